"""Post-processing: per-class probabilities to a label map, without lesions too small to be real.

Probabilities are ``(K, X, Y, Z)``, one sigmoid channel per non-background label (label ``k + 1`` is
channel ``k``), on any grid; ``spacing`` is the voxel size in mm in the same (x, y, z) order, so the
minimum lesion size is a physical volume whatever the voxel shape.

Steps:
    1. A voxel is a candidate for class ``k`` when its probability is at least ``threshold``.
    2. With ``K > 1`` a voxel above the threshold for several classes takes the most probable of them
       (argmax among the classes above the threshold); a voxel above it for none is background.
    3. Per label, 26-connected components with a volume below ``min_lesion_mm3`` are set to
       background (26-connectivity, as the lesion-wise metrics in ``autoseg.evaluate.metrics`` count lesions).

The threshold and minimum size come from ``Configuration.postprocessing`` and are tuned on the
cross-validation predictions by ``autoseg_find_best``, which writes them with the members they were tuned for to
``postprocessing.json``; :func:`read_tuned_postprocessing` is the one reader of that file, and refuses a threshold
outside (0, 1), a minimum size outside [0, ``autoseg.plans.MAX_MIN_LESION_MM3``] or members that are not
``configuration/trainer`` names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.errors import InvalidFileError
from autoseg.io.files import read_json
from autoseg.plans import PostProcessing

__all__ = [
    "MEMBER_PATTERN",
    "TunedPostProcessing",
    "postprocess_probabilities",
    "read_tuned_postprocessing",
    "remove_small_components",
]

#: A member's name: ``configuration/trainer``.
MEMBER_PATTERN = re.compile(r"^\w[\w.-]*/\w[\w.-]*$")

_CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def postprocess_probabilities(
    probabilities: np.ndarray,
    spacing: Sequence[float],
    threshold: float = 0.5,
    min_lesion_mm3: float = 0.0,
) -> np.ndarray:
    """Binarize ``(K, X, Y, Z)`` probabilities at ``threshold`` and drop components below ``min_lesion_mm3``.

    Args:
        probabilities: (K, X, Y, Z) per-class probabilities (sigmoid outputs), K >= 1.
        spacing: voxel size in mm, (x, y, z) order.
        threshold: a voxel is foreground for a class when its probability is >= ``threshold``; in (0, 1).
            Default 0.5.
        min_lesion_mm3: components (26-connected, per label) with a smaller volume are removed. Default 0
            (keep everything).

    Returns:
        (X, Y, Z) uint8 labels: 0 background, ``k + 1`` for channel ``k``.

    Raises:
        ValueError: probabilities not 4-D or with more than 255 classes, spacing without 3 positive values,
            threshold outside (0, 1), or a negative minimum size.

    Example:
        >>> p = np.zeros((1, 4, 4, 4), np.float32); p[0, :2, :2, :2] = 0.9; p[0, 3, 3, 3] = 0.8
        >>> int(postprocess_probabilities(p, (1.0, 1.0, 2.0), min_lesion_mm3=4.0).sum())
        8
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 4 or not 1 <= probabilities.shape[0] <= 255:
        raise ValueError(f"expected probabilities (K, X, Y, Z) with 1 <= K <= 255, got shape {probabilities.shape}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    above = probabilities >= threshold
    if probabilities.shape[0] == 1:
        labels = above[0].astype(np.uint8)
    else:
        best = np.where(above, probabilities, -1.0).argmax(axis=0)
        labels = np.where(above.any(axis=0), best + 1, 0).astype(np.uint8)
    return remove_small_components(labels, spacing, min_lesion_mm3)


def remove_small_components(labels: np.ndarray, spacing: Sequence[float], min_volume_mm3: float) -> np.ndarray:
    """Set 26-connected components of each label with a volume below ``min_volume_mm3`` to 0.

    Args:
        labels: (X, Y, Z) integer label map, 0 = background.
        spacing: voxel size in mm, (x, y, z) order; a component's volume is its voxel count times their product.
        min_volume_mm3: smallest volume kept; a component of exactly this volume stays. 0 keeps everything.

    Returns:
        A new (X, Y, Z) uint8 label map (``labels`` is not changed).

    Raises:
        ValueError: ``labels`` not 3-D, spacing without 3 positive values, or a negative minimum.
    """
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ValueError(f"expected labels (X, Y, Z), got shape {labels.shape}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"spacing needs 3 positive values in mm, got {list(spacing)}")
    if min_volume_mm3 < 0:
        raise ValueError(f"min_volume_mm3 must be >= 0, got {min_volume_mm3}")
    out = labels.astype(np.uint8, copy=True)
    if min_volume_mm3 == 0:
        return out
    voxel_mm3 = float(np.prod(spacing))
    for value in np.unique(out):
        if value == 0:
            continue
        components, _ = ndimage.label(out == value, structure=_CONNECTIVITY_26)
        too_small = np.bincount(components.ravel()) * voxel_mm3 < min_volume_mm3
        too_small[0] = False  # index 0 is everything that is not this label
        out[too_small[components]] = 0
    return out


@dataclass(frozen=True)
class TunedPostProcessing:
    """What ``postprocessing.json`` holds: the members (``configuration/trainer``) it was tuned for, in the file's
    order, and the threshold and minimum lesion size in mm³."""

    members: tuple[str, ...]
    settings: PostProcessing


def read_tuned_postprocessing(path: str | Path) -> TunedPostProcessing:
    """Read and check ``postprocessing.json`` (written by ``autoseg_find_best``; other keys are kept for people).

    Raises:
        InvalidFileError: not a JSON object, ``members`` not a non-empty list of ``configuration/trainer`` names,
            ``threshold`` or ``min_lesion_mm3`` missing, not a number, or out of range
            (:meth:`autoseg.plans.PostProcessing.problems`); the message names the file and the field.
    """
    tuned = read_json(path)
    if not isinstance(tuned, dict):
        raise InvalidFileError(f"{path}: expected a JSON object, got {type(tuned).__name__}")
    members = tuned.get("members")
    if (
        not isinstance(members, list)
        or not members
        or not all(isinstance(m, str) and MEMBER_PATTERN.match(m) for m in members)
    ):
        raise InvalidFileError(f"{path}: members: a non-empty list of configuration/trainer names, got {members!r}")
    values = {}
    for name in ("threshold", "min_lesion_mm3"):
        value = tuned.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidFileError(f"{path}: {name}: a number is needed, got {value!r}")
        values[name] = float(value)
    settings = PostProcessing(**values)
    problems = settings.problems()
    if problems:
        raise InvalidFileError(f"{path}: {'; '.join(problems)}")
    return TunedPostProcessing(tuple(members), settings)
