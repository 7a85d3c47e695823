"""Pictures people look at instead of numbers: axial slices with reference and prediction contours.

Figures are bare :class:`matplotlib.figure.Figure` objects rendered with the Agg canvas, so importing this module
changes no global matplotlib state (backend, pyplot's figure list) of the program that imports it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import PIL.Image
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from autoseg.io.files import atomic_path
from autoseg.io.images import read_image
from autoseg.labels import read_label_file

#: Outline colours: reference (green) and prediction (red), as named in every title and legend.
REFERENCE_COLOUR = "lime"
PREDICTION_COLOUR = "red"


def lesion_slices(reference: np.ndarray, prediction: np.ndarray, count: int = 4) -> list[int]:
    """Indices along z (axis 2) of up to ``count`` slices through the lesions: spread evenly over the slices that
    hold reference lesion (or, without any, predicted lesion), so every pick shows some, also where lesions leave
    gaps between them; the middle slice when neither mask has any."""
    area = reference.sum(axis=(0, 1)) if reference.any() else prediction.sum(axis=(0, 1))
    present = np.flatnonzero(area)
    if present.size == 0:
        return [reference.shape[2] // 2]
    positions = np.linspace(0, present.size - 1, num=min(count, present.size) + 2)[1:-1]
    return sorted({int(present[int(round(p))]) for p in positions})


def read_overlay_arrays(
    image_path: Path | None, reference_path: Path, prediction_path: Path, label: int | None = None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Image (float32, or None without ``image_path``), reference and prediction masks (bool), shape (X, Y, Z), in
    radiological display order. The masks are ``== label``, or every non-zero label when ``label`` is None.

    The files must cover one grid (``autoseg_predict`` writes predictions on the input's grid), in any stored
    orientation: they are read in the canonical RAS orientation (``autoseg.io.images``), so axis 2 runs from foot to head
    and the slices are axial whatever the files store. x is then reversed ([::-1]: canonical x runs towards the
    patient's right; radiological viewers show the patient's right on the left of the picture, anterior up).

    Raises:
        ImageReadError: a file is missing or unreadable (the message names it).
        LabelError: a mask holds values far from integers (the message names it).
    """
    image = None if image_path is None else read_image(image_path)[0][::-1]
    masks = []
    for path in (reference_path, prediction_path):
        labels = read_label_file(path).array[::-1]  # 0.99999994 is 1, not 0
        masks.append(labels > 0 if label is None else labels == label)
    return image, masks[0], masks[1]


def overlay_figure(
    image: np.ndarray | None,
    reference: np.ndarray,
    prediction: np.ndarray,
    count: int = 4,
    title: str | None = None,
    panel_inches: float = 3.2,
) -> Figure:
    """Axial slices through the lesion with the reference (green) and predicted (red) outlines.

    Args:
        image: the background, shape (X, Y, Z) in display order (:func:`read_overlay_arrays`); None draws the
            outlines on a black background.
        reference, prediction: boolean masks of the same shape.
        count: at most this many slices (:func:`lesion_slices`).
        title: the figure's title; None for none (the panels keep their ``z = ...`` labels).
        panel_inches: width of one panel in inches (the height is a little more, for the label).

    Returns:
        A Figure not registered with pyplot; render it with :func:`figure_png` or ``figure.savefig``.
    """
    slices = lesion_slices(reference, prediction, count)
    if image is None:
        image, low, high = np.zeros(reference.shape, np.float32), 0.0, 1.0
    else:
        low, high = np.percentile(image[image != 0], [1, 99]) if image.any() else (0.0, 1.0)
    view = _view_box(image, reference, prediction)
    image, reference, prediction = image[view], reference[view], prediction[view]
    figure = Figure(figsize=(panel_inches * len(slices), panel_inches * 1.19), layout="constrained")
    axes = figure.subplots(1, len(slices), squeeze=False)[0]
    for axis, z in zip(axes, slices):
        axis.imshow(image[:, :, z].T, cmap="gray", vmin=low, vmax=high, origin="lower")
        for mask, colour in ((reference, REFERENCE_COLOUR), (prediction, PREDICTION_COLOUR)):
            if mask[:, :, z].any():
                axis.contour(mask[:, :, z].T.astype(float), levels=[0.5], colors=colour, linewidths=1.2, origin="lower")
        axis.set_title(f"z = {z}", fontsize=9)
        axis.axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def figure_png(figure: Figure, dpi: float = 100, grey_levels: int | None = None) -> bytes:
    """The PNG bytes of ``figure`` at ``dpi`` dots per inch, rendered with the Agg canvas.

    ``grey_levels``: store the picture with a palette of this many greys plus the two outline colours, each pixel
    taken to the nearest entry (no dithering). An overlay then takes about a third of the bytes and the outlines
    keep their colours (an adaptive palette merges their few pixels into the greys). None keeps full RGBA.
    """
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    if grey_levels is None:
        return buffer.getvalue()
    greys = np.linspace(0, 255, min(grey_levels, 254))
    outlines = [np.array(to_rgb(colour)) * 255 for colour in (REFERENCE_COLOUR, PREDICTION_COLOUR)]
    palette = np.concatenate([np.repeat(greys[:, None], 3, axis=1), outlines]).round()  # (P, 3)
    pixels = np.asarray(PIL.Image.open(buffer).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    # Nearest entry by squared distance, exactly (PIL's own palette quantizer rounds white to a grey).
    nearest = np.argmin(((pixels[:, :, None, :] - palette.astype(np.float32)) ** 2).sum(axis=3), axis=2)
    picture = PIL.Image.fromarray(nearest.astype(np.uint8), mode="P")
    picture.putpalette(palette.astype(np.uint8).ravel().tolist())
    buffer = io.BytesIO()
    picture.save(buffer, format="png", optimize=True)
    return buffer.getvalue()


def _view_box(image: np.ndarray, *masks: np.ndarray, margin: int = 2) -> tuple[slice, slice, slice]:
    """The x and y range (all of z) holding the image's non-zero voxels and the masks, plus ``margin`` voxels: the
    black surroundings of a skull-stripped scan are cut away so the brain fills the panel."""
    present = image != 0
    for mask in masks:
        present = present | mask
    if not present.any():
        return slice(None), slice(None), slice(None)
    box = []
    for axis in (0, 1):
        found = np.flatnonzero(present.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(int(found[0]) - margin, 0), int(found[-1]) + margin + 1))
    return box[0], box[1], slice(None)


def save_overlay(image_path: Path, reference_path: Path, prediction_path: Path, output: Path, count: int = 4) -> Path:
    """A PNG of axial slices of ``image_path`` with the reference (green) and predicted (red) lesion outlines,
    written atomically to ``output`` (see :func:`read_overlay_arrays` for orientation; returns ``output``).

    Raises:
        ImageReadError: an input is missing or unreadable.
        DiskFullError: the disk filled up while writing ``output`` (nothing is left under its name).
    """
    image, reference, prediction = read_overlay_arrays(image_path, reference_path, prediction_path)
    title = f"{Path(image_path).name}: reference (green) and prediction (red)"
    png = figure_png(overlay_figure(image, reference, prediction, count, title), dpi=110)
    with atomic_path(Path(output), suffix=".png") as temporary:
        temporary.write_bytes(png)
    return output
