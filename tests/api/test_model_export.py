"""One-file models: ``autoseg_export``, ``autoseg_import`` and ``autoseg_predict -m`` (``autoseg.api.model_files``).

The session's tiny model (conftest ``tiny_model_home``: folds 0 and 1 of a 3-level U-Net with 4-16 features) is
copied into each test's data roots; for the other machine ``AUTOSEG_HOME`` then points at an empty folder.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import stat
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from autoseg import __version__
from autoseg.api.model_files import MANIFEST_FORMAT, ModelFileError, export_model, import_model, summarize_fingerprint
from autoseg.api.predict import PredictionOptions, predict
from autoseg.api.predict_models import ModelChoice
from autoseg.commands.export import main as export_main
from autoseg.commands.find_best import main as find_best_main
from autoseg.commands.import_model import main as import_main
from autoseg.commands.predict import main as predict_main
from autoseg.io.checkpoints import load_checkpoint
from autoseg.io.files import read_json
from autoseg.io.images import read_image
from autoseg.networks import build_network
from autoseg.paths import preprocessed_root, raw_root, results_root
from autoseg.plan.fingerprint import Fingerprint
from autoseg.plans import Network, Plans
from trainers import get_trainer

NAME = "Dataset961_ATLASPredict"  # what conftest's tiny_model_home trains, with TRAINER
TRAINER = "ResidualUNetTrainer"
CONFIGURATION = "3d_resunet"
MEMBER = f"{CONFIGURATION}/{TRAINER}"
FOLDS = [f"{MEMBER}/fold_{k}" for k in (0, 1)]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def home(trained_home: Path) -> Path:
    """This test's AUTOSEG_HOME holding a copy of the session's tiny model (conftest ``tiny_model_home``)."""
    return trained_home


@pytest.fixture
def scans(home: Path, tmp_path: Path) -> Path:
    """Two training scans copied out of the home, to predict on another machine."""
    folder = tmp_path / "scans"
    folder.mkdir()
    for path in sorted((home / "raw" / NAME / "imagesTr").glob("*_0000.nii.gz"))[:2]:
        shutil.copy(path, folder / path.name)
    return folder


def _other_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point AUTOSEG_HOME at an empty folder: a machine that never saw the training data."""
    fresh = tmp_path / "other_machine"
    monkeypatch.setenv("AUTOSEG_HOME", str(fresh))
    return fresh


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    """The predicted images of ``folder`` (not its prediction_summary.json)."""
    return {p.name: read_image(p)[0] for p in sorted(folder.glob("*.nii.gz"))}


QUIET = dict(device="cpu", progress=False, tta="none", save_probabilities=True)


# ---------------------------------------------------------------------------- export
def test_export_holds_weights_only_checkpoints_plans_and_a_manifest(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    target = tmp_path / "model.zip"
    assert export_main(["-d", "ATLASPredict", "-o", str(target)]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left
    with zipfile.ZipFile(target) as archive:
        names = sorted(archive.namelist())
        entries = {name: archive.read(name) for name in names}
    assert names == sorted(
        [
            "manifest.json",
            "dataset.json",
            "fingerprint_summary.json",
            *(f"{fold}/{file}" for fold in FOLDS for file in ("plans.json", "checkpoint_final.pth")),
        ]
    )
    manifest = json.loads(entries.pop("manifest.json"))
    assert manifest["format"] == MANIFEST_FORMAT and manifest["autoseg_version"] == __version__
    assert manifest["dataset"] == NAME and manifest["members"] == [MEMBER] and manifest["checkpoint"] == "final"
    assert manifest["folds"] == {MEMBER: ["0", "1"]}
    assert manifest["network_options"] == {fold: {} for fold in FOLDS}  # the plan's own network, as recorded
    assert manifest["files"] == {
        name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in entries.items()
    }
    runs = home / "results" / NAME
    for fold in FOLDS:
        assert entries[f"{fold}/plans.json"] == (runs / fold / "plans.json").read_bytes()
        original = load_checkpoint(runs / fold / "checkpoint_final.pth")
        (tmp_path / "slim.pth").write_bytes(entries[f"{fold}/checkpoint_final.pth"])
        slim = torch.load(tmp_path / "slim.pth", weights_only=True)
        assert "optimizer" not in slim and "rng" not in slim and "history" not in slim
        assert slim["trainer"] == TRAINER and slim["configuration"] == CONFIGURATION
        assert slim["network_options"] == original["network_options"] == {}
        assert slim["network"].keys() == original["network"].keys()
        assert all(torch.equal(slim["network"][k], original["network"][k]) for k in original["network"])
        assert len(entries[f"{fold}/checkpoint_final.pth"]) < (runs / fold / "checkpoint_final.pth").stat().st_size
    description = json.loads(entries["dataset.json"])
    assert description["channel_names"] == {"0": "T1"} and description["labels"] == {"background": 0, "lesion": 1}
    assert description["file_ending"] == ".nii.gz"
    summary = json.loads(entries["fingerprint_summary.json"])
    fingerprint = Fingerprint.from_json(home / "preprocessed" / NAME / "fingerprint.json")
    assert summary == summarize_fingerprint(fingerprint)
    assert summary["aggregate"]["median_spacing"] == list(fingerprint.aggregate.median_spacing)
    assert "cases" not in summary and "subjects" not in summary
    text = entries["fingerprint_summary.json"].decode()
    assert not [case for case in fingerprint.cases if case in text]  # no case name anywhere


def test_export_takes_the_members_model_selection_chose(home: Path, tmp_path: Path) -> None:
    assert find_best_main(["--metric", "dice", "--no-progress"]) == 0
    runs = home / "results" / NAME / CONFIGURATION
    shutil.copytree(runs / TRAINER, runs / "ZoomInOutTrainer")  # a second trainer: no default member any more
    with pytest.raises(ValueError, match="several trainers"):
        export_model(tmp_path / "none.zip", configurations=[CONFIGURATION])
    chosen = export_model(tmp_path / "chosen.zip").manifest
    assert chosen["members"] == [MEMBER] and "model_selection.json" in chosen["files"]
    assert json.loads(zipfile.ZipFile(tmp_path / "chosen.zip").read("postprocessing.json")) == read_json(
        home / "results" / NAME / "postprocessing.json"
    )
    named = export_model(
        tmp_path / "named.zip", configurations=[CONFIGURATION], trainers="ZoomInOutTrainer", folds=[1]
    ).manifest
    assert named["members"] == [f"{CONFIGURATION}/ZoomInOutTrainer"] and named["folds"] == {
        f"{CONFIGURATION}/ZoomInOutTrainer": ["1"]
    }
    # tuned for other members: neither the selection nor its post-processing travels with them
    assert sorted(named["files"]) == sorted(
        [
            "dataset.json",
            "fingerprint_summary.json",
            f"{CONFIGURATION}/ZoomInOutTrainer/fold_1/plans.json",
            f"{CONFIGURATION}/ZoomInOutTrainer/fold_1/checkpoint_final.pth",
        ]
    )


# ---------------------------------------------------------------------------- import and prediction elsewhere
def test_round_trip_into_an_empty_home_predicts_the_same_labels(
    home: Path, scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    predict(scans, tmp_path / "original", ModelChoice(dataset=NAME), PredictionOptions(**QUIET))
    export_model(tmp_path / "model.zip")
    fresh = _other_machine(tmp_path, monkeypatch)
    assert import_main([str(tmp_path / "model.zip")]) == 0
    assert capsys.readouterr().out.startswith(f"installed: {MEMBER} of {NAME}")
    installed = sorted(p.relative_to(fresh).as_posix() for p in fresh.rglob("*") if p.is_file())
    assert installed == sorted(
        [
            f"results/{NAME}/dataset.json",
            f"results/{NAME}/fingerprint_summary.json",
            *(f"results/{NAME}/{fold}/{file}" for fold in FOLDS for file in ("plans.json", "checkpoint_final.pth")),
        ]
    )
    predict(scans, tmp_path / "imported", ModelChoice(dataset=NAME), PredictionOptions(**QUIET))
    original, imported = _outputs(tmp_path / "original"), _outputs(tmp_path / "imported")
    assert original.keys() == imported.keys() and len(original) == 4
    for name in original:
        np.testing.assert_array_equal(imported[name], original[name])
    assert import_main([str(tmp_path / "model.zip")]) == 0  # again: the identical install is kept
    assert capsys.readouterr().out.startswith("already installed, identical")


def test_predict_with_a_model_file_on_a_machine_without_raw_or_preprocessed_data(
    home: Path, scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    assert find_best_main(["--metric", "dice", "--no-progress"]) == 0  # tuned post-processing travels along
    predict(scans, tmp_path / "original", options=PredictionOptions(**QUIET))
    export_model(tmp_path / "model.zip")
    _other_machine(tmp_path, monkeypatch)
    command = [
        "-m",
        str(tmp_path / "model.zip"),
        "-i",
        str(scans),
        "--device",
        "cpu",
        "--no-progress",
        "--no-tta",
        "--save-probabilities",
    ]
    assert predict_main([*command, "-o", str(tmp_path / "elsewhere")]) == 0
    assert not raw_root().exists() and not preprocessed_root().exists()
    original, elsewhere = _outputs(tmp_path / "original"), _outputs(tmp_path / "elsewhere")
    assert original.keys() == elsewhere.keys()
    for name in original:
        np.testing.assert_array_equal(elsewhere[name], original[name])
    assert predict_main([*command, "-o", str(tmp_path / "again")]) == 0  # the install is reused
    assert predict_main([*command, "-o", str(tmp_path / "x"), "-d", NAME]) == 1
    assert "a model file brings its own members and folds; leave out -d" in capsys.readouterr().err


def test_import_over_a_trained_model_needs_overwrite(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    export_model(tmp_path / "model.zip")
    fold = home / "results" / NAME / FOLDS[0]
    before = sorted(p.name for p in fold.iterdir())
    assert import_main([str(tmp_path / "model.zip")]) == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'model.zip'}: already installed in" in err and FOLDS[0] in err
    assert "autoseg_import --overwrite" in err
    assert sorted(p.name for p in fold.iterdir()) == before
    assert import_main([str(tmp_path / "model.zip"), "--overwrite"]) == 0
    assert sorted(p.name for p in fold.iterdir()) == ["checkpoint_final.pth", "plans.json"]
    assert "optimizer" not in load_checkpoint(fold / "checkpoint_final.pth")
    assert not [p for p in (home / "results").iterdir() if p.name.startswith(".")]  # no staging folder left


# ---------------------------------------------------------------------------- refused model files
class Payload:
    """Any class of our own: ``torch.load(weights_only=True)`` refuses to unpickle it."""


def _rewrite(
    source: Path,
    target: Path,
    change: Callable[[dict[str, bytes], dict], None],
    relist: bool = True,
    links: tuple[str, ...] = (),
) -> Path:
    """Copy the model file ``source`` to ``target`` with ``change(entries, manifest)`` applied; with ``relist`` the
    manifest lists every entry with its true checksum (so only the check under test can refuse); ``links`` are
    written as symbolic links."""
    with zipfile.ZipFile(source) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(entries.pop("manifest.json"))
    change(entries, manifest)
    if relist:
        manifest["files"] = {
            name: {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)} for name, data in entries.items()
        }
    with zipfile.ZipFile(target, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in entries.items():
            info = zipfile.ZipInfo(name)
            if name in links:
                info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, data)
    return target


def _pickled_checkpoint(entries: dict[str, bytes], manifest: dict) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"network": {"w": torch.zeros(1)}, "note": Payload()}, buffer)
    entries[f"{FOLDS[0]}/checkpoint_final.pth"] = buffer.getvalue()


def _tampered_plans(entries: dict[str, bytes], manifest: dict) -> None:
    entries[f"{FOLDS[1]}/plans.json"] = entries[f"{FOLDS[1]}/plans.json"].replace(
        b'"batch_size": 1', b'"batch_size": 9'
    )


REFUSALS = {
    "tampered entry": (_tampered_plans, False, (), f"{FOLDS[1]}/plans.json: SHA-256 or size differs from the manifest"),
    "pickled checkpoint": (
        _pickled_checkpoint,
        True,
        (),
        f"{FOLDS[0]}/checkpoint_final.pth: refused: the file holds pickled Python objects (test_model_export.Payload)",
    ),
    "path escaping": (lambda e, m: e.update({"../evil": b"x"}), True, (), "../evil: path escapes the target folder"),
    "absolute path": (lambda e, m: e.update({"/tmp/evil": b"x"}), True, (), "/tmp/evil: absolute or Windows path"),
    "symbolic link": (
        lambda e, m: e.update({f"{FOLDS[0]}/plans.json": b"/etc/passwd"}),
        True,
        (f"{FOLDS[0]}/plans.json",),
        f"{FOLDS[0]}/plans.json: a symbolic link",
    ),
    "unlisted entry": (
        lambda e, m: e.update({f"{FOLDS[0]}/checkpoint_best.pth": b"x"}),
        False,
        (),
        f"{FOLDS[0]}/checkpoint_best.pth: not listed in the manifest",
    ),
    "foreign file": (lambda e, m: e.update({"run.py": b"print()"}), True, (), "run.py: not part of an autoseg model"),
    "newer manifest": (
        lambda e, m: m.update(format=7),
        True,
        (),
        "manifest format 7 is newer than this autoseg reads (1)",
    ),
    "no manifest version": (lambda e, m: m.pop("format"), True, (), "manifest.json: no readable format version"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_import_refuses_an_unsafe_or_changed_model_file_and_writes_nothing(
    case: str, home: Path, scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    change, relist, links, message = REFUSALS[case]
    export_model(tmp_path / "model.zip")
    bad = _rewrite(tmp_path / "model.zip", tmp_path / "bad.zip", change, relist, links)
    fresh = _other_machine(tmp_path, monkeypatch)
    assert import_main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and message in err and err.count("\n") == 1, err
    assert not [p for p in fresh.rglob("*") if not p.is_dir()] and not (results_root() / NAME).exists()
    assert predict_main(["-m", str(bad), "-i", str(scans), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ModelFileError, match="refused|newer|format|escapes"):
        import_model(bad)


def test_import_refuses_an_entry_that_appears_twice(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    export_model(tmp_path / "model.zip")
    shutil.copy(tmp_path / "model.zip", tmp_path / "twice.zip")
    with zipfile.ZipFile(tmp_path / "twice.zip", "a") as archive, pytest.warns(UserWarning, match="Duplicate name"):
        archive.writestr(f"{FOLDS[0]}/plans.json", b"{}")  # a second entry shadows the checked one
    _other_machine(tmp_path, monkeypatch)
    with pytest.raises(ModelFileError, match=f"{FOLDS[0]}/plans.json: more than one entry of that name"):
        import_model(tmp_path / "twice.zip")


def test_a_pretrained_backbone_the_plans_name_is_not_needed_to_predict(home: Path) -> None:
    """A PSPNet plan naming a backbone file of the training machine: prediction builds the network without it
    (the checkpoint holds the weights)."""
    plans = Plans.from_json(home / "results" / NAME / FOLDS[0] / "plans.json")
    configuration = plans.configuration(CONFIGURATION)
    network = Network(
        architecture="PSPNet",
        backbone="resnet18",
        output_stride=8,
        pyramid_bins=(1, 2, 3, 6),
        pretrained="/training/machine/resnet18_atlas.pth",
    )
    pspnet = dataclasses.replace(configuration, name="2d_pspnet", network=network)
    plans = dataclasses.replace(plans, configurations={"2d_pspnet": pspnet}, default_configuration="2d_pspnet")
    assert (
        sum(
            p.numel()
            for p in build_network(plans, "2d_pspnet", **get_trainer("PSPNetTrainer").network_options()).parameters()
        )
        > 0
    )


def test_a_killed_import_left_behind_does_not_count_as_a_trained_dataset(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hard kill mid-extraction can leave the hidden temporary folder; ``-d`` may still be left out."""
    from autoseg.paths import trained_datasets

    model = export_model(tmp_path / "model.zip", NAME).path
    fresh = _other_machine(tmp_path, monkeypatch)
    import_model(model)
    installed = trained_datasets()
    leftover = fresh / "results" / f".{installed[0]}.import-killed"
    shutil.copytree(fresh / "results" / installed[0], leftover)
    assert trained_datasets() == installed


# ---------------------------------------------------------------------------- model files that would break prediction
def _edit_plans(change: Callable[[dict], None]) -> Callable[[dict[str, bytes], dict], None]:
    """A ``_rewrite`` change applying ``change`` to the configuration of every ``plans.json`` of the zip."""

    def edit(entries: dict[str, bytes], manifest: dict) -> None:
        for name in [n for n in entries if n.endswith("/plans.json")]:
            plans = json.loads(entries[name])
            change(plans["configurations"][CONFIGURATION])
            entries[name] = json.dumps(plans).encode()

    return edit


def _set_patch(configuration: dict, patch: list[int]) -> None:
    configuration["patch_size"] = patch
    configuration["schedule"]["stages"][-1]["patch_size"] = patch


def _tuned(**values: object) -> Callable[[dict[str, bytes], dict], None]:
    """A change adding ``postprocessing.json`` for the zip's own member with ``values`` (None: key left out)."""

    def add(entries: dict[str, bytes], manifest: dict) -> None:
        tuned = {"members": [MEMBER], "threshold": 0.5, "min_lesion_mm3": 0.0, **values}
        entries["postprocessing.json"] = json.dumps({k: v for k, v in tuned.items() if v is not None}).encode()

    return add


def _edit_weights(change: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[dict[str, bytes], dict], None]:
    """A change applying ``change`` to the network weights of fold 0's checkpoint."""

    def edit(entries: dict[str, bytes], manifest: dict) -> None:
        import io

        name = f"{FOLDS[0]}/checkpoint_final.pth"
        state = torch.load(io.BytesIO(entries[name]), weights_only=True)
        change(state["network"])
        buffer = io.BytesIO()
        torch.save(state, buffer)
        entries[name] = buffer.getvalue()

    return edit


def _first_conv(weights: dict[str, torch.Tensor]) -> str:
    return next(name for name, tensor in weights.items() if tensor.ndim == 5)


BROKEN = {
    "patch 10000³": (
        _edit_plans(lambda c: _set_patch(c, [10000] * 3)),
        "patch_size: [10000, 10000, 10000] must be positive and hold at most 33,554,432 voxels",
    ),
    "1e9 features": (
        _edit_plans(lambda c: c["network"].update(features=[4, 8, 10**9])),
        "network.features[2]: must lie in 1..2048 channels",
    ),
    "NaN spacing": (
        _edit_plans(lambda c: c.update(target_spacing=[float("nan"), 1.0, 1.0])),
        "target_spacing: needs 3 values in [0.01, 100] mm, got [nan, 1.0, 1.0]",
    ),
    "kernel 0": (
        _edit_plans(lambda c: c["network"].update(kernel_sizes=[[3, 3, 3], [0, 3, 3], [3, 3, 3]])),
        "network.kernel_sizes[1]: each edge in 1..7, got [0, 3, 3]",
    ),
    "even kernel": (
        _edit_plans(lambda c: c["network"].update(kernel_sizes=[[3, 3, 3], [4, 3, 3], [3, 3, 3]])),
        "no network can be built for 3d_resunet with ResidualUNetTrainer (kernel_sizes[1]=(4, 3, 3) must be odd",
    ),
    "mirror axis 7": (
        _edit_plans(lambda c: c.update(mirror_axes=[0, 7])),
        "mirror_axes: each of 0..2 at most once (the network's spatial axes), got [0, 7]",
    ),
    "stride 0": (
        _edit_plans(lambda c: c["network"].update(strides=[[1, 1, 1], [2, 0, 2], [2, 2, 2]])),
        "network.strides[1]: must be positive, got [2, 0, 2]",
    ),
    "planned minimum 1e12": (
        _edit_plans(lambda c: c["postprocessing"].update(min_lesion_mm3=1e12)),
        "postprocessing.min_lesion_mm3: must lie in [0, 100000] mm³",
    ),
    "threshold 2": (_tuned(threshold=2), "postprocessing.json: threshold: must lie in (0, 1), got 2.0"),
    "threshold 'high'": (_tuned(threshold="high"), "postprocessing.json: threshold: a number is needed, got 'high'"),
    "threshold missing": (_tuned(threshold=None), "postprocessing.json: threshold: a number is needed, got None"),
    "tuned minimum 1e12": (_tuned(min_lesion_mm3=1e12), "postprocessing.json: min_lesion_mm3: must lie in [0, 100000]"),
    "weights of another shape": (
        _edit_weights(lambda w: w.update({_first_conv(w): torch.zeros(2, 1, 3, 3, 3)})),
        "the weights do not fit the network its plans describe: ",
    ),
    "weights of another dtype": (
        _edit_weights(lambda w: w.update({_first_conv(w): w[_first_conv(w)].double()})),
        "float64, the network has",
    ),
    "a weight missing": (
        _edit_weights(lambda w: w.pop(_first_conv(w))),
        ": missing",
    ),
    "manifest's network options not the checkpoint's": (
        lambda e, m: m["network_options"].update({FOLDS[0]: {"network_class": "AsymmetricResidualUNet"}}),
        f"{FOLDS[0]}/checkpoint_final.pth: builds its network with {{}}, the manifest with "
        "{'network_class': 'AsymmetricResidualUNet'}; refused",
    ),
    "unknown network option": (
        lambda e, m: m["network_options"].update({FOLDS[0]: {"depth": 3}}),
        "no network can be built for 3d_resunet with ResidualUNetTrainer (manifest.json: network_options may hold "
        "only network_class (str), auxiliary_head (bool), found {'depth': 3})",
    ),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_import_and_predict_refuse_a_model_file_that_would_break_prediction(
    case: str, home: Path, scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Plans, post-processing and weights are checked against the network before anything is installed, in one
    line that names the entry; ``autoseg_predict -m`` refuses the same file before predicting."""
    change, message = BROKEN[case]
    export_model(tmp_path / "model.zip")
    bad = _rewrite(tmp_path / "model.zip", tmp_path / "bad.zip", change)
    fresh = _other_machine(tmp_path, monkeypatch)
    assert import_main([str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and message in err and err.count("\n") == 1, err
    assert "refused" in err
    assert not [p for p in fresh.rglob("*") if not p.is_dir()] and not (results_root() / NAME).exists()
    assert predict_main(["-m", str(bad), "-i", str(scans), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("options", [{}, {"network_class": "AsymmetricResidualUNet"}], ids=["plan's", "asymmetric"])
def test_the_expected_weights_are_those_of_the_built_network(home: Path, options: dict) -> None:
    """What import compares checkpoints with is built on the meta device, with the initializers skipped (and
    restored afterwards), and equals the real network's state dict."""
    from autoseg.networks.factory import expected_weights, weights_problem

    normal = torch.nn.init.normal_
    plans = Plans.from_json(home / "results" / NAME / FOLDS[0] / "plans.json")
    layout = expected_weights(plans, CONFIGURATION, **options)
    assert torch.nn.init.normal_ is normal
    state = build_network(plans, CONFIGURATION, **options).state_dict()
    assert layout == {name: (tuple(tensor.shape), tensor.dtype) for name, tensor in state.items()}
    assert weights_problem(layout, state) is None
    assert weights_problem(layout, {**state, "extra": torch.zeros(1)}) == "extra: not in the network"


def test_a_tuned_postprocessing_json_that_is_invalid_is_one_line_in_predict(
    home: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tuned = home / "results" / NAME / "postprocessing.json"
    tuned.write_text(json.dumps({"members": [MEMBER], "threshold": "high", "min_lesion_mm3": 0}))
    assert predict_main(["-d", NAME, "-i", str(scans), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == f"error: {tuned}: threshold: a number is needed, got 'high'\n"


def test_a_trained_checkpoint_that_does_not_fit_its_plans_is_one_line_in_predict(
    home: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = home / "results" / NAME / FOLDS[1] / "checkpoint_final.pth"
    state = load_checkpoint(path)
    name = _first_conv(state["network"])
    state["network"][name] = torch.zeros(2, 1, 3, 3, 3)
    torch.save(state, path)
    assert predict_main(["-d", NAME, "-i", str(scans), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: the weights do not fit the network of ") and err.count("\n") == 1
    assert f"{name}: shape [2, 1, 3, 3, 3] float32, the network has [" in err


def test_an_identical_install_is_checked_again_before_predicting(
    home: Path, scans: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """An install written by an earlier autoseg that did not check plans is reused only if it passes the checks."""
    export_model(tmp_path / "model.zip")
    bad = _rewrite(tmp_path / "model.zip", tmp_path / "bad.zip", BROKEN["mirror axis 7"][0])
    _other_machine(tmp_path, monkeypatch)
    with zipfile.ZipFile(bad) as archive:
        archive.extractall(results_root() / NAME)  # as an unchecking import would have installed it
    (results_root() / NAME / "manifest.json").unlink()
    assert predict_main(["-m", str(bad), "-i", str(scans), "-o", str(tmp_path / "out"), "--device", "cpu"]) == 1
    assert "mirror_axes: each of 0..2 at most once" in capsys.readouterr().err and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- a model file changes no other member
OTHER_TRAINER = "ZoomInOutTrainer"  # builds the same network from the same plans
OTHER_MEMBER = f"{CONFIGURATION}/{OTHER_TRAINER}"


def _as_other_member(*extra: tuple[str, dict]) -> Callable[[dict[str, bytes], dict], None]:
    """A change moving the zip's member to ``OTHER_MEMBER`` (as a model trained elsewhere) and adding the JSON
    ``extra`` entries (name, content)."""

    def change(entries: dict[str, bytes], manifest: dict) -> None:
        for name in [n for n in entries if n.startswith(f"{MEMBER}/")]:
            entries[name.replace(MEMBER, OTHER_MEMBER)] = entries.pop(name)
        manifest["members"] = [OTHER_MEMBER]
        manifest["folds"] = {OTHER_MEMBER: ["0", "1"]}
        for name in ("postprocessing.json", "model_selection.json"):  # the exported ones concern MEMBER
            entries.pop(name, None)
        entries.update({name: json.dumps(content).encode() for name, content in extra})

    return change


def _tuned_for(*members: str, threshold: float = 0.05) -> dict:
    return {"members": list(members), "threshold": threshold, "min_lesion_mm3": 0.0}


def _selection_for(*members: str) -> dict:
    return {"chosen": {"members": list(members)}, "postprocessing": {"members": list(members)}}


PLANTED = {
    "post-processing for the user's member": (
        _as_other_member(("postprocessing.json", _tuned_for(MEMBER))),
        f"postprocessing.json: concerns ['{MEMBER}'], not the members this file brings (['{OTHER_MEMBER}'])",
    ),
    "post-processing extending to the user's member": (
        _as_other_member(("postprocessing.json", _tuned_for(MEMBER, OTHER_MEMBER))),
        "postprocessing.json: concerns",
    ),
    "a member claimed without its weights": (
        lambda e, m: (
            _as_other_member(("postprocessing.json", _tuned_for(MEMBER, OTHER_MEMBER)))(e, m),
            m.update(members=[OTHER_MEMBER, MEMBER], folds={OTHER_MEMBER: ["0", "1"], MEMBER: ["0"]}),
        ),
        f"manifest.json: member {MEMBER} has no checkpoint in the zip",
    ),
    "model selection of the user's member": (
        _as_other_member(("model_selection.json", _selection_for(MEMBER))),
        "model_selection.json: concerns",
    ),
}


def _as_a_third_fold_of_the_users_member(entries: dict[str, bytes], manifest: dict) -> None:
    """The zip brings only a ``fold_2`` of the user's own member, with post-processing "tuned" for that member."""
    for name in [n for n in entries if n.startswith(f"{MEMBER}/fold_1/")]:
        entries.pop(name)
    for name in [n for n in entries if n.startswith(f"{MEMBER}/fold_0/")]:
        entries[name.replace("fold_0", "fold_2")] = entries.pop(name)
    manifest["folds"] = {MEMBER: ["2"]}
    options = manifest.get("network_options", {})
    manifest["network_options"] = {
        key.replace("fold_0", "fold_2"): value for key, value in options.items() if "fold_1" not in key
    }
    entries.pop("model_selection.json", None)
    entries["postprocessing.json"] = json.dumps(_tuned_for(MEMBER, threshold=0.01)).encode()


PLANTED["a fold added to the user's member"] = (
    _as_a_third_fold_of_the_users_member,
    f"would add fold_2 to {MEMBER} of {NAME}, which has fold_0, fold_1 of its own; refused",
)


@pytest.mark.parametrize("case", list(PLANTED))
def test_a_model_file_cannot_plant_files_for_a_member_it_does_not_bring(
    case: str, home: Path, scans: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A zip of another member with post-processing "tuned" for the user's own trained member: refused in one line
    naming the entry, nothing installed, and the user's model predicts as before."""
    change, message = PLANTED[case]
    predict(scans, tmp_path / "before", ModelChoice(dataset=NAME), PredictionOptions(**QUIET))
    export_model(tmp_path / "model.zip")
    bad = _rewrite(tmp_path / "model.zip", tmp_path / "bad.zip", change)
    results = home / "results" / NAME
    before = sorted(p.relative_to(results) for p in results.rglob("*"))
    assert import_main([str(bad), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: ") and message in err and err.count("\n") == 1, err
    assert sorted(p.relative_to(results) for p in results.rglob("*")) == before
    predict(scans, tmp_path / "after", ModelChoice(dataset=NAME), PredictionOptions(**QUIET))
    for name, labels in _outputs(tmp_path / "before").items():
        np.testing.assert_array_equal(_outputs(tmp_path / "after")[name], labels)


def test_a_model_file_does_not_replace_the_post_processing_of_other_members(
    home: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tuned = home / "results" / NAME / "postprocessing.json"
    tuned.write_text(json.dumps(_tuned_for(MEMBER, threshold=0.3)))
    export_model(tmp_path / "model.zip", configurations=[CONFIGURATION], trainers=TRAINER)
    own = _rewrite(
        tmp_path / "model.zip",
        tmp_path / "own.zip",
        _as_other_member(("postprocessing.json", _tuned_for(OTHER_MEMBER))),
    )
    assert import_main([str(own), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"postprocessing.json: would replace {tuned}, which concerns ['{MEMBER}']" in err
    assert json.loads(tuned.read_text())["threshold"] == 0.3
    assert not (home / "results" / NAME / OTHER_MEMBER).exists()
    # nor, where the user has none, does it make its member the dataset's default beside the user's
    tuned.unlink()
    assert import_main([str(own)]) == 1
    err = capsys.readouterr().err
    assert f"postprocessing.json: would make ['{OTHER_MEMBER}'] the default members of {NAME}" in err
    assert f"beside its own trained members ['{MEMBER}']" in err
    assert not tuned.exists() and not (home / "results" / NAME / OTHER_MEMBER).exists()
    tuned.write_text(json.dumps(_tuned_for(MEMBER, threshold=0.3)))
    # without the post-processing, the other member installs beside the user's
    plain = _rewrite(tmp_path / "model.zip", tmp_path / "plain.zip", _as_other_member())
    assert import_main([str(plain)]) == 0
    assert (home / "results" / NAME / OTHER_MEMBER / "fold_0" / "checkpoint_final.pth").is_file()
    assert json.loads(tuned.read_text())["threshold"] == 0.3


# ---------------------------------------------------------------------------- zip bombs and full disks
def _bomb(entries: dict[str, bytes], manifest: dict) -> None:
    """fold 0's checkpoint replaced by 64 MiB of zeros: 64 kB compressed, 1000 times as large unpacked."""
    entries[f"{FOLDS[0]}/checkpoint_final.pth"] = bytes(64 << 20)


def _big_tensor(entries: dict[str, bytes], manifest: dict) -> None:
    """A valid checkpoint holding an extra 8 MiB tensor of noise (incompressible) beside the network."""
    import io

    name = f"{FOLDS[0]}/checkpoint_final.pth"
    state = torch.load(io.BytesIO(entries[name]), weights_only=True)
    state["network"]["payload"] = torch.rand(2 << 20, generator=torch.Generator().manual_seed(0))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    entries[name] = buffer.getvalue()


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()] if folder.exists() else []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_bomb, "compressed bytes unpack to 67,108,864, more than 100 times (weights compress about 1.1 times)"),
        (_big_tensor, "more than the network its plans describe can hold"),
    ],
    ids=["deflate bomb", "valid tensor larger than the network"],
)
def test_import_refuses_a_zip_bomb_before_writing_anything(
    change: Callable,
    message: str,
    home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    export_model(tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    manifest = json.loads(entries.pop("manifest.json"))
    change(entries, manifest)
    manifest["files"] = {n: {"sha256": hashlib.sha256(d).hexdigest(), "bytes": len(d)} for n, d in entries.items()}
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        for name, data in entries.items():
            archive.writestr(name, data)
    assert bomb.stat().st_size < 9 << 20
    fresh = _other_machine(tmp_path, monkeypatch)
    written = []
    monkeypatch.setattr(
        "autoseg.api.model_files.install.open", lambda p, *a, **k: written.append(p) or open(p, *a, **k), raising=False
    )
    assert import_main([str(bomb)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bomb}: {FOLDS[0]}/checkpoint_final.pth: ") and err.count("\n") == 1, err
    assert message in err and err.endswith("; refused\n"), err
    assert not [p for p in written if str(p).endswith(".pth")]  # the checkpoint was never extracted
    assert not _files_under(fresh)


def test_import_refuses_sizes_above_the_limits_as_declared(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Declared sizes are checked against the limits before anything is read: a JSON entry above
    MAX_JSON_BYTES, a manifest that understates an entry's size, and more than the disk has free."""
    export_model(tmp_path / "model.zip")
    _other_machine(tmp_path, monkeypatch)
    monkeypatch.setattr("autoseg.api.model_files.archive.MAX_JSON_BYTES", 100)
    with pytest.raises(
        ModelFileError, match=r"plans.json: unpacks to [\d,]+ bytes, more than a JSON entry may \(100\); refused"
    ):
        import_model(tmp_path / "model.zip")
    monkeypatch.setattr("autoseg.api.model_files.archive.MAX_JSON_BYTES", 16 << 20)
    understated = _rewrite(
        tmp_path / "model.zip",
        tmp_path / "understated.zip",
        lambda e, m: m["files"]["dataset.json"].update(bytes=3),
        relist=False,
    )
    with pytest.raises(ModelFileError, match=r"dataset.json: the zip declares [\d,]+ bytes, the manifest 3; refused"):
        import_model(understated)
    monkeypatch.setattr("shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(
        ModelFileError, match=r"unpacks to [\d,]+ bytes, but only 1,000 are free under .*nothing was written"
    ):
        import_model(tmp_path / "model.zip")
    assert not _files_under(results_root())


def test_extraction_stops_at_the_declared_size(home: Path, tmp_path: Path) -> None:
    """Should an entry unpack to more than it declares, extraction stops there (a hard cap, whatever the header)."""
    from autoseg.api.model_files.install import _extract
    from autoseg.api.model_files.layout import ModelFile

    export_model(tmp_path / "model.zip")
    with zipfile.ZipFile(tmp_path / "model.zip") as archive:
        manifest = json.loads(archive.read("manifest.json"))
    manifest["files"]["dataset.json"]["bytes"] = 10
    staging = tmp_path / "staging"
    with pytest.raises(ModelFileError, match="dataset.json: unpacks to more than it declares; refused"):
        _extract(ModelFile(tmp_path / "model.zip", manifest, ["dataset.json"]), staging, ["dataset.json"])
    assert (staging / "dataset.json").stat().st_size <= 10


def test_a_full_disk_during_import_is_one_line_and_leaves_nothing(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import errno

    export_model(tmp_path / "model.zip")
    fresh = _other_machine(tmp_path, monkeypatch)
    real = zipfile.ZipExtFile.read

    def read(self, n: int = -1) -> bytes:
        if self.name.endswith(".pth"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, n)

    monkeypatch.setattr(zipfile.ZipExtFile, "read", read)
    monkeypatch.setattr("autoseg.api.model_files.archive._check_checksum", lambda *args: None)  # reads every entry
    assert import_main([str(tmp_path / "model.zip")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: no space left on device while writing {results_root() / NAME}\n"
    assert not _files_under(fresh)


# ---------------------------------------------------------------------------- temporaries of killed imports, destination
def test_a_later_import_removes_what_killed_imports_left_and_keeps_a_live_ones(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl
    import os
    import time

    from autoseg.api.model_files import STALE_IMPORT_SECONDS

    model = export_model(tmp_path / "model.zip").path
    fresh = _other_machine(tmp_path, monkeypatch)
    root = fresh / "results"
    folders = {name: root / f".{NAME}.import-{name}" for name in ("killed", "live", "just_made")}
    for folder in folders.values():
        (folder / MEMBER / "fold_0").mkdir(parents=True)
        (folder / MEMBER / "fold_0" / "checkpoint_final.pth").write_bytes(b"partial")
    old = time.time() - STALE_IMPORT_SECONDS - 5
    for name in ("killed", "live"):
        for path in [folders[name], *folders[name].rglob("*")]:
            os.utime(path, (old, old))
    unrelated = root / ".notes"
    unrelated.mkdir()
    handle = os.open(folders["live"], os.O_RDONLY)  # a running import holds its folder locked
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
        assert import_main([str(model)]) == 0
    finally:
        os.close(handle)
    assert not folders["killed"].exists()
    assert folders["live"].is_dir() and folders["just_made"].is_dir() and unrelated.is_dir()
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [NAME]


@pytest.mark.parametrize("kind", ["a file", "under a file"])
def test_import_into_a_results_root_that_is_not_a_folder_is_one_line(
    kind: str, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    model = export_model(tmp_path / "model.zip").path
    blocker = tmp_path / "results_file"
    blocker.write_text("not a folder")
    root = blocker if kind == "a file" else blocker / "results"
    monkeypatch.setenv("AUTOSEG_RESULTS", str(root))
    assert import_main([str(model)]) == 1
    err = capsys.readouterr().err
    # autoseg.paths names the variable before the import looks at the zip
    where = "is a file" if kind == "a file" else f"lies below {blocker}, which is a file"
    assert err.startswith(f"error: AUTOSEG_RESULTS = {root}: {where}, not a folder"), err
    assert err.count("\n") == 1 and blocker.read_text() == "not a folder"


def test_import_into_a_read_only_results_root_is_one_line(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import os

    model = export_model(tmp_path / "model.zip").path
    root = tmp_path / "read_only"
    root.mkdir()
    monkeypatch.setenv("AUTOSEG_RESULTS", str(root))
    real = os.access
    monkeypatch.setattr("os.access", lambda path, mode: False if Path(path) == root else real(path, mode))  # as root
    assert import_main([str(model)]) == 1
    assert capsys.readouterr().err == (
        f"error: {model}: cannot install into AUTOSEG_RESULTS={root}: not a writable folder (not writable); "
        "set AUTOSEG_RESULTS (or AUTOSEG_HOME) to one\n"
    )
    assert not list(root.iterdir())


# ---------------------------------------------------------------------------- model files from earlier versions
LEGACY = Path(__file__).parents[1] / "fixtures" / "model_2026_12_07"


def test_a_model_file_from_before_the_layout_change_predicts_as_it_did(
    data_roots: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A one-file model exported before the package layout (``fixtures/model_2026_12_07/README.md``) installs and
    predicts what that version predicted: probabilities within 1e-4 (floating-point kernels differ between CPUs in
    the last bits; on the machine that made the fixture they agree bit for bit), labels equal wherever the
    probability is not that close to the threshold (0.5). Its fingerprint summary holds no training ranges: one
    note, and no input checks."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert (
        predict_main(
            ["-m", str(LEGACY / "model.zip"), "-i", str(LEGACY / "scans"), "-o", str(tmp_path), "--save-probabilities"]
            + ["--device", "cpu", "--no-progress"]
        )
        == 0
    )
    note = (
        f"input checks skipped: {data_roots / 'results' / 'Dataset962_ATLASLegacy' / 'fingerprint_summary.json'}: "
        "no training ranges (a model file exported before they were recorded)"
    )
    assert capsys.readouterr().err.splitlines() == [note]
    summary = read_json(tmp_path / "prediction_summary.json")
    assert summary["input_checks"]["note"] == note.removeprefix("input checks skipped: ")
    assert summary["counts"]["input_warnings"] == 0
    assert all(entry["input_warnings"] == [] for entry in summary["per_case"].values())
    for case in ("sub-01", "sub-02"):
        expected, geometry = read_image(LEGACY / "expected" / f"{case}_probabilities.nii.gz", canonical=False)
        probabilities, written = read_image(tmp_path / f"{case}_probabilities.nii.gz", canonical=False)
        assert written == geometry
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=1e-4)
        labels = read_image(tmp_path / f"{case}.nii.gz", np.uint8, canonical=False)[0]
        expected_labels = read_image(LEGACY / "expected" / f"{case}.nii.gz", np.uint8, canonical=False)[0]
        differ = labels != expected_labels
        assert expected_labels.any() and not np.any(differ & (np.abs(expected - 0.5) >= 1e-4)), np.count_nonzero(differ)


def test_an_export_clears_what_a_killed_export_of_the_same_file_left(home: Path, tmp_path: Path) -> None:
    left = tmp_path / ".model.zip.6nm7_w93.tmp.zip"
    left.write_bytes(b"half a zip")
    export_model(tmp_path / "model.zip")
    assert not left.exists() and zipfile.is_zipfile(tmp_path / "model.zip")
