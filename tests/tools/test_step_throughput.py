"""Tests of tools/step_throughput.py on a tiny network: its operation counts against PyTorch's FLOP counter, its
rebuilt nnU-Net network's shapes, and the report it writes (numbers consistent with each other; no timing asserted)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from autoseg.networks import ResidualUNet
from autoseg.plan.step_probe import PLAIN_CONVOLUTION
from autoseg.plan.topology import PLANNED_UNET_LAYOUT
from autoseg.plans import UNET_LAYOUTS, Loss

TOOL = Path(__file__).resolve().parents[2] / "tools" / "step_throughput.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("step_throughput", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["step_throughput"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("step_throughput", None)


FEATURES, STRIDES = (4, 8, 16), ((1, 1, 1), (2, 2, 2), (2, 2, 1))
KERNELS = ((3, 3, 3), (3, 3, 3), (1, 3, 3))


def _network(tool, patch=(16, 16, 8), batch=2):
    return tool.Network(
        label="tiny",
        in_channels=2,
        num_classes=1,
        features=FEATURES,
        strides=STRIDES,
        kernel_sizes=KERNELS,
        patch=patch,
        batch=batch,
        loss=Loss(name="dice_bce", dice_weight=1.0, bce_weight=1.0),
    )


def _counted_macs(model: torch.nn.Module, data: torch.Tensor) -> int:
    """Forward multiply-accumulates of the convolutions as PyTorch's FLOP counter sees them (2 FLOP each)."""
    with FlopCounterMode(display=False) as counter:
        model(data)
    counts = counter.get_flop_counts()["Global"]
    return sum(v for op, v in counts.items() if "convolution" in str(op)) // 2


def test_the_rebuilt_nnunet_network_counts_its_operations_as_pytorch_does(tool) -> None:
    network = _network(tool)
    model = tool.PlainConvUNet(2, 2, FEATURES, STRIDES, KERNELS)
    data = torch.randn(1, 2, *network.patch)
    outputs = model(data)
    assert [tuple(o.shape) for o in outputs] == [(1, 2, 16, 16, 8), (1, 2, 8, 8, 4)]  # deep supervision, 2 classes
    assert tool._nnunet_macs(network) == _counted_macs(model, data)
    # per encoder stage two convolutions, per decoder stage a transposed one, two convolutions and a head
    convolutions = [m for m in model.modules() if isinstance(m, (torch.nn.Conv3d, torch.nn.ConvTranspose3d))]
    assert len(convolutions) == 2 * 3 + 2 * (1 + 2 + 1)


@pytest.mark.parametrize("layout", UNET_LAYOUTS)
def test_autosegs_count_is_pytorchs(tool, layout: str) -> None:
    network = dataclasses.replace(_network(tool), layout=layout)
    model = ResidualUNet(
        in_channels=2, num_classes=1, features=FEATURES, strides=STRIDES, kernel_sizes=KERNELS, layout=layout
    )
    assert tool._autoseg_network_on_meta_macs(network) == _counted_macs(model, torch.randn(1, 2, *network.patch))


def _report(tool, folder: Path, *arguments: str) -> dict:
    """The JSON report of one run of the tool on a 4-8 network at 8³, batch 1, one fp32 thread."""
    out = folder / "report.json"
    threads = torch.get_num_threads()
    try:
        tool.main(
            [
                *("--features", "4", "8", "--patch", "8", "8", "8", "--batch", "1"),
                *("--threads", "1", "--precision", "fp32", "--json", str(out), *arguments),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def _tiny_macs(layout: str) -> int:
    return ResidualUNet(
        in_channels=1,
        num_classes=1,
        features=(4, 8),
        strides=((1, 1, 1), (2, 2, 2)),
        kernel_sizes=((3, 3, 3),) * 2,
        layout=layout,
    ).forward_macs((8, 8, 8))


def test_the_report_is_consistent(tool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = _report(tool, tmp_path, "--rounds", "1", "--variants", "contiguous", "channels_last", "nnunet")
    printed = capsys.readouterr().out
    (configuration,) = report["configurations"]
    results = configuration["results"]
    assert list(results) == ["contiguous", "channels_last", "nnunet"] and report["threads"] == [1]
    for name, result in results.items():
        assert result["all_rounds"] == [round(result["seconds"], 4)]
        assert result["gflops"] == pytest.approx(result["gflop"] / result["seconds"])
        assert result["share_of_plain"] == pytest.approx(result["gflops"] / result["plain_convolution_gflops"])
        assert set(result["parts"]) == {"forward", "backward", "optimizer"}
        assert sum(result["parts"].values()) == pytest.approx(result["seconds"], rel=1e-6)
        assert name in printed
    assert results["contiguous"]["gflop"] == pytest.approx(6 * _tiny_macs(PLANNED_UNET_LAYOUT) / 1e9)
    assert results["nnunet"]["precision"] == "fp32" and PLAIN_CONVOLUTION.gflop() > 0
    assert "vs contiguous" in printed and "interleaved rounds, fastest kept" in printed


def test_both_layouts_are_timed_in_the_same_rounds_each_with_its_own_count(tool, tmp_path: Path) -> None:
    report = _report(tool, tmp_path, "--rounds", "2", "--layouts", *UNET_LAYOUTS, "--variants", "contiguous", "nnunet")
    results = report["configurations"][0]["results"]
    assert list(results) == [f"contiguous [{layout}]" for layout in UNET_LAYOUTS] + ["nnunet"]
    for layout in UNET_LAYOUTS:
        result = results[f"contiguous [{layout}]"]
        assert result["layout"] == layout and len(result["all_rounds"]) == 2
        assert result["gflop"] == pytest.approx(6 * _tiny_macs(layout) / 1e9)
    assert results["nnunet"]["layout"] is None


def test_features_need_a_patch(tool) -> None:
    with pytest.raises(SystemExit):
        tool.main(["--features", "4", "8"])
