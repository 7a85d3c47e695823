"""The one way to get a network: :func:`build_network` builds the untrained network a configuration plans, for
training, prediction, export and pre-training alike.

A trainer may build another network from the same numbers (``AcuteStrokeTrainer``: the asymmetric U-Net from a
``ResidualUNet`` plan) or add an auxiliary head (``PSPNetTrainer``); it says so through
``Trainer.network_options()``, which the caller (the trainer itself, or ``autoseg_predict`` after resolving the
trainer class of a run folder) passes in here.
"""

from __future__ import annotations

from torch import nn

from autoseg.errors import UsageError
from autoseg.networks.asymmetric_unet import AsymmetricResidualUNet
from autoseg.networks.pspnet import PSPNet
from autoseg.networks.residual_unet import ResidualUNet
from autoseg.plans import Plans

__all__ = ["NETWORK_CLASSES", "build_network"]

#: What :func:`build_network` can build, and the plan architecture each is built from.
NETWORK_CLASSES = {"ResidualUNet": "ResidualUNet", "AsymmetricResidualUNet": "ResidualUNet", "PSPNet": "PSPNet"}


def build_network(
    plans: Plans, configuration: str, *, network_class: str | None = None, auxiliary_head: bool = False
) -> nn.Module:
    """The untrained network of ``configuration`` of ``plans``, on the CPU.

    Input channels are the plans' channels (times 2 or 3 for a symmetric configuration); outputs one sigmoid
    channel per foreground label.

    Args:
        plans: the dataset's plans.
        configuration: a configuration of the plans.
        network_class: one of :data:`NETWORK_CLASSES`; default the plan's ``network.architecture``. It must be
            built from that architecture's numbers.
        auxiliary_head: PSPNet only: the auxiliary head on ``layer3`` (its weights are in checkpoints of a
            trainer that trains with it).

    Raises:
        UsageError: an unknown network class, or one that is not built from the plan's architecture.
    """
    chosen = plans.configuration(configuration)
    network = chosen.network
    name = network_class or network.architecture
    if NETWORK_CLASSES.get(name) != network.architecture:
        raise UsageError(
            f"configuration '{chosen.name}' plans a {network.architecture}; a {name} is not built from "
            f"its numbers (buildable: {', '.join(k for k, v in NETWORK_CLASSES.items() if v == network.architecture)})"
        )
    in_channels = chosen.input_channels(len(plans.channels))
    num_classes = sum(1 for value in plans.labels.values() if value != 0)
    if name == "PSPNet":
        return PSPNet(
            in_channels=in_channels,
            num_classes=num_classes,
            backbone=network.backbone or "resnet50",
            pyramid_bins=network.pyramid_bins or (1, 2, 3, 6),
            output_stride=network.output_stride or 8,
            aux_head=auxiliary_head,
        )
    if name == "AsymmetricResidualUNet":
        return AsymmetricResidualUNet(
            in_channels=in_channels,
            num_classes=num_classes,
            features=network.features,
            strides=network.strides,
            kernel_sizes=network.kernel_sizes,
        )
    levels = len(network.features) - 1
    return ResidualUNet(
        in_channels=in_channels,
        num_classes=num_classes,
        features=network.features,
        strides=network.strides,
        kernel_sizes=network.kernel_sizes,
        deep_supervision=network.deep_supervision and levels > 1,
    )
