"""Tests of autoseg.networks.normalization: GroupNorm's channels-last backward pass against float64 and PyTorch's,
when it is used, and a whole network trained channels-last against the same network trained contiguous."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoseg.networks import ResidualUNet, normalization
from autoseg.networks.normalization import GroupNorm, _ChannelsLastGroupNorm, is_channels_last
from autoseg.plans import Loss
from autoseg.train.losses import build_loss

CHANNELS_LAST = torch.channels_last_3d

# (shape (B, C, X, Y, Z), groups): narrow rows widened, widths the voxels do not divide, one group per channel
CASES = [
    ((2, 16, 6, 4, 6), 8),
    ((3, 4, 5, 3, 2), 2),
    ((1, 64, 4, 4, 4), 8),
    ((2, 8, 3, 3, 3), 8),
    ((2, 32, 8, 16, 16), 4),
]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, shift: float) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = (torch.randn(shape, generator=generator) * 2 + shift).to(dtype).contiguous(memory_format=CHANNELS_LAST)
    weight = 1 + 0.1 * torch.randn(channels, generator=generator)
    bias = torch.randn(channels, generator=generator)
    # an incoming gradient that follows the input (as a loss's does), so that the terms through the group's mean and
    # spread matter: with noise alone they nearly vanish
    noise = torch.randn(shape, generator=generator)
    grad = (noise + 0.5 * (x.float() - shift) / 2 + 0.3).to(dtype).contiguous(memory_format=CHANNELS_LAST)
    return x.requires_grad_(True), weight.requires_grad_(True), bias.requires_grad_(True), grad


def _relative_errors(reference: tuple[torch.Tensor, ...], got: tuple[torch.Tensor, ...]) -> list[float]:
    return [float((r - g.double()).abs().max() / r.abs().max()) for r, g in zip(reference, got)]


def _reference_backward(x, weight, grad, mean, rstd, groups: int) -> tuple[torch.Tensor, ...]:
    """GroupNorm's backward pass in float64 from the forward's own statistics (Wu and He 2018), on a contiguous
    (B, G, C/G, voxels) copy: dx = r (w dy - mean_g(w dy) - x̂ mean_g(w dy x̂)), dw = Σ dy x̂, db = Σ dy."""
    batch, channels = x.shape[:2]
    xs = x.detach().double().contiguous().view(batch, groups, channels // groups, -1)
    dy = grad.double().contiguous().view(batch, groups, channels // groups, -1)
    m, r = mean.double().view(batch, groups, 1, 1), rstd.double().view(batch, groups, 1, 1)
    w = weight.detach().double().view(1, groups, channels // groups, 1)
    xhat = (xs - m) * r
    dx = r * (w * dy - (w * dy).mean((2, 3), keepdim=True) - xhat * (w * dy * xhat).mean((2, 3), keepdim=True))
    return dx.view(x.shape), (dy * xhat).sum((0, 3)).view(channels), dy.sum((0, 3)).view(channels)


def _ours_and_reference(x, weight, bias, grad, groups: int) -> tuple[tuple[torch.Tensor, ...], ...]:
    batch, channels = x.shape[:2]
    _, mean, rstd = torch.ops.aten.native_group_norm(
        x.detach(), weight.detach(), bias.detach(), batch, channels, x[0, 0].numel(), groups, 1e-5
    )
    output = _ChannelsLastGroupNorm.apply(x, weight, bias, groups, 1e-5)
    assert torch.equal(output, F.group_norm(x, groups, weight, bias))  # the forward is PyTorch's own kernel
    got = torch.autograd.grad(output, (x, weight, bias), grad)
    assert is_channels_last(got[0]) and got[0].dtype == x.dtype
    return got, _reference_backward(x, weight, grad, mean, rstd, groups)


@pytest.mark.parametrize("shape, groups", CASES)
@pytest.mark.parametrize("shift", [1.0, 20.0, 200.0])  # a mean far from zero: the centring must not cancel digits
def test_the_channels_last_backward_matches_float64_in_float32(shape, groups, shift) -> None:
    got, reference = _ours_and_reference(*_inputs(shape, torch.float32, shift), groups)
    assert max(_relative_errors(reference, got)) < 1e-5


@pytest.mark.parametrize("shape, groups", CASES)
@pytest.mark.parametrize("shift", [1.0, 20.0, 200.0])  # 200: bf16 rounds the mean by up to a quarter of a std
def test_the_channels_last_backward_in_bf16_is_as_close_as_bf16_allows(shape, groups, shift) -> None:
    got, reference = _ours_and_reference(*_inputs(shape, torch.bfloat16, shift), groups)
    errors = _relative_errors(reference, got)
    # dx: a few bf16 roundings (2^-8 of the largest value each); dw, db: float32 sums of bf16 sums of 64 rows
    assert errors[0] < 1e-2 and errors[1] < 5e-3 and errors[2] < 5e-3


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    original = _ChannelsLastGroupNorm.apply

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_ChannelsLastGroupNorm, "apply", counting)
    return calls


@pytest.mark.parametrize(
    "dtype, memory_format, grad, switch, used",
    [
        (torch.bfloat16, CHANNELS_LAST, True, True, True),
        (torch.bfloat16, torch.contiguous_format, True, True, False),  # contiguous: PyTorch's kernel is fast
        (torch.float32, CHANNELS_LAST, True, True, False),  # float32: PyTorch's channels-last kernel is kept
        (torch.bfloat16, CHANNELS_LAST, False, True, False),  # no gradients: nothing to speed up
        (torch.bfloat16, CHANNELS_LAST, True, False, False),  # switched off (the throughput tool's comparison)
    ],
)
def test_the_own_backward_is_used_only_for_reduced_precision_channels_last_training(
    dtype, memory_format, grad, switch, used, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _calls(monkeypatch)
    monkeypatch.setattr(GroupNorm, "channels_last_backward", switch)
    norm = GroupNorm(4, 16)
    x = torch.randn(2, 16, 4, 4, 4).to(dtype).contiguous(memory_format=memory_format)
    with torch.set_grad_enabled(grad):
        output = norm(x)
    assert bool(calls) == used
    expected = nn.GroupNorm(4, 16)(x.float()).to(dtype)
    assert torch.allclose(output.float(), expected.float(), atol=3e-2) and output.dtype == dtype
    assert output.is_contiguous(memory_format=memory_format)


def test_state_dict_is_nn_group_norms() -> None:
    ours, plain = GroupNorm(4, 16), nn.GroupNorm(4, 16)
    assert ours.state_dict().keys() == plain.state_dict().keys()
    ours.load_state_dict(plain.state_dict())
    assert isinstance(
        ResidualUNet(
            in_channels=1,
            num_classes=1,
            features=(8, 16),
            strides=((1, 1, 1), (2, 2, 2)),
            kernel_sizes=((3, 3, 3),) * 2,
        ).encoder[0][0][1],
        GroupNorm,
    )


def _one_step(memory_format: torch.memory_format, dtype: torch.dtype | None) -> tuple[float, list[torch.Tensor]]:
    """Loss and gradients of one training step of a small residual U-Net in ``memory_format`` under autocast ``dtype``."""
    torch.manual_seed(0)
    network = ResidualUNet(
        in_channels=2,
        num_classes=1,
        features=(8, 16, 32),
        strides=((1, 1, 1), (2, 2, 2), (2, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 3,
    ).to(memory_format=memory_format)
    data = torch.randn(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=memory_format
    )
    target = (data[:, :1] > 1).to(torch.int16)
    loss_function = build_loss(Loss(name="dice_bce", dice_weight=1.0, bce_weight=1.0), 2)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = loss_function(network(data), target)
    loss.backward()
    return float(loss.detach()), [p.grad.float().clone() for p in network.parameters()]


def _distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """|a - b| / |b| over all gradients together (a conv bias before a one-channel group has a zero gradient up to
    rounding, so parameters one by one would compare rounding noise)."""
    flat_a, flat_b = torch.cat([x.flatten() for x in a]), torch.cat([y.flatten() for y in b])
    return float((flat_a - flat_b).norm() / flat_b.norm())


def test_a_network_trained_channels_last_matches_contiguous_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """The faster path (channels-last with autoseg's GroupNorm backward, here forced in float32) against the default
    path (contiguous, PyTorch's kernels): the same loss and gradients to float32 rounding."""
    monkeypatch.setattr(normalization, "REDUCED_PRECISION", (torch.float32,))
    calls = _calls(monkeypatch)
    loss_last, grads_last = _one_step(CHANNELS_LAST, None)
    assert calls, "the channels-last backward ran"
    loss_contiguous, grads_contiguous = _one_step(torch.contiguous_format, None)
    assert loss_last == pytest.approx(loss_contiguous, rel=1e-5)
    assert _distance(grads_last, grads_contiguous) < 1e-5


def test_a_network_trained_channels_last_in_bf16_stays_close_to_contiguous(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _calls(monkeypatch)
    loss_last, grads_last = _one_step(CHANNELS_LAST, torch.bfloat16)
    assert calls
    loss_contiguous, grads_contiguous = _one_step(torch.contiguous_format, torch.bfloat16)
    reference_loss, reference_grads = _one_step(torch.contiguous_format, None)  # float32
    assert loss_last == pytest.approx(loss_contiguous, rel=2e-2)
    # bf16's own error (contiguous against float32) bounds how far the channels-last path may be from float32
    assert _distance(grads_last, reference_grads) < 2 * _distance(grads_contiguous, reference_grads) + 1e-2
