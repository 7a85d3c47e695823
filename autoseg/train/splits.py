"""Cross-validation splits: subject-grouped, deterministic, balanced, saved once as ``splits_final.json``.

``splits_final.json`` lives beside ``plans.json`` in ``AUTOSEG_PREPROCESSED/<dataset>/`` and is a list
with one entry per fold::

    [{"train": ["case_a", ...], "val": ["case_b", ...]}, ...]

It is written the first time a trainer asks for it and read back ever after, so every configuration and
every fold of a dataset is validated on the same cases. It may be replaced by hand (any number of folds);
the file wins over ``num_folds`` once it exists.

The file must name the dataset's cases: training refuses splits that name a case no longer preprocessed or
leave a case out of every fold (a dataset that changed after its splits were made). ``autoseg_plan
--resplit`` re-splits (:data:`RESPLIT_OPTIONS`): ``keep`` leaves every remaining case in its fold and spreads
the new ones over the folds (:func:`extend_splits`), so a fold whose validation cases did not change keeps its
trained models; ``fresh`` makes new splits from scratch (:func:`make_splits`).

All cases of one subject (e.g. two CTP slabs of one patient) land in the same fold: otherwise a model
would be validated on a near copy of a training case.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from autoseg.errors import AutosegError, DataError, InvalidFileError, MissingFileError, UsageError
from autoseg.io.files import read_json, write_json
from autoseg.paths import SPLITS_FILE
from autoseg.preprocess.cases import CaseProperties
from autoseg.train.loading import case_identifiers
from autoseg.train.options import Fold

Splits = list[dict[str, list[str]]]
"""One ``{"train": [...], "val": [...]}`` per fold, identifiers sorted."""


#: ``autoseg_plan --resplit`` choices: ``keep`` (every case stays in its fold; new cases are spread over the
#: folds) and ``fresh`` (new splits from scratch).
RESPLIT_OPTIONS = ("keep", "fresh")
#: Folds of new splits.
DEFAULT_FOLDS = 5


class SplitsError(AutosegError, ValueError):
    """``splits_final.json`` is malformed or names cases that do not exist."""


def check_resplit_option(how: str) -> None:
    """Raises SplitsError naming the choices when ``how`` is not one of :data:`RESPLIT_OPTIONS`."""
    if how not in RESPLIT_OPTIONS:
        raise SplitsError(f"unknown --resplit '{how}', use one of {list(RESPLIT_OPTIONS)}")


def resplit_hint(dataset: str) -> str:
    """How to re-split the cases of ``dataset`` (its folder name) after it changed: both ``--resplit`` options."""
    return (
        f"re-split with autoseg_plan -d {dataset} --resplit keep (every remaining case stays in its fold and new "
        "cases are spread over the folds, so a fold whose validation cases are unchanged keeps its trained "
        "models) or --resplit fresh (new splits from scratch)"
    )


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
    groups = _subject_groups(cases, subjects)
    if len(groups) < num_folds:
        raise SplitsError(
            f"{len(cases)} cases of {len(groups)} subjects cannot fill {num_folds} folds (a subject's "
            f"cases stay together); use at most {len(groups)} folds"
        )
    folds: list[list[str]] = [[] for _ in range(num_folds)]
    _distribute(groups, folds, seed)
    return [{"train": sorted(set(cases) - set(val)), "val": sorted(val)} for val in folds]


def _subject_groups(cases: Sequence[str], subjects: dict[str, str]) -> dict[str, list[str]]:
    """Subject -> its cases (a case missing from ``subjects`` is its own subject)."""
    groups: dict[str, list[str]] = {}
    for case in cases:
        groups.setdefault(str(subjects.get(case, case)), []).append(case)
    return groups


def _distribute(groups: dict[str, list[str]], folds: list[list[str]], seed: int) -> None:
    """Add each subject's cases to the validation cases ``folds`` of the fold that holds the fewest so far (ties:
    the lowest index), largest subject first, subjects of equal size in an order shuffled by ``seed``."""
    order = sorted(groups)
    np.random.default_rng(seed).shuffle(order)
    order.sort(key=lambda subject: -len(groups[subject]))  # stable: the shuffle decides among equal sizes
    for subject in order:
        min(folds, key=len).extend(groups[subject])  # min returns the first, i.e. lowest-index, of equals


def extend_splits(splits: Splits, identifiers: Sequence[str], subjects: dict[str, str], seed: int = 12345) -> Splits:
    """``autoseg_plan --resplit keep``: ``splits`` brought up to date with the cases ``identifiers``.

    Every case of ``splits`` that is still there stays where it was (validated in the same fold, trained on in
    the same folds); cases no longer there are dropped; new cases (in no fold of ``splits``) are validated in
    the fold that already validates a case of their subject, or else spread over the folds as :func:`make_splits`
    spreads subjects (largest first, to the fold with the fewest validation cases), and trained on in every other
    fold. A fold whose validation cases are unchanged therefore still validates cases its models never saw.

    Args:
        splits: the existing splits (as read from ``splits_final.json``).
        identifiers: the dataset's cases now.
        subjects: case -> subject; a case missing from it is its own subject.
        seed: seed of the order among new subjects of equal size.

    Returns:
        The new splits, each list sorted; every case of ``identifiers`` is in some fold.

    Raises:
        SplitsError: ``splits`` is malformed, or a fold would be left without validation cases (all of them were
            removed and no new case took their place).
    """
    cases = sorted(set(identifiers))
    problems = _structure_problems(splits)
    if problems:
        raise SplitsError("; ".join(problems) + "; re-split with --resplit fresh, or fix the file")
    known = set(cases)
    folds = [[case for case in fold["val"] if case in known] for fold in splits]
    placed = {case for fold in splits for case in (*fold["train"], *fold["val"])}
    fold_of = {str(subjects.get(case, case)): index for index, val in reversed(list(enumerate(folds))) for case in val}
    new = [case for case in cases if case not in placed]
    groups = _subject_groups(new, subjects)
    for subject in [subject for subject in groups if subject in fold_of]:
        folds[fold_of[subject]].extend(groups.pop(subject))  # beside the subject's other cases
    _distribute(groups, folds, seed)
    empty = [str(index) for index, val in enumerate(folds) if not val]
    if empty:
        raise SplitsError(
            f"fold(s) {', '.join(empty)} would have no validation case left (every case they validated is gone "
            "and no new case takes their place); re-split with --resplit fresh"
        )
    return [
        {
            "train": sorted([case for case in fold["train"] if case in known] + sorted(set(new) - set(val))),
            "val": sorted(val),
        }
        for fold, val in zip(splits, folds)
    ]


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
        SplitsError: the existing file is malformed, names unknown cases, leaves cases out of every fold, puts
            a case in a fold's train and val, or in two folds' val, or a subject's cases in several folds' val; the
            message names the file, the problem and how to re-split (:func:`resplit_hint`).
    """
    path = Path(preprocessed_dataset_folder) / SPLITS_FILE
    if path.is_file():
        problem = splits_problem(path, identifiers, subjects)
        if problem:
            raise SplitsError(problem)
        splits = read_json(path)
        return [{"train": list(fold["train"]), "val": list(fold["val"])} for fold in splits]
    splits = make_splits(identifiers, subjects, num_folds)
    write_json(splits, path)
    return splits


def splits_problem(path: Path, identifiers: Sequence[str], subjects: dict[str, str] | None = None) -> str | None:
    """One line naming the splits file ``path``, what is wrong with it given the cases ``identifiers`` and their
    ``subjects`` (:func:`split_problems`, :func:`subject_problems`, or invalid JSON) and what to do: re-split
    (:func:`resplit_hint`) when only its cases are out of date, new splits when a subject's cases lie in several
    folds (``dataset.json``'s ``subjects`` changed), else fix the file or make new splits; None when nothing is
    wrong."""
    dataset = Path(path).parent.name
    try:
        splits = read_json(path)
    except InvalidFileError as error:
        splits, problems = None, [str(error).removeprefix(f"{path}: ")]
    else:
        problems = split_problems(splits, identifiers)
        if not problems and subjects:
            problems = subject_problems(splits, subjects)
            if problems:
                return (
                    f"{path}: {'; '.join(problems)}. Training refuses these splits: a subject's cases must share a "
                    f"fold (dataset.json's subjects changed since the splits were made); make new splits with "
                    f"autoseg_plan -d {dataset} --resplit fresh"
                )
    if not problems:
        return None
    if _well_formed(splits) and len(stale_problems(splits, identifiers)) == len(problems):
        remedy = f"the dataset's cases changed since the splits were made: {resplit_hint(dataset)}"
    else:
        remedy = f"fix or delete the file, or make new splits with autoseg_plan -d {dataset} --resplit fresh"
    return f"{path}: {'; '.join(problems)}. Training refuses these splits; {remedy}"


def resplit(preprocessed_dataset_folder: Path, identifiers: Sequence[str], subjects: dict[str, str], how: str) -> str:
    """``autoseg_plan --resplit HOW``: write ``splits_final.json`` for the cases ``identifiers`` and return one line
    saying what changed.

    Args:
        preprocessed_dataset_folder: ``AUTOSEG_PREPROCESSED/<dataset>``.
        identifiers: the dataset's cases.
        subjects: case -> subject (see :func:`make_splits`).
        how: ``keep`` (:func:`extend_splits` of the existing file; a new file when there is none) or ``fresh``
            (:func:`make_splits`, with as many folds as the existing file, else :data:`DEFAULT_FOLDS`).

    Raises:
        SplitsError: unknown ``how``; ``keep`` with a malformed file, or one that would leave a fold without
            validation cases; too few cases or subjects for the folds.
    """
    check_resplit_option(how)
    path = Path(preprocessed_dataset_folder) / SPLITS_FILE
    try:
        old = read_json(path) if path.is_file() else None
    except InvalidFileError as error:
        if how == "keep":
            raise SplitsError(f"{error}; fix the file, or re-split with --resplit fresh") from None
        old = "unreadable"  # replaced, as asked
    if how == "keep" and old is not None:
        try:
            new = extend_splits(old, identifiers, subjects)
        except SplitsError as error:
            raise SplitsError(f"{path}: {error}") from None
    else:
        new = make_splits(identifiers, subjects, len(old) if _well_formed(old) else DEFAULT_FOLDS)
    if new == old:
        return f"{path.name}: --resplit {how}: every case is already in a fold; nothing changed"
    write_json(new, path)
    if old is None:
        return f"{path.name}: --resplit {how}: no splits yet, made {len(new)} folds"
    if not _well_formed(old) or len(old) != len(new):
        return f"{path.name}: --resplit {how}: replaced by {len(new)} new folds"
    return f"{path.name}: --resplit {how}: " + describe_changes(old, new)


def describe_changes(old: Splits, new: Splits) -> str:
    """One line: per fold, the validation cases that ``new`` adds to or drops from ``old`` (as many folds in
    each), and which folds validate the same cases as before (their trained models stay valid)."""
    parts, changed, unchanged = [], [], []
    for index, (before, after) in enumerate(zip(old, new)):
        added, dropped = sorted(set(after["val"]) - set(before["val"])), sorted(set(before["val"]) - set(after["val"]))
        if not added and not dropped:
            unchanged.append(str(index))
            continue
        changed.append(str(index))
        change = [f"+{_listing(added)}" if added else "", f"-{_listing(dropped)}" if dropped else ""]
        parts.append(f"fold {index} validates {' '.join(c for c in change if c)}")
    if unchanged:
        parts.append(
            f"fold(s) {', '.join(unchanged)} validate the same cases as before (their trained models stay valid)"
        )
    if changed:
        parts.append(f"retrain fold(s) {', '.join(changed)} (a run trained before validated other cases)")
    return "; ".join(parts)


def split_problems(splits: object, identifiers: Sequence[str]) -> list[str]:
    """What is wrong with ``splits`` (as read from JSON) given the available ``identifiers``; empty if nothing.
    The problems of a dataset that changed after its splits were made come last (:func:`stale_problems`)."""
    found = _structure_problems(splits)
    if not _well_formed(splits):
        return found
    found += [f"fold {index} has no validation cases" for index, fold in enumerate(splits) if not fold["val"]]
    return found + stale_problems(splits, identifiers)


def stale_problems(splits: Splits, identifiers: Sequence[str]) -> list[str]:
    """Cases that well-formed ``splits`` name but ``identifiers`` do not (removed from the dataset, or not
    preprocessed), and cases of ``identifiers`` in no fold (added after the splits were made); empty if none."""
    named = {case for fold in splits for case in (*fold["train"], *fold["val"])}
    unknown, left_out = sorted(named - set(identifiers)), sorted(set(identifiers) - named)
    return [
        *([f"names cases that are not preprocessed: {_listing(unknown)}"] if unknown else []),
        *([f"leaves out cases that are in no fold: {_listing(left_out)}"] if left_out else []),
    ]


def subject_problems(splits: Splits, subjects: dict[str, str]) -> list[str]:
    """Subjects (``subjects``: case -> subject) whose cases well-formed ``splits`` validate in more than one fold,
    one phrase each naming the subject, its folds and cases; empty if every subject's cases share a fold."""
    folds: dict[str, dict[int, list[str]]] = {}
    for index, fold in enumerate(splits):
        for case in fold["val"]:
            if case in subjects:
                folds.setdefault(subjects[case], {}).setdefault(index, []).append(case)
    return [
        f"subject {subject}'s cases are validated in folds {', '.join(map(str, sorted(where)))} "
        f"({_listing(sorted(case for cases in where.values() for case in cases))})"
        for subject, where in sorted(folds.items())
        if len(where) > 1
    ]


def _listing(cases: list[str]) -> str:
    """The first five of ``cases`` as a list, and how many more."""
    return f"{cases[:5]}" + (f" and {len(cases) - 5} more" if len(cases) > 5 else "")


def _well_formed(splits: object) -> bool:
    """A non-empty list of ``{"train": [...], "val": [...]}`` objects whose lists hold strings."""
    return (
        isinstance(splits, list)
        and bool(splits)
        and all(
            isinstance(f, dict)
            and all(
                isinstance(f.get(key), list) and all(isinstance(c, str) for c in f[key]) for key in ("train", "val")
            )
            for f in splits
        )
    )


def _structure_problems(splits: object) -> list[str]:
    """What is wrong with ``splits`` whatever the dataset: its form, a case in a fold's train and val, a case
    validated in two folds."""
    if not _well_formed(splits):
        return ['expected a non-empty list of {"train": [...], "val": [...]} objects, with case names as strings']
    found, seen = [], set()
    for index, fold in enumerate(splits):
        both = sorted(set(fold["train"]) & set(fold["val"]))
        if both:
            found.append(f"fold {index} has cases in train and val: {both[:5]}")
        twice = sorted(seen & set(fold["val"]))
        if twice:
            found.append(f"fold {index} validates cases already validated in an earlier fold: {twice[:5]}")
        seen |= set(fold["val"])
    return found


def read_subjects(folder: Path, identifiers: Sequence[str]) -> dict[str, str]:
    """Case -> subject from the preprocessed ``CASE.json`` files in ``folder`` (the case itself if absent)."""
    return {case: CaseProperties.from_json(Path(folder) / f"{case}.json").subject or case for case in identifiers}


def fold_cases(
    preprocessed_dataset_folder: Path, data_folder: Path, fold: Fold, raw_cases: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Training and validation cases of ``fold``; ``full`` trains and validates on every case.

    The 5-fold split is made once, subject-grouped, and kept in ``splits_final.json`` (``autoseg.train.splits``). It
    must hold the preprocessed cases, no more and no fewer; so must the raw dataset (``raw_cases``, when given):
    a dataset that changed since it was preprocessed or split is refused here, before any training, rather than
    when the fold's validation meets a case that is gone.

    Raises:
        MissingFileError: no preprocessed cases.
        DataError: the preprocessed cases differ from ``raw_cases`` (the message names them and says to re-run
            ``autoseg_plan``).
        SplitsError: ``splits_final.json`` is malformed, or names a case that is not preprocessed or leaves one
            out (the message says how to re-split: ``autoseg_plan --resplit keep`` or ``fresh``).
        UsageError: too few cases for 5 folds (new splits), or a fold out of range.
    """
    identifiers = case_identifiers(data_folder)
    if not identifiers:
        raise MissingFileError(
            f"{data_folder}: no preprocessed cases; run autoseg_plan (or autoseg_plan --preprocess-only) "
            "for this dataset and configuration first"
        )
    if raw_cases is not None and set(raw_cases) != set(identifiers):
        added, removed = sorted(set(raw_cases) - set(identifiers)), sorted(set(identifiers) - set(raw_cases))
        raise DataError(
            f"{data_folder}: the raw dataset changed since it was preprocessed ("
            + ", ".join(
                [
                    *([f"new, not preprocessed: {added[:5]}"] if added else []),
                    *([f"preprocessed, no longer in the raw dataset: {removed[:5]}"] if removed else []),
                ]
            )
            + f"); re-run autoseg_plan -d {preprocessed_dataset_folder.name} first"
        )
    if fold == "full":
        return identifiers, identifiers
    path = preprocessed_dataset_folder / SPLITS_FILE
    try:
        splits = load_or_create_splits(
            preprocessed_dataset_folder, identifiers, read_subjects(data_folder, identifiers)
        )
    except ValueError as error:
        if path.is_file():  # an existing file's problems: its message says what to do
            raise
        raise UsageError(f"{error}; or write {path} by hand, or train with -f full") from None
    if not isinstance(fold, int) or not 0 <= fold < len(splits):
        raise UsageError(
            f"fold {fold} is out of range: {path} has {len(splits)} folds (0-{len(splits) - 1}); "
            "or use -f all / -f full"
        )
    return splits[fold]["train"], splits[fold]["val"]
