"""Networks built from the numbers in the plans, and their memory model for the planner.

- :func:`build_network`: the one way to get the network a configuration plans (training, prediction, export).

- :class:`ResidualUNet`: residual U-Net with GroupNorm, 2D or 3D, optional deep supervision.
- :class:`AsymmetricResidualUNet`: the acute stroke paper's U-Net (75% of the parameters in the encoder, PReLU,
  max-pooling ‖ strided-conv downsampling), from the same numbers.
- :class:`PSPNet`: 2D PSPNet (initializer, dilated torchvision-layout ResNet, pyramid pooling) for fine-tuning.
- :func:`count_parameters`, :func:`estimate_training_memory_bytes`, :func:`feature_map_shapes`: what the
  planner needs to fit patch and batch size into a GPU memory budget without building the network.
"""

from autoseg.networks.asymmetric_unet import AsymmetricResidualUNet
from autoseg.networks.factory import NETWORK_CLASSES, build_network
from autoseg.networks.memory import (
    ADAM_BYTES_PER_PARAMETER,
    CUDA_OVERHEAD_BYTES,
    count_asymmetric_parameters,
    count_asymmetric_stored_activations,
    count_forward_macs,
    count_parameters,
    count_stored_activations,
    estimate_asymmetric_training_memory_bytes,
    estimate_training_memory_bytes,
    feature_map_shapes,
)
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
    "count_asymmetric_parameters",
    "count_asymmetric_stored_activations",
    "estimate_asymmetric_training_memory_bytes",
    "CUDA_OVERHEAD_BYTES",
    "PSPNet",
    "count_forward_macs",
    "count_stored_activations",
    "PretrainedReport",
    "ResidualBlock",
    "ResidualUNet",
    "Shape",
    "count_parameters",
    "default_blocks_per_stage",
    "estimate_training_memory_bytes",
    "feature_map_shapes",
    "validate_architecture",
]
