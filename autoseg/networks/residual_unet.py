"""Residual U-Net with GroupNorm, built only from the numbers in the plans.

Architecture (after the 3D residual U-Net for chronic stroke lesions, residual blocks with GroupNorm because
the batch is small, laid out like dynamic-network-architectures' ``PlainConvUNet``), in one of two layouts:

- ``"residual"`` (every plan written before 2026-12-07, and the default):
  - encoder stage ``i``: a strided conv (kernel ``kernel_sizes[i]``, stride ``strides[i]``) -> GroupNorm ->
    LeakyReLU, then ``blocks_per_stage[i]`` residual blocks of width ``features[i]``;
  - decoder level ``i`` (from the coarsest up to ``0``): a transposed conv with kernel = stride =
    ``strides[i + 1]`` that undoes the downsampling into stage ``i + 1``, concatenation with the encoder output
    of stage ``i``, one residual block back to ``features[i]`` channels, and a 1x1 segmentation head.
- ``"residual_encoder"`` (nnU-Net's ``ResidualEncoderUNet`` layout, Isensee et al., "nnU-Net Revisited", MICCAI
  2024; ResNet's downsampling, He et al., CVPR 2016):
  - a stem conv -> GroupNorm -> LeakyReLU to ``features[0]``, then ``blocks_per_stage[0]`` residual blocks;
  - encoder stage ``i >= 1``: ``blocks_per_stage[i]`` residual blocks, the first of which downsamples (its first
    conv has stride ``strides[i]``, its skip a 1x1 conv with that stride + GroupNorm);
  - decoder level ``i``: the transposed conv and the concatenation as above, then one conv -> GroupNorm ->
    LeakyReLU back to ``features[i]`` channels, and the head.

  At equal features it does about 3/4 of the ``"residual"`` layout's multiply-accumulates (1.1 times nnU-Net's
  ``PlainConvUNet``'s against 1.47 at the default 2 mm plan): one full-width conv fewer per lower encoder stage and
  per decoder level.

Shapes are written ``(B, C, X, Y, Z)`` for a batch of 3D images and ``(B, C, X, Y)`` in 2D; every per-axis
sequence (strides, kernel sizes, patch size) is in the same axis order as the array.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.cost import CountsItsCost, conv_macs, conv_output_size, elements, feature_map_shapes
from autoseg.networks.normalization import GroupNorm
from autoseg.plans import UNET_LAYOUTS

__all__ = [
    "Shape",
    "ResidualBlock",
    "ResidualUNet",
    "default_blocks_per_stage",
    "validate_architecture",
]

Shape = tuple[int, ...]
"""Per-axis integers (a stride, a kernel size, a spatial shape) in the array's axis order (X, Y[, Z])."""

LEAKY_RELU_SLOPE = 1e-2

_CONV_OPS: dict[int, tuple[type[nn.Module], type[nn.Module]]] = {
    2: (nn.Conv2d, nn.ConvTranspose2d),
    3: (nn.Conv3d, nn.ConvTranspose3d),
}


def default_blocks_per_stage(num_stages: int) -> tuple[int, ...]:
    """Residual blocks per encoder stage when the plans give none: 1 at full resolution, 2 below it."""
    return (1,) + (2,) * (num_stages - 1)


def validate_architecture(
    *,
    in_channels: int,
    num_classes: int,
    features: Sequence[int],
    strides: Sequence[Sequence[int]],
    kernel_sizes: Sequence[Sequence[int]],
    blocks_per_stage: Sequence[int] | None = None,
    num_groups: int = 8,
    layout: str = UNET_LAYOUTS[0],
) -> tuple[int, ...]:
    """Check the numbers that define a :class:`ResidualUNet`; shared by the networks built from these numbers.

    Returns:
        ``blocks_per_stage`` as a tuple, the default (:func:`default_blocks_per_stage`) filled in when None.

    Raises:
        ValueError: naming the first argument that is inconsistent, and why.
    """
    num_stages = len(features)
    if in_channels < 1 or num_classes < 1:
        raise ValueError(f"in_channels and num_classes must be >= 1, got {in_channels} and {num_classes}")
    if num_stages < 2:
        raise ValueError(f"a U-Net needs at least 2 resolution stages, got features={list(features)}")
    if layout not in UNET_LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(UNET_LAYOUTS)}, got {layout!r}")
    if not len(strides) == len(kernel_sizes) == num_stages:
        raise ValueError(
            "features, strides and kernel_sizes must have one entry per stage, got lengths "
            f"{num_stages}, {len(strides)} and {len(kernel_sizes)}"
        )
    _check_per_axis(strides, kernel_sizes)
    _check_widths(features, num_groups)
    blocks = default_blocks_per_stage(num_stages) if blocks_per_stage is None else tuple(blocks_per_stage)
    if len(blocks) != num_stages or any(b < 1 for b in blocks):
        raise ValueError(f"blocks_per_stage must hold {num_stages} integers >= 1, got {list(blocks)}")
    return blocks


def _check_per_axis(strides: Sequence[Sequence[int]], kernel_sizes: Sequence[Sequence[int]]) -> None:
    dim = len(strides[0])
    if dim not in _CONV_OPS:
        raise ValueError(f"strides[0] must have 2 (2D) or 3 (3D) entries, got {tuple(strides[0])}")
    if any(s != 1 for s in strides[0]):
        raise ValueError(f"strides[0] must be all ones so the logits keep the input resolution, got {strides[0]}")
    for name, values in (("strides", strides), ("kernel_sizes", kernel_sizes)):
        for stage, per_axis in enumerate(values):
            if len(per_axis) != dim:
                raise ValueError(f"{name}[{stage}]={tuple(per_axis)} has {len(per_axis)} axes, expected {dim}")
            if any(v < 1 for v in per_axis):
                raise ValueError(f"{name}[{stage}]={tuple(per_axis)} must be positive")
    for stage, kernel in enumerate(kernel_sizes):
        if any(k % 2 == 0 for k in kernel):
            raise ValueError(f"kernel_sizes[{stage}]={tuple(kernel)} must be odd so 'same' padding keeps the shape")


def _check_widths(features: Sequence[int], num_groups: int) -> None:
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    for stage, width in enumerate(features):
        if width < 1 or width % min(num_groups, width) != 0:
            raise ValueError(
                f"features[{stage}]={width} must be positive and divisible by min(num_groups={num_groups}, {width})"
            )


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return GroupNorm(min(num_groups, channels), channels)


def _same_padding(kernel_size: Sequence[int]) -> Shape:
    return tuple(k // 2 for k in kernel_size)


class ConvNormAct(nn.Sequential):
    """conv -> GroupNorm -> LeakyReLU; used as the (strided) first conv of every encoder stage.

    Input (B, in_channels, X, Y, Z), output (B, out_channels, X / sx, Y / sy, Z / sz).
    """

    def __init__(
        self,
        *,
        conv_op: type[nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        num_groups: int,
    ) -> None:
        super().__init__(
            conv_op(
                in_channels, out_channels, tuple(kernel_size), stride=tuple(stride), padding=_same_padding(kernel_size)
            ),
            _group_norm(out_channels, num_groups),
            nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True),
        )

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample of spatial ``input_size`` (X, Y[, Z]) leaves stored for backward: the conv's output
        (kept by GroupNorm) and the in-place LeakyReLU's output (kept by it and the next conv). The input is counted
        by whatever made it."""
        return 2 * elements(self[0].out_channels, conv_output_size(self[0], input_size))

    def forward_macs(self, input_size: Sequence[int]) -> int:
        """Multiply-accumulates of one sample of spatial ``input_size`` (the conv's; GroupNorm and LeakyReLU are
        left out)."""
        return conv_macs(self[0], input_size)


class ResidualBlock(nn.Module):
    """conv-GN-LeakyReLU-conv-GN, plus a skip, then LeakyReLU.

    The skip is the identity when width and stride are unchanged, else a 1x1(x1) conv (with the stride) + GN.

    Args:
        conv_op: ``nn.Conv2d`` or ``nn.Conv3d``.
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: per-axis kernel of both convs (odd).
        stride: per-axis stride of the first conv and the skip; defaults to all ones.
        num_groups: GroupNorm groups, capped at the channel count.

    Input (B, in_channels, X, Y, Z), output (B, out_channels, X / sx, Y / sy, Z / sz).
    """

    def __init__(
        self,
        *,
        conv_op: type[nn.Module],
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int] | None = None,
        num_groups: int = 8,
    ) -> None:
        super().__init__()
        stride = tuple(stride) if stride is not None else (1,) * len(kernel_size)
        padding = _same_padding(kernel_size)
        self.conv1 = conv_op(in_channels, out_channels, tuple(kernel_size), stride=stride, padding=padding)
        self.norm1 = _group_norm(out_channels, num_groups)
        self.act1 = nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True)
        self.conv2 = conv_op(out_channels, out_channels, tuple(kernel_size), padding=padding)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels or any(s != 1 for s in stride):
            self.skip = nn.Sequential(
                conv_op(in_channels, out_channels, 1, stride=stride), _group_norm(out_channels, num_groups)
            )
        # In place: the sum is a fresh tensor nobody else keeps, and autograd then stores one tensor, not two.
        self.act2 = nn.LeakyReLU(LEAKY_RELU_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(residual + self.skip(x))

    @property
    def projects(self) -> bool:
        """Whether the skip is a 1x1 conv + GN (True) or the identity."""
        return not isinstance(self.skip, nn.Identity)

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample of spatial ``input_size`` (X, Y[, Z]) leaves stored for backward, as PyTorch saves
        them (GroupNorm keeps its input, the in-place LeakyReLU its output, a sum nothing): conv1's output, act1's,
        conv2's, the projecting skip conv's where there is one, and act2's after the sum, each
        ``out_channels x output voxels``. The input is counted by whatever made it."""
        output = conv_output_size(self.conv1, input_size)
        return (4 + self.projects) * elements(self.conv1.out_channels, output)

    def forward_macs(self, input_size: Sequence[int]) -> int:
        """Multiply-accumulates of one sample of spatial ``input_size``: both convs and the projecting skip conv."""
        macs = conv_macs(self.conv1, input_size) + conv_macs(self.conv2, conv_output_size(self.conv1, input_size))
        return macs + (conv_macs(self.skip[0], input_size) if self.projects else 0)


class DecoderStage(nn.Module):
    """Transposed conv (kernel = stride), concatenation with the skip, then one residual block (``residual=True``)
    or one conv -> GroupNorm -> LeakyReLU (``residual=False``, nnU-Net's decoder) back to ``out_channels``.

    Input ``x`` (B, C_coarse, X / s, ...) and ``skip`` (B, C, X, ...); output (B, C, X, ...).
    """

    def __init__(
        self,
        *,
        conv_op: type[nn.Module],
        transposed_conv_op: type[nn.Module],
        in_channels: int,
        out_channels: int,
        stride: Sequence[int],
        kernel_size: Sequence[int],
        num_groups: int,
        residual: bool = True,
    ) -> None:
        super().__init__()
        self.upsample = transposed_conv_op(in_channels, out_channels, tuple(stride), stride=tuple(stride))
        block = ResidualBlock if residual else ConvNormAct
        self.block = block(
            conv_op=conv_op,
            in_channels=2 * out_channels,
            out_channels=out_channels,
            kernel_size=kernel_size,
            stride=(1,) * len(kernel_size),
            num_groups=num_groups,
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.block(torch.cat((self.upsample(x), skip), dim=1))

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample whose coarse input ``x`` has spatial ``input_size`` leaves stored for backward: the
        concatenation (kept by the block's first conv and skip conv) and the block's own. The transposed conv's
        output is only read by the concatenation and freed; its input and the skip are counted where they are made."""
        fine = conv_output_size(self.upsample, input_size)
        return elements(2 * self.upsample.out_channels, fine) + self.block.stored_activations(fine)

    def forward_macs(self, input_size: Sequence[int]) -> int:
        """Multiply-accumulates of one sample whose coarse input has spatial ``input_size``: the transposed conv
        and the block."""
        fine = conv_output_size(self.upsample, input_size)
        return conv_macs(self.upsample, input_size) + self.block.forward_macs(fine)


class ResidualUNet(CountsItsCost, nn.Module):
    """Residual U-Net with GroupNorm for 2D or 3D segmentation, defined by per-stage numbers only.

    Args:
        in_channels: input channels (modalities), C of the input.
        num_classes: output channels; 1 for a binary lesion task read through a sigmoid, else one per class
            (softmax). Any value >= 1.
        features: width of each resolution stage, full resolution first, e.g. ``(32, 64, 128, 256, 320, 320)``.
        strides: per stage, per axis: the downsampling into that stage. ``strides[0]`` must be all ones; its
            length (2 or 3) sets the dimension and so the conv ops.
        kernel_sizes: per stage, per axis, odd; e.g. ``(1, 3, 3)`` where the first axis is much coarser.
        deep_supervision: if True, :meth:`forward` returns logits at every decoder level; switch it off for
            inference with the :attr:`deep_supervision` setter (all heads are always built, so a checkpoint
            loads either way).
        num_groups: GroupNorm groups, capped at each stage's width, which it must divide. Default 8.
        blocks_per_stage: residual blocks per encoder stage; default ``(1, 2, 2, ...)``. In the
            ``"residual_encoder"`` layout the downsampling block of a stage is one of them.
        layout: ``"residual"`` (default) or ``"residual_encoder"``: where the network downsamples and what each
            decoder level does (module doc). It changes the weights' names, so a checkpoint loads only into its
            own layout.

    Raises:
        ValueError: if the numbers are inconsistent (see :func:`validate_architecture`).

    Example:
        >>> net = ResidualUNet(in_channels=1, num_classes=1, features=(8, 16, 32),
        ...                    strides=((1, 1, 1), (2, 2, 2), (2, 2, 1)), kernel_sizes=((3, 3, 3),) * 3)
        >>> [tuple(o.shape) for o in net(torch.zeros(2, 1, 16, 16, 8))]
        [(2, 1, 16, 16, 8), (2, 1, 8, 8, 4)]
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
        deep_supervision: bool = True,
        num_groups: int = 8,
        blocks_per_stage: Sequence[int] | None = None,
        layout: str = UNET_LAYOUTS[0],
    ) -> None:
        super().__init__()
        blocks = validate_architecture(
            in_channels=in_channels,
            num_classes=num_classes,
            features=features,
            strides=strides,
            kernel_sizes=kernel_sizes,
            blocks_per_stage=blocks_per_stage,
            num_groups=num_groups,
            layout=layout,
        )
        self.layout = layout
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.features: Shape = tuple(features)
        self.strides: tuple[Shape, ...] = tuple(tuple(s) for s in strides)
        self.kernel_sizes: tuple[Shape, ...] = tuple(tuple(k) for k in kernel_sizes)
        self.blocks_per_stage: Shape = blocks
        self.dim = len(self.strides[0])
        self.deep_supervision = deep_supervision
        self.encoder = self._build_encoder(num_groups)
        self.decoder = self._build_decoder(num_groups)
        conv_op = _CONV_OPS[self.dim][0]
        self.heads = nn.ModuleList(conv_op(width, num_classes, 1) for width in self.features[:-1])
        self.apply(_init_weights)

    def _build_encoder(self, num_groups: int) -> nn.ModuleList:
        """``encoder[i]``: a Sequential whose first module takes the input of stage ``i`` (the image, or stage
        ``i - 1``'s output) and downsamples by ``strides[i]``; the rest keep width and resolution."""
        conv_op = _CONV_OPS[self.dim][0]
        stages = []
        widths_in = (self.in_channels,) + self.features[:-1]
        for stage, (width_in, width, stride, kernel, num_blocks) in enumerate(
            zip(widths_in, self.features, self.strides, self.kernel_sizes, self.blocks_per_stage)
        ):
            layers = dict(conv_op=conv_op, out_channels=width, kernel_size=kernel, num_groups=num_groups)
            if self.layout == "residual" or stage == 0:  # a (strided) conv, then the blocks
                down: nn.Module = ConvNormAct(in_channels=width_in, stride=stride, **layers)
                num_blocks += 1
            else:  # the first block downsamples
                down = ResidualBlock(in_channels=width_in, stride=stride, **layers)
            blocks = [ResidualBlock(in_channels=width, **layers) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(down, *blocks))
        return nn.ModuleList(stages)

    def _build_decoder(self, num_groups: int) -> nn.ModuleList:
        """``decoder[i]`` brings stage ``i + 1`` back to the resolution and width of stage ``i``."""
        conv_op, transposed_conv_op = _CONV_OPS[self.dim]
        return nn.ModuleList(
            DecoderStage(
                conv_op=conv_op,
                transposed_conv_op=transposed_conv_op,
                in_channels=self.features[i + 1],
                out_channels=self.features[i],
                stride=self.strides[i + 1],
                kernel_size=self.kernel_sizes[i],
                num_groups=num_groups,
                residual=self.layout == "residual",
            )
            for i in range(len(self.features) - 1)
        )

    @property
    def deep_supervision(self) -> bool:
        """Whether :meth:`forward` returns a list of logits (True) or only the full-resolution ones."""
        return self._deep_supervision

    @deep_supervision.setter
    def deep_supervision(self, enabled: bool) -> None:
        self._deep_supervision = bool(enabled)

    @property
    def total_strides(self) -> Shape:
        """Per-axis product of all strides; every spatial size of the input must be a multiple of it."""
        return tuple(math.prod(axis) for axis in zip(*self.strides))

    @property
    def deep_supervision_strides(self) -> list[Shape]:
        """Per-axis downsampling of each deep-supervision output relative to the input, full resolution first.

        E.g. ``[(1, 1, 1), (2, 2, 2), (4, 4, 2)]``: what a trainer needs to downsample the targets.
        """
        cumulative = [self.strides[0]]
        for stride in self.strides[1:-1]:
            cumulative.append(tuple(c * s for c, s in zip(cumulative[-1], stride)))
        return cumulative

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment a batch.

        Args:
            x: (B, in_channels, X, Y, Z) in 3D or (B, in_channels, X, Y) in 2D; each spatial size a multiple of
                :attr:`total_strides`.

        Returns:
            Logits (B, num_classes, X, Y, Z) when :attr:`deep_supervision` is False; otherwise a list of
            ``len(features) - 1`` logits, full resolution first, then each coarser decoder level
            (shapes divided by :attr:`deep_supervision_strides`).

        Raises:
            ValueError: if the input has the wrong rank, channel count, or a spatial size the strides don't divide.
        """
        self._check_input(x)
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outputs = []
        for level in reversed(range(len(self.decoder))):
            x = self.decoder[level](x, skips[level])
            if self.deep_supervision or level == 0:
                outputs.append(self.heads[level](x))
        if not self.deep_supervision:
            return outputs[0]
        return outputs[::-1]

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('XYZ'[: self.dim])}), got {tuple(x.shape)}"
            )
        spatial = tuple(x.shape[2:])
        if any(size % total != 0 for size, total in zip(spatial, self.total_strides)):
            raise ValueError(f"spatial shape {spatial} must be a multiple of the total strides {self.total_strides}")

    # ------------------------------------------------------------------ its own cost, for the planner
    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements (not bytes) autograd stores for backward in one training step of one sample of spatial size
        ``input_size`` (X, Y[, Z]): the input (kept by the first conv), each encoder stage's and decoder level's
        own count (their ``stored_activations``) and the logits of every head :meth:`forward` computes (all with
        :attr:`deep_supervision`, else the full-resolution one), which the loss keeps. GroupNorm's per-group
        mean and 1/std (groups per sample) are left out as negligible.

        Raises:
            ValueError: if a stride has another number of axes than ``input_size``, or does not divide it.
        """
        count, shapes = self._sum_over_blocks("stored_activations", input_size)
        heads = sum(elements(self.heads[level].out_channels, shapes[level]) for level in self._computed_heads())
        return elements(self.in_channels, input_size) + count + heads

    def forward_macs(self, input_size: Sequence[int]) -> int:
        """Multiply-accumulates of one forward pass of one sample of spatial size ``input_size`` (X, Y[, Z]), its
        convolutions only (normalization, activations and sums are memory-bound and charged through
        :meth:`stored_activations`); the heads :meth:`forward` computes. A training step costs about three times this.

        Raises:
            ValueError: as :meth:`stored_activations`.
        """
        count, shapes = self._sum_over_blocks("forward_macs", input_size)
        return count + sum(conv_macs(self.heads[level], shapes[level]) for level in self._computed_heads())

    def _computed_heads(self) -> range:
        return range(len(self.heads) if self.deep_supervision else 1)

    def _sum_over_blocks(self, counter: str, input_size: Sequence[int]) -> tuple[int, list[Shape]]:
        """``counter`` (a method name of the blocks) summed over the encoder's and decoder's blocks for one sample,
        and the spatial shape of each stage."""
        shapes = feature_map_shapes(patch_size=input_size, strides=self.strides)
        total = 0
        for stage, size_in, size in zip(self.encoder, (tuple(input_size), *shapes), shapes):
            total += getattr(stage[0], counter)(size_in) + sum(getattr(block, counter)(size) for block in stage[1:])
        total += sum(getattr(decoder, counter)(shapes[level + 1]) for level, decoder in enumerate(self.decoder))
        return total, shapes


def _init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal init for LeakyReLU(0.01) on every (transposed) conv; zero biases. Nothing on the meta
    device, where a network is built only to count its cost (and PyTorch's reference random fill is slow)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and not module.weight.is_meta:
        nn.init.kaiming_normal_(module.weight, a=LEAKY_RELU_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
