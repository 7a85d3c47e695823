"""Counting helpers the networks use to report their own cost beside their ``forward``.

Every block of :mod:`autoseg.networks` counts, from its own modules, the elements autograd stores for its backward
pass (``stored_activations(input_size)``), as dynamic-network-architectures' blocks do with
``compute_conv_feature_map_size``; a network sums its encoder's and decoder's, and the planner asks the network it
would build (:func:`on_meta`) instead of a separate model of it. What is shared by those counts lives here.

Units: *elements* are numbers of tensor entries (whatever the dtype); *bytes* appear only where the dtype is
assumed and said (:meth:`CountsItsCost.training_memory_bytes`). A spatial size is ``(X, Y, Z)`` or ``(X, Y)``, the trailing
axes of a ``(B, C, X, Y, Z)`` or ``(B, C, X, Y)`` tensor, in the array's axis order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = [
    "ADAM_BYTES_PER_PARAMETER",
    "CUDA_OVERHEAD_BYTES",
    "CountsItsCost",
    "conv_macs",
    "conv_output_size",
    "elements",
    "feature_map_shapes",
    "on_meta",
    "parameter_count",
]

ADAM_BYTES_PER_PARAMETER = 16
"""fp32 weight, its gradient and Adam's two moments: 4 x 4 bytes."""

CUDA_OVERHEAD_BYTES = 512 * 2**20
"""Fixed 0.5 GiB for what scales with neither patch nor batch: the CUDA context and kernels, cuDNN
workspaces and allocator fragmentation. A rough figure; measure on the target GPU if the memory budget is tight."""

Network = TypeVar("Network", bound=nn.Module)


def elements(channels: int, size: Sequence[int]) -> int:
    """Entries of one sample's feature map of ``channels`` channels and spatial ``size`` (X, Y[, Z]):
    ``channels x prod(size)`` elements (not bytes)."""
    return channels * math.prod(size)


def conv_output_size(conv: nn.Module, input_size: Sequence[int]) -> tuple[int, ...]:
    """Spatial size (X, Y[, Z]) of what a ``nn.ConvNd`` or ``nn.ConvTransposeNd`` makes of ``input_size``, read from
    its own kernel, stride, padding, dilation (and output padding), with PyTorch's formulas."""
    sizes = zip(input_size, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return tuple(
            (n - 1) * s - 2 * p + d * (k - 1) + extra + 1 for (n, k, s, p, d), extra in zip(sizes, conv.output_padding)
        )
    return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in sizes)


def conv_macs(conv: nn.Module, input_size: Sequence[int]) -> int:
    """Multiply-accumulates of one sample through a (transposed) convolution, bias left out:
    ``in x out / groups x prod(kernel)`` per output voxel of a convolution, per *input* voxel of a transposed one
    (what ``torch.utils.flop_counter`` counts, halved)."""
    per_voxel = conv.in_channels * conv.out_channels // conv.groups * math.prod(conv.kernel_size)
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        return per_voxel * math.prod(input_size)
    return per_voxel * math.prod(conv_output_size(conv, input_size))


def parameter_count(module: nn.Module) -> int:
    """``sum(p.numel() for p in module.parameters())``: exact, also for a module on the meta device."""
    return sum(p.numel() for p in module.parameters())


def feature_map_shapes(*, patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """Spatial shape of each resolution stage of a U-Net for one patch.

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


class CountsItsCost:
    """Mixin for a network that counts its own cost: it defines ``stored_activations(input_size)`` beside its
    ``forward``; this adds the training-memory estimate the planner fits patch and batch sizes with."""

    def stored_activations(self, input_size: Sequence[int]) -> float:
        """Elements autograd stores for backward in one training step of one sample of spatial ``input_size``
        (X, Y[, Z]); elements, not bytes."""
        raise NotImplementedError(f"{type(self).__name__} does not count its stored activations")

    def counted_parameters(self) -> int:
        """Parameters the memory estimate charges ``ADAM_BYTES_PER_PARAMETER`` each: all of them (exact)."""
        return parameter_count(self)

    def training_memory_bytes(
        self, *, patch_size: Sequence[int], batch_size: int, bytes_per_activation: int = 2
    ) -> int:
        """Estimated peak GPU memory (bytes) of one training step with Adam:
        ``stored_activations(patch_size) x bytes_per_activation x batch_size + counted_parameters() x
        ADAM_BYTES_PER_PARAMETER + CUDA_OVERHEAD_BYTES``, rounded down.

        Assumptions:
            - ``bytes_per_activation=2``: mixed precision (fp16/bf16) keeps each stored activation in 2 bytes;
              use 4 for fp32. Caveat: CUDA autocast runs ``group_norm`` in fp32, so GroupNorm inputs and the
              activations after it are stored in 4 bytes plus a 2-byte copy cast for the next conv; a GroupNorm
              network under CUDA AMP stores nearer 4-5 bytes per counted element, so 2 underestimates.
            - Parameters, gradients and both moments of the optimizer (Adam, Adadelta) are fp32: 16 bytes each.
            - Transient buffers of the backward pass (gradients of the largest activations, conv workspaces) and
              the CUDA context are covered only by the fixed ``CUDA_OVERHEAD_BYTES`` (0.5 GiB).

        Args:
            patch_size: (X, Y, Z) or (X, Y) of one sample, as the network's ``stored_activations`` takes it.
            batch_size: samples per step, >= 1.
            bytes_per_activation: bytes per stored activation element, >= 1. Default 2.

        Raises:
            ValueError: if ``batch_size`` or ``bytes_per_activation`` is < 1, or the network refuses the patch.

        Example:
            >>> net = on_meta(ResidualUNet, in_channels=1, num_classes=1, features=(32, 64, 128, 256, 320, 320),
            ...               strides=((1, 1, 1),) + ((2, 2, 2),) * 5, kernel_sizes=((3, 3, 3),) * 6)
            >>> gib = net.training_memory_bytes(patch_size=(128, 128, 128), batch_size=2) / 2**30
        """
        if batch_size < 1 or bytes_per_activation < 1:
            raise ValueError(
                f"batch_size and bytes_per_activation must be >= 1, got {batch_size}, {bytes_per_activation}"
            )
        activations = self.stored_activations(patch_size)
        return int(
            activations * bytes_per_activation * batch_size
            + self.counted_parameters() * ADAM_BYTES_PER_PARAMETER
            + CUDA_OVERHEAD_BYTES
        )


def on_meta(network_class: type[Network], **kwargs: Any) -> Network:
    """The network ``network_class(**kwargs)`` builds, on the meta device: every module and parameter shape, no
    memory and no initialisation, for asking it its cost (``stored_activations``, ``training_memory_bytes``, parameters).

    Cached per class and arguments (which must be hashable: tuples, not lists), since the planner asks the same
    network about many patch and batch sizes; the result is shared, so do not change it.

    Raises:
        ValueError: as the network's constructor, for inconsistent arguments.
    """
    return _on_meta(network_class, tuple(sorted((name, _hashable(value)) for name, value in kwargs.items())))


def _hashable(value: Any) -> Any:
    """Lists (e.g. from JSON) as tuples, nested, so the arguments can key the cache."""
    return tuple(_hashable(v) for v in value) if isinstance(value, (list, tuple)) else value


@functools.lru_cache(maxsize=256)
def _on_meta(network_class: type[Network], kwargs: tuple[tuple[str, Any], ...]) -> Network:
    with torch.device("meta"):
        return network_class(**dict(kwargs))
