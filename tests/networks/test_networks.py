"""Tests of autoseg.networks: ResidualUNet shapes, gradients, precision, validation, and the cost it counts itself."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autoseg.networks import (
    ADAM_BYTES_PER_PARAMETER,
    CUDA_OVERHEAD_BYTES,
    AsymmetricResidualUNet,
    ResidualBlock,
    ResidualUNet,
    feature_map_shapes,
    on_meta,
    parameter_count,
)
from autoseg.plans import UNET_LAYOUTS

ISOTROPIC_3D = dict(
    in_channels=1,
    num_classes=1,
    features=(8, 16, 32, 64),
    strides=((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2)),
    kernel_sizes=((3, 3, 3),) * 4,
)
ANISOTROPIC_3D = dict(
    in_channels=2,
    num_classes=3,
    features=(8, 16, 32, 32),
    strides=((1, 1, 1), (2, 2, 1), (2, 2, 2), (2, 2, 2)),
    kernel_sizes=((3, 3, 1), (3, 3, 1), (3, 3, 3), (3, 3, 3)),
)
PLANAR_2D = dict(
    in_channels=1,
    num_classes=2,
    features=(8, 16, 32),
    strides=((1, 1), (2, 2), (2, 2)),
    kernel_sizes=((3, 3),) * 3,
)

# (net kwargs, patch (X, Y[, Z]), expected deep-supervision shapes, full resolution first)
SHAPE_CASES = {
    "3d_isotropic": (ISOTROPIC_3D, (16, 24, 8), [(16, 24, 8), (8, 12, 4), (4, 6, 2)]),
    "3d_anisotropic": (ANISOTROPIC_3D, (16, 16, 8), [(16, 16, 8), (8, 8, 8), (4, 4, 4)]),
    "2d": (PLANAR_2D, (32, 28), [(32, 28), (16, 14)]),
}


def _build(seed: int = 0, **kwargs) -> ResidualUNet:
    torch.manual_seed(seed)
    return ResidualUNet(**kwargs)


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
@pytest.mark.parametrize("name", SHAPE_CASES)
def test_output_shapes_with_and_without_deep_supervision(name: str, layout: str) -> None:
    kwargs, patch, expected = SHAPE_CASES[name]
    net = _build(layout=layout, **kwargs)
    x = torch.randn(2, kwargs["in_channels"], *patch)
    with torch.no_grad():
        outputs = net(x)
        assert isinstance(outputs, list)
        assert [tuple(o.shape) for o in outputs] == [(2, kwargs["num_classes"], *s) for s in expected]
        assert len(outputs) == len(kwargs["features"]) - 1
        net.deep_supervision = False
        single = net(x)
    assert isinstance(single, torch.Tensor)
    assert tuple(single.shape) == (2, kwargs["num_classes"], *patch)
    torch.testing.assert_close(single, outputs[0])


def test_deep_supervision_strides_match_outputs() -> None:
    kwargs, patch, expected = SHAPE_CASES["3d_anisotropic"]
    net = _build(**kwargs)
    assert net.deep_supervision_strides == [(1, 1, 1), (2, 2, 1), (4, 4, 2)]
    assert [tuple(p // s for p, s in zip(patch, st)) for st in net.deep_supervision_strides] == expected
    assert net.total_strides == (8, 8, 4)


def test_deep_supervision_off_at_construction() -> None:
    net = _build(deep_supervision=False, **ISOTROPIC_3D)
    assert not net.deep_supervision
    assert isinstance(net(torch.randn(1, 1, 16, 16, 16)), torch.Tensor)


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
@pytest.mark.parametrize("name", SHAPE_CASES)
@pytest.mark.parametrize("blocks", [None, (2, 1, 1, 3)])
def test_parameter_count_on_the_meta_device_matches_the_built_network(
    name: str, blocks: tuple[int, ...] | None, layout: str
) -> None:
    kwargs = dict(SHAPE_CASES[name][0], layout=layout)
    blocks = None if blocks is None else blocks[: len(kwargs["features"])]
    net = ResidualUNet(blocks_per_stage=blocks, **kwargs)
    actual = sum(p.numel() for p in net.parameters())
    for deep_supervision in (True, False):
        counted = on_meta(ResidualUNet, blocks_per_stage=blocks, deep_supervision=deep_supervision, **kwargs)
        assert next(counted.parameters()).is_meta
        assert parameter_count(counted) == actual


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
def test_gradients_reach_every_parameter(layout: str) -> None:
    net = _build(layout=layout, **ANISOTROPIC_3D)
    outputs = net(torch.randn(2, 2, 16, 16, 8))
    sum(o.square().mean() for o in outputs).backward()
    for name, parameter in net.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in net.parameters() if p.ndim > 1)


def test_residual_block_with_stride_projects_the_skip() -> None:
    block = ResidualBlock(
        conv_op=torch.nn.Conv3d, in_channels=4, out_channels=8, kernel_size=(3, 3, 1), stride=(2, 2, 1), num_groups=8
    )
    assert tuple(block(torch.randn(2, 4, 8, 8, 4)).shape) == (2, 8, 4, 4, 4)
    identity = ResidualBlock(conv_op=torch.nn.Conv2d, in_channels=8, out_channels=8, kernel_size=(3, 3))
    assert isinstance(identity.skip, torch.nn.Identity)


def test_bf16_autocast_with_channels_last_3d() -> None:
    net = _build(**ISOTROPIC_3D).to(memory_format=torch.channels_last_3d)
    # Small: CPUs without native bf16 (AVX2 only) run bf16 3D convs ~100x slower than fp32.
    x = torch.randn(2, 1, 8, 8, 8).to(memory_format=torch.channels_last_3d)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(x)
        loss = sum(o.float().mean() for o in outputs)
    loss.backward()
    assert outputs[0].dtype == torch.bfloat16
    assert tuple(outputs[0].shape) == (2, 1, 8, 8, 8)
    assert all(torch.isfinite(o.float()).all() for o in outputs)
    assert all(p.grad is not None for p in net.parameters())


def test_same_seed_gives_identical_weights() -> None:
    first, second, other = _build(0, **ISOTROPIC_3D), _build(0, **ISOTROPIC_3D), _build(1, **ISOTROPIC_3D)
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(first.encoder[0][0][0].weight, other.encoder[0][0][0].weight)


def test_initialization_is_kaiming_with_zero_bias() -> None:
    net = _build(
        in_channels=1, num_classes=1, features=(32, 64), strides=((1, 1, 1), (2, 2, 2)), kernel_sizes=((3, 3, 3),) * 2
    )
    conv = net.decoder[0].block.conv2  # 32 -> 32, 3x3x3: fan_in 864
    expected_std = math.sqrt(2.0 / (1 + 1e-4)) / math.sqrt(32 * 27)
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    assert all(m.bias.abs().sum() == 0 for m in net.modules() if isinstance(m, torch.nn.Conv3d))


INVALID_CASES = {
    "length mismatch": (dict(ISOTROPIC_3D, features=(8, 16, 32)), "one entry per stage"),
    "stride axes": (dict(ISOTROPIC_3D, strides=((1, 1, 1), (2, 2), (2, 2, 2), (2, 2, 2))), r"strides\[1\]"),
    "kernel axes": (dict(ISOTROPIC_3D, kernel_sizes=((3, 3, 3),) * 3 + ((3, 3),)), r"kernel_sizes\[3\]"),
    "even kernel": (dict(ISOTROPIC_3D, kernel_sizes=((3, 3, 3),) * 3 + ((2, 2, 2),)), "odd"),
    "groups": (dict(ISOTROPIC_3D, features=(8, 12, 32, 64)), r"features\[1\]=12 .*divisible"),
    "first stride": (dict(ISOTROPIC_3D, strides=((2, 2, 2),) * 4), "all ones"),
    "dimension": (dict(ISOTROPIC_3D, strides=((1,), (2,), (2,), (2,)), kernel_sizes=((3,),) * 4), "2 .*or 3"),
    "one stage": (dict(ISOTROPIC_3D, features=(8,), strides=((1, 1, 1),), kernel_sizes=((3, 3, 3),)), "at least 2"),
    "classes": (dict(ISOTROPIC_3D, num_classes=0), "num_classes"),
    "blocks": (dict(ISOTROPIC_3D, blocks_per_stage=(1, 1)), "blocks_per_stage"),
}


@pytest.mark.parametrize("case", INVALID_CASES)
def test_invalid_arguments_raise_value_error(case: str) -> None:
    kwargs, message = INVALID_CASES[case]
    with pytest.raises(ValueError, match=message):
        ResidualUNet(**kwargs)
    with pytest.raises(ValueError, match=message):
        on_meta(ResidualUNet, **kwargs)


def test_invalid_input_raises_value_error() -> None:
    net = _build(**ISOTROPIC_3D)
    with pytest.raises(ValueError, match="multiple of the total strides"):
        net(torch.randn(1, 1, 16, 16, 12))
    with pytest.raises(ValueError, match="expected input"):
        net(torch.randn(1, 2, 16, 16, 16))


def test_feature_map_shapes() -> None:
    assert feature_map_shapes(patch_size=(64, 64, 32), strides=ANISOTROPIC_3D["strides"]) == [
        (64, 64, 32),
        (32, 32, 32),
        (16, 16, 16),
        (8, 8, 8),
    ]
    with pytest.raises(ValueError, match="not divisible"):
        feature_map_shapes(patch_size=(64, 64, 30), strides=ISOTROPIC_3D["strides"])
    with pytest.raises(ValueError, match="axes"):
        feature_map_shapes(patch_size=(64, 64), strides=ISOTROPIC_3D["strides"])


def saved_activation_bytes(net: ResidualUNet, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves in one forward pass (parameters excluded), plus the logits,
    which the loss keeps until backward."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in net.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = net(x)
    logits = outputs if isinstance(outputs, list) else [outputs]
    return sum(saved.values()) + sum(o.numel() * o.element_size() for o in logits)


MEMORY_CASES = {
    "32^3 isotropic": (dict(ISOTROPIC_3D, deep_supervision=True), (32, 32, 32)),
    "48x64x40 anisotropic": (dict(ANISOTROPIC_3D, deep_supervision=True), (48, 64, 40)),
    "64^3 five stages, no deep supervision": (
        dict(
            in_channels=1,
            num_classes=1,
            features=(4, 8, 16, 32, 32),
            strides=((1, 1, 1),) + ((2, 2, 2),) * 4,
            kernel_sizes=((3, 3, 3),) * 5,
            blocks_per_stage=(1, 1, 2, 2, 2),
            deep_supervision=False,
        ),
        (64, 64, 64),
    ),
    "2d": (dict(PLANAR_2D, deep_supervision=True), (64, 48)),
}


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
@pytest.mark.parametrize("case", MEMORY_CASES)
def test_stored_activations_match_autograds_saved_tensors(case: str, layout: str) -> None:
    """The network's own count, on the meta device, against the tensors autograd saves in an fp32 forward pass of
    the same network (4 bytes each); within 0.1% (what is left out: GroupNorm's per-group statistics)."""
    kwargs, patch = MEMORY_CASES[case]
    kwargs = dict(kwargs, layout=layout)
    batch_size = 2
    measured = saved_activation_bytes(_build(**kwargs), torch.randn(batch_size, kwargs["in_channels"], *patch))
    net = on_meta(ResidualUNet, **kwargs)
    assert 4 * batch_size * net.stored_activations(patch) == pytest.approx(measured, rel=1e-3)
    estimate = net.training_memory_bytes(patch_size=patch, batch_size=batch_size, bytes_per_activation=4)
    activations = estimate - parameter_count(net) * ADAM_BYTES_PER_PARAMETER - CUDA_OVERHEAD_BYTES
    assert activations == 4 * batch_size * net.stored_activations(patch)


def test_memory_estimate_scales_with_batch_and_precision() -> None:
    net = on_meta(ResidualUNet, **ISOTROPIC_3D)
    fixed = parameter_count(net) * ADAM_BYTES_PER_PARAMETER + CUDA_OVERHEAD_BYTES
    one = net.training_memory_bytes(patch_size=(32, 32, 32), batch_size=1) - fixed
    assert net.training_memory_bytes(patch_size=(32, 32, 32), batch_size=4) - fixed == 4 * one
    assert net.training_memory_bytes(patch_size=(32, 32, 32), batch_size=1, bytes_per_activation=4) - fixed == 2 * one
    with pytest.raises(ValueError, match="batch_size"):
        net.training_memory_bytes(patch_size=(32, 32, 32), batch_size=0)
    with pytest.raises(ValueError, match="not divisible"):
        net.training_memory_bytes(patch_size=(32, 32, 30), batch_size=1)


@pytest.mark.parametrize("dataset", ["ATLASTiny", "CTPTiny"])
def test_every_demo_plan_builds_its_network_and_runs_its_patch(dataset: str, tiny_atlas, tiny_ctp) -> None:
    """Parameter count and a forward pass at the planned patch size, for every U-Net configuration planned."""
    from autoseg.api.plan import plan_and_preprocess

    plans = plan_and_preprocess(dataset, progress=False).plans
    unets = [c for c in plans.configurations.values() if c.network.architecture == "ResidualUNet"]
    assert unets
    for configuration in unets:
        net = configuration.network
        arguments = dict(
            in_channels=len(plans.channels),
            num_classes=len(plans.labels) - 1,
            features=net.features,
            strides=net.strides,
            kernel_sizes=net.kernel_sizes,
            layout=net.layout,
        )
        network = ResidualUNet(**arguments, deep_supervision=False)
        assert sum(p.numel() for p in network.parameters()) == parameter_count(on_meta(ResidualUNet, **arguments))
        for stage in configuration.schedule.stages:
            with torch.no_grad():
                out = network(torch.zeros(1, len(plans.channels), *stage.patch_size))
            assert out.shape == (1, 1, *stage.patch_size), configuration.name


def test_a_strided_projecting_block_counts_what_autograd_saves() -> None:
    """A block on its own: what it stores besides its input (counted by whoever made it), its output (which
    ``saved_activation_bytes`` adds once more, as logits) and the statistics of its three GroupNorms (a mean and a
    1/std per sample and group, left out as negligible), each 4 bytes in fp32: exactly the count."""
    block = ResidualBlock(
        conv_op=torch.nn.Conv3d, in_channels=4, out_channels=8, kernel_size=(3, 3, 1), stride=(2, 2, 1), num_groups=8
    )
    x = torch.randn(2, 4, 8, 12, 4)
    statistics = 3 * 2 * 2 * 8
    measured = saved_activation_bytes(block, x) - 4 * (x.numel() + 2 * 8 * 4 * 6 * 4 + statistics)
    assert 4 * 2 * block.stored_activations((8, 12, 4)) == measured
    assert block.stored_activations((8, 12, 4)) == 5 * 8 * 4 * 6 * 4  # conv1, act1, conv2, skip conv, act2


#: Counts the planner used before the networks counted themselves (``networks/memory.py``), so plans do not change:
#: (network class, arguments, patch) -> (stored activations, forward MACs with and without deep supervision,
#: training memory in bytes at batch 2 and 4 bytes per activation).
COUNTS_BEFORE = {
    "ResidualUNet": (ResidualUNet, ANISOTROPIC_3D, (48, 64, 40), (24096000, 1844551680, 1842708480, 735773328)),
    "AsymmetricResidualUNet": (AsymmetricResidualUNet, PLANAR_2D, (32, 28), (158592, None, None, 538723616)),
}


@pytest.mark.parametrize("name", COUNTS_BEFORE)
def test_the_networks_count_as_the_planner_did_before(name: str) -> None:
    network_class, kwargs, patch, (activations, macs, macs_alone, memory) = COUNTS_BEFORE[name]
    net = on_meta(network_class, **kwargs)
    assert net.stored_activations(patch) == activations
    assert net.training_memory_bytes(patch_size=patch, batch_size=2, bytes_per_activation=4) == memory
    if macs is not None:
        assert net.forward_macs(patch) == macs
        assert on_meta(network_class, deep_supervision=False, **kwargs).forward_macs(patch) == macs_alone


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
@pytest.mark.parametrize("deep_supervision", [True, False])
def test_forward_macs_are_pytorchs_flop_count(layout: str, deep_supervision: bool) -> None:
    """The count the planner and the cost model use, against PyTorch's FLOP counter (2 FLOPs per multiply-accumulate;
    the counter leaves out biases too)."""
    kwargs = dict(ANISOTROPIC_3D, layout=layout, deep_supervision=deep_supervision)
    net = _build(**kwargs)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, kwargs["in_channels"], 16, 16, 8))
    assert 2 * on_meta(ResidualUNet, **kwargs).forward_macs((16, 16, 8)) == counter.get_total_flops()


def test_the_residual_encoder_layout_downsamples_in_its_first_block_and_decodes_with_one_conv() -> None:
    """What ``layout="residual_encoder"`` builds: a stem conv and the stage's blocks at full resolution; below it
    ``blocks_per_stage[i]`` blocks, the first strided with a projecting skip; one conv per decoder level. At the
    default 2 mm plan's widths it does about 3/4 of the residual layout's multiply-accumulates."""
    blocks = (1, 2, 3, 2)
    net = ResidualUNet(blocks_per_stage=blocks, layout="residual_encoder", **ISOTROPIC_3D)
    stem, *rest = net.encoder[0]
    assert stem.__class__.__name__ == "ConvNormAct" and len(rest) == blocks[0]
    for stage, count, stride in zip(net.encoder[1:], blocks[1:], ISOTROPIC_3D["strides"][1:]):
        assert len(stage) == count and all(isinstance(block, ResidualBlock) for block in stage)
        assert stage[0].projects and stage[0].conv1.stride == stride
        assert not any(block.projects for block in stage[1:])
    assert all(level.block.__class__.__name__ == "ConvNormAct" for level in net.decoder)
    plan = dict(
        in_channels=1,
        num_classes=1,
        features=(32, 64, 128, 256, 320),
        strides=((1, 1, 1),) + ((2, 2, 2),) * 4,
        kernel_sizes=((3, 3, 3),) * 5,
    )
    lean = on_meta(ResidualUNet, layout="residual_encoder", **plan).forward_macs((80, 96, 80))
    assert 0.7 < lean / on_meta(ResidualUNet, layout="residual", **plan).forward_macs((80, 96, 80)) < 0.8


def test_weights_of_one_layout_do_not_load_into_the_other() -> None:
    residual = ResidualUNet(layout="residual", **ISOTROPIC_3D).state_dict()
    with pytest.raises(RuntimeError, match="Missing key|Unexpected key|size mismatch"):
        ResidualUNet(layout="residual_encoder", **ISOTROPIC_3D).load_state_dict(residual)


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="layout must be one of residual, residual_encoder"):
        ResidualUNet(layout="plain", **ISOTROPIC_3D)
