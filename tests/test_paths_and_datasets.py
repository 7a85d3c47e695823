"""Data roots and finding datasets by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.dataset import DatasetError, find_dataset, load_dataset
from autoseg.errors import UsageError
from autoseg.paths import preprocessed_root, raw_root, results_root


def test_one_home_folder_holds_all_roots_by_default(data_roots: Path) -> None:
    assert raw_root() == data_roots / "raw"
    assert preprocessed_root() == data_roots / "preprocessed"
    assert results_root() == data_roots / "results"


def test_each_root_can_be_set_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOSEG_RAW", str(tmp_path / "elsewhere"))
    assert raw_root() == tmp_path / "elsewhere"
    assert results_root().name == "results"


def _commands(tmp: Path) -> dict[str, tuple[object, list[str]]]:
    """Every command that reads a data root, with arguments that reach it."""
    from autoseg.commands import demo, export, find_best, import_model, plan, predict, pretrain, train

    (tmp / "in").mkdir(exist_ok=True)
    (tmp / "model.zip").write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
    return {
        "autoseg_plan": (plan.main, ["-d", "ATLASTiny", "--verify", "--no-progress"]),
        "autoseg_train": (train.main, ["-d", "ATLASTiny", "-f", "0"]),
        "autoseg_predict": (predict.main, ["-i", str(tmp / "in"), "-o", str(tmp / "out"), "--device", "cpu"]),
        "autoseg_find_best": (find_best.main, ["-d", "ATLASTiny"]),
        "autoseg_export": (export.main, ["-d", "ATLASTiny", "-o", str(tmp / "out.zip")]),
        "autoseg_import": (import_model.main, [str(tmp / "model.zip")]),
        "autoseg_pretrain": (pretrain.main, ["-d", "ATLASTiny", "-o", str(tmp / "w.pth")]),
        "autoseg_demo": (demo.main, ["atlas", "--tiny", "-n", "1"]),
    }


#: The commands (of :func:`_commands`) that read each root before anything else can go wrong.
READERS = {
    "AUTOSEG_HOME": {"autoseg_plan", "autoseg_train", "autoseg_predict", "autoseg_find_best", "autoseg_export"},
    "AUTOSEG_RAW": {"autoseg_plan", "autoseg_train", "autoseg_demo"},
    "AUTOSEG_PREPROCESSED": {"autoseg_train"},
    "AUTOSEG_RESULTS": {"autoseg_predict", "autoseg_find_best", "autoseg_export"},
}


@pytest.mark.parametrize("variable", sorted(READERS))
@pytest.mark.parametrize("below", [False, True])
def test_a_data_root_that_is_a_file_is_one_line_naming_it_in_every_command(
    tiny_atlas: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    variable: str,
    below: bool,
) -> None:
    file = tmp_path / "not_a_folder.txt"
    file.write_text("a file")
    path = file / "roots" if below else file
    monkeypatch.setenv(variable, str(path))
    reached, seen = set(), []
    for name, (main, arguments) in _commands(tmp_path).items():
        status = main(arguments)
        err = capsys.readouterr().err.strip().splitlines()
        seen.append((name, status, err))
        if not any(variable in line for line in err):
            continue  # this command never reads that root before its own error (e.g. no such dataset)
        reached.add(name)
        assert status == 1 and len(err) == 1, (name, err)
        assert err[0].startswith(f"error: {variable} = {path}: ") and "not a folder" in err[0], (name, err)
        assert (str(file) in err[0]) and ("which is a file" in err[0]) == below, (name, err)
    assert READERS[variable] <= reached, seen  # each command that reads the root says so, as the first thing
    assert file.read_text() == "a file"


def test_a_default_root_below_a_home_that_holds_a_file_of_its_name_is_named(
    data_roots: Path, capsys: pytest.CaptureFixture
) -> None:
    data_roots.mkdir(parents=True, exist_ok=True)
    (data_roots / "results").write_text("a file")
    with pytest.raises(UsageError, match=r"^AUTOSEG_RESULTS \(unset: a sub-folder of AUTOSEG_HOME\) = .*is a file"):
        results_root()


@pytest.mark.parametrize("name", ["ATLASTiny", "901", "Dataset901_ATLASTiny"])
def test_dataset_found_by_short_name_number_or_folder(tiny_atlas: Path, name: str) -> None:
    dataset = find_dataset(name)
    assert dataset.folder == tiny_atlas
    assert dataset.channel_names == ("T1",)
    assert len(dataset.cases()) == 4


def test_unknown_dataset_lists_the_available_ones(tiny_atlas: Path) -> None:
    with pytest.raises(DatasetError, match="available: Dataset901_ATLASTiny"):
        find_dataset("BRATS")


def test_subject_grouping_is_read(tiny_ctp: Path) -> None:
    cases = find_dataset("CTPTiny").cases()
    subjects = [case.subject for case in cases]
    assert len(set(subjects)) < len(subjects), "some subject should have two slabs"
    assert all(case.subject in case.identifier for case in cases)


def test_dataset_json_missing_keys_are_all_named(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "lesion": 1}}))
    with pytest.raises(DatasetError) as error:
        load_dataset(tmp_path)
    assert "'channel_names'" in str(error.value) and "'file_ending'" in str(error.value)
