"""autoseg_pretrain: a PSPNet trained on the slices of a planned 3-D dataset, its backbone exported in
torchvision's layout and loadable into a PSPNet of any input channel count; the dataset's plans untouched."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from autoseg.api.plan import plan_and_preprocess
from autoseg.api.pretrain import CONFIGURATION, slice_configuration
from autoseg.commands.pretrain import main as pretrain_main
from autoseg.io.checkpoints import load_checkpoint
from autoseg.networks import PSPNet
from autoseg.networks.pspnet import ResNetBackbone
from autoseg.plans import Plans

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_pretrained_backbone_is_exported_in_torchvision_layout(tiny_atlas: Path, data_roots: Path, capsys) -> None:
    plans_file = data_roots / "preprocessed" / tiny_atlas.name / "plans.json"
    plan_and_preprocess("ATLASTiny", progress=False)
    before = plans_file.read_bytes()
    weights = data_roots / "resnet18_slices.pth"
    assert (
        pretrain_main(
            [
                "-d",
                "ATLASTiny",
                "-o",
                str(weights),
                "--epochs",
                "2",
                "--iters-per-epoch",
                "2",
                "-np",
                "0",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "next: autoseg_train" in capsys.readouterr().out
    assert plans_file.read_bytes() == before, "the dataset's own plans are not touched"

    exported = load_checkpoint(weights)
    assert set(exported) == set(ResNetBackbone("resnet18").state_dict())  # torchvision names, no fc
    run = data_roots / "results" / tiny_atlas.name / CONFIGURATION / "PSPNetTrainer" / "fold_full"
    final = load_checkpoint(run / "checkpoint_final.pth")
    assert final["epoch"] == 2
    assert all(torch.equal(exported[k], final["network"][f"backbone.{k}"]) for k in exported)
    derived = Plans.from_json(run / "plans.json").configuration(CONFIGURATION)
    assert derived.dimension == 2 and derived.slice_axis == 2 and derived.network.backbone == "resnet18"
    assert "log.txt" in {p.name for p in run.iterdir()} and (run / "progress.png").is_file()

    # a 5-channel CTP PSPNet takes every backbone tensor; its initializer stays its own
    network = PSPNet(in_channels=5, num_classes=1, backbone="resnet18")
    report = network.load_pretrained(weights)
    assert report.layout == "torchvision" and len(report.loaded) == len(exported) and not report.missing
    assert torch.equal(network.backbone.conv1.weight, exported["conv1.weight"])

    # an existing output is not overwritten without --continue
    assert (
        pretrain_main(["-d", "ATLASTiny", "-o", str(weights), "--epochs", "2", "--iters-per-epoch", "2", "-np", "0"])
        == 1
    )
    assert "exists" in capsys.readouterr().err


def test_slice_configuration_needs_a_3d_source_and_rounds_the_slice_to_the_stride(tiny_atlas: Path) -> None:
    source = plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()
    derived = slice_configuration(source, backbone="resnet34", slice_axis=0, epochs=3, iterations_per_epoch=4)
    assert derived.patch_size == tuple(-(-source.median_shape[a] // 8) * 8 for a in (1, 2))
    assert derived.data_identifier == source.data_identifier and derived.problems(1) == []
    with pytest.raises(ValueError, match="3-D one"):
        slice_configuration(
            dataclasses.replace(source, dimension=2),
            backbone="resnet18",
            slice_axis=2,
            epochs=1,
            iterations_per_epoch=1,
        )
    with pytest.raises(ValueError, match="unknown backbone"):
        slice_configuration(source, backbone="vgg16", slice_axis=2, epochs=1, iterations_per_epoch=1)
