"""Networks built from the numbers in the plans; each counts its own cost for the planner.

- :func:`build_network`: the one way to get the network a configuration plans (training, prediction, export).

- :class:`ResidualUNet`: residual U-Net with GroupNorm, 2D or 3D, optional deep supervision.
- :class:`AsymmetricResidualUNet`: the acute stroke paper's U-Net (75% of the parameters in the encoder, PReLU,
  max-pooling ‖ strided-conv downsampling), from the same numbers.
- :class:`PSPNet`: 2D PSPNet (initializer, dilated torchvision-layout ResNet, pyramid pooling) for fine-tuning.
- Their cost, beside their ``forward``: ``stored_activations(input_size)`` (elements autograd keeps for backward,
  each block counting its own), ``training_memory_bytes(...)`` and, for the residual U-Net, ``forward_macs``.
  :func:`on_meta` builds a network on the meta device (no memory) for the planner to ask;
  :func:`feature_map_shapes` and the byte constants are in :mod:`autoseg.networks.cost`.
"""

from autoseg.networks.asymmetric_unet import AsymmetricResidualUNet
from autoseg.networks.cost import (
    ADAM_BYTES_PER_PARAMETER,
    CUDA_OVERHEAD_BYTES,
    CountsItsCost,
    feature_map_shapes,
    on_meta,
    parameter_count,
)
from autoseg.networks.factory import NETWORK_CLASSES, build_network
from autoseg.networks.pspnet import PretrainedReport, PSPNet
from autoseg.networks.residual_unet import (
    ResidualBlock,
    ResidualUNet,
    Shape,
    default_blocks_per_stage,
    validate_architecture,
)

__all__ = [
    "NETWORK_CLASSES",
    "build_network",
    "ADAM_BYTES_PER_PARAMETER",
    "AsymmetricResidualUNet",
    "CountsItsCost",
    "CUDA_OVERHEAD_BYTES",
    "PSPNet",
    "PretrainedReport",
    "ResidualBlock",
    "ResidualUNet",
    "Shape",
    "default_blocks_per_stage",
    "feature_map_shapes",
    "on_meta",
    "parameter_count",
    "validate_architecture",
]
