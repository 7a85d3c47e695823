"""ATLAS R2.0 (Anatomical Tracings of Lesions After Stroke), as released: chronic stroke T1w MRI in MNI space.

The release's top folder (``ATLAS_2/`` once unpacked) holds BIDS trees split by site::

    Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz
    Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_label-L_desc-T1lesion_mask.nii.gz
    Testing/R001/sub-r001s050/ses-1/anat/sub-r001s050_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz   (no masks)

Training images with their masks go to ``imagesTr``/``labelsTr``, Testing images to ``imagesTs``. A case is
one session (``sub-r001s001_ses-1``); its subject (``sub-r001s001``) is its group in ``subjects``, so a
subject's sessions always share a cross-validation fold.
"""

from __future__ import annotations

from pathlib import Path

from autoseg.data.converters.common import (
    Problems,
    SourceCase,
    SourceDataset,
    case_identifier,
    index_bids,
    required_folder,
    subject_folders,
)

SUMMARY = "ATLAS R2.0 (T1w, chronic stroke): SRC is the release's top folder holding Training/ (and Testing/)"
_ROLES = {
    "T1w": lambda entities, suffix: suffix == "T1w" and "label" not in entities,
    "mask": lambda entities, suffix: suffix == "mask" and entities.get("desc") == "T1lesion",
}


def read(source: Path) -> SourceDataset:
    """Find the cases of an ATLAS R2.0 release under ``source``.

    Raises:
        FileNotFoundError: ``source`` has no ``Training/`` folder.
        ConversionError: listing every T1w image without a mask, mask without an image, subject folder
            without an image, and file whose subject or session disagrees with its folders.
    """
    training_folder = required_folder(source, "Training", "the ATLAS R2.0 release's top folder, e.g. ATLAS_2/")
    problems = Problems()
    training = _cases(training_folder, problems, masks=True)
    testing_folder = source / "Testing"
    test = _cases(testing_folder, problems, masks=False) if testing_folder.is_dir() else []
    problems.raise_if_any(source)
    return SourceDataset(
        channel_names=("T1",),
        training=tuple(training),
        test=tuple(test),
        description={
            "name": "ATLAS R2.0",
            "description": f"ATLAS R2.0 chronic stroke T1w MRI in MNI152NLin2009aSym space, converted from {source} "
            "by autoseg_convert atlas2 (masks binarised to 0/1).",
            "reference": "Liew et al., Scientific Data 9, 320 (2022); https://atlas.grand-challenge.org/",
        },
    )


def _cases(folder: Path, problems: Problems, masks: bool) -> list[SourceCase]:
    subjects = subject_folders(folder)
    if not subjects:
        problems.add(folder, "no sub-* subject folders found (expected e.g. R001/sub-r001s001/ses-1/anat/)")
    found = index_bids(subjects, _ROLES if masks else {"T1w": _ROLES["T1w"]}, problems)
    for subject_folder in subjects:
        subject = subject_folder.name.removeprefix("sub-")
        if not any(key[0] == subject and "T1w" in files for key, files in found.items()):
            problems.add(
                subject_folder,
                f"no T1w image (expected ses-1/anat/{subject_folder.name}_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz)",
            )
    cases = []
    for (subject, session), files in sorted(found.items()):
        image, mask = files.get("T1w"), files.get("mask")
        if image is None:
            problems.add(mask, "lesion mask without a T1w image")
            continue
        if masks and mask is None:
            expected = image.name.replace("_T1w.", "_label-L_desc-T1lesion_mask.")
            problems.add(image, f"no lesion mask beside it (expected {expected})")
            continue
        cases.append(SourceCase(case_identifier(subject, session), f"sub-{subject}", (image,), mask))
    return cases
