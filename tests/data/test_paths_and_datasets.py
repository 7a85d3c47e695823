"""Data roots and finding datasets by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.commands.plan import main as plan_main
from autoseg.data.dataset import DatasetError, find_dataset, load_dataset
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


_SOUND = {"channel_names": {"0": "T1"}, "labels": {"background": 0, "lesion": 1}, "file_ending": ".nii.gz"}


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"5", "must be a JSON object with keys channel_names, labels, file_ending, found a number"),
        (b'"Dataset001"', "found a string"),
        (b"[1, 2]", "found a list"),
        (b"null", "found null"),
        (json.dumps({**_SOUND, "labels": ["background", "lesion"]}).encode(), "'labels' must map names to integers"),
        (json.dumps({**_SOUND, "labels": {"background": 0, "lesion": "1"}}).encode(), "must be integers"),
        (json.dumps({**_SOUND, "labels": {"background": 0, "lesion": True}}).encode(), "must be integers"),
        (json.dumps({**_SOUND, "labels": {"background": 0, "a": 1, "b": 1}}).encode(), "[1] declared under more"),
        (json.dumps({**_SOUND, "labels": {"background": 0, "lesion": 2**40}}).encode(), "outside"),
        (json.dumps({**_SOUND, "labels": {"lesion": 1}}).encode(), "with background 0"),
        (json.dumps({**_SOUND, "subjects": ["a", "b"]}).encode(), "'subjects' must map case to subject"),
        (json.dumps({**_SOUND, "subjects": {"c1": 3}}).encode(), "'subjects' must map case to subject"),
        (json.dumps({**_SOUND, "channel_names": ["T1"]}).encode(), "'channel_names' must map channel index"),
        (json.dumps({**_SOUND, "channel_names": {"0": 1}}).encode(), "'channel_names' must map channel index"),
        (json.dumps({**_SOUND, "channel_names": {"a": "T1"}}).encode(), "keys must be channel indices"),
        (json.dumps({**_SOUND, "file_ending": 5}).encode(), "'file_ending' must be a file ending"),
        (b'{"channel_names": {"0": "T\xff1"}}', "not UTF-8 text (byte 26"),
        (b'{"channel_names": ', "invalid JSON at line 1"),
    ],
)
def test_malformed_dataset_json_is_one_line_naming_the_file(
    data_roots: Path, capsys: pytest.CaptureFixture[str], content: bytes, problem: str
) -> None:
    folder = raw_root() / "Dataset123_Bad"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_bytes(content)
    with pytest.raises(DatasetError) as error:
        load_dataset(folder)
    message = str(error.value)
    assert message.startswith(f"{folder / 'dataset.json'}: ") and "\n" not in message and problem in message
    for command in (["-d", "Bad", "--no-progress"], ["-d", "Bad", "--verify", "--no-progress"]):
        assert plan_main(command) == 1
        error_lines = capsys.readouterr().err.strip().splitlines()
        assert error_lines == [f"error: {message}"]
