"""Asymmetric residual U-Net of the acute stroke paper (Clèrigues et al., paper 001, section 3.2), built only from
the numbers in the plans (the same ``features``, ``strides`` and ``kernel_sizes`` a :class:`ResidualUNet` takes).

Architecture:

- encoder stage 0: conv (kernel ``kernel_sizes[0]``) -> GroupNorm -> PReLU, then ``blocks_per_stage[0]`` residual
  blocks of two convolutions;
- encoder stage ``i > 0``: downsampling by *concatenating* a max-pooling (kernel = stride = ``strides[i]``) and a
  strided convolution (kernel ``kernel_sizes[i]``, stride ``strides[i]``, + GroupNorm + PReLU) of the previous stage's
  ``features[i - 1]`` channels (Szegedy et al.'s grid reduction: no representational bottleneck, few parameters),
  giving ``2 * features[i - 1]`` channels; then ``blocks_per_stage[i]`` residual blocks of two convolutions, the first
  going to ``features[i]`` (with a 1x1 projection on its skip where the width changes, e.g. capped widths);
- decoder level ``i`` (coarsest first): a transposed convolution (kernel ``kernel_sizes[i + 1]``, stride
  ``strides[i + 1]``) back to the resolution and width of stage ``i``, *added* to the encoder output of stage ``i``
  (a long residual connection, as in uResNet), then a residual block of a single convolution;
- a 1x1 head on the full-resolution decoder output. No deep supervision (the paper has none).

Two convolutions per encoder block against one per decoder block, and the decoder's summed (not concatenated) skips,
put about 75% of the parameters in the encoder for the paper's 4 stages of 32 to 256 features (see
:meth:`AsymmetricResidualUNet.parameter_split`). Every non-linearity is a per-channel PReLU (as ENet,
which the paper follows). Normalization is GroupNorm rather than the paper's unspecified normalization, because
autoseg's batches are small (2 patches against the paper's 16), as in :class:`ResidualUNet`; the paper's dropout is
left out.

Shapes are ``(B, C, X, Y, Z)`` in 3D and ``(B, C, X, Y)`` in 2D; per-axis sequences are in the array's axis order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from autoseg.networks.cost import CountsItsCost, conv_output_size, elements, feature_map_shapes
from autoseg.networks.residual_unet import Shape, _group_norm, _same_padding, validate_architecture

__all__ = ["AsymmetricResidualUNet", "asymmetric_blocks_per_stage"]

#: PReLU's initial slope (He et al.), also the slope the weights are initialized for.
PRELU_INIT = 0.25

_OPS: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    2: (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d),
    3: (nn.Conv3d, nn.ConvTranspose3d, nn.MaxPool3d),
}


def asymmetric_blocks_per_stage(num_stages: int) -> tuple[int, ...]:
    """Residual blocks per encoder stage when none are given: one (of two convolutions) per resolution step."""
    return (1,) * num_stages


class _ConvNormPReLU(nn.Sequential):
    """conv -> GroupNorm -> PReLU; input (B, C_in, X, ...), output (B, C_out, X / s, ...)."""

    def __init__(
        self,
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
            nn.PReLU(out_channels, init=PRELU_INIT),
        )

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample of spatial ``input_size`` (X, Y[, Z]) leaves stored for backward: the conv's output
        (kept by GroupNorm), GroupNorm's (kept by PReLU) and PReLU's (kept by the next conv), each
        ``C_out x output voxels``. The input is counted by whatever made it."""
        return 3 * elements(self[0].out_channels, conv_output_size(self[0], input_size))


class EncoderBlock(nn.Module):
    """Two convolutions with a residual skip: conv-GN-PReLU-conv-GN, plus the input (a 1x1 conv + GN where the width
    changes), then PReLU. Input (B, C_in, X, ...), output (B, C_out, X, ...)."""

    def __init__(
        self, conv_op: type[nn.Module], in_channels: int, out_channels: int, kernel_size: Sequence[int], num_groups: int
    ) -> None:
        super().__init__()
        padding = _same_padding(kernel_size)
        self.conv1 = conv_op(in_channels, out_channels, tuple(kernel_size), padding=padding)
        self.norm1 = _group_norm(out_channels, num_groups)
        self.act1 = nn.PReLU(out_channels, init=PRELU_INIT)
        self.conv2 = conv_op(out_channels, out_channels, tuple(kernel_size), padding=padding)
        self.norm2 = _group_norm(out_channels, num_groups)
        self.skip: nn.Module = nn.Identity()
        if in_channels != out_channels:
            self.skip = nn.Sequential(conv_op(in_channels, out_channels, 1), _group_norm(out_channels, num_groups))
        self.act2 = nn.PReLU(out_channels, init=PRELU_INIT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act2(self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x))))) + self.skip(x))

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample of spatial ``input_size`` (X, Y[, Z]) leaves stored for backward, as PyTorch saves
        them (a conv, GroupNorm and PReLU keep their inputs, a sum nothing): conv1's, GN1's, PReLU1's and conv2's
        outputs, the sum before the last PReLU and that PReLU's output, plus the skip conv's output where it
        projects, each ``C_out x voxels``. The input is counted by whatever made it."""
        projects = not isinstance(self.skip, nn.Identity)
        return (6 + projects) * elements(self.conv1.out_channels, input_size)


class Downsample(nn.Module):
    """Max-pooling concatenated with a strided conv (+ GN + PReLU) of the same input (Szegedy et al.).

    Input (B, C, X, ...), output (B, 2 C, X / s, ...): the pooled channels first, then the convolved ones."""

    def __init__(
        self,
        conv_op: type[nn.Module],
        pool_op: type[nn.Module],
        channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        num_groups: int,
    ) -> None:
        super().__init__()
        self.pool = pool_op(tuple(stride), stride=tuple(stride))
        self.conv = _ConvNormPReLU(conv_op, channels, channels, kernel_size, stride, num_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat((self.pool(x), self.conv(x)), dim=1)

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample of spatial ``input_size`` (X, Y[, Z]) leaves stored for backward, counted as 4-byte
        elements: the conv branch's own (its PReLU's output is only read by the concatenation, then freed), the
        max-pooling's int64 indices (8 bytes: 2 elements each) and the concatenation. The pooling's input is
        counted by whatever made it."""
        conv = self.conv[0]
        size = conv_output_size(conv, input_size)
        branch = self.conv.stored_activations(input_size) - elements(conv.out_channels, size)
        return branch + 2 * elements(conv.in_channels, size) + elements(conv.in_channels + conv.out_channels, size)


class DecoderStage(nn.Module):
    """Transposed conv back to the finer stage, plus that stage's encoder output (long residual), then one conv with
    a residual skip: conv-GN, plus its input, PReLU. Inputs ``x`` (B, C_coarse, X / s, ...) and ``skip``
    (B, C, X, ...); output (B, C, X, ...)."""

    def __init__(
        self,
        conv_op: type[nn.Module],
        transposed_op: type[nn.Module],
        in_channels: int,
        out_channels: int,
        up_kernel: Sequence[int],
        stride: Sequence[int],
        kernel_size: Sequence[int],
        num_groups: int,
    ) -> None:
        super().__init__()
        # output = (n - 1) s - 2 (k // 2) + k + (s - 1) = n s for odd k: exactly undoes the strided conv.
        self.upsample = transposed_op(
            in_channels,
            out_channels,
            tuple(up_kernel),
            stride=tuple(stride),
            padding=_same_padding(up_kernel),
            output_padding=tuple(s - 1 for s in stride),
        )
        self.conv = conv_op(out_channels, out_channels, tuple(kernel_size), padding=_same_padding(kernel_size))
        self.norm = _group_norm(out_channels, num_groups)
        self.act = nn.PReLU(out_channels, init=PRELU_INIT)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.upsample(x) + skip
        return self.act(self.norm(self.conv(x)) + x)

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements one sample whose coarse input ``x`` has spatial ``input_size`` leaves stored for backward: the
        sum with the skip (kept by the conv), the conv's output (kept by GroupNorm), the sum before PReLU and the
        PReLU's output, each ``C x fine voxels``. The transposed conv's output is only summed, then freed."""
        return 4 * elements(self.conv.out_channels, conv_output_size(self.upsample, input_size))


class AsymmetricResidualUNet(CountsItsCost, nn.Module):
    """The acute stroke paper's asymmetric residual U-Net (see the module docstring), 2D or 3D.

    Args:
        in_channels: input channels (modalities), C of the input.
        num_classes: output channels (one sigmoid per foreground label).
        features: width of each resolution stage, full resolution first; the paper's is ``(32, 64, 128, 256)``.
        strides: per stage, per axis: the downsampling into that stage; ``strides[0]`` all ones.
        kernel_sizes: per stage, per axis, odd.
        num_groups: GroupNorm groups, capped at each stage's width, which it must divide. Default 8.
        blocks_per_stage: residual blocks (of two convolutions) per encoder stage; default one per stage.

    Raises:
        ValueError: inconsistent numbers (see :func:`~autoseg.networks.validate_architecture`).

    Example:
        >>> net = AsymmetricResidualUNet(in_channels=2, num_classes=1, features=(8, 16, 32),
        ...                              strides=((1, 1, 1), (2, 2, 2), (2, 2, 1)), kernel_sizes=((3, 3, 3),) * 3)
        >>> tuple(net(torch.zeros(2, 2, 24, 24, 16)).shape)
        (2, 1, 24, 24, 16)
    """

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        features: Sequence[int],
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
        num_groups: int = 8,
        blocks_per_stage: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        blocks = validate_architecture(
            in_channels=in_channels,
            num_classes=num_classes,
            features=features,
            strides=strides,
            kernel_sizes=kernel_sizes,
            num_groups=num_groups,
            blocks_per_stage=asymmetric_blocks_per_stage(len(features))
            if blocks_per_stage is None
            else blocks_per_stage,
        )
        self.in_channels, self.num_classes = in_channels, num_classes
        self.features: Shape = tuple(features)
        self.strides: tuple[Shape, ...] = tuple(tuple(s) for s in strides)
        self.kernel_sizes: tuple[Shape, ...] = tuple(tuple(k) for k in kernel_sizes)
        self.blocks_per_stage: Shape = blocks
        self.dim = len(self.strides[0])
        conv_op, transposed_op, pool_op = _OPS[self.dim]
        stages = []
        for i, (width, stride, kernel, count) in enumerate(zip(self.features, self.strides, self.kernel_sizes, blocks)):
            if i == 0:
                entry, width_in = _ConvNormPReLU(conv_op, in_channels, width, kernel, stride, num_groups), width
            else:
                previous = self.features[i - 1]
                entry, width_in = Downsample(conv_op, pool_op, previous, kernel, stride, num_groups), 2 * previous
            body = [
                EncoderBlock(conv_op, width_in if b == 0 else width, width, kernel, num_groups) for b in range(count)
            ]
            stages.append(nn.Sequential(entry, *body))
        self.encoder = nn.ModuleList(stages)
        self.decoder = nn.ModuleList(
            DecoderStage(
                conv_op,
                transposed_op,
                self.features[i + 1],
                self.features[i],
                self.kernel_sizes[i + 1],
                self.strides[i + 1],
                self.kernel_sizes[i],
                num_groups,
            )
            for i in range(len(self.features) - 1)
        )
        self.head = conv_op(self.features[0], num_classes, 1)
        self.apply(_init_weights)

    @property
    def total_strides(self) -> Shape:
        """Per-axis product of all strides; every spatial size of the input must be a multiple of it."""
        return tuple(math.prod(axis) for axis in zip(*self.strides))

    def parameter_split(self) -> tuple[int, int]:
        """(encoder, decoder) parameter counts; the decoder's include the head."""
        encoder = sum(p.numel() for p in self.encoder.parameters())
        return encoder, sum(p.numel() for p in self.parameters()) - encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segment a batch.

        Args:
            x: (B, in_channels, X, Y, Z) in 3D or (B, in_channels, X, Y) in 2D; each spatial size a multiple of
                :attr:`total_strides`.

        Returns:
            Logits (B, num_classes, X, Y, Z) (or (B, num_classes, X, Y)).

        Raises:
            ValueError: wrong rank, channel count, or a spatial size the strides do not divide.
        """
        if x.ndim != self.dim + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected input (B, {self.in_channels}, {', '.join('XYZ'[: self.dim])}), got {tuple(x.shape)}"
            )
        if any(size % total for size, total in zip(x.shape[2:], self.total_strides)):
            raise ValueError(
                f"spatial shape {tuple(x.shape[2:])} must be a multiple of the total strides {self.total_strides}"
            )
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        for level in reversed(range(len(self.decoder))):
            x = self.decoder[level](x, skips[level])
        return self.head(x)

    def stored_activations(self, input_size: Sequence[int]) -> int:
        """Elements (counted as 4-byte elements, not bytes) autograd stores for backward in one training step of one
        sample of spatial size ``input_size`` (X, Y[, Z]): the input (kept by the first conv), each encoder stage's
        and decoder level's own count (their ``stored_activations``) and the logits, which the loss keeps.
        GroupNorm's per-group statistics are left out as negligible.

        Raises:
            ValueError: if a stride has another number of axes than ``input_size``, or does not divide it.
        """
        shapes = feature_map_shapes(patch_size=input_size, strides=self.strides)
        count = elements(self.in_channels, input_size) + elements(self.head.out_channels, shapes[0])
        for stage, size_in, size in zip(self.encoder, (tuple(input_size), *shapes), shapes):
            count += stage[0].stored_activations(size_in) + sum(block.stored_activations(size) for block in stage[1:])
        return count + sum(decoder.stored_activations(shapes[i + 1]) for i, decoder in enumerate(self.decoder))


def _init_weights(module: nn.Module) -> None:
    """He (Kaiming) normal init for PReLU's initial slope on every (transposed) conv; zero biases. Nothing on the
    meta device, where a network is built only to count its cost."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)) and not module.weight.is_meta:
        nn.init.kaiming_normal_(module.weight, a=PRELU_INIT)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
