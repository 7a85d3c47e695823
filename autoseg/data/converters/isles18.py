"""ISLES 2018 (Ischemic Stroke Lesion Segmentation), as released: acute stroke CT perfusion slabs::

    TRAINING/case_1/SMIR.Brain.XX.O.CT.345562/SMIR.Brain.XX.O.CT.345562.nii
    TRAINING/case_1/SMIR.Brain.XX.O.CT_CBF.345563/SMIR.Brain.XX.O.CT_CBF.345563.nii
    ... CT_CBV, CT_MTT, CT_Tmax, CT_4DPWI, and OT (the lesion traced on DWI, training only)
    TESTING/case_1/...                                   (no OT)

Five channels, ``CT``, ``CBF``, ``CBV``, ``MTT`` and ``Tmax``, the names autoseg's CT perfusion path expects.
``CT_4DPWI`` is left out: it is the 4-D source series (one volume per time point) the four maps were computed
from, autoseg's channels are 3-D, and its length and timing differ from case to case.

Patients: some patients have two slabs, released as two cases. The folders do not say which; the challenge
published the case-to-patient table at SMIR (its names are ``Train_40_A`` and ``Train_40_B`` for the two
slabs of training patient 40, e.g. ``Train_40_A = case 64``). Given that table as a text file (``--slabs``),
slabs of one patient become one subject (``Train_40``); without it every case is its own subject and a note
says that two slabs of one patient may land in different cross-validation folds.
"""

from __future__ import annotations

import re
from pathlib import Path

from autoseg.data.converters.common import Problems, SourceCase, SourceDataset, required_folder, sorted_naturally
from autoseg.data.demo.ctp import CTP_CHANNELS
from autoseg.errors import MissingFileError

SUMMARY = "ISLES 2018 (CT perfusion slabs): SRC is the release's top folder holding TRAINING/ (and TESTING/)"
#: Release modality -> channel name, in channel order: CT, CT_CBF, ... -> CT, CBF, ...
MODALITIES = {("CT" if name == "CT" else f"CT_{name}"): name for name in CTP_CHANNELS}
MASK_MODALITY = "OT"
_FILE = re.compile(r"\.O\.(?P<modality>[A-Za-z0-9_]+)\.\d+\.nii(?:\.gz)?$")
_CASE = re.compile(r"^case_\d+$")
_SLAB_CASE = re.compile(r"\bcase[ _-]?(\d+)\b", re.IGNORECASE)
_SLAB_PATIENT = re.compile(r"\b(train)[ _-]?(\d+)(?:[ _-]?([AB]))?\b", re.IGNORECASE)


def read(source: Path, slabs: Path | None = None) -> SourceDataset:
    """Find the cases of an ISLES 2018 release under ``source``.

    Args:
        source: the folder holding ``TRAINING/`` (and ``TESTING/``).
        slabs: a text file pairing training cases with the challenge's patient names, one pair per line in any
            layout that names both (``Train_40_A = case 64``, ``case_64,Train_40_A``, ...); other lines are
            ignored.

    Raises:
        FileNotFoundError: ``source`` has no ``TRAINING/`` folder, or ``slabs`` does not exist.
        ConversionError: listing every case folder without one of the five maps or (training) the OT mask,
            with a modality twice, and every ``slabs`` line naming a case that is not in ``TRAINING/``.
    """
    training_folder = required_folder(source, "TRAINING", "the ISLES 2018 release's top folder")
    problems = Problems()
    training = _cases(training_folder, problems, masks=True)
    testing_folder = source / "TESTING"
    test = _cases(testing_folder, problems, masks=False) if testing_folder.is_dir() else []
    patients = _read_slabs(slabs, {case.identifier for case in training}, problems) if slabs else {}
    problems.raise_if_any(source)
    training = [SourceCase(c.identifier, patients.get(c.identifier, c.identifier), c.images, c.label) for c in training]
    test = [SourceCase(f"test_{c.identifier}", f"test_{c.identifier}", c.images) for c in test]
    if slabs is None:
        notes = (
            "ISLES 2018 does not say which cases are slabs of one patient: every case is its own subject, so two "
            "slabs of a patient may land in different folds. Pass --slabs FILE with the challenge's "
            "case-to-patient table (documentation/datasets/isles18.md).",
        )
    else:
        unlisted = [case.identifier for case in training if case.identifier not in patients]
        notes = (
            f"{len(set(patients.values()))} patient(s) from {slabs}"
            + (f"; not listed there, so their own subject: {', '.join(unlisted)}" if unlisted else ""),
        )
    return SourceDataset(
        channel_names=CTP_CHANNELS,
        training=tuple(training),
        test=tuple(test),
        description={
            "name": "ISLES 2018",
            "description": f"ISLES 2018 acute stroke CT perfusion slabs (CT, CBF, CBV, MTT, Tmax; CT_4DPWI left out), "
            f"converted from {source} by autoseg_convert isles18 (masks binarised to 0/1); subjects "
            + (f"from {slabs}." if slabs else "unknown: one per case."),
            "reference": "Hakim et al., Stroke 52, 2328 (2021); https://www.isles-challenge.org/",
        },
        notes=notes,
    )


def _cases(folder: Path, problems: Problems, masks: bool) -> list[SourceCase]:
    case_folders = sorted_naturally(path for path in folder.iterdir() if path.is_dir() and _CASE.match(path.name))
    if not case_folders:
        problems.add(folder, "no case_N folders found (expected e.g. case_1/SMIR.Brain.XX.O.CT.345562/)")
    wanted = [*MODALITIES, *([MASK_MODALITY] if masks else [])]
    cases = []
    for case_folder in case_folders:
        files: dict[str, Path] = {}
        for path in sorted(case_folder.rglob("*.nii*")):
            match = _FILE.search(path.name)
            modality = match.group("modality") if match else None
            if modality not in wanted:
                continue
            if modality in files:
                problems.add(path, f"a second {modality} file in {case_folder.name} (the first is {files[modality]})")
            files[modality] = path
        missing = [modality for modality in wanted if modality not in files]
        for modality in missing:
            problems.add(
                case_folder,
                f"no {modality} image (expected SMIR.Brain.XX.O.{modality}.NNNNN/SMIR.Brain.XX.O.{modality}.NNNNN.nii)",
            )
        if not missing:
            images = tuple(files[modality] for modality in MODALITIES)
            cases.append(SourceCase(case_folder.name, case_folder.name, images, files.get(MASK_MODALITY)))
    return cases


def _read_slabs(path: Path, cases: set[str], problems: Problems) -> dict[str, str]:
    """Case -> patient (``Train_40``) from the lines of ``path`` that name both a case and a patient."""
    if not path.is_file():
        raise MissingFileError(f"{path}: no such file (--slabs)")
    patients: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        case, patient = _SLAB_CASE.search(line), _SLAB_PATIENT.search(line)
        if case is None or patient is None:
            continue
        identifier, name = f"case_{int(case.group(1))}", f"Train_{int(patient.group(2))}"
        where = Path(f"{path}, line {number}")
        if identifier not in cases:
            problems.add(where, f"{identifier} is not a case folder in TRAINING/")
        elif patients.get(identifier, name) != name:
            problems.add(where, f"{identifier} was already given to {patients[identifier]}")
        else:
            patients[identifier] = name
    return patients
