"""Cross-validation splits: subject-grouped, deterministic, balanced, saved once as ``splits_final.json``.

``splits_final.json`` lives beside ``plans.json`` in ``AUTOSEG_PREPROCESSED/<dataset>/`` and is a list
with one entry per fold::

    [{"train": ["case_a", ...], "val": ["case_b", ...]}, ...]

It is written the first time a trainer asks for it and read back ever after, so every configuration and
every fold of a dataset is validated on the same cases. It may be replaced by hand (any number of folds);
the file wins over ``num_folds`` once it exists.

All cases of one subject (e.g. two CTP slabs of one patient) land in the same fold: otherwise a model
would be validated on a near copy of a training case.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError
from autoseg.io import read_json, write_json
from autoseg.paths import SPLITS_FILE
from autoseg.preprocessing import CaseProperties

Splits = list[dict[str, list[str]]]
"""One ``{"train": [...], "val": [...]}`` per fold, identifiers sorted."""


class SplitsError(AutosegError, ValueError):
    """``splits_final.json`` is malformed or names cases that do not exist."""


def make_splits(identifiers: Sequence[str], subjects: dict[str, str], num_folds: int = 5, seed: int = 12345) -> Splits:
    """Split cases into ``num_folds`` folds, keeping each subject's cases together.

    Subjects are shuffled with a generator seeded by ``seed`` (after sorting, so the input order does not
    matter), then assigned largest first to the fold that holds the fewest cases so far (ties: the lowest
    fold index). That keeps folds as balanced by case count as the subject groups allow.

    Args:
        identifiers: case identifiers; order is irrelevant.
        subjects: case -> subject. A case missing from it is its own subject.
        num_folds: number of folds, at least 2.
        seed: seed of the shuffle.

    Returns:
        One ``{"train": [...], "val": [...]}`` per fold, each list sorted; every case is in exactly one ``val``.

    Raises:
        ValueError: fewer than 2 folds, duplicate identifiers, or fewer cases or subjects than folds.

    Example:
        >>> make_splits(["a1", "a2", "b", "c"], {"a1": "A", "a2": "A"}, num_folds=2)
        [{'train': ['b', 'c'], 'val': ['a1', 'a2']}, {'train': ['a1', 'a2'], 'val': ['b', 'c']}]
    """
    cases = sorted(identifiers)
    if num_folds < 2:
        raise SplitsError(f"cross-validation needs at least 2 folds, got {num_folds}")
    if len(set(cases)) != len(cases):
        raise SplitsError(f"duplicate case identifiers: {sorted({c for c in cases if cases.count(c) > 1})}")
    if len(cases) < num_folds:
        raise SplitsError(
            f"{len(cases)} cases cannot fill {num_folds} folds: every fold needs a validation case; "
            f"use at most {len(cases)} folds"
        )
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(str(subjects.get(case, case)), []).append(case)
    if len(groups) < num_folds:
        raise SplitsError(
            f"{len(cases)} cases of {len(groups)} subjects cannot fill {num_folds} folds (a subject's "
            f"cases stay together); use at most {len(groups)} folds"
        )
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda subject: -len(groups[subject]))  # stable: the shuffle decides among equal sizes
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    for subject in order:
        min(folds, key=len).extend(groups[subject])  # min returns the first, i.e. lowest-index, of equals
    return [{"train": sorted(set(cases) - set(val)), "val": sorted(val)} for val in folds]


def load_or_create_splits(
    preprocessed_dataset_folder: Path, identifiers: Sequence[str], subjects: dict[str, str], num_folds: int = 5
) -> Splits:
    """Read ``splits_final.json`` from ``preprocessed_dataset_folder``, or create and save it.

    Args:
        preprocessed_dataset_folder: ``AUTOSEG_PREPROCESSED/<dataset>`` (where ``plans.json`` is).
        identifiers: the cases available for training; an existing file may name no others.
        subjects: case -> subject, for grouping (see :func:`make_splits`).
        num_folds: folds of a new file; an existing file keeps its own number.

    Raises:
        ValueError: too few cases or subjects for ``num_folds`` (new file).
        SplitsError: the existing file is malformed, names unknown cases, or puts a case in a fold's train and
            val, or in two folds' val; the message names the file and the problem.
    """
    path = Path(preprocessed_dataset_folder) / SPLITS_FILE
    if path.is_file():
        splits = read_json(path)
        problems = split_problems(splits, identifiers)
        if problems:
            raise SplitsError(f"{path}: " + "; ".join(problems) + ". Fix or delete the file to create new splits.")
        return [{"train": list(fold["train"]), "val": list(fold["val"])} for fold in splits]
    splits = make_splits(identifiers, subjects, num_folds)
    write_json(splits, path)
    return splits


def split_problems(splits: object, identifiers: Sequence[str]) -> list[str]:
    """What is wrong with ``splits`` (as read from JSON) given the available ``identifiers``; empty if nothing."""
    if (
        not isinstance(splits, list)
        or not splits
        or not all(
            isinstance(f, dict) and isinstance(f.get("train"), list) and isinstance(f.get("val"), list) for f in splits
        )
    ):
        return ['expected a non-empty list of {"train": [...], "val": [...]} objects']
    known, found, seen = set(identifiers), [], set()
    for index, fold in enumerate(splits):
        unknown = sorted((set(fold["train"]) | set(fold["val"])) - known)
        if unknown:
            found.append(
                f"fold {index} names cases that are not preprocessed: {unknown[:5]}"
                + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
            )
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            found.append(f"fold {index} has cases in train and val: {both[:5]}")
        twice = sorted(seen & set(fold["val"]))
        if twice:
            found.append(f"fold {index} validates cases already validated in an earlier fold: {twice[:5]}")
        seen |= set(fold["val"])
        if not fold["val"]:
            found.append(f"fold {index} has no validation cases")
    return found


def read_subjects(folder: Path, identifiers: Sequence[str]) -> dict[str, str]:
    """Case -> subject from the preprocessed ``CASE.json`` files in ``folder`` (the case itself if absent)."""
    return {case: CaseProperties.from_json(Path(folder) / f"{case}.json").subject or case for case in identifiers}
