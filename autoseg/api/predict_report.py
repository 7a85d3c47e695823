"""The review page of a prediction run: one self-contained ``report.html`` that says which predicted cases to check
first, and shows why.

:func:`write_review_page` reads only what ``autoseg_predict`` wrote into its output folder, so it works at the end of
``autoseg_predict --report`` and, as a function, on any output folder written earlier:

- the run's summary, ``prediction_summary.json`` (a part's ``prediction_summary_part{i}of{K}.json``): the input, the
  cases written, skipped (done by an earlier run) and failed;
- each written or skipped case's lesion report ``CASE_lesions.json`` (total volume in ml, lesion count, the lesions
  largest first with their centroids, QC score, review flag and reasons, input-check warnings), the mask it names,
  the uncertainty map it names (``--save-uncertainty``) and channel 0 of the input files it names, drawn behind the
  outlines.

The page (``autoseg.evaluate.page``: offline, no script, every picture a data URI, a Content-Security-Policy that
forbids anything else) holds:

- the run (input, output folder, part, time) and tiles: cases, flagged for review, with input warnings, failed;
- the conventions: the lesion reports' own (connectivity, how volumes are measured, coordinates), what the QC score
  means, and how slices are shown (:data:`autoseg.evaluate.visualization.CONVENTIONS`; radiological by default, said
  on the page);
- an index table and a card per case in :func:`review_order`: flagged cases first, then by QC score ascending. Each
  card gives the total volume, lesion count, QC score and threshold, the review reasons, the input-check warnings, the
  largest lesions, and an overlay: axial slices through the centroids of the up to three largest lesions (the
  central slice for an empty prediction), the prediction outline (red) over channel 0 and, where the uncertainty
  map was saved, a second row showing it (:data:`UNCERTAINTY_RANGE`) with the same outline;
- the failed cases with their problem, and relative links to the summary and the run's lesion tables.

Slices are axial in the canonical orientation (``autoseg.io.images.read_image``), whatever the files store, as on
the evaluation page; the lesions' centroids (world mm) are turned into slice indices with the canonical geometry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from autoseg.api.predict_outputs import (
    LESION_REPORT_ENDING,
    LESION_TABLE_FILE,
    LESIONS_FILE,
    SUMMARY_FILE,
    summary_path,
)
from autoseg.errors import DataError, InvalidFileError, MissingFileError
from autoseg.evaluate.evaluation import format_number
from autoseg.evaluate.page import (
    data_uri,
    definitions,
    document,
    escape,
    relative_link,
    table,
    tiles,
    timestamp,
    write_page,
)
from autoseg.evaluate.report import OVERLAY_DPI, OVERLAY_GREY_LEVELS, OVERLAY_PANEL_INCHES, OVERLAY_SLICES, REPORT_NAME
from autoseg.evaluate.visualization import (
    CONVENTIONS,
    PREDICTION_COLOUR,
    UNCERTAINTY_COLOURMAP,
    display_order,
    figure_png,
    slice_figure,
)
from autoseg.io.files import check_output_file, read_json
from autoseg.io.geometry import Geometry
from autoseg.io.images import read_image
from autoseg.labels import read_label_file
from autoseg.parallel import map_cases

__all__ = [
    "UNCERTAINTY_RANGE",
    "CaseReview",
    "Overlay",
    "ReviewRun",
    "draw_overlay",
    "load_run",
    "overlay_slices",
    "render_review_page",
    "review_order",
    "review_page_path",
    "write_review_page",
]

#: The uncertainty values at the two ends of the colour map: the whole range of the map ``--save-uncertainty`` writes,
#: the binary entropy in bits of the lesion probability (``autoseg.infer.quality.predictive_entropy``); the same on
#: every case, so cases compare by colour.
UNCERTAINTY_RANGE = (0.0, 1.0)
#: Lesions listed on a case's card (all of them are in lesion_table.csv).
LISTED_LESIONS = 5


@dataclass(frozen=True)
class CaseReview:
    """What the page shows of one predicted case, read from its ``CASE_lesions.json`` (:func:`read_case_review`).

    Attributes:
        case: the case identifier.
        report: the lesion report file.
        files: the input channel files, channel order (channel 0 is drawn behind the outlines).
        mask: the label file.
        uncertainty: the uncertainty map, or None when it was not saved.
        lesion_count: number of lesions (connected components, connectivity as ``conventions`` says).
        total_volume_ml: the predicted lesion volume in ml, on the input's grid.
        lesions: the lesions, largest first, as the report holds them (``volume_ml``, ``centroid_lps_mm``, ...).
        qc_score: the QC score in [0, 1], lower is more likely wrong; None where the report has none.
        review: whether the case is flagged for review.
        reasons: one line per reason it is flagged.
        threshold: the score below which a case is flagged; None where the report has none.
        calibrated: whether the threshold was calibrated on the cross-validation.
        input_warnings: the input checks' warnings, one line each.
        conventions: the report's conventions (name -> sentence).
    """

    case: str
    report: Path
    files: tuple[Path, ...]
    mask: Path
    uncertainty: Path | None
    lesion_count: int
    total_volume_ml: float
    lesions: tuple[Mapping[str, Any], ...]
    qc_score: float | None
    review: bool
    reasons: tuple[str, ...]
    threshold: float | None
    calibrated: bool
    input_warnings: tuple[str, ...]
    conventions: Mapping[str, Any]


@dataclass(frozen=True)
class Overlay:
    """A case's overlay picture (PNG bytes) and the axial slices it shows, left to right (canonical z indices)."""

    png: bytes
    slices: tuple[int, ...]


@dataclass(frozen=True)
class ReviewRun:
    """A prediction run as the page shows it (:func:`load_run`).

    Attributes:
        output_dir: the prediction folder.
        summary_file: the run's summary file.
        summary: its content.
        cases: every written or skipped case, in summary order.
        failed: the failed cases as the summary lists them (``case``, ``files``, ``problem``).
    """

    output_dir: Path
    summary_file: Path
    summary: Mapping[str, Any]
    cases: tuple[CaseReview, ...]
    failed: tuple[Mapping[str, Any], ...]


def review_page_path(output: str | Path, num_parts: int = 1, part_id: int = 0) -> Path:
    """Where the review page of a run (or of part ``part_id`` of ``num_parts``) goes: ``OUTPUT/report.html``, or
    ``OUTPUT/report_part{i}of{K}.html`` beside that part's summary, so parts running at once never share a page."""
    return summary_path(output, num_parts, part_id, REPORT_NAME)


def load_run(output_dir: str | Path, summary_file: str | Path | None = None) -> ReviewRun:
    """Read a prediction folder's summary and the lesion report of every case it wrote or skipped.

    Args:
        output_dir: the ``-o`` folder of ``autoseg_predict``.
        summary_file: the summary to read; default ``output_dir/prediction_summary.json``.

    Raises:
        MissingFileError: the summary or a case's lesion report is missing (the message names it and says what to run).
        InvalidFileError: one of them is not valid JSON or lacks a field the page needs (the message names both).
    """
    output_dir = Path(output_dir)
    summary_file = Path(summary_file) if summary_file is not None else output_dir / SUMMARY_FILE
    if not summary_file.is_file():
        raise MissingFileError(f"{summary_file} not found: run autoseg_predict with -o {output_dir} first")
    summary = read_json(summary_file)
    names = [*_field(summary, "written", list, summary_file), *_field(summary, "skipped", list, summary_file)]
    cases = tuple(read_case_review(output_dir / f"{name}{LESION_REPORT_ENDING}", output_dir) for name in names)
    return ReviewRun(output_dir, summary_file, summary, cases, tuple(_field(summary, "failed", list, summary_file)))


def read_case_review(path: Path, output_dir: Path) -> CaseReview:
    """One case's lesion report as :class:`CaseReview`; the mask and uncertainty it names lie in ``output_dir``.

    Raises:
        MissingFileError: ``path`` is missing (a case predicted by an autoseg without lesion reports).
        InvalidFileError: not valid JSON, or a field is missing or of the wrong kind (the message names both).
    """
    if not path.is_file():
        raise MissingFileError(
            f"{path} not found: the case was predicted without a lesion report; predict it again (--overwrite)"
        )
    data = read_json(path)
    qc = _field(data, "qc", dict, path)
    uncertainty = _field(data, "uncertainty", (str, type(None)), path)
    score, threshold = qc.get("score"), qc.get("threshold")
    for name, value in (("qc.score", score), ("qc.threshold", threshold)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InvalidFileError(f"{path}: {name}: expected a number or null, got {value!r}")
    return CaseReview(
        case=_field(data, "case", str, path),
        report=path,
        files=tuple(Path(file) for file in _field(data, "files", list, path)),
        mask=output_dir / _field(data, "mask", str, path),
        uncertainty=None if uncertainty is None else output_dir / uncertainty,
        lesion_count=_field(data, "lesion_count", int, path),
        total_volume_ml=float(_field(data, "total_volume_ml", (int, float), path)),
        lesions=tuple(_field(data, "lesions", list, path)),
        qc_score=None if score is None else float(score),
        review=_field(qc, "review", bool, path, "qc."),
        reasons=tuple(str(reason) for reason in qc.get("reasons", [])),
        threshold=None if threshold is None else float(threshold),
        calibrated=bool(qc.get("calibrated", False)),
        input_warnings=tuple(str(line) for line in _field(data, "input_warnings", list, path)),
        conventions=dict(data.get("conventions", {})),
    )


def _field(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...], path: Path, prefix: str = "") -> Any:
    """``data[name]`` when it is of ``kind``.

    Raises:
        InvalidFileError: ``PATH: PREFIXNAME: missing`` or ``...: expected KIND, got VALUE``.
    """
    if not isinstance(data, Mapping) or name not in data:
        raise InvalidFileError(f"{path}: {prefix}{name}: missing")
    value = data[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise InvalidFileError(f"{path}: {prefix}{name}: expected {expected}, got {value!r}")
    return value


def review_order(cases: Sequence[CaseReview]) -> list[CaseReview]:
    """Flagged cases first, then by QC score ascending (a case without a score first of its group), ties by name."""
    return sorted(cases, key=lambda c: (not c.review, -math.inf if c.qc_score is None else c.qc_score, c.case))


def write_review_page(
    output_dir: str | Path,
    summary_file: str | Path | None = None,
    page: str | Path | None = None,
    convention: str = "radiological",
    num_workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write the review page of a prediction folder; return its path.

    Args:
        output_dir: the ``-o`` folder of ``autoseg_predict``.
        summary_file: the run's summary; default ``output_dir/prediction_summary.json``.
        page: the page; default :func:`review_page_path` for the part the summary records (``report.html`` for a
            whole run). Written atomically: an error leaves nothing.
        convention: ``radiological`` (default: the patient's right on the left of the picture) or ``neurological``.
        num_workers: processes drawing overlays.
        progress: show a progress bar over cases.

    Example:
        >>> write_review_page("predictions/")  # -> predictions/report.html

    Raises:
        MissingFileError: the summary, a lesion report, mask, uncertainty map or input file is missing.
        InvalidFileError: the summary or a lesion report is not what ``autoseg_predict`` writes.
        DataError: a mask, its input or its uncertainty map lie on different grids (the message names both files).
        ImageReadError, LabelError: an image is unreadable, a mask holds values that are not integers.
        DiskFullError: the disk filled up while writing the page.
        OutputPathError: ``page`` is a folder or cannot be written (checked first).
        ValueError: an unknown ``convention``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown display convention {convention!r}, use one of {list(CONVENTIONS)}")
    run = load_run(output_dir, summary_file)
    if page is None:
        part = run.summary.get("part") or {}
        page = review_page_path(output_dir, int(part.get("of", 1)), int(part.get("id", 0)))
    page = Path(page)
    check_output_file(page, "review page")
    order = review_order(run.cases)
    jobs = [(case.files[0] if case.files else None, case.mask, case.uncertainty, case.lesions) for case in order]
    overlays = map_cases(partial(draw_overlay, convention=convention), jobs, num_workers, progress, "drawing overlays")
    text = render_review_page(run, dict(zip((case.case for case in order), overlays)), page.parent, convention)
    return write_page(text, page)


def overlay_slices(
    lesions: Sequence[Mapping[str, Any]], geometry: Geometry, count: int = OVERLAY_SLICES
) -> list[tuple[int, list[int]]]:
    """The axial slices to show: (z, the lesion indices it goes through) for the centroids of the ``count`` largest
    ``lesions`` (in the report's order, largest first), in that order, a slice shared by two lesions once; the central
    slice, ``[(Z // 2, [])]``, without lesions.

    Args:
        lesions: the lesion report's lesions (``index``, ``centroid_lps_mm``: world mm, LPS as SimpleITK).
        geometry: the canonical geometry of the mask (``autoseg.io.images.read_image``), whose axis 2 the slices index.

    Raises:
        InvalidFileError: a lesion without a centroid.
    """
    found: dict[int, list[int]] = {}
    for lesion in lesions[:count]:
        centroid = lesion.get("centroid_lps_mm")
        if not isinstance(centroid, Sequence) or len(centroid) != 3:
            raise InvalidFileError(
                f"lesion {lesion.get('index')}: centroid_lps_mm: expected 3 numbers, got {centroid!r}"
            )
        z = int(np.clip(np.round(geometry.continuous_index(centroid)[2]), 0, geometry.shape[2] - 1))
        found.setdefault(z, []).append(int(lesion.get("index", len(found) + 1)))
    return list(found.items()) or [(int(geometry.shape[2]) // 2, [])]


def draw_overlay(
    job: tuple[Path | None, Path, Path | None, Sequence[Mapping[str, Any]]], convention: str = "radiological"
) -> Overlay:
    """The overlay of one case, (channel 0, mask, uncertainty map or None, the report's lesions) -> :class:`Overlay`:
    the slices of :func:`overlay_slices`, the prediction outline over channel 0 and, with an uncertainty map, a second
    row showing it, all in display order for ``convention``.

    Raises:
        MissingFileError: a file is missing.
        DataError: channel 0 or the uncertainty map is not on the mask's grid.
        ImageReadError, LabelError: a file is unreadable, or the mask's values are not integers.
    """
    image_path, mask_path, uncertainty_path, lesions = job
    for path in (image_path, mask_path, uncertainty_path):
        if path is not None and not path.is_file():
            raise MissingFileError(f"{path} not found (named by the lesion report of {mask_path.name})")
    labels = read_label_file(mask_path)
    geometry = labels.geometry
    image = None
    if image_path is not None:
        image, image_geometry = read_image(image_path)
        _same_grid(image_geometry, geometry, image_path, mask_path)
        image = display_order(image, convention)
    heat = None
    if uncertainty_path is not None:
        heat, heat_geometry = read_image(uncertainty_path)
        _same_grid(heat_geometry, geometry, uncertainty_path, mask_path)
        heat = display_order(heat, convention)
    slices = overlay_slices(lesions, geometry)
    titles = [_slice_title(z, indices) for z, indices in slices]
    mask = display_order(labels.array > 0, convention)  # every lesion label, whatever its value (1, 255, ...)
    figure = slice_figure(
        image,
        [z for z, _ in slices],
        [(mask, PREDICTION_COLOUR)],
        titles,
        heat=heat,
        heat_range=UNCERTAINTY_RANGE,
        heat_label="uncertainty (entropy, bits)",
        panel_inches=OVERLAY_PANEL_INCHES,
    )
    colourmap = UNCERTAINTY_COLOURMAP if heat is not None else None
    png = figure_png(figure, dpi=OVERLAY_DPI, grey_levels=OVERLAY_GREY_LEVELS, colourmap=colourmap)
    return Overlay(png, tuple(z for z, _ in slices))


def _same_grid(geometry: Geometry, mask_geometry: Geometry, path: Path, mask_path: Path) -> None:
    differences = geometry.differences(mask_geometry)
    if differences:
        raise DataError(f"{path}: not on the grid of the mask {mask_path} ({'; '.join(differences)})")


def _slice_title(z: int, indices: Sequence[int]) -> str:
    if not indices:
        return f"no lesion: central slice z = {z}"
    names = "lesion" if len(indices) == 1 else "lesions"
    return f"{names} {', '.join(str(i) for i in indices)}: z = {z}"


def render_review_page(
    run: ReviewRun,
    overlays: Mapping[str, Overlay],
    page_dir: Path,
    convention: str = "radiological",
    now: datetime | None = None,
) -> str:
    """The page as HTML text (see the module docstring); pure apart from reading the clock when ``now`` is None.

    Args:
        run: what :func:`load_run` read.
        overlays: case -> its :class:`Overlay`, for every case of ``run``.
        page_dir: the folder the page will be written to; its links are relative to it.
        convention: the display convention the overlays were drawn in (said on the page).
        now: the time printed on the page (default: now, UTC).
    """
    stamp = timestamp(now)
    order = review_order(run.cases)
    summary = run.summary
    part = summary.get("part") or {}
    title = f"Prediction review: {'/'.join(run.output_dir.resolve().parts[-2:])}"
    flagged = sum(case.review for case in order)
    warned = sum(bool(case.input_warnings) for case in order)
    rows = [("Input", summary.get("input")), ("Output", run.output_dir.resolve())]
    if summary.get("list"):
        rows.append(("Case list", summary["list"]))
    if int(part.get("of", 1)) > 1:
        rows.append(("Part", f"{int(part.get('id', 0)) + 1} of {part['of']} (part id {part.get('id')})"))
    rows += [("Cases", len(order)), ("Made", stamp)]
    tables = [summary_path(run.output_dir, int(part.get("of", 1)), int(part.get("id", 0)), name)
              for name in (LESIONS_FILE, LESION_TABLE_FILE)]  # fmt: skip
    links = [run.summary_file, *(path for path in tables if path.is_file())]
    body = [
        f"<header><h1>{escape(title)}</h1>",
        definitions(rows, "inputs"),
        "<nav>"
        + " · ".join(
            f'<a href="#{anchor}">{label}</a>'
            for anchor, label in (
                ("conventions", "Conventions"),
                ("cases", "Cases"),
                ("failed", "Failed"),
                ("files", "Files"),
            )
        )
        + "</nav></header>",  # fmt: skip
        tiles(
            [
                ("Cases", str(len(order)), "written or already done"),
                ("Flagged for review", str(flagged), "listed first"),
                ("With input warnings", str(warned), "outside the training data's range"),
                ("Failed", str(len(run.failed)), "not predicted"),
            ]
        ),  # fmt: skip
        '<section id="conventions"><h2>Conventions</h2>',
        _conventions(order, convention),
        "</section>",
        f'<section id="cases"><h2>Cases, flagged for review first, then by QC score ({len(order)})</h2>',
        _case_index(order),
        '<div class="cards">',
        *(_case_card(rank, case, overlays[case.case], page_dir) for rank, case in enumerate(order, start=1)),
        "</div></section>",
        f'<section id="failed"><h2>Failed cases ({len(run.failed)})</h2>',
        _failed(run.failed),
        "</section>",
        '<section id="files"><h2>Files</h2><ul>',
        *(f'<li><a href="{relative_link(path, page_dir)}">{escape(path.name)}</a></li>' for path in links),
        "</ul></section>",
    ]
    return document(title, body, stamp, _STYLE)


def _conventions(cases: Sequence[CaseReview], convention: str) -> str:
    side = "left" if convention == "radiological" else "right"
    lo, hi = UNCERTAINTY_RANGE
    rows = [
        ("Slices", f"axial, {convention} convention: the patient's right on the {side} of the picture, anterior up; "
                   "through the centroids of the largest lesions (the central slice of an empty prediction)"),
        ("Outline", f"the predicted lesion ({PREDICTION_COLOUR}) over channel 0 of the input"),
        ("Uncertainty", f"second row where saved (--save-uncertainty): the entropy of the lesion probability in bits, "
                        f"{UNCERTAINTY_COLOURMAP} colour map from {lo:g} (dark blue: certain) to {hi:g} (yellow: p = 0.5)"),
        ("QC score", "0 to 1, lower is more likely wrong; a case is flagged for review below its threshold or for "
                     "a reason listed on its card"),
    ]  # fmt: skip
    seen: dict[str, Any] = {}
    for case in cases:
        for name, value in case.conventions.items():
            seen.setdefault(str(name), value)
    rows += [(name.replace("_", " ").capitalize(), value) for name, value in seen.items()]
    return definitions(rows, "inputs")


def _case_index(order: Sequence[CaseReview]) -> str:
    """One row per case, linked to its card."""
    header = ["#", "Case", "Review", "QC score", "Volume (ml)", "Lesions", "Input warnings"]
    rows = [
        f'<tr><td>{rank}</td><th scope="row"><a href="#case-{rank}">{escape(case.case)}</a></th>'
        f"<td>{'yes' if case.review else 'no'}</td><td>{format_number(case.qc_score, 2)}</td>"
        f"<td>{case.total_volume_ml:.2f}</td><td>{case.lesion_count}</td><td>{len(case.input_warnings)}</td></tr>"
        for rank, case in enumerate(order, start=1)
    ]
    return table("index", header, rows)


def _case_card(rank: int, case: CaseReview, overlay: Overlay, page_dir: Path) -> str:
    name = escape(case.case)
    threshold = "" if case.threshold is None else (
        f" (flagged below {case.threshold:.2f}, "
        f"{'calibrated on the cross-validation' if case.calibrated else 'not calibrated'})"
    )  # fmt: skip
    facts = [
        ("Total volume", escape(f"{case.total_volume_ml:.2f} ml")),
        ("Lesions", str(case.lesion_count)),
        ("QC score", escape(format_number(case.qc_score, 2) + threshold)),
        ("Review", _list("reasons", case.reasons) if case.review else "no"),
        ("Input warnings", _list("warnings", case.input_warnings) if case.input_warnings else "none"),
    ]
    if case.lesions:
        facts.append(("Largest lesions", _lesion_table(case.lesions, case.lesion_count)))
    files = [(case.mask.name, case.mask)] + ([(case.uncertainty.name, case.uncertainty)] if case.uncertainty else [])
    links = ", ".join(f'<a href="{relative_link(path, page_dir)}">{escape(label)}</a>' for label, path in files)
    facts.append(("Files", f"{links}; input {', '.join(escape(path.name) for path in case.files)}"))
    items = "".join(f"<dt>{escape(label)}</dt><dd>{value}</dd>" for label, value in facts)
    badge = '<span class="badge poor">review</span>' if case.review else '<span class="badge good">ok</span>'
    return (f'<article class="case" id="case-{rank}" data-case="{name}" data-review="{str(case.review).lower()}" '
            f'data-qc-score="{escape(repr(case.qc_score))}" data-volume-ml="{escape(repr(case.total_volume_ml))}" '
            f'data-lesions="{case.lesion_count}" data-warnings="{len(case.input_warnings)}">'
            f'<h3><span class="rank">{rank}</span> {name} {badge}</h3><dl>{items}</dl>'
            f'<img src="{data_uri(overlay.png)}" data-slices="{" ".join(str(z) for z in overlay.slices)}" '
            f'alt="overlay of {name}: axial slices z = {", ".join(str(z) for z in overlay.slices)}"></article>')  # fmt: skip


def _list(css_class: str, lines: Sequence[str]) -> str:
    if not lines:
        return "yes"
    return f'<ul class="{css_class}">' + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>"


def _lesion_table(lesions: Sequence[Mapping[str, Any]], count: int) -> str:
    rows = []
    for lesion in lesions[:LISTED_LESIONS]:
        centroid = lesion.get("centroid_ras_mm") or []
        where = ", ".join(format_number(value, 1) for value in centroid)
        rows.append(f"<tr><td>{escape(lesion.get('index'))}</td><td>{format_number(lesion.get('volume_ml'), 2)}</td>"
                    f"<td>{escape(lesion.get('hemisphere', ''))}</td><td>{escape(where)}</td></tr>")  # fmt: skip
    more = f'<div class="ci">and {count - len(rows)} more in lesion_table.csv</div>' if count > len(rows) else ""
    return table("lesions", ["#", "ml", "Hemisphere", "Centroid RAS (mm)"], rows) + more


def _failed(failed: Sequence[Mapping[str, Any]]) -> str:
    if not failed:
        return "<p>None.</p>"
    items = "".join(
        f'<li data-case="{escape(entry.get("case"))}"><strong>{escape(entry.get("case"))}</strong> '
        f"({escape(', '.join(str(f) for f in entry.get('files', [])))}): {escape(entry.get('problem'))}</li>"
        for entry in failed
    )
    return f'<ul class="failed">{items}</ul>'


_STYLE = """
.case ul { margin: 0; padding-left: 18px; } .case ul.reasons li { color: #c0392b; } .case ul.warnings li { color: #8a5a00; }
table.lesions { font-size: 12px; } table.lesions th, table.lesions td { padding: 1px 6px; }
ul.failed li { margin-bottom: 4px; }
"""
