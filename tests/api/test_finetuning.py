"""Fine-tuning from a model a lab already has: ``autoseg_plan --like MODEL`` and ``autoseg_train --init-from MODEL``
(``planners.like``, ``autoseg.train.transfer``, ``autoseg.api.source_model``).

The model is the session's tiny one (conftest ``tiny_model_home``: a 3-level U-Net with 4-16 features trained for
one iteration on folds 0 and 1 of ``Dataset961_ATLASPredict``, channel ``T1``); the lab's dataset is a copy of the
tiny ATLAS-like one (4 cases), under another name, sometimes with other channels. Expected weights are read from the
model's checkpoints with ``torch.load(..., weights_only=True)`` here, not through the code under test.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
import torch

from autoseg.api.model_files import export_model
from autoseg.api.plan import plan_and_preprocess
from autoseg.api.train import TrainingOptions, prepare_run
from autoseg.commands.plan import main as plan_main
from autoseg.commands.train import main as train_main
from autoseg.data.dataset import find_dataset, write_dataset_json
from autoseg.errors import UsageError
from autoseg.io.files import write_json
from autoseg.io.images import read_image, write_image
from autoseg.networks import ResidualUNet, build_network, on_meta
from autoseg.plan.fingerprint import compute_fingerprint
from autoseg.plans import Plans
from autoseg.train.transfer import (
    SourceModel,
    TransferError,
    choose_initial_weights,
    initial_state,
    transferred_state,
)
from planners import get_planner

MODEL = "Dataset961_ATLASPredict"  # conftest's tiny_model_home
MODEL_MEMBER = "3d_resunet/ResidualUNetTrainer"
LAB = "Dataset970_Lab"
#: The first convolution of a ResidualUNet, the only layer that reads the input channels.
FIRST_CONV = "encoder.0.0.0.weight"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(trained_home: Path) -> Path:
    """This test's AUTOSEG_HOME with the session's tiny model trained in it."""
    return trained_home


def _lab_dataset(home: Path, source: Path, channels: tuple[str, ...] = ("T1",)) -> Path:
    """The tiny ATLAS-like dataset ``source`` as ``LAB`` with ``channels``: ``T1`` is the original scan, any other
    channel a contrast made from it (its square root, scaled), written as the channel files of that position."""
    folder = home / "raw" / LAB
    shutil.copytree(source / "labelsTr", folder / "labelsTr")
    for scan in sorted((source / "imagesTr").glob("*_0000.nii.gz")):
        image, geometry = read_image(scan)
        for index, name in enumerate(channels):
            data = image if name == "T1" else (10 * np.sqrt(np.maximum(image, 0))).astype(np.float32)
            write_image(data, geometry, folder / "imagesTr" / scan.name.replace("_0000", f"_{index:04d}"))
    write_dataset_json(folder, channels, len(list((source / "labelsTr").glob("*.nii.gz"))))
    return folder


def _two_folds(home: Path) -> None:
    """``splits_final.json`` of two folds for the lab's four cases (five folds need five cases)."""
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (home / "raw" / LAB / "labelsTr").glob("*.nii.gz"))
    write_json(
        [{"train": cases[2:], "val": cases[:2]}, {"train": cases[:2], "val": cases[2:]}],
        home / "preprocessed" / LAB / "splits_final.json",
    )


def _model_weights(home: Path, fold: int) -> dict[str, torch.Tensor]:
    path = home / "results" / MODEL / MODEL_MEMBER / f"fold_{fold}" / "checkpoint_final.pth"
    return torch.load(path, map_location="cpu", weights_only=True)["network"]


def _model_plans(home: Path) -> Plans:
    return Plans.from_json(home / "results" / MODEL / MODEL_MEMBER / "fold_0" / "plans.json")


QUIET = dict(num_processes=0, echo=False, val_iterations=0, device="cpu", precision="fp32", validation=False)


# ---------------------------------------------------------------------------- plan --like
def test_plan_like_inherits_the_models_network_and_normalization_and_says_so(
    home: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    _lab_dataset(home, tiny_sources["atlas"])
    own = plan_and_preprocess(LAB, progress=False).plans.configuration()
    assert plan_main(["-d", LAB, "--like", MODEL, "--no-progress", "-np", "1"]) == 0
    out = capsys.readouterr().out
    plans = Plans.from_json(home / "preprocessed" / LAB / "plans.json")
    model = _model_plans(home).configuration("3d_resunet")
    planned = plans.configuration()
    assert planned.name == "3d_resunet" and plans.default_configuration == "3d_resunet"
    # The model's topology, not the one this planner picks for the data (which is wider): every weight fits.
    assert own.network.features != model.network.features
    assert planned.network == dataclasses.replace(model.network, pretrained=None)
    assert build_network(plans, "3d_resunet").state_dict().keys() == _model_weights(home, 0).keys()
    assert all(
        tuple(tensor.shape) == tuple(_model_weights(home, 0)[name].shape)
        for name, tensor in build_network(plans, "3d_resunet").state_dict().items()
    )
    assert planned.reasons["network"].startswith(f"inherited from {MODEL} ({MODEL_MEMBER})")
    assert [n.scheme for n in planned.normalization] == [n.scheme for n in model.normalization]
    assert "inherited from the model's T1" in planned.reasons["normalization"]
    # Patch and batch are this dataset's, fitted to the inherited network (total stride 4).
    assert all(edge % 4 == 0 for edge in planned.patch_size) and planned.patch_size != model.patch_size
    assert planned.target_spacing == own.target_spacing
    # The fine-tuning schedule: a warm-up at a tenth of the first planned stage's rate, 5% of the epochs.
    warmup, first = planned.schedule.stages[:2]
    assert warmup.name == "warmup" and warmup.start_epoch == 0 and first.start_epoch == 50 == 0.05 * 1000
    assert warmup.learning_rate == pytest.approx(0.1 * first.learning_rate)
    assert (warmup.patch_size, warmup.batch_size) == (first.patch_size, first.batch_size)
    # Then the stages this planner plans for the data, at their rates and from their epochs.
    assert [(s.name, s.learning_rate) for s in planned.schedule.stages[1:]] == [
        (s.name, s.learning_rate) for s in own.schedule.stages
    ]
    assert [s.start_epoch for s in planned.schedule.stages[2:]] == [s.start_epoch for s in own.schedule.stages[1:]]
    assert "warm-up stage of 50 epoch(s)" in planned.reasons["schedule"]
    assert "T1 <- the model's T1 (its channel 0)" in plans.reasons["like"]
    assert f"autoseg_train -d {LAB} -f 0 --init-from {MODEL}" in out


def test_plan_like_a_model_file_on_another_machine(
    home: Path, tiny_sources: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_model(tmp_path / "model.zip", MODEL, folds=[0])
    monkeypatch.setenv("AUTOSEG_HOME", str(tmp_path / "lab"))  # a machine that never saw the model's data
    _lab_dataset(tmp_path / "lab", tiny_sources["atlas"])
    plans = plan_and_preprocess(LAB, progress=False, like=str(tmp_path / "model.zip")).plans
    assert plans.configuration().network.features == _model_plans(home).configuration("3d_resunet").network.features
    assert (tmp_path / "lab" / "results" / MODEL / MODEL_MEMBER / "fold_0" / "checkpoint_final.pth").is_file()
    assert f"planned like {tmp_path / 'model.zip'} ({MODEL}, {MODEL_MEMBER})" in plans.reasons["like"]


def test_a_channel_the_model_needs_that_the_dataset_lacks_is_named(
    home: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    _lab_dataset(home, tiny_sources["atlas"], channels=("FLAIR",))
    assert plan_main(["-d", LAB, "--like", MODEL, "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert f"needs channel T1, which {LAB} lacks (its channels: FLAIR)" in err
    assert not (home / "preprocessed" / LAB).exists()  # nothing written


def test_bad_models_and_options_are_one_line_errors(
    home: Path, tiny_sources: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _lab_dataset(home, tiny_sources["atlas"])

    def error(main, *arguments: str) -> str:
        """The last line on stderr of a command that failed: its own error (exit 1) or argparse's (exit 2)."""
        try:
            status = main(list(arguments))
        except SystemExit as exit:
            status = exit.code
        assert status in (1, 2)
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "error: NoSuchModel: neither a model file (autoseg_export writes one, a .zip) nor a trained dataset (" in (
        error(plan_main, "-d", LAB, "--like", "NoSuchModel")
    )
    assert f"error: {tmp_path / 'gone.zip'}: no such model file" == error(
        plan_main, "-d", LAB, "--like", str(tmp_path / "gone.zip")
    )
    (tmp_path / "weights.pth").write_bytes(b"not a zip")
    assert "not a readable zip file" in error(plan_main, "-d", LAB, "--like", str(tmp_path / "weights.pth"))
    assert "--normalization has no effect with --like" in error(
        plan_main, "-d", LAB, "--like", MODEL, "--normalization", "histeq"
    )
    plan_and_preprocess(LAB, progress=False, like=MODEL)
    assert "error: NoSuchModel: neither a model file" in error(train_main, "-d", LAB, "--init-from", "NoSuchModel")
    assert "error: --init-from and --pretrained both start the network from weights" in error(
        train_main, "-d", LAB, "--init-from", MODEL, "--pretrained", "x.pth"
    )
    assert "error: --init-fold chooses a fold of the model --init-from names" in error(
        train_main, "-d", LAB, "--init-fold", "1"
    )
    assert f"error: {MODEL} ({MODEL_MEMBER}) has no fold 7; its folds: 0, 1" == error(
        train_main, "-d", LAB, "-f", "full", "--init-from", MODEL, "--init-fold", "7"
    )
    # A checkpoint holding a pickled object is refused (read with weights_only=True), naming the file.
    checkpoint = home / "results" / MODEL / MODEL_MEMBER / "fold_0" / "checkpoint_final.pth"
    torch.save({**torch.load(checkpoint, weights_only=True), "note": PurePosixPath("x")}, checkpoint)
    assert f"error: {checkpoint}: refused: the file holds pickled Python objects (pathlib.PurePosixPath)" in error(
        train_main, "-d", LAB, "-f", "full", "--init-from", MODEL
    )


# ---------------------------------------------------------------------------- train --init-from
def test_channels_are_mapped_by_name_and_a_new_channel_starts_from_zero_weights(
    home: Path, tiny_sources: dict[str, Path]
) -> None:
    _lab_dataset(home, tiny_sources["atlas"], channels=("FLAIR", "T1"))  # T1 is the model's channel 0, here 1
    plans = plan_and_preprocess(LAB, progress=False, like=MODEL).plans
    assert [n.channel for n in plans.configuration().normalization] == ["FLAIR", "T1"]
    assert "FLAIR: new (zero weights); T1 <- the model's T1 (its channel 0)" in plans.reasons["like"]
    _two_folds(home)
    for fold in (0, 1):  # fold by fold: the lab's fold k starts from the model's fold k
        runner = prepare_run(LAB, None, fold, options=TrainingOptions(**QUIET, init_from=MODEL)).setup()
        loaded, expected = runner.network.state_dict(), _model_weights(home, fold)
        assert loaded.keys() == expected.keys()
        for name, tensor in expected.items():
            if name != FIRST_CONV:
                assert torch.equal(loaded[name], tensor), name
        assert torch.equal(loaded[FIRST_CONV][:, 1], expected[FIRST_CONV][:, 0])  # T1 <- T1
        assert torch.count_nonzero(loaded[FIRST_CONV][:, 0]) == 0  # FLAIR: new, zero weights
        # So the network computes from (FLAIR, T1) exactly what the model computed from T1.
        model = build_network(_model_plans(home), "3d_resunet")
        model.load_state_dict(expected)
        scans = torch.randn(1, 2, 16, 16, 16)
        with torch.no_grad():
            ours, theirs = runner.network.eval()(scans), model.eval()(scans[:, 1:])
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))
        log = (runner.output_folder / "log.txt").read_text()
        assert (
            f"weights: from {MODEL} ({MODEL_MEMBER}), fold {fold} (checkpoint_final.pth; its fold of the same " in log
        )
        assert f"new channels start from zero weights in {FIRST_CONV}" in log


def test_a_two_iteration_fine_tuning_run_starts_from_the_models_weights(
    home: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    _lab_dataset(home, tiny_sources["atlas"])
    plan_and_preprocess(LAB, progress=False, like=MODEL)
    arguments = ["-d", LAB, "-f", "full", "--init-from", MODEL, "--epochs", "1", "--iters-per-epoch", "2"]
    quiet = ["--val-iters", "0", "--no-validation", "-np", "0", "--device", "cpu", "--precision", "fp32"]
    assert train_main([*arguments, *quiet]) == 0
    folder = home / "results" / LAB / "3d_resunet" / "ZoomInOutTrainer" / "fold_full"
    trained = torch.load(folder / "checkpoint_final.pth", weights_only=True)["network"]
    start = _model_weights(home, 0)  # fold_full: the model has none, so its first fold
    # Two Adam steps at lr <= 1e-4 move each weight by about 2e-4 at most; a network trained from scratch would
    # start from other weights altogether.
    distance = max(float((trained[name] - tensor).abs().max()) for name, tensor in start.items())
    scratch = build_network(Plans.from_json(folder / "plans.json"), "3d_resunet").state_dict()
    assert 0 < distance < 1e-3 < max(float((scratch[n] - t).abs().max()) for n, t in start.items())
    assert (
        "fold 0 (checkpoint_final.pth; it has no fold full and no fold_full: its first fold)"
        in (folder / "log.txt").read_text()
    )
    assert "epoch 1/1" in capsys.readouterr().out


def test_weights_that_do_not_fit_name_the_layer(
    home: Path, tiny_sources: dict[str, Path], capsys: pytest.CaptureFixture
) -> None:
    _lab_dataset(home, tiny_sources["atlas"])
    plans = plan_and_preprocess(LAB, progress=False, like=MODEL).plans
    # One stage wider than the model's: only the layers of that stage (and those that read it) differ.
    configuration = plans.configuration()
    network = dataclasses.replace(configuration.network, features=(4, 8, 24))
    edited = dataclasses.replace(configuration, network=network)
    dataclasses.replace(plans, configurations={edited.name: edited}).to_json(home / "preprocessed" / LAB / "plans.json")
    arguments = ["-d", LAB, "-f", "full", "--init-from", MODEL, "--device", "cpu", "-np", "0"]
    assert train_main(arguments) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert (
        "the weights do not fit the planned network: encoder.2.0.conv1.weight: shape [16, 8, 3, 3, 3] float32, the "
        "network has [24, 8, 3, 3, 3] float32 (and " in err
    )
    assert not (home / "results" / LAB).exists()  # refused before anything was written
    # Planned without --like, the network is the planner's own, a stage deeper than the model.
    plan_and_preprocess(LAB, progress=False)
    assert train_main(arguments) == 1
    assert (
        "the weights do not fit the planned network: encoder.3.0.conv1.weight: missing (and " in capsys.readouterr().err
    )


def test_weights_of_another_network_class_name_the_trainer_that_builds_it(
    home: Path, tiny_sources: dict[str, Path]
) -> None:
    _lab_dataset(home, tiny_sources["atlas"])
    plans = plan_and_preprocess(LAB, progress=False, like=MODEL).plans
    checkpoint = home / "results" / MODEL / MODEL_MEMBER / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, weights_only=True)
    torch.save({**state, "network_options": {"network_class": "AsymmetricResidualUNet"}}, checkpoint)
    source = SourceModel(MODEL, MODEL, "3d_resunet", "AcuteStrokeTrainer", _model_plans(home), {"0": checkpoint})
    with pytest.raises(TransferError, match="AcuteStrokeTrainer.*train with -tr AcuteStrokeTrainer$"):
        initial_state(choose_initial_weights(source, "full"), plans, "3d_resunet", {})


# ---------------------------------------------------------------------------- the rules, on their own
def test_which_fold_of_the_model_starts_which_fold(tmp_path: Path) -> None:
    plans = None  # the fold rule reads only the checkpoints
    two = SourceModel("m.zip", "D", "c", "t", plans, {"0": tmp_path / "a", "1": tmp_path / "b"})
    assert choose_initial_weights(two, 1).checkpoint == tmp_path / "b"
    assert choose_initial_weights(two, "full").fold == "0"  # no fold_full: the first fold
    assert choose_initial_weights(two, 3).reason == "it has no fold 3 and no fold_full: its first fold"
    assert choose_initial_weights(two, 0, init_fold="1").fold == "1"  # one fold's weights for every fold
    with_full = dataclasses.replace(two, checkpoints={**two.checkpoints, "full": tmp_path / "f"})
    assert choose_initial_weights(with_full, 3).fold == "full"
    with pytest.raises(TransferError, match="has no fold 7; its folds: 0, 1$"):
        choose_initial_weights(two, 0, init_fold=7)


def test_input_channels_map_through_every_replica_of_a_symmetric_network() -> None:
    # A first convolution of 2 output channels reading (A, B, mirror A, mirror B); the model read (B, mirror B).
    model = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(2, 2, 3)
    own = torch.full((2, 4, 3), -1.0)
    layout = {"conv.weight": ((2, 4, 3), torch.float32), "norm.weight": ((5,), torch.float32)}
    weights = {"conv.weight": model, "norm.weight": torch.ones(5)}
    mapped = transferred_state(weights, layout, {"conv.weight": 1}, [None, 0], 1, own={"conv.weight": own})
    expected = torch.zeros(2, 4, 3)
    expected[:, 1], expected[:, 3] = model[:, 0], model[:, 1]  # B <- B, mirror B <- mirror B; A, mirror A: zeros
    assert torch.equal(mapped["conv.weight"], expected) and torch.equal(mapped["norm.weight"], torch.ones(5))
    with pytest.raises(TransferError, match=r"norm.weight: shape \[4\] float32, the network has \[5\] float32"):
        transferred_state({**weights, "norm.weight": torch.ones(4)}, layout, {"conv.weight": 1}, [None, 0], 1)
    with pytest.raises(
        TransferError, match=r"conv.weight: shape \[2, 2, 3\] reads 2 input channels \(axis 1\), the model's plans 4"
    ):
        transferred_state(weights, layout, {"conv.weight": 1}, [None, 0], 2)
    with pytest.raises(TransferError, match=r"conv.weight: shape \[3, 2, 3\] float32, the network has \[2, 4, 3\]"):
        transferred_state({**weights, "conv.weight": torch.zeros(3, 2, 3)}, layout, {"conv.weight": 1}, [None, 0], 1)


def test_a_symmetric_histogram_equalized_model_is_planned_as_it_is_and_a_pspnet_is_refused(
    tiny_sources: dict[str, Path],
) -> None:
    fingerprint = compute_fingerprint(find_dataset(str(tiny_sources["atlas"])), progress=False)
    model_plans = get_planner("DefaultPlanner")(fingerprint, normalization="histeq").plan()
    model = model_plans.configuration("3d_resunet_sym_histeq")
    source = SourceModel("m.zip", "D", model.name, "ZoomInOutTrainer", model_plans, {})
    plans = get_planner("CPUPlanner")(fingerprint, like=source).plan()
    planned = plans.configuration()
    assert list(plans.configurations) == ["3d_resunet_sym_histeq"] and planned.symmetry == model.symmetry
    assert planned.network == model.network and planned.data_identifier.endswith("_sym_histeq")
    assert [n.scheme for n in planned.normalization] == ["histogram_equalization"]
    assert planned.reasons["symmetry"].startswith("inherited from m.zip (D, 3d_resunet_sym_histeq/ZoomInOutTrainer)")
    assert planned.schedule.trainer == "ZoomInOutTrainer" and planned.schedule.stages[0].name == "warmup"
    assert not plans.problems()
    slabs = compute_fingerprint(find_dataset(str(tiny_sources["ctp"])), progress=False)
    pspnet = get_planner("DefaultPlanner")(slabs).plan()
    source = SourceModel("ctp.zip", "C", "2d_pspnet", "PSPNetTrainer", pspnet, {})
    with pytest.raises(TransferError, match="a 2-D PSPNet \\(2d_pspnet\\); --like plans the residual 3-D U-Net"):
        get_planner("DefaultPlanner")(slabs, like=source).plan()


def test_a_model_of_the_earlier_residual_layout_is_planned_like_in_its_own_layout(
    tiny_sources: dict[str, Path],
) -> None:
    """Models trained before plans chose a layout keep theirs (``residual``): the planned network is the model's,
    and patch and batch are fitted to that network's memory, not to the layout new plans get."""
    fingerprint = compute_fingerprint(find_dataset(str(tiny_sources["atlas"])), progress=False)
    own = get_planner("DefaultPlanner")(fingerprint, unet_layout="residual").plan()
    assert own.configuration().network.layout == "residual"
    source = SourceModel("old.zip", "D", "3d_resunet", "ZoomInOutTrainer", own, {})
    planner = get_planner("DefaultPlanner")(fingerprint, like=source)
    assert planner.unet_layout == "residual"
    planned = planner.plan().configuration()
    assert planned.network.layout == "residual" and "layout residual" in planned.reasons["network"]
    memory = on_meta(
        ResidualUNet,
        in_channels=1,
        num_classes=1,
        features=planned.network.features,
        strides=planned.network.strides,
        kernel_sizes=planned.network.kernel_sizes,
        layout="residual",
    ).training_memory_bytes(patch_size=planned.patch_size, batch_size=planned.batch_size, bytes_per_activation=4)
    assert planned.estimated_memory_gb == pytest.approx(memory / 1024**3, abs=1e-3)
    with pytest.raises(UsageError, match="the U-Net layout is the model's when planning like old.zip"):
        get_planner("DefaultPlanner")(fingerprint, like=source, unet_layout="residual_encoder")
