"""Pictures people look at instead of numbers: axial slices with reference and prediction contours."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)
import numpy as np  # noqa: E402

from autoseg.io import atomic_path, read_image  # noqa: E402


def lesion_slices(reference: np.ndarray, prediction: np.ndarray, count: int = 4) -> list[int]:
    """Indices along z (axis 2) of up to ``count`` slices through the lesions, spread from the largest
    reference (or, without reference lesion, prediction) cross-sections; the middle slice when neither has any."""
    area = reference.sum(axis=(0, 1)) if reference.any() else prediction.sum(axis=(0, 1))
    present = np.flatnonzero(area)
    if present.size == 0:
        return [reference.shape[2] // 2]
    picks = np.linspace(present[0], present[-1], num=min(count, present.size) + 2)[1:-1]
    return sorted({int(round(p)) for p in picks})


def save_overlay(image_path: Path, reference_path: Path, prediction_path: Path, output: Path, count: int = 4) -> Path:
    """A PNG of axial slices of ``image_path`` with the reference (green) and predicted (red) lesion outlines.

    All three files must cover one grid (``autoseg_predict`` writes predictions on the input's grid), in any stored
    orientation: they are read in the canonical RAS orientation (``autoseg.io``), so axis 2 runs from foot to head and
    the slices are axial whatever the files store. They are shown as radiological viewers do: the patient's right on
    the left of the picture (x reversed), anterior up.
    """
    # [::-1]: canonical x runs towards the patient's right; radiological display puts it on the left.
    image = read_image(image_path)[0][::-1]
    reference = read_image(reference_path, np.uint8)[0][::-1] > 0
    prediction = read_image(prediction_path, np.uint8)[0][::-1] > 0
    slices = lesion_slices(reference, prediction, count)
    low, high = np.percentile(image[image != 0], [1, 99]) if image.any() else (0.0, 1.0)
    figure, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.8), squeeze=False)
    for axis, z in zip(axes[0], slices):
        axis.imshow(image[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower")
        for mask, colour in ((reference, "lime"), (prediction, "red")):
            if mask[:, :, z].any():
                axis.contour(mask[:, :, z].T.astype(float), levels=[0.5], colors=colour, linewidths=1.2, origin="lower")
        axis.set_title(f"z = {z}", fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{Path(image_path).name}: reference (green) and prediction (red)", fontsize=10)
    figure.tight_layout()
    with atomic_path(Path(output), suffix=".png") as temporary:
        figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    return output
