"""The one way to get a network: :func:`build_network` builds the untrained network a configuration plans, for
training, prediction, export and pre-training alike.

A trainer may build another network from the same numbers (``AcuteStrokeTrainer``: the asymmetric U-Net from a
``ResidualUNet`` plan) or add an auxiliary head (``PSPNetTrainer``); it says so through
``Trainer.network_options()``, which the trainer passes in here and writes into every checkpoint it saves
(:data:`NETWORK_OPTIONS_KEY`). Prediction, export and import rebuild a run's network from its checkpoint
(:func:`checkpoint_network_options`), never from the trainer class; a checkpoint from before runs recorded them
gets the options of its trainer's name in :data:`BUILT_IN_NETWORK_OPTIONS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from autoseg.errors import InvalidFileError, UsageError
from autoseg.networks.asymmetric_unet import AsymmetricResidualUNet
from autoseg.networks.pspnet import PSPNet
from autoseg.networks.residual_unet import ResidualUNet
from autoseg.plans import Plans

__all__ = [
    "BUILT_IN_NETWORK_OPTIONS",
    "NETWORK_CLASSES",
    "NETWORK_OPTIONS_KEY",
    "WeightLayout",
    "build_network",
    "checkpoint_network_options",
    "expected_weights",
    "layout_bytes",
    "weight_mismatches",
    "weights_problem",
]

WeightLayout = dict[str, tuple[tuple[int, ...], torch.dtype]]
"""A network's state dict without its values: name -> (shape, dtype)."""

#: What :func:`build_network` can build, and the plan architecture each is built from.
NETWORK_CLASSES = {"ResidualUNet": "ResidualUNet", "AsymmetricResidualUNet": "ResidualUNet", "PSPNet": "PSPNet"}
#: The checkpoint key that holds the keyword arguments of :func:`build_network` the run's network was built with
#: (its trainer's ``network_options()``): a dict of str to str or bool, ``{}`` for the plan's own network.
NETWORK_OPTIONS_KEY = "network_options"
#: The ``network_options()`` of the built-in trainers whose network is not the plan's own, by trainer name: what a
#: checkpoint written before checkpoints recorded :data:`NETWORK_OPTIONS_KEY` (and a model file exported from one)
#: was trained with. Every other trainer name gets ``{}``. Fixed: the trainers' own ``network_options()`` must
#: agree with it (``tests/test_training.py``), and a new trainer records its options in its checkpoints instead.
BUILT_IN_NETWORK_OPTIONS: dict[str, dict[str, str | bool]] = {
    "AcuteStrokeTrainer": {"network_class": "AsymmetricResidualUNet"},
    "PSPNetTrainer": {"auxiliary_head": True},
    "PSPNetCETrainer": {"auxiliary_head": True},
}
#: The keyword arguments of :func:`build_network` a checkpoint may record, and their types.
_OPTION_TYPES = {"network_class": str, "auxiliary_head": bool}


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
        layout=network.layout,
    )


def checkpoint_network_options(
    state: Mapping[str, object], trainer: str, where: str | Path = "checkpoint"
) -> dict[str, str | bool]:
    """The keyword arguments of :func:`build_network` that rebuild the network of a checkpoint: those it recorded
    under :data:`NETWORK_OPTIONS_KEY`, else (a checkpoint from before they were recorded) its ``trainer``'s in
    :data:`BUILT_IN_NETWORK_OPTIONS`, else none.

    Args:
        state: the checkpoint (:func:`autoseg.io.checkpoints.load_checkpoint`), or a model file manifest's record.
        trainer: the run's trainer name (its folder name), for a checkpoint without a record.
        where: what the error message names first (the checkpoint's path).

    Example:
        >>> checkpoint_network_options({"network": {}}, "AcuteStrokeTrainer")
        {'network_class': 'AsymmetricResidualUNet'}

    Raises:
        InvalidFileError: the record is not a dict of known options of the right types (the message names
            ``where`` and says what it holds).
    """
    if NETWORK_OPTIONS_KEY not in state:
        return dict(BUILT_IN_NETWORK_OPTIONS.get(trainer, {}))
    options = state[NETWORK_OPTIONS_KEY]
    if not isinstance(options, dict) or not all(
        isinstance(value, _OPTION_TYPES.get(key, ())) for key, value in options.items()
    ):
        allowed = ", ".join(f"{key} ({kind.__name__})" for key, kind in _OPTION_TYPES.items())
        raise InvalidFileError(f"{where}: {NETWORK_OPTIONS_KEY} may hold only {allowed}, found {options!r}")
    return dict(options)


def expected_weights(plans: Plans, configuration: str, **options: object) -> WeightLayout:
    """Names, shapes and dtypes of the state dict of :func:`build_network` ``(plans, configuration, **options)``,
    built on the meta device: nothing is allocated, so a plan asking for a huge network costs nothing here.

    Raises:
        UsageError, ValueError: see :func:`build_network` and the network's own checks.
    """
    with torch.device("meta"), _initializers_skipped():
        network = build_network(plans, configuration, **options)
    return {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in network.state_dict().items()}


#: ``torch.nn.init`` functions, no-ops while a network is built on the meta device (:func:`_initializers_skipped`).
_INITIALIZERS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "constant_",
    "ones_",
    "zeros_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
)


@contextmanager
def _initializers_skipped() -> Iterator[None]:
    """``torch.nn.init``'s initializers as no-ops: a meta tensor has no values to draw, and PyTorch's meta
    ``normal_`` imports ``torch._dynamo`` the first time (seconds, for nothing). Not thread-safe: the functions are
    replaced module-wide while the block runs."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALIZERS}
    try:
        for name in _INITIALIZERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def layout_bytes(layout: WeightLayout) -> int:
    """Bytes the tensors of ``layout`` hold."""
    return sum(
        int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size() for shape, dtype in layout.values()
    )


def weight_mismatches(expected: WeightLayout, weights: object) -> list[str]:
    """Where ``weights`` (a state dict) does not fit ``expected`` (:func:`expected_weights`): tensors missing or
    unexpected, and those of another shape or dtype, one line each (``NAME: shape [..] float32, the network
    has [..] float32``); empty when they fit."""
    if not isinstance(weights, dict):
        return [f"not a state dict but {type(weights).__name__}"]
    found = [f"{name}: missing" for name in expected if name not in weights]
    found += [f"{name}: not in the network" for name in weights if name not in expected]
    for name, value in weights.items():
        if name not in expected:
            continue
        shape, dtype = expected[name]
        if not isinstance(value, torch.Tensor):
            found.append(f"{name}: {type(value).__name__}, not a tensor")
        elif (tuple(value.shape), value.dtype) != (shape, dtype):
            found.append(
                f"{name}: shape {list(value.shape)} {str(value.dtype).removeprefix('torch.')}, the network has "
                f"{list(shape)} {str(dtype).removeprefix('torch.')}"
            )
    return found


def weights_problem(expected: WeightLayout, weights: object) -> str | None:
    """The first of :func:`weight_mismatches` with how many more there are (``NAME: ... (and 3 more)``), or None
    when ``weights`` fit ``expected``."""
    found = weight_mismatches(expected, weights)
    if not found:
        return None
    return found[0] + (f" (and {len(found) - 1} more)" if len(found) > 1 else "")
