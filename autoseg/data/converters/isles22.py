"""ISLES 2022 (Ischemic Stroke Lesion Segmentation), as released: acute and sub-acute stroke MRI, BIDS::

    rawdata/sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_dwi.nii.gz
    rawdata/sub-strokecase0001/ses-0001/dwi/sub-strokecase0001_ses-0001_adc.nii.gz
    rawdata/sub-strokecase0001/ses-0001/anat/sub-strokecase0001_ses-0001_FLAIR.nii.gz
    derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz

Some copies keep the subject folders at the top instead of under ``rawdata/``; both are read. Three channels,
``DWI``, ``ADC`` and ``FLAIR``; with ``flair=False`` (``autoseg_convert isles22 --no-flair``) only the first two.

DWI and ADC share one grid, the grid the masks were traced on; they are copied byte for byte. FLAIR lies on its own
grid (another voxel size and field of view, often another orientation) and is not registered to DWI in the release:
it is rigidly registered to DWI and resampled onto its grid (``autoseg.data.coregistration``, the code
preprocessing and prediction share), written as float32 with the DWI's header, and the dataset declares
``"coregister_channels": true``, so the plans record it and ``autoseg_predict`` registers the FLAIR of new scans,
given as acquired, the same way. Every fit is in the dataset's ``coregistration.json``; a FLAIR that does not
register (too little overlap with the DWI, no convergence) is named and nothing is written.
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

SUMMARY = (
    "ISLES 2022 (DWI, ADC and FLAIR registered onto DWI, acute stroke): SRC is the release's top folder holding "
    "rawdata/ and derivatives/"
)
CHANNELS = {"dwi": "DWI", "adc": "ADC", "flair": "FLAIR"}  # BIDS suffix (any case) -> channel name, in channel order
_IMAGE_ROLES = {suffix: (lambda entities, found, wanted=suffix: found.lower() == wanted) for suffix in CHANNELS}
_MASK_ROLES = {"mask": lambda entities, suffix: suffix == "msk"}
#: Where each image lies in a session folder, for messages.
_FOLDERS = {"dwi": "dwi", "adc": "dwi", "flair": "anat"}
_BIDS_SUFFIX = {"dwi": "dwi", "adc": "adc", "flair": "FLAIR"}


def read(source: Path, flair: bool = True) -> SourceDataset:
    """Find the cases of an ISLES 2022 release under ``source``.

    Args:
        source: the release's top folder.
        flair: include FLAIR as channel 2, registered onto DWI when written (module docstring); False: DWI and ADC.

    Raises:
        FileNotFoundError: ``source`` has no ``derivatives/`` folder.
        ConversionError: listing every subject without a DWI, ADC (or, with ``flair``, FLAIR) image or without a
            mask, every mask without a subject, and every file whose subject or session disagrees with its folders.
    """
    channels = {suffix: name for suffix, name in CHANNELS.items() if flair or suffix != "flair"}
    roles = {suffix: role for suffix, role in _IMAGE_ROLES.items() if suffix in channels}
    derivatives = required_folder(source, "derivatives", "the ISLES 2022 release's top folder, e.g. ISLES-2022/")
    raw = source / "rawdata" if (source / "rawdata").is_dir() else source
    problems = Problems()
    subjects = [folder for folder in subject_folders(raw) if derivatives not in folder.parents]
    if not subjects:
        problems.add(raw, "no sub-* subject folders found (expected e.g. sub-strokecase0001/ses-0001/dwi/)")
    images = index_bids(subjects, roles, problems)
    masks = index_bids(subject_folders(derivatives), _MASK_ROLES, problems)
    for folder in subjects:
        if not any(key[0] == folder.name.removeprefix("sub-") for key in images):
            problems.add(
                folder,
                f"no {' or '.join(channels.values())} image (expected ses-0001/dwi/{folder.name}_ses-0001_dwi.nii.gz)",
            )
    cases = []
    for (subject, session), files in sorted(images.items()):
        identifier = case_identifier(subject, session)
        missing = [suffix for suffix in channels if suffix not in files]
        if missing:
            for suffix in missing:
                present = next(iter(files.values()))
                expected = f"{_FOLDERS[suffix]}/{identifier}_{_BIDS_SUFFIX[suffix]}.nii.gz"
                hint = "; or convert without FLAIR: --no-flair" if suffix == "flair" else ""
                problems.add(present.parent.parent, f"no {suffix} image for {identifier} (expected {expected}{hint})")
            continue
        mask = masks.get((subject, session), {}).get("mask")
        if mask is None:
            problems.add(
                files["dwi"],
                f"no lesion mask for {identifier} (expected derivatives/sub-{subject}/"
                f"{'ses-' + session + '/' if session else ''}{identifier}_msk.nii.gz)",
            )
            continue
        cases.append(SourceCase(identifier, f"sub-{subject}", tuple(files[suffix] for suffix in channels), mask))
    for key, files in sorted(masks.items()):
        if key not in images:
            problems.add(files["mask"], "lesion mask without images in rawdata/")
    problems.raise_if_any(source)
    names = ", ".join(channels.values())
    return SourceDataset(
        channel_names=tuple(channels.values()),
        training=tuple(cases),
        description={
            "name": "ISLES 2022",
            "description": f"ISLES 2022 stroke MRI ({names}"
            + ("; FLAIR rigidly registered onto DWI and resampled onto its grid" if flair else "; FLAIR left out")
            + f"), converted from {source} by autoseg_convert isles22 (masks binarised to 0/1).",
            "reference": "Hernandez Petzsche et al., Scientific Data 9, 762 (2022); https://isles22.grand-challenge.org/",
        },
        notes=() if flair else ("FLAIR left out (--no-flair); DWI and ADC share the masks' grid.",),
        coregister=flair,
    )
