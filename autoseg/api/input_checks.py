"""Input checks: each case :func:`autoseg.api.predict.predict` reads is compared, before it is predicted, with what
the model's training cases were like, so that a scan unlike anything the model saw is named.

What the model knows (:func:`load_training_ranges`): the :class:`autoseg.plan.fingerprint.TrainingRanges` of its
training cases, computed from the per-case figures of ``AUTOSEG_PREPROCESSED/<dataset>/fingerprint.json`` for a
dataset planned here, else read from the ``training_ranges`` of ``AUTOSEG_RESULTS/<dataset>/fingerprint_summary.json``,
which a model file carries (``autoseg_export`` computes them; ranges only, nothing per case). A model with neither
(or a model file exported before the ranges were recorded) gets one note and no checks.

Each case is measured as the fingerprint measured the training cases: in the canonical orientation
(``autoseg.io.images.read_image``), intensities within the non-zero region of all channels
(``autoseg.plan.fingerprint.foreground_mask``). A measure is *outside the training range* when:

==================================  ====================================================================================
spacing (mm, per axis)              on any axis below the training minimum / :data:`RATIO_TOLERANCE` or above the
                                    maximum × :data:`RATIO_TOLERANCE` (1.5)
size (voxels, per axis)             the same rule
orientation                         obliqueness (``autoseg.io.geometry.obliqueness_degrees``) more than
                                    :data:`OBLIQUE_TOLERANCE_DEGREES` (5 degrees) above the training maximum
foreground intensity, per channel   its 0.5th, 50th or 99.5th percentile beyond the training (min, max) of that
                                    percentile by more than :data:`INTENSITY_TOLERANCE` (0.5) × the channel's typical
                                    foreground width (the training cases' median 99.5th minus 0.5th percentile)
channel name                        a file's name names a modality (:data:`MODALITY_WORDS`: ``T1w``, ``FLAIR``, ``CT``,
                                    ``Tmax``, ...) and none of them is the modality of the model's channel it is
                                    given as (checked only when that channel's name is one of the words)
==================================  ====================================================================================

Channel count: files are grouped into cases by the model's channel count (``find_input_cases``), and files that
form a multi-channel set given to a one-channel model are refused there. A case outside the training range is
still predicted: one line per measure, ``case CASE: MEASURE outside the training range: VALUE vs [MIN, MAX]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.api.model_files.layout import FINGERPRINT_SUMMARY_FILE
from autoseg.api.predict_inputs import InputCase
from autoseg.io.files import read_json
from autoseg.io.geometry import Geometry, obliqueness_degrees
from autoseg.io.headers import split_ending
from autoseg.io.typed_json import from_plain
from autoseg.paths import FINGERPRINT_FILE, preprocessed_folder, results_folder
from autoseg.plan.fingerprint import (
    Fingerprint,
    FingerprintError,
    TrainingRanges,
    foreground_mask,
    intensity_statistics,
    training_ranges,
)

__all__ = [
    "INTENSITY_TOLERANCE",
    "MODALITY_WORDS",
    "OBLIQUE_TOLERANCE_DEGREES",
    "RATIO_TOLERANCE",
    "InputChecks",
    "TrainingReference",
    "check_case",
    "load_training_ranges",
]

#: Spacing and size: a case is outside when a value is below the training minimum / this or above the maximum × this.
RATIO_TOLERANCE = 1.5
#: Orientation: a case is outside when it is more oblique than the most oblique training case by more than this.
OBLIQUE_TOLERANCE_DEGREES = 5.0
#: Intensity: a percentile is outside when it lies beyond the training range by more than this share of the
#: channel's typical foreground width.
INTENSITY_TOLERANCE = 0.5
#: Words of a file or channel name (split at anything but letters and digits, any case) -> the modality they name.
MODALITY_WORDS = {
    "t1": "T1",
    "t1w": "T1",
    "mprage": "T1",
    "t2": "T2",
    "t2w": "T2",
    "flair": "FLAIR",
    "dwi": "DWI",
    "adc": "ADC",
    "ct": "CT",
    "ncct": "CT",
    "cta": "CTA",
    "cbf": "CBF",
    "rcbf": "CBF",
    "cbv": "CBV",
    "rcbv": "CBV",
    "mtt": "MTT",
    "tmax": "Tmax",
    "ttp": "TTP",
}
_PERCENTILES = (("p00_5", "0.5th percentile"), ("p50", "median"), ("p99_5", "99.5th percentile"))


@dataclass(frozen=True)
class TrainingReference:
    """What a model knows of its training cases (:func:`load_training_ranges`).

    Attributes:
        ranges: the training ranges (``ranges.lesion_count``, ``ranges.lesion_volume_ml``: per case, what a
            prediction's lesion count and volume can be held to); None when there are none.
        source: the file they come from; None when there is none.
        note: why there are no ranges (one line); None when there are.
    """

    ranges: TrainingRanges | None
    source: Path | None
    note: str | None = None


def load_training_ranges(dataset: str, channel_names: Sequence[str] | None = None) -> TrainingReference:
    """The training ranges of a trained or installed dataset: from ``AUTOSEG_PREPROCESSED/<dataset>/fingerprint.json``
    (computed from its per-case figures, ``autoseg.plan.fingerprint.training_ranges``), else from the
    ``training_ranges`` of ``AUTOSEG_RESULTS/<dataset>/fingerprint_summary.json`` (an installed model file's).

    Besides the input checks, the ranges hold each training case's lesion count (26-connected) and total lesion
    volume in ml as (min, max) (``TrainingReference.ranges.lesion_count``, ``.lesion_volume_ml``).

    Args:
        dataset: the dataset folder's name (``Dataset001_ATLAS``).
        channel_names: the model's channels; ranges of other channels (a fingerprint of another dataset under the
            same name) are not used. None: not compared.

    Returns:
        The ranges and their file, or (no file, an unreadable file, a summary without ranges, other channels) no
        ranges and a one-line note that says why. Never raises for a missing or malformed file: prediction does not
        need it.
    """
    fingerprint = preprocessed_folder(dataset) / FINGERPRINT_FILE
    summary = results_folder(dataset) / FINGERPRINT_SUMMARY_FILE
    ranges, source = None, fingerprint if fingerprint.is_file() else summary
    try:
        if fingerprint.is_file():
            ranges = training_ranges(Fingerprint.from_json(fingerprint))
        elif summary.is_file():
            plain = read_json(summary)
            if not isinstance(plain, dict) or "training_ranges" not in plain:
                return TrainingReference(
                    None, summary, f"{summary}: no training ranges (a model file exported before they were recorded)"
                )
            ranges = from_plain(TrainingRanges, plain["training_ranges"], "training_ranges")
        else:
            return TrainingReference(None, None, f"no training fingerprint for {dataset} ({fingerprint}, {summary})")
    except (FingerprintError, TypeError, ValueError, IndexError, OSError) as error:
        problem = " ".join(str(error).split())
        return TrainingReference(None, source, problem if problem.startswith(str(source)) else f"{source}: {problem}")
    trained = [channel.name for channel in ranges.channels]
    if channel_names is not None and trained != list(channel_names):
        return TrainingReference(
            None, source, f"{source}: describes channels {trained}, the model takes {list(channel_names)}"
        )
    return TrainingReference(ranges, source)


def check_case(
    case: InputCase, images: np.ndarray, geometry: Geometry, ranges: TrainingRanges, channel_names: Sequence[str]
) -> list[str]:
    """The measures of one case outside the training range (module docstring), one line each, without the case's
    name: ``spacing outside the training range: 10.5 x 3.5 x 3.5 mm vs [3.5, 3.5] x [3.5, 3.5] x [3.5, 3.5] mm``.

    Args:
        case: the case (its files name its channels' modalities, if anything does).
        images: (C, X, Y, Z) channels in the canonical orientation, as ``autoseg.api.predict_inputs.read_case`` reads
            them.
        geometry: their geometry (spacing in mm, direction), canonical as well.
        ranges: the model's training ranges, channels in the model's order.
        channel_names: the model's channel names, in channel order.

    Returns:
        One line per measure outside its range; empty when the case lies within every one.
    """
    lines = []
    spacing, shape = geometry.spacing, geometry.shape
    if any(_beyond_ratio(value, bounds) for value, bounds in zip(spacing, ranges.spacing_mm)):
        lines.append(
            f"spacing outside the training range: {_per_axis(spacing)} mm vs {_per_axis(ranges.spacing_mm)} mm"
        )
    if any(_beyond_ratio(value, bounds) for value, bounds in zip(shape, ranges.shape)):
        lines.append(f"size outside the training range: {_per_axis(shape)} voxels vs {_per_axis(ranges.shape)} voxels")
    oblique = obliqueness_degrees(geometry.direction)
    if oblique > ranges.obliqueness_degrees[1] + OBLIQUE_TOLERANCE_DEGREES:
        low, high = ranges.obliqueness_degrees
        lines.append(
            f"orientation outside the training range: oblique by {oblique:.1f} vs [{low:.1f}, {high:.1f}] degrees"
        )
    foreground = foreground_mask(images)
    if foreground.any():
        for index, (channel, trained) in enumerate(zip(images, ranges.channels)):
            statistics = intensity_statistics(channel[foreground])
            margin = INTENSITY_TOLERANCE * trained.typical_width
            outside = [
                f"{label} {_number(statistics[key])} vs {_bounds(getattr(trained, key))}"
                for key, label in _PERCENTILES
                if not getattr(trained, key)[0] - margin <= statistics[key] <= getattr(trained, key)[1] + margin
            ]
            if outside:
                lines.append(
                    f"{channel_names[index]} (channel {index}) foreground intensity outside the training range: "
                    + "; ".join(outside)
                )
    for index, path in enumerate(case.images):
        expected, named = _modality(channel_names[index]), _named_modalities(path)
        if expected is not None and named and expected not in named:
            lines.append(
                f"channel name: {path.name} names {', '.join(sorted(named))}, the model's channel {index} is "
                f"{channel_names[index]}"
            )
    return lines


@dataclass
class InputChecks:
    """The input checks of one prediction run: the model's training ranges, and the warnings of each case checked.

    Attributes:
        reference: what the model knows (:func:`load_training_ranges`).
        channel_names: the model's channels, in channel order.
        log: receives each warning line (``case CASE: ...``) as it is found.
        warnings: case -> its warning lines (without the case's name), for every case checked (an empty list: checked,
            within every range); cases skipped or failed before they were read are not there.
    """

    reference: TrainingReference
    channel_names: tuple[str, ...]
    log: Callable[[str], None]
    warnings: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, dataset: str, channel_names: Sequence[str], log: Callable[[str], None]) -> InputChecks:
        """The checks for a model of ``dataset`` taking ``channel_names``; a model without training ranges gets one
        note in ``log`` (``input checks skipped: WHY``) and no checks."""
        reference = load_training_ranges(dataset, channel_names)
        if reference.note:
            log(f"input checks skipped: {reference.note}")
        return cls(reference, tuple(channel_names), log)

    def check(self, case: InputCase, images: np.ndarray, geometry: Geometry) -> list[str]:
        """Check one read case (:func:`check_case`), log each warning as ``case CASE: ...`` and record them under
        the case; nothing (and nothing recorded) without training ranges."""
        if self.reference.ranges is None:
            return []
        lines = check_case(case, images, geometry, self.reference.ranges, self.channel_names)
        self.warnings[case.identifier] = lines
        for line in lines:
            self.log(f"case {case.identifier}: {line}")
        return lines

    def to_json(self) -> dict[str, object]:
        """What ``prediction_summary.json`` says of the checks: ``against`` (the file of the training ranges, or
        null) and ``note`` (why nothing was checked, or null)."""
        source = self.reference.source if self.reference.ranges is not None else None
        return {"against": None if source is None else str(source), "note": self.reference.note}


def _beyond_ratio(value: float, bounds: tuple[float, float]) -> bool:
    """Whether ``value`` lies below ``bounds[0] / RATIO_TOLERANCE`` or above ``bounds[1] * RATIO_TOLERANCE``."""
    return value < bounds[0] / RATIO_TOLERANCE or value > bounds[1] * RATIO_TOLERANCE


def _number(value: float) -> str:
    """4 significant digits, without an exponent up to 99,999."""
    return f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"


def _bounds(bounds: Sequence[float]) -> str:
    return f"[{_number(bounds[0])}, {_number(bounds[1])}]"


def _per_axis(values: Sequence[float] | Sequence[Sequence[float]]) -> str:
    """``10.5 x 3.5 x 3.5`` for values, ``[3.5, 3.5] x [3.5, 3.5] x ...`` for (min, max) per axis."""
    return " x ".join(_bounds(v) if isinstance(v, (tuple, list)) else _number(v) for v in values)


def _words(name: str) -> list[str]:
    return [word for word in re.split(r"[^a-z0-9]+", name.lower()) if word]


def _modality(channel_name: str) -> str | None:
    """The modality a channel name names (:data:`MODALITY_WORDS`; the first word that names one), else None."""
    return next((MODALITY_WORDS[w] for w in _words(channel_name) if w in MODALITY_WORDS), None)


def _named_modalities(path: Path) -> set[str]:
    """The modalities the words of a file's name (without its ending) name."""
    return {MODALITY_WORDS[w] for w in _words(split_ending(path)[0]) if w in MODALITY_WORDS}
