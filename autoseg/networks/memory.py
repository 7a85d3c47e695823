"""Parameter count and training-memory estimate of a :class:`~autoseg.networks.ResidualUNet` (and of the
:class:`~autoseg.networks.AsymmetricResidualUNet` and the PSPNet), without building it.

The planner calls these to fit patch and batch size into a GPU memory budget. All three functions take the
same keyword arguments as :class:`~autoseg.networks.ResidualUNet` (plus ``patch_size``/``batch_size``), so
``count_parameters(**net_kwargs)`` works. Patch sizes are per axis in the array's axis order (X, Y[, Z]).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from autoseg.networks.residual_unet import Shape, validate_architecture

__all__ = [
    "ADAM_BYTES_PER_PARAMETER",
    "CUDA_OVERHEAD_BYTES",
    "count_asymmetric_parameters",
    "count_asymmetric_stored_activations",
    "count_forward_macs",
    "count_parameters",
    "count_stored_activations",
    "estimate_asymmetric_training_memory_bytes",
    "estimate_pspnet_training_memory_bytes",
    "estimate_training_memory_bytes",
    "feature_map_shapes",
]

ADAM_BYTES_PER_PARAMETER = 16
"""fp32 weight, its gradient and Adam's two moments: 4 x 4 bytes."""

CUDA_OVERHEAD_BYTES = 512 * 2**20
"""Fixed 0.5 GiB for what scales with neither patch nor batch: the CUDA context and kernels, cuDNN
workspaces and allocator fragmentation. A rough figure; measure on the target GPU if the budget is tight."""


def feature_map_shapes(*, patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[Shape]:
    """Spatial shape of each resolution stage for one patch.

    Args:
        patch_size: (X, Y, Z) or (X, Y) of the network input.
        strides: per stage, per axis, as for the network.

    Returns:
        One shape per stage, full resolution first; e.g. patch (64, 64, 32) with strides
        ((1, 1, 1), (2, 2, 2), (2, 2, 1)) gives [(64, 64, 32), (32, 32, 16), (16, 16, 16)].

    Raises:
        ValueError: if a stride has a different number of axes than the patch, or does not divide it.
    """
    shape = tuple(int(s) for s in patch_size)
    shapes = []
    for stage, stride in enumerate(strides):
        if len(stride) != len(shape):
            raise ValueError(f"strides[{stage}]={tuple(stride)} has {len(stride)} axes, patch {shape} has {len(shape)}")
        if any(size % s != 0 for size, s in zip(shape, stride)):
            raise ValueError(f"patch size {tuple(patch_size)} is not divisible by the strides down to stage {stage}")
        shape = tuple(size // s for size, s in zip(shape, stride))
        shapes.append(shape)
    return shapes


def _conv(in_channels: int, out_channels: int, kernel_size: Sequence[int]) -> int:
    return in_channels * out_channels * math.prod(kernel_size) + out_channels


def _norm(channels: int) -> int:
    return 2 * channels


def _residual_block(in_channels: int, out_channels: int, kernel_size: Sequence[int]) -> int:
    body = _conv(in_channels, out_channels, kernel_size) + _conv(out_channels, out_channels, kernel_size)
    count = body + 2 * _norm(out_channels)
    if in_channels != out_channels:
        count += _conv(in_channels, out_channels, (1,)) + _norm(out_channels)
    return count


def count_parameters(
    *,
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    deep_supervision: bool = True,
    num_groups: int = 8,
) -> int:
    """Number of parameters of the :class:`~autoseg.networks.ResidualUNet` these arguments build.

    Equal to ``sum(p.numel() for p in net.parameters())``. ``deep_supervision`` and ``num_groups`` do not change
    the count (every head is always built; GroupNorm has 2 parameters per channel whatever the groups); they are
    accepted, and validated, so the network's keyword arguments can be passed unchanged.

    Raises:
        ValueError: as :func:`~autoseg.networks.validate_architecture`.
    """
    blocks = validate_architecture(
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        strides=strides,
        kernel_sizes=kernel_sizes,
        blocks_per_stage=blocks_per_stage,
        num_groups=num_groups,
    )
    count = 0
    widths_in = (in_channels, *features[:-1])
    for width_in, width, kernel, num_blocks in zip(widths_in, features, kernel_sizes, blocks):
        count += _conv(width_in, width, kernel) + _norm(width)
        count += num_blocks * _residual_block(width, width, kernel)
    for level in range(len(features) - 1):
        width = features[level]
        count += _conv(features[level + 1], width, strides[level + 1])  # transposed conv, kernel = stride
        count += _residual_block(2 * width, width, kernel_sizes[level])
        count += _conv(width, num_classes, (1,))  # head
    return count


def _activation_elements_per_sample(
    *,
    voxels: Sequence[int],
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    blocks: Sequence[int],
    deep_supervision: bool,
) -> int:
    """Elements autograd keeps for backward for one sample, given the voxel count of each stage.

    Mirrors what PyTorch saves (LeakyReLU in place, so it stores its output, and GroupNorm its input; a sum and a
    concatenation store nothing, a transposed conv only its input):

    - network input, kept by the first conv: ``in_channels x voxels[0]``;
    - encoder stage ``i``: strided conv output + activation = 2, each residual block 4 (conv1 out, activation,
      conv2 out, activation after the sum): ``(2 + 4 * blocks[i]) x features[i] x voxels[i]``;
    - decoder level ``i``: concatenation (2 x width, kept by conv1 and the skip conv) + residual block with a
      projected skip (conv1 out, activation, conv2 out, skip-conv out, activation) = ``7 x features[i] x voxels[i]``;
      the transposed-conv output is only read by the concatenation and freed;
    - logits of each computed head, which the loss keeps: ``num_classes x voxels[i]``.

    GroupNorm's per-group mean and 1/std (B x groups each) are left out as negligible.
    """
    elements = in_channels * voxels[0]
    for width, voxel_count, num_blocks in zip(features, voxels, blocks):
        elements += (2 + 4 * num_blocks) * width * voxel_count
    for level in range(len(features) - 1):
        elements += 7 * features[level] * voxels[level]
    head_levels = range(len(features) - 1) if deep_supervision else range(1)
    elements += sum(num_classes * voxels[level] for level in head_levels)
    return elements


def estimate_training_memory_bytes(
    *,
    patch_size: Sequence[int],
    batch_size: int,
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    deep_supervision: bool = True,
    bytes_per_activation: int = 2,
    num_groups: int = 8,
) -> int:
    """Estimated peak GPU memory (bytes) of one training step with Adam.

    ``activations x bytes_per_activation x batch_size + parameters x ADAM_BYTES_PER_PARAMETER +
    CUDA_OVERHEAD_BYTES``, where ``activations`` counts, per sample, every element autograd stores for backward
    (conv, GroupNorm and activation outputs, concatenations, network input, head logits; see
    ``_activation_elements_per_sample``).

    Assumptions:
        - ``bytes_per_activation=2``: mixed precision (fp16/bf16) keeps each stored activation in 2 bytes;
          use 4 for fp32. Caveat: CUDA autocast runs ``group_norm`` in fp32, so GroupNorm inputs and the
          LeakyReLU outputs after it are stored in 4 bytes plus a 2-byte copy cast for the next conv; a GroupNorm
          network under CUDA AMP stores nearer 4-5 bytes per counted element, so 2 underestimates.
        - Parameters, gradients and both Adam moments are fp32 (16 bytes per parameter).
        - Transient buffers of the backward pass (gradients of the largest activations, conv workspaces) and the
          CUDA context are covered only by the fixed ``CUDA_OVERHEAD_BYTES`` (0.5 GiB).
        - Tested on CPU: with ``bytes_per_activation=4`` the activation term is within 25% of (in practice
          equal to) the bytes of the tensors saved by autograd in an fp32 forward pass plus the logits.

    Args:
        patch_size: (X, Y, Z) or (X, Y), divisible by the product of the strides per axis.
        batch_size: samples per step, >= 1.
        bytes_per_activation: bytes per stored activation element. Default 2.
        in_channels, num_classes, features, strides, kernel_sizes, blocks_per_stage, deep_supervision,
        num_groups: as for :class:`~autoseg.networks.ResidualUNet`.

    Returns:
        Estimated bytes, an int.

    Raises:
        ValueError: if the architecture is inconsistent, the patch is not divisible by the strides, or
            ``batch_size``/``bytes_per_activation`` is < 1.

    Example:
        >>> net_kwargs = dict(in_channels=1, num_classes=1, features=(32, 64, 128, 256, 320, 320),
        ...                   strides=((1, 1, 1),) + ((2, 2, 2),) * 5, kernel_sizes=((3, 3, 3),) * 6)
        >>> gib = estimate_training_memory_bytes(patch_size=(128, 128, 128), batch_size=2, **net_kwargs) / 2**30
    """
    if batch_size < 1 or bytes_per_activation < 1:
        raise ValueError(f"batch_size and bytes_per_activation must be >= 1, got {batch_size}, {bytes_per_activation}")
    net_kwargs = dict(
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        strides=strides,
        kernel_sizes=kernel_sizes,
        blocks_per_stage=blocks_per_stage,
        num_groups=num_groups,
    )
    blocks = validate_architecture(**net_kwargs)
    voxels = [math.prod(shape) for shape in feature_map_shapes(patch_size=patch_size, strides=strides)]
    activations = _activation_elements_per_sample(
        voxels=voxels,
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        blocks=blocks,
        deep_supervision=deep_supervision,
    )
    parameters = count_parameters(**net_kwargs)
    return activations * bytes_per_activation * batch_size + parameters * ADAM_BYTES_PER_PARAMETER + CUDA_OVERHEAD_BYTES


def count_forward_macs(
    *,
    patch_size: Sequence[int],
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    deep_supervision: bool = True,
    num_groups: int = 8,
) -> int:
    """Multiply-accumulates of one forward pass of one sample through the
    :class:`~autoseg.networks.ResidualUNet` these arguments build (convolutions only).

    A convolution costs ``in x out x prod(kernel)`` MACs per output voxel, a transposed convolution (kernel =
    stride) ``in x out x prod(stride)`` per input voxel; normalization, activations and sums are left out (they are
    memory-bound, and the compute-budget model charges them through :func:`count_stored_activations`). With
    ``deep_supervision`` every decoder level's head is counted, else only the full-resolution one. A training step
    (forward + backward) costs about three times this.

    Raises:
        ValueError: as :func:`~autoseg.networks.validate_architecture`, or a patch the strides do not divide.
    """
    blocks = validate_architecture(
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        strides=strides,
        kernel_sizes=kernel_sizes,
        blocks_per_stage=blocks_per_stage,
        num_groups=num_groups,
    )
    voxels = [math.prod(shape) for shape in feature_map_shapes(patch_size=patch_size, strides=strides)]
    macs = 0
    widths_in = (in_channels, *features[:-1])
    for width_in, width, kernel, count, num_blocks in zip(widths_in, features, kernel_sizes, voxels, blocks):
        taps = math.prod(kernel)
        macs += (width_in * width * taps + num_blocks * 2 * width * width * taps) * count
    for level in range(len(features) - 1):
        width, taps, count = features[level], math.prod(kernel_sizes[level]), voxels[level]
        macs += features[level + 1] * width * count  # transposed conv: prod(stride) outputs per input voxel
        macs += (2 * width * width * taps + width * width * taps + 2 * width * width) * count  # block + 1x1 skip
        if deep_supervision or level == 0:
            macs += width * num_classes * count
    return macs


def count_stored_activations(
    *,
    patch_size: Sequence[int],
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    deep_supervision: bool = True,
    num_groups: int = 8,
) -> int:
    """Elements autograd stores for backward in one training step of one sample (the activation term of
    :func:`estimate_training_memory_bytes`, before bytes and batch)."""
    blocks = validate_architecture(
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        strides=strides,
        kernel_sizes=kernel_sizes,
        blocks_per_stage=blocks_per_stage,
        num_groups=num_groups,
    )
    voxels = [math.prod(shape) for shape in feature_map_shapes(patch_size=patch_size, strides=strides)]
    return _activation_elements_per_sample(
        voxels=voxels,
        in_channels=in_channels,
        num_classes=num_classes,
        features=features,
        blocks=blocks,
        deep_supervision=deep_supervision,
    )


#: ResNet layouts: block type and blocks per layer (torchvision's resnet18/34/50).
_RESNETS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}
#: Backbone parameters (torchvision's ResNets without the classifier).
_RESNET_PARAMETERS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}


def estimate_pspnet_training_memory_bytes(
    *,
    patch_size: Sequence[int],
    batch_size: int,
    in_channels: int,
    num_classes: int,
    backbone: str = "resnet50",
    bytes_per_activation: int = 2,
) -> int:
    """Training memory of a 2D PSPNet (dilated ResNet at output stride 8, pyramid pooling 1/2/3/6).

    Counts three stored tensors per convolution (its output, the normalized output and the
    activation), per stage of the dilated ResNet: the stem at 1/2 and 1/4 of the (X, Y) patch, layer1
    at 1/4, layers 2-4 at 1/8. Parameters cost 16 bytes each (weights, gradients, two optimizer
    moments) and ``CUDA_OVERHEAD_BYTES`` is added once, as in ``estimate_training_memory_bytes``.

    Args:
        patch_size: (X, Y) slice size in pixels.
        backbone: ``resnet18``, ``resnet34`` or ``resnet50``.
    """
    if backbone not in _RESNETS:
        raise ValueError(f"unknown backbone '{backbone}'; use one of {sorted(_RESNETS)}")
    block, depths = _RESNETS[backbone]
    pixels = float(math.prod(patch_size))
    expansion = 4 if block == "bottleneck" else 1
    elements = 3 * pixels * (in_channels + 3) + 3 * 64 * pixels / 4 + 64 * pixels / 16  # initializer, stem, max-pool
    for layer, (depth, width) in enumerate(zip(depths, (64, 128, 256, 512))):
        scale = pixels / (16 if layer == 0 else 64)
        per_block = 3 * width * scale * (2 if block == "basic" else 2 + expansion)
        elements += depth * per_block + 3 * width * expansion * scale  # plus the projection shortcut
    features = 512 * expansion
    elements += (2 * features + 4 * features // 4) * pixels / 64 * 2  # pyramid branches and concatenation
    elements += 4 * 512 * pixels / 64 + 2 * num_classes * pixels  # head at 1/8 and the upsampled logits
    parameters = _RESNET_PARAMETERS[backbone] + features * features + 2 * features * 512 * 9 + 512 * num_classes
    return int(elements * bytes_per_activation * batch_size + 16 * parameters + CUDA_OVERHEAD_BYTES)


# ---------------------------------------------------------------------------- the asymmetric residual U-Net
def _asymmetric_blocks(kwargs: dict) -> tuple[int, ...]:
    from autoseg.networks.asymmetric_unet import asymmetric_blocks_per_stage

    blocks = kwargs.pop("blocks_per_stage", None)
    return validate_architecture(
        **kwargs, blocks_per_stage=asymmetric_blocks_per_stage(len(kwargs["features"])) if blocks is None else blocks
    )


def _encoder_block_parameters(in_channels: int, out_channels: int, kernel_size: Sequence[int]) -> int:
    """A residual block's parameters (:func:`_residual_block`) plus its two per-channel PReLUs."""
    return _residual_block(in_channels, out_channels, kernel_size) + 2 * out_channels


def count_asymmetric_parameters(
    *,
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    num_groups: int = 8,
) -> tuple[int, int]:
    """(encoder, decoder) parameters of the :class:`~autoseg.networks.AsymmetricResidualUNet` these arguments build;
    the decoder's include the 1x1 head. Their sum equals ``sum(p.numel() for p in net.parameters())``.

    Raises:
        ValueError: as :func:`~autoseg.networks.validate_architecture`.
    """
    blocks = _asymmetric_blocks(
        dict(
            in_channels=in_channels,
            num_classes=num_classes,
            features=features,
            strides=strides,
            kernel_sizes=kernel_sizes,
            blocks_per_stage=blocks_per_stage,
            num_groups=num_groups,
        )
    )
    encoder = decoder = 0
    for i, (width, kernel, count) in enumerate(zip(features, kernel_sizes, blocks)):
        if i == 0:  # conv + GN + PReLU
            encoder += _conv(in_channels, width, kernel) + _norm(width) + width
            width_in = width
        else:  # the strided conv branch of the downsampling (+ GN + PReLU); max-pooling has no parameters
            previous = features[i - 1]
            encoder += _conv(previous, previous, kernel) + _norm(previous) + previous
            width_in = 2 * previous
        encoder += _encoder_block_parameters(width_in, width, kernel)
        encoder += (count - 1) * _encoder_block_parameters(width, width, kernel)
    for level in range(len(features) - 1):
        width = features[level]
        decoder += _conv(features[level + 1], width, kernel_sizes[level + 1])  # transposed conv
        decoder += _conv(width, width, kernel_sizes[level]) + _norm(width) + width
    decoder += _conv(features[0], num_classes, (1,))
    return encoder, decoder


def count_asymmetric_stored_activations(
    *,
    patch_size: Sequence[int],
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    num_groups: int = 8,
) -> int:
    """Elements autograd stores for backward in one training step of one sample of the
    :class:`~autoseg.networks.AsymmetricResidualUNet`, counted as 4-byte elements.

    Mirrors what PyTorch saves (a conv its input, GroupNorm its input, PReLU its input, max-pooling its input and
    int64 indices; a sum and a concatenation nothing, so their inputs are freed unless another op keeps them):

    - network input: ``in_channels x voxels[0]``; stage 0's conv, GN and PReLU outputs: ``3 x features[0] x voxels[0]``;
    - downsampling into stage ``i``: conv and GN outputs ``2 x features[i-1] x voxels[i]``, the max-pooling's indices
      (8 bytes: 2 elements each) ``2 x features[i-1] x voxels[i]``, the concatenation ``2 x features[i-1] x voxels[i]``;
    - each encoder block: conv1, GN1, PReLU1, conv2 outputs, the sum before the last PReLU and that PReLU's output,
      ``6 x features[i] x voxels[i]``, plus the skip conv's output ``features[i] x voxels[i]`` where it projects;
    - decoder level ``i``: the sum with the skip (kept by the conv), conv output, the sum before PReLU and the PReLU
      output: ``4 x features[i] x voxels[i]`` (the transposed conv's output is only summed, then freed);
    - the logits, which the loss keeps: ``num_classes x voxels[0]``.

    GroupNorm's per-group statistics are left out as negligible.
    """
    blocks = _asymmetric_blocks(
        dict(
            in_channels=in_channels,
            num_classes=num_classes,
            features=features,
            strides=strides,
            kernel_sizes=kernel_sizes,
            blocks_per_stage=blocks_per_stage,
            num_groups=num_groups,
        )
    )
    voxels = [math.prod(shape) for shape in feature_map_shapes(patch_size=patch_size, strides=strides)]
    elements = in_channels * voxels[0] + 3 * features[0] * voxels[0] + num_classes * voxels[0]
    for i, (width, count, voxel_count) in enumerate(zip(features, blocks, voxels)):
        width_in = width
        if i > 0:
            width_in = 2 * features[i - 1]
            elements += 6 * features[i - 1] * voxel_count
        elements += (6 * count + (width_in != width)) * width * voxel_count
    elements += sum(4 * features[level] * voxels[level] for level in range(len(features) - 1))
    return elements


def estimate_asymmetric_training_memory_bytes(
    *,
    patch_size: Sequence[int],
    batch_size: int,
    bytes_per_activation: int = 2,
    **net_kwargs: object,
) -> int:
    """Estimated peak GPU memory (bytes) of one training step of the
    :class:`~autoseg.networks.AsymmetricResidualUNet` ``net_kwargs`` build, as
    :func:`estimate_training_memory_bytes` does for the :class:`~autoseg.networks.ResidualUNet`:
    ``activations x bytes_per_activation x batch_size + parameters x ADAM_BYTES_PER_PARAMETER +
    CUDA_OVERHEAD_BYTES`` with the activations of :func:`count_asymmetric_stored_activations` (same assumptions; an
    optimizer with two moments per parameter such as Adam or Adadelta).

    Raises:
        ValueError: an inconsistent architecture, a patch the strides do not divide, or ``batch_size`` /
            ``bytes_per_activation`` < 1.
    """
    if batch_size < 1 or bytes_per_activation < 1:
        raise ValueError(f"batch_size and bytes_per_activation must be >= 1, got {batch_size}, {bytes_per_activation}")
    activations = count_asymmetric_stored_activations(patch_size=patch_size, **net_kwargs)
    parameters = sum(count_asymmetric_parameters(**net_kwargs))
    return activations * bytes_per_activation * batch_size + parameters * ADAM_BYTES_PER_PARAMETER + CUDA_OVERHEAD_BYTES
