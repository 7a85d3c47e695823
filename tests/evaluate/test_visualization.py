"""The overlay picture: slices through the lesion, a real PNG, written atomically."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image

from autoseg.evaluate.visualization import figure_png, lesion_slices, overlay_figure, save_overlay
from autoseg.io.geometry import Geometry
from autoseg.io.images import write_image


def test_slices_go_through_the_lesion() -> None:
    reference = np.zeros((10, 10, 20), bool)
    reference[3:6, 3:6, 8:13] = True
    picks = lesion_slices(reference, np.zeros_like(reference), count=4)
    assert picks and all(8 <= z <= 12 for z in picks)
    assert lesion_slices(np.zeros_like(reference), np.zeros_like(reference)) == [10]


def test_overlay_png_is_written(tmp_path: Path) -> None:
    geometry = Geometry((16, 16, 8), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    image = np.random.default_rng(0).random((16, 16, 8)).astype(np.float32) + 1
    label = np.zeros((16, 16, 8), np.uint8)
    label[5:9, 5:9, 3:5] = 1
    for name, array in (("image.nii.gz", image), ("reference.nii.gz", label), ("prediction.nii.gz", np.roll(label, 1))):
        write_image(array, geometry, tmp_path / name)
    output = save_overlay(
        tmp_path / "image.nii.gz",
        tmp_path / "reference.nii.gz",
        tmp_path / "prediction.nii.gz",
        tmp_path / "out" / "overlay.png",
    )
    assert output.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in output.parent.iterdir()] == ["overlay.png"]


def test_slices_skip_the_gap_between_lesions() -> None:
    reference = np.zeros((10, 10, 30), bool)
    reference[2:4, 2:4, 2:5] = True
    reference[6:8, 6:8, 25:28] = True
    picks = lesion_slices(reference, np.zeros_like(reference), count=3)
    assert len(picks) == 3 and all(reference[:, :, z].any() for z in picks)


def test_importing_leaves_matplotlib_alone() -> None:
    """No backend chosen and no pyplot imported: a program importing autoseg keeps its own matplotlib set-up."""
    # rcParams["backend"] would itself resolve the backend through pyplot; dict.__getitem__ reads it as set.
    code = (
        "import sys, matplotlib; read = lambda: dict.__getitem__(matplotlib.rcParams, 'backend'); "
        "before = read(); import autoseg.evaluate.visualization, autoseg.evaluate.report; "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'; assert read() == before, read()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_palette_png_keeps_the_outline_colours() -> None:
    reference = np.zeros((20, 20, 5), bool)
    reference[5:12, 5:12, 2] = True
    image = np.random.default_rng(1).random((20, 20, 5)).astype(np.float32) + 1
    png = figure_png(overlay_figure(image, reference, np.roll(reference, 3, axis=0), count=1), dpi=60, grey_levels=32)
    picture = PIL.Image.open(io.BytesIO(png))
    assert picture.mode == "P" and len(picture.getpalette()) // 3 <= 34
    colours = {tuple(c) for _, c in picture.convert("RGB").getcolors(4096)}
    assert {(0, 255, 0), (255, 0, 0), (255, 255, 255)} <= colours
