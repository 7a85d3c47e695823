"""GroupNorm whose backward pass stays fast when a CPU network trains in bf16 and channels-last memory format.

PyTorch's CPU kernel for the GroupNorm backward pass is fast on contiguous ``(B, C, X, Y, Z)`` tensors and very slow
on channels-last ones (``torch.channels_last_3d``) in bf16: on one thread of an AMD EPYC with AVX512-BF16 (torch
2.13, 8 groups, 2026-12-07, a busy machine) its backward pass took 53 ms for a (2, 16, 48, 48, 48) bf16 tensor
against 1.8 ms contiguous, and 127 ms against 4.2 ms at 64³, so a residual U-Net trained in channels-last lost more
in its normalization than it gained in its convolutions (``documentation/benchmarks.md``, "A faster CPU step").
Converting to contiguous and back costs about as much as the kernel saves (bf16 transposes are slow).

:class:`GroupNorm` is ``nn.GroupNorm`` (same parameters, same state dict, same forward result) that, while training
on the CPU with a bf16 (or fp16) channels-last input, runs PyTorch's own forward kernel and computes the backward
pass in the channels-last layout itself (:class:`_ChannelsLastGroupNorm`), from per-sample, per-channel sums over
the voxels: 6.2 ms at (2, 16, 48, 48, 48), 12 ms at 32 channels (PyTorch's: 53 and 54 ms), 14 ms at 64³ (127 ms),
3.5 ms at (2, 64, 24, 24, 24) (7.8 ms).
Everywhere else (float32, contiguous input, no gradients, another device) it is ``nn.GroupNorm`` unchanged; in
float32 PyTorch's channels-last kernel is within a factor of two of this one either way.

The backward pass, for one sample and group of ``n`` elements with mean ``m``, ``r = 1 / std``, ``x̂ = (x - m) r``
and channel weights ``w``: ``dx = r (w dy - mean_g(w dy) - x̂ mean_g(w dy x̂))``, ``dw = Σ dy x̂``, ``db = Σ dy``,
with ``mean_g`` over the group's channels and voxels (Wu and He, "Group Normalization", ECCV 2018; PyTorch's
``native_group_norm_backward`` computes the same). The sums over the voxels of ``dy`` and of the bf16 products
``dy (x - m)`` (``m`` rounded to bf16, corrected exactly afterwards) are taken in bf16 over chunks of
:data:`_SUM_CHUNK` rows (PyTorch accumulates in float32 and rounds each chunk's sum once) and over the chunks in
float32, so the gradients differ from float64 by a few bf16 roundings (``tests/networks/test_normalization.py``:
dx within 1e-2, dw and db within 5e-3 of their largest value, against float64 from the same forward statistics);
in float32 they agree to rounding (1e-5).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

__all__ = ["REDUCED_PRECISION", "GroupNorm", "is_channels_last"]

#: Input dtypes whose channels-last backward PyTorch computes slowly and :class:`GroupNorm` computes itself.
REDUCED_PRECISION = (torch.bfloat16, torch.float16)
#: Rows of fewer channels than this are widened (several voxels side by side) for the sums and products: PyTorch's
#: CPU loops vectorize poorly over 16 bf16 channels.
_ROW_WIDTH = 64
#: Rows summed in the input's dtype before float32 takes over (:func:`_row_sums`): a power of two, so it divides the
#: voxel counts of patches that are multiples of the network's stride.
_SUM_CHUNK = 64


def is_channels_last(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` (B, C, X, Y[, Z]) is stored channels-last and not also contiguous (one channel or one
    voxel is both, and then nothing differs)."""
    layout = {5: torch.channels_last_3d, 4: torch.channels_last}.get(tensor.dim())
    return layout is not None and tensor.is_contiguous(memory_format=layout) and not tensor.is_contiguous()


def _row_sums(values: torch.Tensor) -> torch.Tensor:
    """(B, R, W) -> (B, W) float32 sums over the rows: in chunks of up to :data:`_SUM_CHUNK` rows in the values'
    own dtype (accumulated in float32 by PyTorch, the chunk's sum rounded once), then the chunks' sums in float32;
    converting every value to float32 first would copy the whole tensor."""
    batch, rows, width = values.shape
    chunk = math.gcd(rows, _SUM_CHUNK)
    return values.view(batch, rows // chunk, chunk, width).sum(2).sum(1, dtype=torch.float32)


def _per_channel(values: torch.Tensor, batch: int, groups: int, channels: int) -> torch.Tensor:
    """(B, G) per-group values as (B, 1, C), each channel its group's value, float32."""
    return values.float().view(batch, groups, 1).expand(batch, groups, channels // groups).reshape(batch, 1, channels)


def _group_mean(values: torch.Tensor, groups: int, count: int) -> torch.Tensor:
    """(B, 1, C) per-channel sums -> (B, 1, C) each channel its group's sum divided by ``count``."""
    batch, _, channels = values.shape
    summed = values.view(batch, groups, channels // groups).sum(2, keepdim=True) / count
    return summed.expand(batch, groups, channels // groups).reshape(batch, 1, channels)


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """``native_group_norm`` forward; the backward pass on the channels-last layout viewed as (B, voxels, C)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int, eps: float
    ) -> torch.Tensor:
        batch, channels = x.shape[:2]
        voxels = math.prod(x.shape[2:])
        output, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, batch, channels, voxels, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        batch, channels = x.shape[:2]
        groups, dtype = ctx.groups, x.dtype
        voxels = math.prod(x.shape[2:])
        layout = torch.channels_last_3d if x.dim() == 5 else torch.channels_last
        widen = 1  # voxels side by side in one row, so that a row holds at least _ROW_WIDTH values
        while widen * channels < _ROW_WIDTH and voxels % (2 * widen) == 0:
            widen *= 2
        rows = (batch, voxels // widen, widen * channels)
        x_rows = x.movedim(1, -1).reshape(rows)  # a view: channels-last memory is (B, X, Y, Z, C)
        dy_rows = grad_output.contiguous(memory_format=layout).movedim(1, -1).reshape(rows)

        def channel_sums(values: torch.Tensor) -> torch.Tensor:  # (B, rows, widen*C) -> (B, 1, C), float32
            return _row_sums(values).view(batch, widen, channels).sum(1, keepdim=True)

        def per_row(values: torch.Tensor) -> torch.Tensor:  # (B, 1, C) float32 -> (B, 1, widen*C) in x's dtype
            return values.to(dtype).repeat(1, 1, widen)

        mean_c, rstd_c = _per_channel(mean, batch, groups, channels), _per_channel(rstd, batch, groups, channels)
        mean_low = mean_c.to(dtype)  # the mean as subtracted below; (mean_low - mean_c) corrects for its rounding
        offset = mean_low.float() - mean_c
        centred = x_rows - mean_low.repeat(1, 1, widen)
        sum_dy = channel_sums(dy_rows)
        work = torch.mul(centred, dy_rows)
        sum_dy_centred = channel_sums(work) + offset * sum_dy  # Σ dy (x - mean)
        w = weight.float().view(1, 1, channels)
        count = voxels * (channels // groups)
        mean_w_dy = _group_mean(w * sum_dy, groups, count)
        mean_w_dy_xhat = _group_mean(w * rstd_c * sum_dy_centred, groups, count)
        # dx = a dy + b (x - mean_low) + c
        a = rstd_c * w
        b = -rstd_c * rstd_c * mean_w_dy_xhat
        c = -rstd_c * mean_w_dy + b * offset
        grad_x = torch.addcmul(per_row(c), centred, per_row(b), out=work).addcmul_(dy_rows, per_row(a))
        grad_x = grad_x.view(batch, *x.shape[2:], channels).movedim(-1, 1)
        grad_weight = (sum_dy_centred * rstd_c).sum(0).view(channels).to(weight.dtype)
        grad_bias = sum_dy.sum(0).view(channels).to(weight.dtype)
        wanted = ctx.needs_input_grad
        return (
            grad_x if wanted[0] else None,
            grad_weight if wanted[1] else None,
            grad_bias if wanted[2] else None,
            None,
            None,
        )


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` with a fast backward pass for bf16 channels-last inputs on the CPU (see the module doc).

    Input (B, C, X, Y[, Z]), output of the same shape and layout. Same arguments, parameters and state dict as
    ``nn.GroupNorm``, so checkpoints load either way.

    Attributes:
        channels_last_backward: class switch; False makes every instance plain ``nn.GroupNorm`` (for measuring
            PyTorch's own channels-last kernel, ``tools/step_throughput.py``).
    """

    channels_last_backward: ClassVar[bool] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.channels_last_backward
            and self.affine
            and x.device.type == "cpu"
            and x.dtype in REDUCED_PRECISION
            and torch.is_grad_enabled()
            and (x.requires_grad or self.weight.requires_grad)
            and is_channels_last(x)
        ):
            return _ChannelsLastGroupNorm.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        return super().forward(x)
