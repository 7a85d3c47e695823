"""The results page: one self-contained HTML file that shows what ``autoseg_evaluate`` computed.

``write_report`` reads the files an evaluation wrote (``autoseg.evaluate.evaluation.OUTPUT_NAMES``) and writes, atomically,
one page (``report.html`` beside them by default) with:

- the inputs (reference and prediction folders, lesion label), the evaluation protocol (its lesion connectivity,
  volume unit, empty-mask values and sources, ``autoseg.evaluate.protocols``) and the time the page was made;
- the metric table: mean, bootstrap 95% CI of the mean, median, SD, n and NaN count per metric (summary.json);
- the lesion-size quartile table (summary.json, as quartiles.csv);
- the Dice-against-lesion-volume plot (dice_vs_volume.png) and its fit;
- every case, worst Dice first: an index table and a card per case with its metrics and an overlay of axial slices
  through the lesion, reference outline green and prediction red (``autoseg.evaluate.visualization``);
- relative links to per_case.csv, summary.json, quartiles.csv and dice_vs_volume.png.

Self-contained: CSS is inline and every picture is a base64 PNG data URI, so the page needs no network, no script
and no other file to be viewed (the links to the CSV/JSON files are the only references, and relative). A
Content-Security-Policy forbids the page anything else. Overlays are small (3 slices, palette PNG, 20-60 kB a case), so
a cohort of a few hundred cases stays a page of some megabytes.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pandas as pd

from autoseg.data.dataset import cases_from_files
from autoseg.evaluate.evaluation import (
    DISPLAY_NAMES,
    OUTPUT_NAMES,
    CaseFiles,
    EvaluationError,
    check_geometries,
    evaluation_protocol,
    find_images,
    format_number,
    pair_cases,
    quartile_metrics,
    require_all,
)
from autoseg.evaluate.protocols import Protocol
from autoseg.evaluate.visualization import figure_png, overlay_figure, read_overlay_arrays
from autoseg.io.files import atomic_path, check_output_file, read_json
from autoseg.io.headers import ImageReadError
from autoseg.labels import LabelError
from autoseg.parallel import map_cases

#: File name of the page inside the evaluation folder.
REPORT_NAME = "report.html"
#: Overlay thumbnails: slices per case, width of one slice panel (inches), resolution (dots per inch) and grey levels
#: of the palette PNG (``autoseg.evaluate.visualization.figure_png``): about 200 pixels a panel and 20-40 kB a case.
OVERLAY_SLICES = 3
OVERLAY_PANEL_INCHES = 2.2
OVERLAY_DPI = 90
OVERLAY_GREY_LEVELS = 64
#: Columns of the case index table under the autoseg protocol: per-case column -> (title, decimals). A challenge's
#: protocol shows its own metrics there (:func:`case_columns`).
_CASE_COLUMNS: dict[str, tuple[str, int]] = {
    "dice": ("Dice", 3), "lesion_f1": ("Lesion F1", 3), "hausdorff95": ("HD95 (mm)", 1),
    "sensitivity": ("Sensitivity", 3), "precision": ("Precision", 3),
}  # fmt: skip
_CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


@dataclass(frozen=True)
class ReportInputs:
    """What the page shows, read from an evaluation folder (:func:`load_evaluation`).

    Attributes:
        summary: the content of summary.json (JSON null for NaN read back as None).
        per_case: per_case.csv, index ``case``.
        plot_png: the bytes of dice_vs_volume.png.
        evaluation_dir: the folder the files were read from.
    """

    summary: dict[str, Any]
    per_case: pd.DataFrame
    plot_png: bytes
    evaluation_dir: Path


def find_case_images(images_dir: str | Path, reference_dir: str | Path) -> dict[str, Path]:
    """Case -> the image drawn behind its outlines: channel 0 of every reference case in ``images_dir``.

    Files follow the dataset naming rule (``autoseg.data.dataset.cases_from_files`` with one channel): ``CASE_0000.nii.gz``
    or ``CASE.nii.gz`` is channel 0 of ``CASE``; other channels (``CASE_0001`` ...) are ignored. Only headers are
    read, so this is cheap enough to run before an evaluation to fail early.

    Raises:
        EvaluationError: a folder is missing, a reference case has no image, an image is unreadable, not 3-D, or
            not on its reference's grid (the message names the file).
    """
    references = find_images(reference_dir, "reference")
    files = list(find_images(images_dir, "image").values())
    try:
        images = {case: channels[0] for case, channels in cases_from_files(files, 1)}
    except ValueError as error:
        raise EvaluationError(f"image folder {images_dir}: {error}") from None
    require_all(references, images, "image (CASE_0000 or CASE)", images_dir)
    # The image stands in the prediction's place: the same grid check, with a message that names the image file.
    check_geometries([CaseFiles(case, references[case], images[case]) for case in references])
    return {case: images[case] for case in sorted(references)}


def load_evaluation(evaluation_dir: str | Path) -> ReportInputs:
    """Read summary.json, per_case.csv and dice_vs_volume.png from an ``autoseg_evaluate`` output folder.

    Raises:
        EvaluationError: a file is missing (run ``autoseg_evaluate`` first) or unreadable; the message names it.
    """
    evaluation_dir = Path(evaluation_dir)
    paths = {key: evaluation_dir / name for key, name in OUTPUT_NAMES.items()}
    for path in paths.values():
        if not path.is_file():
            raise EvaluationError(f"{path} not found: run autoseg_evaluate with -o {evaluation_dir} first")
    try:
        # Case names stay strings as written ("001", "1e3", "NaN" are names, not numbers); "NaN" is a missing value
        # in the metric columns alone.
        columns = pd.read_csv(paths["per_case"], nrows=0).columns
        missing = {column: ["NaN"] for column in columns if column != "case"}
        per_case = pd.read_csv(
            paths["per_case"], index_col="case", dtype={"case": str}, keep_default_na=False, na_values=missing
        )
    except (ValueError, KeyError, pd.errors.ParserError) as error:
        raise EvaluationError(f"{paths['per_case']}: unreadable table ({error})") from None
    return ReportInputs(read_json(paths["summary"]), per_case, paths["plot"].read_bytes(), evaluation_dir)


def write_report(
    evaluation_dir: str | Path,
    images_dir: str | Path | None = None,
    output: str | Path | None = None,
    reference_dir: str | Path | None = None,
    prediction_dir: str | Path | None = None,
    num_workers: int = 1,
    progress: bool = False,
) -> Path:
    """Write the results page of an evaluation folder; return its path.

    Args:
        evaluation_dir: the ``-o`` folder of ``autoseg_evaluate`` (summary.json, per_case.csv, ...).
        images_dir: folder of the images (channel 0 of each case, :func:`find_case_images`) drawn behind the
            outlines; None draws them on black, and the page says so.
        output: the page; default ``evaluation_dir/report.html``. Written atomically: an error leaves nothing.
        reference_dir, prediction_dir: the label folders; default the ones recorded in summary.json.
        num_workers: processes drawing overlays (about 0.2 s a case on one core).
        progress: show a progress bar over cases.

    Raises:
        EvaluationError: an evaluation file, reference, prediction or image is missing, unreadable or on another
            grid; a case of per_case.csv has no reference. The message names the file.
        DiskFullError: the disk filled up while writing the page.
        OutputPathError: ``output`` is a folder or cannot be written (checked first).
    """
    output = Path(output) if output is not None else Path(evaluation_dir) / REPORT_NAME
    check_output_file(output, "results page")
    inputs = load_evaluation(evaluation_dir)
    recorded = inputs.summary.get("inputs", {})
    reference_dir = reference_dir if reference_dir is not None else recorded.get("reference_dir")
    prediction_dir = prediction_dir if prediction_dir is not None else recorded.get("prediction_dir")
    if reference_dir is None or prediction_dir is None:
        raise EvaluationError(f"{Path(evaluation_dir) / OUTPUT_NAMES['summary']}: no reference_dir/prediction_dir")
    cases = {files.case: files for files in pair_cases(reference_dir, prediction_dir)}
    unknown = sorted(set(inputs.per_case.index) - set(cases))
    if unknown:
        raise EvaluationError(f"cases of the evaluation without a reference in {reference_dir}: {', '.join(unknown)}")
    images = None if images_dir is None else find_case_images(images_dir, reference_dir)
    order = case_order(inputs.per_case)
    jobs = [((images or {}).get(case), cases[case].reference, cases[case].prediction) for case in order]
    label = None if recorded.get("binarize") else int(recorded.get("label", 1))  # None: every non-zero voxel
    overlays = map_cases(partial(_overlay_png, label=label), jobs, num_workers, progress, "drawing overlays")
    page = render_report(inputs, dict(zip(order, overlays)), output.parent, images_given=images is not None)
    with atomic_path(output, suffix=".html") as temporary:
        temporary.write_text(page, encoding="utf-8")
    return output


def case_columns(protocol: Protocol) -> dict[str, tuple[str, int]]:
    """The metrics of the case index table: per-case column -> (title, decimals)."""
    if not protocol.is_challenge:
        return _CASE_COLUMNS
    return {name: (DISPLAY_NAMES[name][0], min(DISPLAY_NAMES[name][1], 3)) for name in protocol.metrics}


def case_order(per_case: pd.DataFrame) -> list[str]:
    """Case names, worst Dice first (NaN first of all), ties by name."""
    ranked = per_case.sort_index().sort_values("dice", kind="mergesort", na_position="first")
    return [str(case) for case in ranked.index]


def render_report(
    inputs: ReportInputs, overlays: Mapping[str, bytes], page_dir: Path, images_given: bool, now: datetime | None = None
) -> str:
    """The page as HTML text (see the module docstring); pure apart from reading the clock when ``now`` is None.

    Args:
        inputs: what :func:`load_evaluation` read.
        overlays: case -> overlay PNG bytes, for every case of ``inputs.per_case``.
        page_dir: the folder the page will be written to; the links to the evaluation files are relative to it.
        images_given: whether the overlays show images (else the page says the background is black).
        now: the time printed on the page (default: now, UTC).
    """
    summary = inputs.summary
    recorded = summary.get("inputs", {})
    protocol = evaluation_protocol(summary)
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M %Z").strip()
    order = case_order(inputs.per_case)
    links = {name: _relative_link(inputs.evaluation_dir / name, page_dir) for name in OUTPUT_NAMES.values()}
    title = f"Evaluation: {_short(recorded.get('prediction_dir'))} against {_short(recorded.get('reference_dir'))}"
    background = (
        "the image (channel 0) behind them" if images_given
        else "no image behind them (autoseg_evaluate was run without <code>--images</code>): a black background"
    )  # fmt: skip
    body = [
        f"<header><h1>{_text(title)}</h1>",
        _inputs_list(recorded, protocol, len(order), stamp),
        "<nav>" + " · ".join(f'<a href="#{anchor}">{label}</a>' for anchor, label in
                             (("metrics", "Metrics"), ("quartiles", "Lesion size"), ("volume", "Dice vs volume"),
                              ("cases", "Cases"), ("files", "Files"))) + "</nav></header>",  # fmt: skip
        _headline(summary),
        '<section id="metrics"><h2>Metrics</h2>',
        f"<p>The metrics of the {_text(protocol.name)} protocol ({_text(protocol.title)}). Mean over cases with "
        "the seeded percentile-bootstrap 95% confidence interval of the mean "
        f"({_text(recorded.get('num_bootstrap', '?'))} resamples). Undefined values (NaN: an empty mask, see "
        "documentation/evaluation.md) are left out and counted.</p>",
        _metric_table(summary), "</section>",
        '<section id="quartiles"><h2>By lesion size</h2>',
        "<p>Cases in four equal-count groups by reference lesion volume; mean and 95% CI per group.</p>",
        _quartile_table(summary, protocol), "</section>",
        '<section id="volume"><h2>Dice against lesion volume</h2>',
        _fit_text(summary.get("dice_vs_volume", {})),
        f'<img class="plot" src="{_data_uri(inputs.plot_png)}" alt="Dice against reference lesion volume">',
        "</section>",
        f'<section id="cases"><h2>Cases, worst Dice first ({len(order)})</h2>',
        f'<p>Axial slices through the reference lesion: <span class="ref">reference</span> and '
        f'<span class="pred">prediction</span> outlines, {background}. Patient right on the left.</p>',
        _case_index(inputs.per_case, order, protocol),
        '<div class="cards">', *(_case_card(rank, case, inputs.per_case.loc[case], overlays[case], protocol)
                                  for rank, case in enumerate(order, start=1)), "</div></section>",
        '<section id="files"><h2>Files</h2><ul>',
        *(f'<li><a href="{href}">{_text(name)}</a></li>' for name, href in links.items()), "</ul></section>",
    ]  # fmt: skip
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CONTENT_SECURITY_POLICY}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_text(title)}</title><style>{_STYLE}</style></head><body><main>",
        *body, f"<footer>autoseg · {stamp}</footer></main></body></html>", "",
    ])  # fmt: skip


def _inputs_list(recorded: Mapping[str, Any], protocol: Protocol, num_cases: int, stamp: str) -> str:
    rows = [("Predictions", recorded.get("prediction_dir")), ("References", recorded.get("reference_dir"))]
    if recorded.get("probabilities_dir"):
        rows.append(("Probabilities", recorded["probabilities_dir"]))
    rows += [
        ("Lesion label", "any non-zero value (--binarize)" if recorded.get("binarize") else recorded.get("label")),
        ("Protocol", protocol.describe()),
        ("Protocol sources", "; ".join(protocol.sources)),
        ("Cases", num_cases),
        ("Made", stamp),
    ]
    return '<dl class="inputs">' + "".join(f"<dt>{name}</dt><dd>{_text(value)}</dd>" for name, value in rows) + "</dl>"


def _headline(summary: Mapping[str, Any]) -> str:
    """The three numbers people ask for first, as tiles."""
    metrics = summary.get("metrics", {})
    tiles = []
    for name in ("dice", "lesion_f1", "hausdorff95"):
        if name in metrics:
            title, digits = DISPLAY_NAMES.get(name, (name, 4))
            stats = metrics[name]
            digits = min(digits, 3)
            tiles.append((title, format_number(stats["mean"], digits),
                          f"95% CI {_interval(stats['ci_low'], stats['ci_high'], digits)}"))  # fmt: skip
    tiles.append(("micro-Dice", format_number(summary.get("micro_dice"), 3), "all voxels pooled"))
    return '<div class="tiles">' + "".join(
        f'<div class="tile"><div class="label">{_text(label)}</div><div class="value">{value}</div>'
        f'<div class="note">{_text(note)}</div></div>' for label, value, note in tiles) + "</div>"  # fmt: skip


def _metric_table(summary: Mapping[str, Any]) -> str:
    rows = []
    for name, stats in summary.get("metrics", {}).items():
        title, digits = DISPLAY_NAMES.get(name, (name, 4))
        rows.append(f'<tr data-metric="{_text(name)}"><th scope="row">{_text(title)}</th>'
                    f"<td>{format_number(stats['mean'], digits)}</td>"
                    f'<td class="ci">{_interval(stats["ci_low"], stats["ci_high"], digits)}</td>'
                    f"<td>{format_number(stats['median'], digits)}</td><td>{format_number(stats['std'], digits)}</td>"
                    f"<td>{stats['n']}</td><td>{stats['n_nan']}</td></tr>")  # fmt: skip
    rows.append(f'<tr class="extra"><th scope="row">micro-Dice (pooled)</th>'
                f'<td>{format_number(summary.get("micro_dice"), 4)}</td><td colspan="5"></td></tr>')  # fmt: skip
    return _table("metrics", ("Metric", "Mean", "95% CI of mean", "Median", "SD", "n", "NaN"), rows)


def _quartile_table(summary: Mapping[str, Any], protocol: Protocol) -> str:
    metrics = quartile_metrics(protocol)
    header = ["Quartile", "Cases", "Volume (mm³)"] + [DISPLAY_NAMES.get(m, (m, 4))[0] for m in metrics]
    rows = []
    for row in summary.get("quartiles", []):
        cells = [f'<th scope="row">{_text(row["quartile"])}</th>', f"<td>{row['num_cases']}</td>",
                 f"<td>{_volume_range(row['volume_min_mm3'], row['volume_max_mm3'])}</td>"]  # fmt: skip
        for metric in metrics:
            digits = min(DISPLAY_NAMES.get(metric, (metric, 4))[1], 3)
            interval = _interval(row[f"{metric}_ci_low"], row[f"{metric}_ci_high"], digits)
            cells.append(f'<td>{format_number(row[f"{metric}_mean"], digits)}<div class="ci">{interval}</div></td>')
        rows.append(f'<tr data-quartile="{_text(row["quartile"])}">{"".join(cells)}</tr>')
    return _table("quartiles", header, rows)


def _fit_text(fit: Mapping[str, Any]) -> str:
    if fit.get("slope") is None or not math.isfinite(fit["slope"]):
        return f"<p>No linear fit: fewer than two distinct lesion volumes ({fit.get('num_cases', 0)} usable cases).</p>"
    sign = "+" if fit["intercept"] >= 0 else "−"
    return (f"<p>Least-squares line over {fit['num_cases']} cases with a lesion: Dice = {fit['slope']:.3f} · "
            f"log10(V / mm³) {sign} {abs(fit['intercept']):.3f}, "
            f"R² = {format_number(fit.get('r2'), 2)}.</p>")  # fmt: skip


def _case_index(per_case: pd.DataFrame, order: Sequence[str], protocol: Protocol) -> str:
    """One row per case, linked to its card: the whole cohort at a glance."""
    columns = case_columns(protocol)
    header = ["#", "Case", "Reference volume", "Predicted volume", *(title for title, _ in columns.values())]
    rows = []
    for rank, case in enumerate(order, start=1):
        row = per_case.loc[case]
        cells = "".join(f"<td>{format_number(row.get(c, math.nan), d)}</td>" for c, (_, d) in columns.items())
        rows.append(f'<tr><td>{rank}</td><th scope="row"><a href="#case-{rank}">{_text(case)}</a></th>'
                    f"<td>{_volume(row['volume_reference_mm3'])}</td><td>{_volume(row['volume_prediction_mm3'])}</td>"
                    f"{cells}</tr>")  # fmt: skip
    return _table("index", header, rows)


def _table(css_class: str, header: Sequence[str], rows: Sequence[str]) -> str:
    """A table with one header row and the given ``<tr>`` rows, scrolling sideways where the page is too narrow."""
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    return (f'<div class="scroll"><table class="{css_class}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')  # fmt: skip


def _case_card(rank: int, case: str, row: pd.Series, overlay: bytes, protocol: Protocol) -> str:
    dice = float(row["dice"])
    facts = [
        ("Reference lesion", _volume(row["volume_reference_mm3"])),
        ("Predicted lesion", _volume(row["volume_prediction_mm3"])),
        ("Lesion F1", f"{format_number(row['lesion_f1'], 3)} (found {int(row['lesion_tp'])}, missed "
                      f"{int(row['lesion_fn'])}, false {int(row['lesion_fp'])}; "
                      f"{protocol.lesion_connectivity}-connected)"),
    ]  # fmt: skip
    if protocol.is_challenge:
        facts += [
            (DISPLAY_NAMES[name][0], format_number(row[name], 3))
            for name in (protocol.volume_metric, "lesion_count_difference")
        ]
    else:
        facts += [
            ("HD95", _millimetres(row["hausdorff95"])),
            ("Sensitivity / precision", f"{format_number(row['sensitivity'], 3)} / {format_number(row['precision'], 3)}"),
        ]  # fmt: skip
    if "max_dice" in row.index:
        facts.insert(0, ("max Dice (mDSC)", format_number(row["max_dice"], 3)))
    items = "".join(f"<dt>{name}</dt><dd>{_text(value)}</dd>" for name, value in facts)
    name = _text(case)
    return (f'<article class="case" id="case-{rank}" data-case="{name}" data-dice="{_text(repr(dice))}">'
            f'<h3><span class="rank">{rank}</span> {name} <span class="badge {_grade(dice)}">Dice '
            f"{format_number(dice, 3)}</span></h3><dl>{items}</dl>"
            f'<img src="{_data_uri(overlay)}" alt="overlay of {name}"></article>')  # fmt: skip


def _overlay_png(job: tuple[Path | None, Path, Path], label: int | None) -> bytes:
    """The overlay thumbnail of one case: (image or None, reference, prediction) -> PNG bytes."""
    image_path, reference_path, prediction_path = job
    try:
        image, reference, prediction = read_overlay_arrays(image_path, reference_path, prediction_path, label)
    except (ImageReadError, LabelError) as error:
        raise EvaluationError(str(error)) from None
    figure = overlay_figure(image, reference, prediction, OVERLAY_SLICES, panel_inches=OVERLAY_PANEL_INCHES)
    return figure_png(figure, dpi=OVERLAY_DPI, grey_levels=OVERLAY_GREY_LEVELS)


def _relative_link(target: Path, page_dir: Path) -> str:
    return quote(Path(os.path.relpath(target.resolve(), page_dir.resolve())).as_posix())


def _short(folder: str | None) -> str:
    """The last two parts of a folder's path (``Dataset012_X/labelsTr``), which name it well enough for a title."""
    return "?" if folder is None else "/".join(Path(folder).parts[-2:])


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _text(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _interval(low: float | None, high: float | None, digits: int) -> str:
    return f"[{format_number(low, digits)}, {format_number(high, digits)}]"


def _millimetres(value: float) -> str:
    return f"{value:.1f} mm" if math.isfinite(value) else "undefined (a mask is empty)"


def _volume(mm3: float) -> str:
    if not math.isfinite(mm3) or mm3 == 0:
        return "none" if mm3 == 0 else "NaN"
    return f"{mm3 / 1000:.2f} ml" if mm3 >= 1000 else f"{mm3:.0f} mm³"


def _volume_range(low: float | None, high: float | None) -> str:
    if low is None or high is None or not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"{low:,.0f} – {high:,.0f}"


def _grade(dice: float) -> str:
    """CSS class of a Dice badge: poor below 0.5, fair below 0.7, good from 0.7 (NaN counts as poor)."""
    return "good" if dice >= 0.7 else "fair" if dice >= 0.5 else "poor"


_STYLE = """
:root { --ink: #1d2330; --muted: #5b6475; --line: #dfe3ea; --panel: #f6f7f9; --accent: #2458a6; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       background: #fff; }
main { max-width: 1280px; margin: 0 auto; padding: 24px 28px 40px; }
h1 { font-size: 26px; margin: 0 0 8px; } h2 { font-size: 20px; margin: 34px 0 8px; border-bottom: 2px solid var(--line);
   padding-bottom: 4px; } h3 { font-size: 15px; margin: 0 0 6px; display: flex; gap: 8px; align-items: center; }
a { color: var(--accent); text-decoration: none; } a:hover { text-decoration: underline; }
code { background: var(--panel); padding: 0 4px; border-radius: 3px; }
dl.inputs { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 8px 0; color: var(--muted); }
dl.inputs dt { font-weight: 600; } dl.inputs dd { margin: 0; font-family: ui-monospace, monospace; font-size: 13px;
   overflow-wrap: anywhere; }
nav { margin-top: 10px; font-weight: 600; }
.tiles { display: grid; grid-template-columns: repeat(auto-fit, minmax(190px, 1fr)); gap: 12px; margin: 22px 0 0; }
.tile { background: var(--panel); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.tile .label { color: var(--muted); font-size: 13px; } .tile .value { font-size: 28px; font-weight: 700; }
.tile .note { color: var(--muted); font-size: 12px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; font-size: 14px; }
th, td { padding: 5px 10px; border-bottom: 1px solid var(--line); text-align: right; vertical-align: top; }
thead th { background: var(--panel); font-weight: 600; position: sticky; top: 0; }
tbody th { text-align: left; font-weight: 500; } tbody tr:hover { background: #f0f4fb; }
.ci { color: var(--muted); font-size: 12px; white-space: nowrap; } tr.extra th { font-style: italic; }
img.plot { max-width: 560px; width: 100%; border: 1px solid var(--line); border-radius: 6px; }
.ref { color: #0a8a0a; font-weight: 700; } .pred { color: #d01010; font-weight: 700; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(440px, 1fr)); gap: 14px; margin-top: 16px; }
.case { border: 1px solid var(--line); border-radius: 8px; padding: 10px 12px; background: #fff; }
.case dl { display: grid; grid-template-columns: max-content 1fr; gap: 0 10px; margin: 0 0 8px; font-size: 13px; }
.case dt { color: var(--muted); } .case dd { margin: 0; font-variant-numeric: tabular-nums; }
.case img { display: block; max-width: 100%; height: auto; margin: 0 auto; border-radius: 4px; }
.rank { color: var(--muted); font-weight: 400; }
.badge { margin-left: auto; border-radius: 10px; padding: 1px 9px; font-size: 13px; color: #fff; white-space: nowrap; }
.badge.good { background: #2e8540; } .badge.fair { background: #c98a00; } .badge.poor { background: #c0392b; }
footer { margin-top: 36px; color: var(--muted); font-size: 12px; }
"""
