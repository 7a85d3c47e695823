"""Public stroke datasets in their own folder layouts, converted into raw datasets (``autoseg_convert``).

Each module reads one release as downloaded (nothing is fetched) and returns a
:class:`~autoseg.data.converters.common.SourceDataset`; :func:`convert` checks the tree completely before anything
is written, then writes ``AUTOSEG_RAW/DatasetNNN_NAME`` through a hidden folder renamed into place at the end.

- ``atlas2``: ATLAS R2.0, T1w (:mod:`autoseg.data.converters.atlas2`)
- ``isles22``: ISLES 2022, DWI, ADC and FLAIR registered onto DWI (:mod:`autoseg.data.converters.isles22`)
- ``isles18``: ISLES 2018, CT and four perfusion maps (:mod:`autoseg.data.converters.isles18`)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from autoseg.data.converters import atlas2, isles18, isles22
from autoseg.data.converters.common import ConversionError, SourceDataset, coregistration_note, write_dataset
from autoseg.data.coregistration import ChannelFit
from autoseg.data.dataset import new_dataset_folder
from autoseg.errors import UsageError

__all__ = ["CONVERTERS", "ConversionError", "Converted", "convert"]


@dataclass(frozen=True)
class Converter:
    """One release layout: its command-line name, a one-line summary and its reader."""

    name: str
    summary: str
    read: Callable[..., SourceDataset]

    @classmethod
    def of(cls, name: str, module: ModuleType) -> Converter:
        return cls(name, module.SUMMARY, module.read)


CONVERTERS = {
    name: Converter.of(name, module)
    for name, module in (("atlas2", atlas2), ("isles22", isles22), ("isles18", isles18))
}


@dataclass(frozen=True)
class Converted:
    """A written dataset: its folder, what was found in the release and, for a release converted with channel
    co-registration, case -> the fit of each channel moved (``autoseg.data.coregistration.ChannelFit``)."""

    folder: Path
    source: SourceDataset
    coregistration: dict[str, tuple[ChannelFit, ...]] = field(default_factory=dict)

    def notes(self) -> list[str]:
        """What the user should know: the reader's notes and what co-registration did."""
        note = coregistration_note(self.source.channel_names, self.coregistration)
        return [*self.source.notes, *([note] if note else [])]


def convert(
    kind: str,
    source: str | Path,
    name: str,
    number: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    **options: Any,
) -> Converted:
    """Convert the release at ``source`` into ``AUTOSEG_RAW/DatasetNNN_NAME``.

    Args:
        kind: ``atlas2``, ``isles22`` or ``isles18``.
        source: the release's top folder, as downloaded and unpacked.
        name: the dataset's name (``NAME``).
        number: ``NNN``; default: the number an existing dataset of that name has (with ``overwrite``),
            else the lowest free one.
        overwrite: replace an existing dataset of that name and number (only once the new one is complete).
        progress: show a progress bar.
        options: the reader's own options (``slabs`` for ``isles18``, ``flair`` for ``isles22``).

    Raises:
        ValueError: an unknown ``kind`` or an invalid name or number.
        FileExistsError: see :func:`autoseg.data.dataset.new_dataset_folder`.
        FileNotFoundError: ``source`` lacks the release's top-level folders.
        ConversionError: the tree is malformed (every offending file is named), or a channel does not register
            onto channel 0 (each file named with the reason); nothing is written.
    """
    if kind not in CONVERTERS:
        raise UsageError(f"unknown dataset kind '{kind}'; known: {', '.join(sorted(CONVERTERS))}")
    target = new_dataset_folder(name, number, overwrite)
    source = Path(source).expanduser()
    found = CONVERTERS[kind].read(source, **options)
    return Converted(target, found, write_dataset(found, target, overwrite, progress, release=source))
