"""Data roots and finding datasets by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autoseg.commands.plan import main as plan_main
from autoseg.dataset import DatasetError, find_dataset, load_dataset
from autoseg.paths import preprocessed_root, raw_root, results_root


def test_one_home_folder_holds_all_roots_by_default(data_roots: Path) -> None:
    assert raw_root() == data_roots / "raw"
    assert preprocessed_root() == data_roots / "preprocessed"
    assert results_root() == data_roots / "results"


def test_each_root_can_be_set_on_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AUTOSEG_RAW", str(tmp_path / "elsewhere"))
    assert raw_root() == tmp_path / "elsewhere"
    assert results_root().name == "results"


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
