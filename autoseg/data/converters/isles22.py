"""ISLES 2022 (Ischemic Stroke Lesion Segmentation), as released: acute and sub-acute stroke MRI, BIDS::

    rawdata/sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_dwi.nii.gz
    rawdata/sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_adc.nii.gz
    rawdata/sub-strokecase0001/ses-0001/anat/sub-strokecase0001_ses-0001_FLAIR.nii.gz
    derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz

Some copies keep the subject folders at the top instead of under ``rawdata/``; both are read. Two channels,
``DWI`` and ``ADC`` (the trace image and the ADC map share one grid, the grid the masks were traced on).

FLAIR is left out. It lies on its own grid (other voxel size, field of view and often orientation) and is not
registered to DWI in the release. autoseg has no code that moves a channel onto another channel's grid:
prediction refuses channels on different grids rather than resampling them
(``autoseg.api.predict_inputs.read_case``), and its resampling (``autoseg.preprocess.preprocessing``) only changes
the voxel size of one grid. Resampling FLAIR here
would need new code that prediction would not share, so a model trained on it could not be given new scans
as acquired; and a header-only resampling assumes the patient did not move between the sequences.
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

SUMMARY = "ISLES 2022 (DWI and ADC, acute stroke): SRC is the release's top folder holding rawdata/ and derivatives/"
CHANNELS = {"dwi": "DWI", "adc": "ADC"}  # BIDS suffix -> channel name, in channel order
_IMAGE_ROLES = {suffix: (lambda entities, found, wanted=suffix: found.lower() == wanted) for suffix in CHANNELS}
_MASK_ROLES = {"mask": lambda entities, suffix: suffix == "msk"}


def read(source: Path) -> SourceDataset:
    """Find the cases of an ISLES 2022 release under ``source``.

    Raises:
        FileNotFoundError: ``source`` has no ``derivatives/`` folder.
        ConversionError: listing every subject without a DWI or ADC image or without a mask, every mask
            without a subject, and every file whose subject or session disagrees with its folders.
    """
    derivatives = required_folder(source, "derivatives", "the ISLES 2022 release's top folder, e.g. ISLES-2022/")
    raw = source / "rawdata" if (source / "rawdata").is_dir() else source
    problems = Problems()
    subjects = [folder for folder in subject_folders(raw) if derivatives not in folder.parents]
    if not subjects:
        problems.add(raw, "no sub-* subject folders found (expected e.g. sub-strokecase0001/ses-0001/dwi/)")
    images = index_bids(subjects, _IMAGE_ROLES, problems)
    masks = index_bids(subject_folders(derivatives), _MASK_ROLES, problems)
    for folder in subjects:
        if not any(key[0] == folder.name.removeprefix("sub-") for key in images):
            problems.add(folder, f"no DWI or ADC image (expected ses-0001/dwi/{folder.name}_ses-0001_dwi.nii.gz)")
    cases = []
    for (subject, session), files in sorted(images.items()):
        identifier = case_identifier(subject, session)
        missing = [suffix for suffix in CHANNELS if suffix not in files]
        if missing:
            for suffix in missing:
                present = next(iter(files.values()))
                problems.add(
                    present.parent, f"no {suffix} image for {identifier} (expected {identifier}_{suffix}.nii.gz)"
                )
            continue
        mask = masks.get((subject, session), {}).get("mask")
        if mask is None:
            problems.add(
                files["dwi"],
                f"no lesion mask for {identifier} (expected derivatives/sub-{subject}/"
                f"{'ses-' + session + '/' if session else ''}{identifier}_msk.nii.gz)",
            )
            continue
        cases.append(SourceCase(identifier, f"sub-{subject}", tuple(files[suffix] for suffix in CHANNELS), mask))
    for key, files in sorted(masks.items()):
        if key not in images:
            problems.add(files["mask"], "lesion mask without images in rawdata/")
    problems.raise_if_any(source)
    return SourceDataset(
        channel_names=tuple(CHANNELS.values()),
        training=tuple(cases),
        description={
            "name": "ISLES 2022",
            "description": f"ISLES 2022 stroke MRI (DWI, ADC; FLAIR left out: it lies on its own, unregistered grid), "
            f"converted from {source} by autoseg_convert isles22 (masks binarised to 0/1).",
            "reference": "Hernandez Petzsche et al., Scientific Data 9, 762 (2022); https://isles22.grand-challenge.org/",
        },
        notes=("FLAIR left out: it lies on its own grid, unregistered to DWI (documentation/datasets/isles22.md).",),
    )
