"""Pictures people look at instead of numbers: axial slices with lesion outlines (reference and prediction on the
results page, the prediction and its uncertainty on the review page of a prediction run).

Figures are bare :class:`matplotlib.figure.Figure` objects rendered with the Agg canvas, so importing this module
changes no global matplotlib state (backend, pyplot's figure list) of the program that imports it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure

from autoseg.io.files import atomic_path
from autoseg.io.images import read_image
from autoseg.labels import read_label_file

#: Outline colours: reference (green) and prediction (red), as named in every title and legend.
REFERENCE_COLOUR = "lime"
PREDICTION_COLOUR = "red"
#: Colour map of an uncertainty panel: perceptually uniform and without red, so the prediction outline stays visible.
UNCERTAINTY_COLOURMAP = "viridis"
#: How a slice is shown: ``radiological`` puts the patient's right on the left of the picture (as radiology viewers
#: do), ``neurological`` on the right (as FSLeyes and MRIcroGL do by default); anterior is up in both.
CONVENTIONS = ("radiological", "neurological")
#: Palette entries a colour map gets in :func:`figure_png`.
_COLOURMAP_LEVELS = 64


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


def display_order(array: np.ndarray, convention: str = "radiological") -> np.ndarray:
    """A canonical (X, Y, Z) array (``autoseg.io.images.read_image``: x towards the patient's right, y anterior, z up)
    in display order for ``convention`` (:data:`CONVENTIONS`): x reversed for radiological (a view, not a copy).

    Raises:
        ValueError: an unknown convention.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown display convention {convention!r}, use one of {list(CONVENTIONS)}")
    return array[::-1] if convention == "radiological" else array


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
    image = None if image_path is None else display_order(read_image(image_path)[0])
    masks = []
    for path in (reference_path, prediction_path):
        labels = display_order(read_label_file(path).array)  # 0.99999994 is 1, not 0
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
    outlines = [(reference, REFERENCE_COLOUR), (prediction, PREDICTION_COLOUR)]
    figure = slice_figure(image, slices, outlines, [f"z = {z}" for z in slices], panel_inches=panel_inches)
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def slice_figure(
    image: np.ndarray | None,
    slices: Sequence[int],
    outlines: Sequence[tuple[np.ndarray, str]],
    titles: Sequence[str],
    heat: np.ndarray | None = None,
    heat_range: tuple[float, float] = (0.0, 1.0),
    heat_label: str = "",
    panel_inches: float = 3.2,
) -> Figure:
    """One panel per axial slice of ``image`` with the outline of every mask in ``outlines``; with ``heat``, a second
    row of the same slices showing ``heat`` in :data:`UNCERTAINTY_COLOURMAP` with the same outlines and a colour bar.

    Every panel is cut to the box of the image's non-zero voxels and the masks (the black surroundings of a
    skull-stripped scan go), the image's grey scale spans its 1st to 99th percentile of non-zero voxels.

    Args:
        image: the background, shape (X, Y, Z) in display order (:func:`display_order`); None draws the outlines on
            a black background.
        slices: indices along z (axis 2), one panel each, left to right.
        outlines: (boolean mask of shape (X, Y, Z), matplotlib colour) pairs, drawn in this order.
        titles: one per slice, above its panel.
        heat: None, or a float map of shape (X, Y, Z) shown in the second row.
        heat_range: the values of ``heat`` at the colour map's two ends; values beyond are shown as the ends.
        heat_label: the colour bar's label (the measure and its unit).
        panel_inches: width of one panel in inches (the height is a little more, for the title).

    Returns:
        A Figure not registered with pyplot; render it with :func:`figure_png` or ``figure.savefig``.
    """
    masks = [mask for mask, _ in outlines]
    shape = masks[0].shape if masks else image.shape
    if image is None:
        image, low, high = np.zeros(shape, np.float32), 0.0, 1.0
    else:
        low, high = np.percentile(image[image != 0], [1, 99]) if image.any() else (0.0, 1.0)
    view = _view_box(image, *masks)
    rows = [(image[view], dict(cmap="gray", vmin=low, vmax=high))]
    if heat is not None:
        rows.append((heat[view], dict(cmap=UNCERTAINTY_COLOURMAP, vmin=heat_range[0], vmax=heat_range[1])))
    masks = [mask[view] for mask in masks]
    figure = Figure(figsize=(panel_inches * len(slices), panel_inches * 1.19 * len(rows)), layout="constrained")
    axes = figure.subplots(len(rows), len(slices), squeeze=False)
    for row, (background, style) in enumerate(rows):
        for axis, z, title in zip(axes[row], slices, titles):
            shown = axis.imshow(background[:, :, z].T, origin="lower", **style)
            for mask, (_, colour) in zip(masks, outlines):
                if mask[:, :, z].any():
                    axis.contour(
                        mask[:, :, z].T.astype(float), levels=[0.5], colors=colour, linewidths=1.2, origin="lower"
                    )
            axis.set_title(title, fontsize=9)
            axis.axis("off")
        if row == 1:
            figure.colorbar(shown, ax=list(axes[row]), shrink=0.8, label=heat_label)
    return figure


def figure_png(figure: Figure, dpi: float = 100, grey_levels: int | None = None, colourmap: str | None = None) -> bytes:
    """The PNG bytes of ``figure`` at ``dpi`` dots per inch, rendered with the Agg canvas.

    ``grey_levels``: store the picture with a palette of this many greys plus the two outline colours (and, with
    ``colourmap``, 64 colours spread along that matplotlib colour map, for a heat panel of :func:`slice_figure`), each
    pixel taken to the nearest entry (no dithering). An overlay then takes about a third of the bytes and the outlines
    keep their colours (an adaptive palette merges their few pixels into the greys). None keeps full RGBA.
    """
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    if grey_levels is None:
        return buffer.getvalue()
    greys = np.linspace(0, 255, min(grey_levels, 254 - (_COLOURMAP_LEVELS if colourmap else 0)))
    entries = [np.repeat(greys[:, None], 3, axis=1)]
    entries.append(np.array([to_rgb(colour) for colour in (REFERENCE_COLOUR, PREDICTION_COLOUR)]) * 255)
    if colourmap:
        entries.append(colormaps[colourmap](np.linspace(0, 1, _COLOURMAP_LEVELS))[:, :3] * 255)
    palette = np.concatenate(entries).round().astype(np.float32)  # (P, 3)
    pixels = np.asarray(PIL.Image.open(buffer).convert("RGB"), dtype=np.float32)  # (H, W, 3)
    # Nearest entry by squared distance, exactly (PIL's own palette quantizer rounds white to a grey), a band of rows
    # at a time so that the (rows, W, P, 3) differences stay some tens of MB.
    band = max(1, 2**21 // (pixels.shape[1] * len(palette)))
    nearest = np.concatenate([
        np.argmin(((pixels[start : start + band, :, None, :] - palette) ** 2).sum(axis=3), axis=2)
        for start in range(0, pixels.shape[0], band)
    ])  # fmt: skip
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
