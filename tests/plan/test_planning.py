"""Planner decisions: the right configuration for the right reason, budgets and divisibility, determinism."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import planners.base as planners_base
from autoseg.api.plan import plan_and_preprocess
from autoseg.commands.plan import main as plan_main
from autoseg.data.dataset import find_dataset
from autoseg.networks import ResidualUNet, build_network, on_meta
from autoseg.paths import preprocessed_root
from autoseg.plan.topology import round_to_multiple, target_spacing, unet_topology
from autoseg.plans import SCHEMA_VERSION, Configuration, Loss, Plans, PlansError, Stage
from planners import available_planners, get_planner, register_planner
from trainers import get_trainer

GIB = 1024**3


def plans_path(home: Path, dataset: str) -> Path:
    return home / "preprocessed" / dataset / "plans.json"


def test_atlas_like_gets_the_residual_3d_unet_with_zoom_in_and_out(tiny_atlas: Path) -> None:
    plans = plan_and_preprocess("ATLASTiny", progress=False).plans
    assert plans.default_configuration == "3d_resunet"
    assert "near-isotropic" in plans.reasons["default_configuration"]
    configuration = plans.configuration()
    assert configuration.network.architecture == "ResidualUNet"
    assert configuration.schedule.trainer == "ZoomInOutTrainer"
    zoom_in, zoom_out = configuration.schedule.stages
    assert np.prod(zoom_in.patch_size) < np.prod(zoom_out.patch_size) == np.prod(configuration.patch_size)
    assert (zoom_in.learning_rate, zoom_out.learning_rate) == (1e-3, 1e-4)
    assert "zoom-in&out" in configuration.reasons["schedule"]
    assert configuration.normalization[0].scheme == "zscore_foreground"


def test_ctp_like_gets_the_2d_pspnet_and_the_anisotropic_comparison(tiny_ctp: Path) -> None:
    plans = plan_and_preprocess("CTPTiny", progress=False).plans
    assert plans.default_configuration == "2d_pspnet"
    assert set(plans.configurations) == {"2d_pspnet", "3d_aniso", "2d_pspnet_sym"}  # the CT head is symmetric
    assert "thin slabs" in plans.reasons["default_configuration"]
    pspnet, aniso = plans.configuration("2d_pspnet"), plans.configuration("3d_aniso")
    assert pspnet.dimension == 2 and pspnet.slice_axis == 2 and pspnet.loss.name == "focal"
    assert pspnet.loss.focal_gamma == 1.0  # the CTP paper's γ
    fingerprint = json.loads((tiny_ctp.parent.parent / "preprocessed" / tiny_ctp.name / "fingerprint.json").read_text())
    fraction = fingerprint["aggregate"]["median_lesion_fraction_of_foreground"]
    assert 0 < fraction < 1 and pspnet.loss.positive_weight == pytest.approx((1 - fraction) / fraction, abs=1e-3)
    assert "weighted_ce" in pspnet.reasons["loss"]
    assert [s.trainable for s in pspnet.schedule.stages] == ["new_layers", "all"]
    assert all(stride[2] == 1 for stride in aniso.network.strides), "never pool along the 5 mm axis"
    schemes = {n.channel: n.scheme for n in pspnet.normalization}
    assert schemes == dict.fromkeys(["CT", "CBF", "CBV", "MTT", "Tmax"], "clip_zscore_dataset")
    assert "CT is CT" in pspnet.reasons["normalization"] and "perfusion map" in pspnet.reasons["normalization"]
    # both share one preprocessed copy of the data
    assert pspnet.data_identifier == aniso.data_identifier


def test_every_decision_has_a_reason(tiny_atlas: Path, tiny_ctp: Path) -> None:
    required = {
        "target_spacing",
        "patch_size",
        "batch_size",
        "network",
        "loss",
        "sampling",
        "postprocessing",
        "normalization",
        "resampling",
        "schedule",
        "mirror_axes",
    }
    for name in ("ATLASTiny", "CTPTiny"):
        for configuration in plan_and_preprocess(name, progress=False).plans.configurations.values():
            assert required <= set(configuration.reasons), configuration.name
            assert all(len(reason) > 20 for reason in configuration.reasons.values())


@pytest.mark.parametrize("budget_gb", [0.75, 1.0, 8.0])
def test_patches_respect_the_memory_budget_and_divisibility(tiny_atlas: Path, budget_gb: float) -> None:
    plans = plan_and_preprocess("ATLASTiny", memory_budget_gb=budget_gb, progress=False).plans
    configuration = plans.configuration()
    network = configuration.network
    for stage in configuration.schedule.stages:
        assert all(p % s == 0 for p, s in zip(stage.patch_size, network.total_stride))
        assert stage.batch_size >= 2
    needed = on_meta(
        ResidualUNet,
        in_channels=1,
        num_classes=1,
        features=network.features,
        strides=network.strides,
        kernel_sizes=network.kernel_sizes,
        layout=network.layout,
    ).training_memory_bytes(
        patch_size=configuration.patch_size, batch_size=configuration.batch_size, bytes_per_activation=4
    )
    assert needed <= budget_gb * GIB
    assert configuration.estimated_memory_gb <= budget_gb


def test_smaller_budget_gives_smaller_patches(tiny_atlas: Path) -> None:
    small = plan_and_preprocess("ATLASTiny", memory_budget_gb=0.7, progress=False).plans.configuration()
    large = plan_and_preprocess("ATLASTiny", memory_budget_gb=8.0, progress=False).plans.configuration()
    assert np.prod(small.patch_size) < np.prod(large.patch_size)


def test_same_data_gives_byte_identical_plans(tiny_sources: dict, tmp_path: Path, monkeypatch) -> None:
    contents = []
    for run in ("first", "second"):
        home = tmp_path / run
        shutil.copytree(tiny_sources["ctp"], home / "raw" / tiny_sources["ctp"].name)
        monkeypatch.setenv("AUTOSEG_HOME", str(home))
        plan_and_preprocess("CTPTiny", progress=False, num_processes=2 if run == "second" else 1)
        contents.append(plans_path(home, "Dataset903_CTPTiny").read_bytes())
    assert contents[0] == contents[1]


def test_anisotropic_spacing_keeps_a_low_percentile_for_the_coarse_axis() -> None:
    aggregate = SimpleNamespace(
        median_spacing=(0.9, 0.9, 5.0), anisotropy_ratio=5.56, coarse_axis=2, spacing_percentile_10=(0.8, 0.8, 4.0)
    )  # the fields of a DatasetAggregate it reads
    spacing, reason = target_spacing(aggregate)
    assert spacing == (0.9, 0.9, 4.0) and "10th percentile" in reason


def test_topology_stops_at_four_voxels_and_uses_flat_kernels_on_thick_axes() -> None:
    topology = unet_topology((256, 256, 12), (0.9, 0.9, 5.0))
    assert topology.kernel_sizes[0] == (3, 3, 1)
    final = np.array((256, 256, 12)) // np.array(topology.total_stride)
    assert final.min() >= 4 and topology.strides[1][2] == 1
    assert round_to_multiple((41, 52, 44), (8, 8, 8)) == (48, 56, 48)
    assert round_to_multiple((41, 52, 3), (8, 8, 8), mode="nearest") == (40, 48, 8)


def test_edited_plans_are_used_and_invalid_edits_are_named(tiny_atlas: Path, data_roots: Path, capsys) -> None:
    assert plan_main(["-d", "ATLASTiny", "--no-progress"]) == 0
    path = plans_path(data_roots, "Dataset901_ATLASTiny")
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_resunet"]["batch_size"] = 3
    plans["configurations"]["3d_resunet"]["schedule"]["stages"][-1]["batch_size"] = 3  # the last stage's is the same
    path.write_text(json.dumps(plans))
    assert plan_main(["-d", "ATLASTiny", "--preprocess-only", "--no-progress"]) == 0
    assert Plans.from_json(path).configuration().batch_size == 3
    plans["configurations"]["3d_resunet"]["patch_size"] = [41, 48, 40]
    plans["configurations"]["3d_resunet"]["loss"]["name"] = "hinge"
    path.write_text(json.dumps(plans))
    assert plan_main(["-d", "ATLASTiny", "--preprocess-only", "--no-progress"]) == 1
    error = capsys.readouterr().err
    assert "3d_resunet.patch_size: [41, 48, 40] must be positive and divisible" in error
    assert "loss.name: unknown loss 'hinge'" in error
    with pytest.raises(PlansError, match="available: \\['3d_resunet', '3d_resunet_sym'\\]"):
        Plans.from_json(_valid_copy(path)).configuration("2d")


def test_plans_out_of_range_are_refused_by_every_reader_with_each_field_named(
    tiny_atlas: Path, data_roots: Path
) -> None:
    """Values that would crash or silently break training and prediction (a stride of 0 used to be a
    ZeroDivisionError in the reader itself) are each named, whoever reads the plans."""
    assert plan_main(["-d", "ATLASTiny", "--no-progress"]) == 0
    path = plans_path(data_roots, "Dataset901_ATLASTiny")
    plans = json.loads(path.read_text())
    configuration = plans["configurations"]["3d_resunet"]
    configuration["target_spacing"] = [float("nan"), 1.0, 1e9]
    configuration["mirror_axes"] = [0, 7]
    configuration["network"]["strides"][1] = [2, 0, 2]
    configuration["network"]["kernel_sizes"][0] = [0, 3, 3]
    configuration["network"]["features"][-1] = 10**9
    configuration["postprocessing"] = {"threshold": float("nan"), "min_lesion_mm3": 1e12}
    path.write_text(json.dumps(plans))
    with pytest.raises(PlansError) as error:
        Plans.from_json(path)
    where = "configurations.3d_resunet"
    for problem in (
        f"{where}.target_spacing: needs 3 values in [0.01, 100] mm, got [nan, 1.0, 1000000000.0]",
        f"{where}.mirror_axes: each of 0..2 at most once",
        f"{where}.network.strides[1]: must be positive, got [2, 0, 2]",
        f"{where}.network.kernel_sizes[0]: each edge in 1..7, got [0, 3, 3]",
        f"{where}.network.features[{len(configuration['network']['features']) - 1}]: must lie in 1..2048",
        f"{where}.postprocessing.threshold: must lie in (0, 1), got nan",
        f"{where}.postprocessing.min_lesion_mm3: must lie in [0, 100000] mm³",
    ):
        assert problem in str(error.value)


def _valid_copy(path: Path) -> Path:
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_resunet"]["patch_size"] = [40, 48, 40]
    plans["configurations"]["3d_resunet"]["schedule"]["stages"][-1]["patch_size"] = [40, 48, 40]
    plans["configurations"]["3d_resunet"]["loss"]["name"] = "dice_bce"
    copy = path.with_name("copy.json")
    copy.write_text(json.dumps(plans))
    return copy


def test_unknown_fields_and_wrong_types_are_named(tiny_atlas: Path, data_roots: Path) -> None:
    plan_and_preprocess("ATLASTiny", progress=False)
    path = plans_path(data_roots, "Dataset901_ATLASTiny")
    plans = json.loads(path.read_text())
    plans["configurations"]["3d_resunet"]["batch_size"] = "two"
    path.write_text(json.dumps(plans))
    with pytest.raises(PlansError, match="configurations.3d_resunet.batch_size: expected int"):
        Plans.from_json(path)


@pytest.fixture(scope="module")
def atlas_plans_json(tiny_sources: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plans.json`` of the tiny ATLAS-like data as the default planner writes it (planned only, nothing
    preprocessed)."""
    from autoseg.plan.fingerprint import compute_fingerprint

    fingerprint = compute_fingerprint(find_dataset(str(tiny_sources["atlas"])), progress=False)
    path = tmp_path_factory.mktemp("plans") / "plans.json"
    get_planner("DefaultPlanner")(fingerprint).plan().to_json(path)
    return path


def test_plan_dataclasses_take_keyword_arguments_only() -> None:
    with pytest.raises(TypeError):
        Loss("dice_bce_focal", 1.0, 1.0, 1.0, 2.0, 0.75)
    with pytest.raises(TypeError):
        Stage("full", 0, (16, 16, 16), 2, 1e-2)
    assert Loss(name="dice_bce").dice_weight == 1.0


@pytest.mark.parametrize("field", ["patch_size", "batch_size"])
def test_a_patch_or_batch_size_unlike_the_last_stages_is_refused_naming_both(
    atlas_plans_json: Path, tmp_path: Path, field: str
) -> None:
    plans = json.loads(atlas_plans_json.read_text())
    configuration = plans["configurations"]["3d_resunet"]
    last = configuration["schedule"]["stages"][-1][field]
    edited = [edge + 8 for edge in last] if field == "patch_size" else last + 1
    configuration[field] = edited
    path = tmp_path / "plans.json"
    path.write_text(json.dumps(plans))
    index = len(configuration["schedule"]["stages"]) - 1
    expected = f"configurations.3d_resunet.{field}: {edited} differs from schedule.stages[{index}].{field} {last}"
    with pytest.raises(PlansError, match=re.escape(expected)) as error:
        Plans.from_json(path)
    assert str(path) in str(error.value)


def test_version_1_plans_are_read_without_the_optimizer_fields_no_code_read(
    atlas_plans_json: Path, tmp_path: Path
) -> None:
    plans = json.loads(atlas_plans_json.read_text())
    assert plans["schema_version"] == SCHEMA_VERSION == 2
    assert "optimizer" not in plans["configurations"]["3d_resunet"]["schedule"]
    plans["schema_version"] = 1
    for configuration in plans["configurations"].values():
        configuration["schedule"].update(optimizer="adam", lr_schedule="cosine_warm_restarts")
    old = tmp_path / "plans.json"
    old.write_text(json.dumps(plans))
    read = Plans.from_json(old)
    assert read == Plans.from_json(atlas_plans_json)
    read.to_json(old)
    assert old.read_bytes() == atlas_plans_json.read_bytes()
    plans["schema_version"] = 2  # a version 2 file with them has fields this version does not know
    old.write_text(json.dumps(plans))
    with pytest.raises(PlansError, match=r"unknown field\(s\) \['lr_schedule', 'optimizer'\]"):
        Plans.from_json(old)


def test_planners_resolve_by_name_and_unknown_names_list_the_known(tiny_atlas: Path, capsys) -> None:
    assert {"DefaultPlanner", "CPUPlanner"} <= set(available_planners())
    with pytest.raises(KeyError, match="available: CPUPlanner, DefaultPlanner"):
        get_planner("nnUNetPlanner")
    assert plan_main(["-d", "ATLASTiny", "-pl", "Nope", "--no-progress"]) == 1
    assert "unknown planner 'Nope'" in capsys.readouterr().err


def test_cpu_planner_coarsens_spacing(tiny_ctp: Path) -> None:
    plans = plan_and_preprocess("CTPTiny", planner="CPUPlanner", progress=False).plans
    assert plans.planner == "CPUPlanner"
    assert min(plans.configuration().target_spacing) >= 2.0
    aniso = plans.configuration("3d_aniso").network
    assert aniso.features[0] == 16 and max(aniso.features) <= 256, "half-width network for the CPU"
    pspnet = plans.configuration("2d_pspnet")
    assert pspnet.network.backbone == "resnet18" and "['resnet18']" in pspnet.reasons["network"]


def test_a_pspnet_batch_of_one_is_refused_naming_the_reason(tiny_ctp: Path) -> None:
    plans = plan_and_preprocess("CTPTiny", progress=False).plans
    pspnet = plans.configuration("2d_pspnet")
    assert pspnet.batch_size >= 2 and all(stage.batch_size >= 2 for stage in pspnet.schedule.stages)
    single = _with_batch(pspnet, 1)
    assert any("batches of 2 or more" in problem for problem in single.problems(len(plans.channels)))
    aniso = _with_batch(plans.configuration("3d_aniso"), 1)
    assert aniso.problems(len(plans.channels)) == []  # GroupNorm: a 3-D U-Net trains with batch 1


def _with_batch(configuration: Configuration, batch: int) -> Configuration:
    """``configuration`` with batch size ``batch``, in the configuration and in every stage alike."""
    stages = tuple(dataclasses.replace(stage, batch_size=batch) for stage in configuration.schedule.stages)
    return dataclasses.replace(
        configuration, batch_size=batch, schedule=dataclasses.replace(configuration.schedule, stages=stages)
    )


@pytest.mark.parametrize(("small_share", "choice"), [(0.5, "lesion"), (0.1, "voxel")])
def test_many_small_lesions_make_patches_choose_a_lesion_first(
    tiny_sources: dict, small_share: float, choice: str
) -> None:
    from autoseg.data.dataset import find_dataset
    from autoseg.plan.fingerprint import compute_fingerprint

    fingerprint = compute_fingerprint(find_dataset(str(tiny_sources["atlas"])), progress=False)
    fingerprint = dataclasses.replace(
        fingerprint, aggregate=dataclasses.replace(fingerprint.aggregate, share_of_lesions_below_1cm3=small_share)
    )
    configuration = get_planner("DefaultPlanner")(fingerprint).plan().configuration()
    assert configuration.sampling.lesion_choice == choice
    assert f"{small_share:.0%} of lesions" in configuration.reasons["sampling"]


def test_thin_slabs_stored_slab_axis_first_plan_and_predict_slices_along_the_canonical_axis(
    tiny_ctp: Path, reoriented_copy
) -> None:
    """Half the CT perfusion slabs stored with their 5 mm axis first ("SAL", every file of the case): the plan is the
    plan of the untouched dataset, the 2-D PSPNet slices along canonical axis 2, and the preprocessed arrays of a
    moved case are those of the untouched case, slice for slice."""
    untouched = plan_and_preprocess("CTPTiny", progress=False)
    identifier = untouched.plans.configuration("2d_pspnet").data_identifier
    folder = tiny_ctp.parent.parent / "preprocessed" / tiny_ctp.name / identifier
    before = {path.name: np.load(path) for path in folder.glob("*.npy")}
    cases = find_dataset("CTPTiny").cases()
    for case in cases[::2]:
        for path in (*case.images, case.label):
            reoriented_copy(path, path, "SAL")
    mixed = plan_and_preprocess("CTPTiny", progress=False)
    assert mixed.preprocessed[identifier] == [case.identifier for case in cases[::2]], "moved cases are redone"
    fingerprint = json.loads(mixed.fingerprint_path.read_text())
    assert fingerprint["aggregate"]["stored_orientations"].get("SAL", 0) >= 1
    for name in ("2d_pspnet", "3d_aniso"):
        a, b = untouched.plans.configuration(name), mixed.plans.configuration(name)
        assert (a.target_spacing, a.patch_size, a.slice_axis) == (b.target_spacing, b.patch_size, b.slice_axis), name
    assert mixed.plans.configuration("2d_pspnet").slice_axis == 2
    for name, array in before.items():
        np.testing.assert_allclose(np.load(folder / name), array, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("name", available_planners())
def test_every_planner_plans_tiny_data_and_every_configuration_builds(
    name: str, tiny_atlas: Path, tiny_ctp: Path
) -> None:
    """Each registered planner plans both kinds of tiny data into valid plans whose networks build."""
    for dataset in (tiny_atlas, tiny_ctp):
        planned = plan_and_preprocess(dataset.name, planner=name, progress=False).plans
        plans = Plans.from_json(preprocessed_root() / dataset.name / "plans.json")  # written, valid, the same
        assert plans == planned and plans.planner == name
        for configuration in plans.configurations.values():
            options = get_trainer(configuration.schedule.trainer).network_options()
            network = build_network(plans, configuration.name, **options)
            assert sum(p.numel() for p in network.parameters()) > 0, configuration.name


def test_a_planner_from_outside_the_package_is_used_once_registered(
    tiny_atlas: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = planners_base._REGISTRY
    monkeypatch.setattr(registry, "_classes", dict(registry._classes))
    monkeypatch.setattr(registry, "_explicit", set(registry._explicit))
    mine = type("MyPlanner", (get_planner("CPUPlanner"),), {"__module__": "__main__"})
    assert "MyPlanner" not in available_planners()
    with pytest.raises(KeyError, match="unknown planner 'MyPlanner'"):
        plan_and_preprocess(tiny_atlas.name, planner="MyPlanner", progress=False)
    register_planner(mine)
    assert plan_and_preprocess(tiny_atlas.name, planner="MyPlanner", progress=False).plans.planner == "MyPlanner"


def test_new_plans_get_the_residual_encoder_layout_and_unet_layout_chooses_the_other(
    tiny_atlas: Path, data_roots: Path, capsys: pytest.CaptureFixture
) -> None:
    """Each U-Net configuration says its layout and why; ``--unet-layout residual`` plans the earlier layout and
    says it was asked for; a plan that names no layout (written before the choice) reads as ``residual``; an unknown
    one is refused naming the field."""
    planned = plan_and_preprocess("ATLASTiny", progress=False).plans.configuration()
    assert planned.network.layout == "residual_encoder"
    assert "layout residual_encoder (nnU-Net's residual encoder" in planned.reasons["network"]
    assert plan_main(["-d", "ATLASTiny", "--unet-layout", "residual", "--no-progress", "-np", "1"]) == 0
    path = plans_path(data_roots, tiny_atlas.name)
    asked = Plans.from_json(path).configuration()
    assert asked.network.layout == "residual" and "as asked (--unet-layout)" in asked.reasons["network"]
    assert asked.network.features == planned.network.features
    raw = json.loads(path.read_text())
    del raw["configurations"]["3d_resunet"]["network"]["layout"]
    path.write_text(json.dumps(raw))
    assert Plans.from_json(path).configuration().network.layout == "residual"
    raw["configurations"]["3d_resunet"]["network"]["layout"] = "plain"
    path.write_text(json.dumps(raw))
    with pytest.raises(PlansError, match="configurations.3d_resunet.network.layout: unknown 'plain'"):
        Plans.from_json(path)
    with pytest.raises(SystemExit):
        plan_main(["-d", "ATLASTiny", "--unet-layout", "plain"])
    assert "invalid choice: 'plain'" in capsys.readouterr().err
