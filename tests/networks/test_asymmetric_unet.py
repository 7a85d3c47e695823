"""Tests of the acute stroke paper's asymmetric residual U-Net and the parameters and memory it counts itself."""

from __future__ import annotations

import pytest
import torch
from test_networks import ANISOTROPIC_3D, ISOTROPIC_3D, PLANAR_2D, saved_activation_bytes
from torch import nn

from autoseg.networks import (
    ADAM_BYTES_PER_PARAMETER,
    CUDA_OVERHEAD_BYTES,
    AsymmetricResidualUNet,
    on_meta,
    parameter_count,
)
from autoseg.networks.asymmetric_unet import Downsample

#: The paper's network (section 3.2, figure 2): 4 resolution steps, 32 base filters doubling, 3x3x3 kernels.
PAPER = dict(
    in_channels=4,
    num_classes=1,
    features=(32, 64, 128, 256),
    strides=((1, 1, 1),) + ((2, 2, 2),) * 3,
    kernel_sizes=((3, 3, 3),) * 4,
)
CASES = {
    "3d_isotropic": (ISOTROPIC_3D, (16, 24, 8)),
    "3d_anisotropic_two_blocks": (dict(ANISOTROPIC_3D, blocks_per_stage=(1, 2, 1, 2)), (16, 16, 8)),
    "2d": (PLANAR_2D, (32, 28)),
}


def _build(seed: int = 0, **kwargs) -> AsymmetricResidualUNet:
    torch.manual_seed(seed)
    return AsymmetricResidualUNet(**kwargs)


@pytest.mark.parametrize("name", CASES)
def test_output_has_the_input_size_and_the_parameter_count_is_exact(name: str) -> None:
    kwargs, patch = CASES[name]
    net = _build(**kwargs)
    out = net(torch.zeros(2, kwargs["in_channels"], *patch))
    assert tuple(out.shape) == (2, kwargs["num_classes"], *patch)
    encoder, decoder = on_meta(AsymmetricResidualUNet, **kwargs).parameter_split()
    assert encoder + decoder == sum(p.numel() for p in net.parameters())
    assert (encoder, decoder) == net.parameter_split()


def test_the_paper_network_has_three_quarters_of_its_parameters_in_the_encoder() -> None:
    encoder, decoder = on_meta(AsymmetricResidualUNet, **PAPER).parameter_split()
    assert (encoder, decoder) == (5_289_088, 1_742_977)  # 75.2% in the encoder
    assert encoder / (encoder + decoder) == pytest.approx(0.75, abs=0.01)
    assert tuple(_build(**PAPER)(torch.zeros(1, 4, 24, 24, 16)).shape) == (1, 1, 24, 24, 16)  # its 24x24x16 patches


def test_prelu_everywhere_and_downsampling_concatenates_max_pooling_with_a_strided_conv() -> None:
    net = _build(**ISOTROPIC_3D)
    kinds = {type(m) for m in net.modules()}
    assert nn.PReLU in kinds and not kinds & {nn.ReLU, nn.LeakyReLU}
    down = net.encoder[1][0]
    assert isinstance(down, Downsample)
    x = torch.randn(1, 8, 8, 8, 8)
    out = down(x)
    assert out.shape == (1, 16, 4, 4, 4)
    assert torch.equal(out[:, :8], nn.functional.max_pool3d(x, 2))  # pooled channels first, then the convolved


def test_gradients_reach_every_parameter() -> None:
    net = _build(**ANISOTROPIC_3D)
    net(torch.randn(2, 2, 16, 16, 8)).square().mean().backward()
    assert all(p.grad is not None and torch.any(p.grad != 0) for p in net.parameters())


@pytest.mark.parametrize("name", CASES)
def test_stored_activations_match_autograds_saved_tensors(name: str) -> None:
    """Counted on the meta device, against autograd's saved tensors in fp32 (4 bytes each): within 0.1%."""
    kwargs, patch = CASES[name]
    patch = tuple(2 * p for p in patch)
    measured = saved_activation_bytes(_build(**kwargs), torch.randn(2, kwargs["in_channels"], *patch))
    net = on_meta(AsymmetricResidualUNet, **kwargs)
    assert 4 * 2 * net.stored_activations(patch) == pytest.approx(measured, rel=1e-3)
    estimate = net.training_memory_bytes(patch_size=patch, batch_size=2, bytes_per_activation=4)
    assert estimate - parameter_count(
        net
    ) * ADAM_BYTES_PER_PARAMETER - CUDA_OVERHEAD_BYTES == 8 * net.stored_activations(patch)


def test_memory_estimate_scales_with_batch_and_precision() -> None:
    net = on_meta(AsymmetricResidualUNet, **ISOTROPIC_3D)
    fixed = parameter_count(net) * ADAM_BYTES_PER_PARAMETER + CUDA_OVERHEAD_BYTES
    one = net.training_memory_bytes(patch_size=(32,) * 3, batch_size=1) - fixed
    assert net.training_memory_bytes(patch_size=(32,) * 3, batch_size=4) - fixed == 4 * one
    assert net.training_memory_bytes(patch_size=(32,) * 3, batch_size=1, bytes_per_activation=4) - fixed == 2 * one
    with pytest.raises(ValueError, match="batch_size"):
        net.training_memory_bytes(patch_size=(32,) * 3, batch_size=0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(features=(8,)), "at least 2 resolution stages"),
        (dict(strides=((2, 2, 2),) * 4), "strides\\[0\\] must be all ones"),
        (dict(kernel_sizes=((2, 2, 2),) * 4), "must be odd"),
        (dict(blocks_per_stage=(1, 0, 1, 1)), "blocks_per_stage"),
    ],
)
def test_invalid_numbers_raise(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AsymmetricResidualUNet(**{**ISOTROPIC_3D, **change})
    with pytest.raises(ValueError, match=message):
        on_meta(AsymmetricResidualUNet, **{**ISOTROPIC_3D, **change})
    with pytest.raises(ValueError, match="multiple of the total strides"):
        _build(**ISOTROPIC_3D)(torch.zeros(1, 1, 12, 16, 16))
