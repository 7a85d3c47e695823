"""Cross-validation splits: deterministic, order-independent, subject-grouped, balanced, saved once."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from autoseg.io.files import read_json, write_json
from autoseg.io.geometry import Geometry
from autoseg.preprocess.cases import CaseProperties
from autoseg.train.splits import (
    SPLITS_FILE,
    SplitsError,
    extend_splits,
    load_or_create_splits,
    make_splits,
    read_subjects,
    resplit,
    splits_problem,
)

# 23 cases of 17 subjects: the last 9 cases belong to 3 subjects (e.g. several CTP slabs of one patient).
CASES = [f"case_{i:02d}" for i in range(23)]
SUBJECTS = {case: f"subject_{i if i < 14 else 14 + (i - 14) // 3:02d}" for i, case in enumerate(CASES)}


def test_every_case_validated_exactly_once_and_never_trained_on_in_its_fold() -> None:
    splits = make_splits(CASES, SUBJECTS, num_folds=5)
    assert len(splits) == 5
    validated = [case for fold in splits for case in fold["val"]]
    assert sorted(validated) == sorted(CASES)
    for fold in splits:
        assert sorted(fold["train"] + fold["val"]) == sorted(CASES)
        assert fold["train"] == sorted(fold["train"]) and fold["val"] == sorted(fold["val"])


def test_subjects_stay_together_and_folds_are_balanced() -> None:
    splits = make_splits(CASES, SUBJECTS, num_folds=5)
    fold_of = {case: index for index, fold in enumerate(splits) for case in fold["val"]}
    for subject in set(SUBJECTS.values()):
        folds = {fold_of[case] for case, owner in SUBJECTS.items() if owner == subject}
        assert len(folds) == 1, subject
    sizes = [len(fold["val"]) for fold in splits]
    assert max(sizes) - min(sizes) <= 1, sizes  # 23 cases: 5, 5, 5, 4, 4 is reachable with these groups


def test_same_inputs_give_same_splits_in_any_order_and_the_seed_matters() -> None:
    first = make_splits(CASES, SUBJECTS)
    shuffled = CASES[7:] + CASES[:7][::-1]
    reordered_subjects = dict(reversed(list(SUBJECTS.items())))
    assert make_splits(shuffled, reordered_subjects) == first
    assert make_splits(CASES, SUBJECTS, seed=1) != first


def test_cases_without_subject_are_their_own_subject() -> None:
    splits = make_splits(["a", "b", "c"], {}, num_folds=3)
    assert sorted(len(fold["val"]) for fold in splits) == [1, 1, 1]


@pytest.mark.parametrize(
    "cases, subjects, folds, message",
    [
        (["a", "b", "c"], {}, 5, "3 cases cannot fill 5 folds"),
        (["a", "b", "c"], {"a": "s", "b": "s"}, 3, "2 subjects cannot fill 3 folds"),
        (["a", "a", "b"], {}, 2, "duplicate"),
        (["a", "b"], {}, 1, "at least 2 folds"),
    ],
)
def test_too_few_cases_or_subjects_are_refused(cases, subjects, folds, message) -> None:
    with pytest.raises(ValueError, match=message):
        make_splits(cases, subjects, num_folds=folds)


def test_created_once_then_read_back(tmp_path: Path) -> None:
    created = load_or_create_splits(tmp_path, CASES, SUBJECTS)
    assert read_json(tmp_path / SPLITS_FILE) == created
    edited = [{"train": CASES[:20], "val": CASES[20:]}, {"train": CASES[3:], "val": CASES[:3]}]
    write_json(edited, tmp_path / SPLITS_FILE)  # a hand-made file wins, with its own number of folds
    assert load_or_create_splits(tmp_path, CASES, SUBJECTS) == edited


@pytest.mark.parametrize(
    "content, message",
    [
        ([{"train": ["case_00"], "val": ["gone"]}], r"not preprocessed: \['gone'\]"),
        ([{"train": ["case_00"], "val": ["case_00"]}], "in train and val"),
        ([{"train": [], "val": ["case_00"]}, {"train": [], "val": ["case_00"]}], "already validated"),
        ({"train": []}, "expected a non-empty list"),
    ],
)
def test_invalid_saved_splits_are_reported_with_the_file(tmp_path: Path, content, message) -> None:
    write_json(content, tmp_path / SPLITS_FILE)
    with pytest.raises(SplitsError, match=message) as error:
        load_or_create_splits(tmp_path, CASES, SUBJECTS)
    assert SPLITS_FILE in str(error.value)


def test_subjects_are_read_from_preprocessed_properties(tmp_path: Path) -> None:
    geometry = Geometry((4, 4, 4), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    properties = CaseProperties(
        geometry=geometry,
        crop_box=((0, 4),) * 3,
        cropped_shape=(4, 4, 4),
        resampled_shape=(4, 4, 4),
        target_spacing=(1.0, 1.0, 1.0),
    )
    replace(properties, case="a", subject="S1").to_json(tmp_path / "a.json")
    replace(properties, case="b").to_json(tmp_path / "b.json")
    assert read_subjects(tmp_path, ["a", "b"]) == {"a": "S1", "b": "b"}


def test_splits_that_leave_a_case_out_are_refused_with_the_resplit_options(tmp_path: Path) -> None:
    folder = tmp_path / "Dataset001_X"
    folder.mkdir()
    write_json(make_splits(CASES[:-2], SUBJECTS), folder / SPLITS_FILE)  # two cases added since
    with pytest.raises(SplitsError, match=r"leaves out cases that are in no fold: \['case_21', 'case_22'\]") as error:
        load_or_create_splits(folder, CASES, SUBJECTS)
    message = str(error.value)
    assert "autoseg_plan -d Dataset001_X --resplit keep" in message and "--resplit fresh" in message


def test_splits_that_put_one_subjects_cases_in_two_folds_are_refused_with_a_fresh_split(tmp_path: Path) -> None:
    """dataset.json's subjects changed after the splits were made: two cases validated in different folds now belong
    to one subject, which would sit on both sides of a fold."""
    folder = tmp_path / "Dataset001_X"
    folder.mkdir()
    splits = make_splits(CASES, SUBJECTS)
    write_json(splits, folder / SPLITS_FILE)
    first, second = sorted([splits[0]["val"][0], splits[1]["val"][0]])
    joined = {**SUBJECTS, first: "S1", second: "S1"}
    with pytest.raises(
        SplitsError, match=rf"subject S1's cases are validated in folds 0, 1 \(\['{first}', '{second}'\]\)"
    ):
        load_or_create_splits(folder, CASES, joined)
    assert splits_problem(folder / SPLITS_FILE, CASES, joined).endswith(
        "make new splits with autoseg_plan -d Dataset001_X --resplit fresh"
    )
    assert splits_problem(folder / SPLITS_FILE, CASES, SUBJECTS) is None  # as they were made: sound
    assert load_or_create_splits(folder, CASES, SUBJECTS) == splits


def test_extend_keeps_every_case_in_its_fold_and_puts_new_cases_beside_their_subject() -> None:
    old = make_splits(CASES, SUBJECTS)
    gone = old[1]["val"][0]
    # case_23 is a new slab of subject_16 (already in a fold); case_24 and case_25 are new subjects.
    cases = [c for c in CASES if c != gone] + ["case_23", "case_24", "case_25"]
    subjects = {**SUBJECTS, "case_23": "subject_16", "case_24": "subject_24", "case_25": "subject_25"}
    new = extend_splits(old, cases, subjects)
    assert sorted(case for fold in new for case in fold["val"]) == sorted(cases)  # every case validated once
    for before, after in zip(old, new):
        assert set(before["val"]) - {gone} <= set(after["val"])  # nobody moved
        assert sorted(after["train"] + after["val"]) == sorted(cases)
    fold_of = {case: index for index, fold in enumerate(new) for case in fold["val"]}
    assert fold_of["case_23"] == fold_of["case_20"]  # case_20 is subject_16's too
    unchanged = [index for index, (a, b) in enumerate(zip(old, new)) if a["val"] == b["val"]]
    assert len(unchanged) >= 2  # three folds changed at most: one lost a case, two took the new subjects
    assert extend_splits(new, cases, subjects) == new  # nothing to do


def test_extend_refuses_a_fold_left_without_validation_cases() -> None:
    old = [{"train": ["b", "c"], "val": ["a"]}, {"train": ["a"], "val": ["b", "c"]}]
    with pytest.raises(SplitsError, match=r"fold\(s\) 0 would have no validation case left.*--resplit fresh"):
        extend_splits(old, ["b", "c"], {})
    assert extend_splits(old, ["b", "c", "d"], {}) == [
        {"train": ["b", "c"], "val": ["d"]},
        {"train": ["d"], "val": ["b", "c"]},
    ]


def test_resplit_keep_and_fresh_write_the_file_and_say_which_folds_kept_their_cases(tmp_path: Path) -> None:
    assert "no splits yet, made 5 folds" in resplit(tmp_path, CASES[:-1], SUBJECTS, "keep")
    old = read_json(tmp_path / SPLITS_FILE)
    line = resplit(tmp_path, CASES, SUBJECTS, "keep")
    assert "+['case_22']" in line and "validate the same cases as before" in line and "retrain fold(s) " in line
    assert read_json(tmp_path / SPLITS_FILE) == extend_splits(old, CASES, SUBJECTS)
    assert "nothing changed" in resplit(tmp_path, CASES, SUBJECTS, "keep")
    (tmp_path / SPLITS_FILE).write_text("[{")  # unreadable: keep refuses, fresh replaces it
    with pytest.raises(SplitsError, match="invalid JSON.*--resplit fresh"):
        resplit(tmp_path, CASES, SUBJECTS, "keep")
    assert "replaced by 5 new folds" in resplit(tmp_path, CASES, SUBJECTS, "fresh")
    assert read_json(tmp_path / SPLITS_FILE) == make_splits(CASES, SUBJECTS)
    with pytest.raises(SplitsError, match=r"unknown --resplit 'new', use one of \['keep', 'fresh'\]"):
        resplit(tmp_path, CASES, SUBJECTS, "new")
