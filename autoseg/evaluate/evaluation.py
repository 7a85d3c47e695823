"""Folder-level evaluation: pair predictions with references, compute every metric, summarise, report.

Folder layout, matched by case name (the file name without its image ending; endings may differ)::

    reference_dir/CASE.nii.gz        label map; voxels equal to ``label`` are lesion (with ``binarize``: every
                                     non-zero voxel)
    prediction_dir/CASE.nii.gz       label map with the same geometry
    probabilities_dir/CASE.nii.gz    optional: lesion probability in [0, 1] as a 3-D float image

Outputs in ``output_dir`` (each written atomically, and only after every case was evaluated, so an
error leaves nothing behind):

    per_case.csv          one row per case: the protocol's name and lesion connectivity (columns ``protocol``,
                          ``lesion_connectivity``), then the metrics of :func:`autoseg.evaluate.metrics.score_case`
                          for ``label`` under that protocol
    summary.json          the protocol (``protocol``: name, connectivity, volume unit, empty-mask values, sources);
                          per metric of the protocol: mean, std, median, bootstrap 95% CI of the mean, n, NaN count;
                          micro-Dice; Dice-vs-volume fit; the lesion-size quartile table. NaN -> null.
    quartiles.csv         cases split into four equal-count groups by reference lesion volume (mm^3)
    dice_vs_volume.png    Dice against reference lesion volume (log scale) with a linear fit in log10

``autoseg_evaluate --report`` then writes ``report.html`` from these files (:mod:`autoseg.evaluate.report`).

The protocol (``autoseg.evaluate.protocols``) decides the metrics: ``autoseg`` (default) autoseg's own, ``isles22`` and
``atlas2`` those of the two challenges' published evaluation code (Dice, volume difference in ml or voxels, lesion
count difference and lesion F1 with 26- or 6-connected lesions), whose means can stand beside their tables.

Label maps are read as integers (``autoseg.labels.read_label_file``): values within 0.001 of an integer (a float
mask from a resampling tool holds 0.99999994 for 1) are rounded, with one warning naming the file
(:class:`autoseg.labels.LabelValueWarning`); values far from every integer are an error naming the file. A reference
or prediction whose non-zero values include none of the evaluated labels is refused, naming the file and its values
(a mask stored as 0/255 scored for label 1 would otherwise count as empty, and two such masks would score Dice 1),
unless ``binarize`` asks to count every non-zero voxel as lesion.

Statistics: NaN values (undefined metrics, see :mod:`autoseg.evaluate.metrics`) are left out of every mean,
median and interval and counted in ``n_nan``. Standard deviations use ddof=1. The confidence interval
is the percentile bootstrap of the mean with a seeded generator, so reruns give identical numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from autoseg.errors import AutosegError, UsageError
from autoseg.evaluate.metrics import dice_from_counts, score_case
from autoseg.evaluate.protocols import DEFAULT_PROTOCOL, PROTOCOLS, Protocol, get_protocol
from autoseg.io.files import atomic_path, check_output_file, check_output_folder, write_json
from autoseg.io.geometry import Geometry, canonical_geometry
from autoseg.io.headers import IMAGE_ENDINGS, ImageReadError, split_ending
from autoseg.io.images import read_header, read_image
from autoseg.labels import LabelError, LabelValueWarning, format_values, read_label_file
from autoseg.parallel import map_cases

#: Metrics summarised in summary.json and the terminal table under the autoseg protocol, in display order (a
#: challenge's protocol summarises its own, ``Protocol.metrics``).
SUMMARY_METRICS: tuple[str, ...] = PROTOCOLS[DEFAULT_PROTOCOL].metrics
#: Metrics of the lesion-size quartile table under the autoseg protocol (Table 4 of Tomita et al. plus HD95 and
#: lesion F1); a challenge's protocol shows its own metrics there (:func:`quartile_metrics`).
QUARTILE_METRICS: tuple[str, ...] = (
    "dice", "hausdorff", "hausdorff95", "assd", "sensitivity", "precision", "lesion_f1",
)  # fmt: skip
QUARTILE_NAMES: tuple[str, ...] = ("0-25%", "25-50%", "50-75%", "75-100%")
#: Output key -> file name inside ``output_dir``.
OUTPUT_NAMES: dict[str, str] = {
    "per_case": "per_case.csv",
    "summary": "summary.json",
    "quartiles": "quartiles.csv",
    "plot": "dice_vs_volume.png",
}
_COUNT_COLUMNS = (
    "lesion_tp", "lesion_fp", "lesion_fn", "lesion_count_difference", "tp_voxels", "fp_voxels", "fn_voxels",
)  # fmt: skip
#: Metric -> (title shown in tables, decimals shown).
DISPLAY_NAMES: dict[str, tuple[str, int]] = {
    "dice": ("Dice", 4), "max_dice": ("max Dice (mDSC)", 4), "sensitivity": ("Sensitivity (TPR)", 4),
    "precision": ("Precision (PPV)", 4), "hausdorff": ("HD (mm)", 2), "hausdorff95": ("HD95 (mm)", 2),
    "assd": ("ASSD (mm)", 2), "dice_hd_score": ("Dice/HD score", 4),
    "volume_difference_mm3": ("|Volume diff.| (mm3)", 1), "relative_volume_difference": ("Relative volume diff.", 4),
    "volume_difference_ml": ("|Volume diff.| (ml)", 4), "volume_difference_voxels": ("|Volume diff.| (voxels)", 1),
    "lesion_f1": ("Lesion F1", 4), "lesion_count_difference": ("|Lesion count diff.|", 2),
}  # fmt: skip
_CONFIDENCE = 0.95
_MAX_NAMES_IN_MESSAGE = 20


class EvaluationError(AutosegError, ValueError):
    """The inputs cannot be evaluated: a missing folder or file, or a geometry mismatch. One-line message.

    A ``ValueError`` so that the commands' shared error handler reports it as an input error.
    """


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case; ``probabilities`` is None when no probability folder was given."""

    case: str
    reference: Path
    prediction: Path
    probabilities: Path | None = None


@dataclass(frozen=True)
class EvaluationResult:
    """What :func:`evaluate_folders` computed.

    Attributes:
        per_case: one row per case (index ``case``), the metrics of ``score_case`` for ``label``.
        summary: the content of summary.json (NaN kept as float NaN here).
        quartiles: the lesion-size quartile table, one row per quartile.
        output_files: output key -> path written; empty when no ``output_dir`` was given.
    """

    per_case: pd.DataFrame
    summary: dict[str, Any]
    quartiles: pd.DataFrame
    output_files: dict[str, Path] = field(default_factory=dict)


def evaluate_folders(
    reference_dir: str | Path,
    prediction_dir: str | Path,
    output_dir: str | Path | None = None,
    probabilities_dir: str | Path | None = None,
    label: int = 1,
    num_bootstrap: int = 1000,
    seed: int = 0,
    num_workers: int = 1,
    progress: bool = True,
    binarize: bool = False,
    protocol: str | Protocol = DEFAULT_PROTOCOL,
) -> EvaluationResult:
    """Evaluate every reference case against the prediction of the same name.

    Args:
        reference_dir: folder of reference label maps.
        prediction_dir: folder of predicted label maps; every reference case needs one.
        output_dir: where to write the report files; None writes nothing.
        probabilities_dir: optional folder of lesion probability maps, adds mDSC (``max_dice``).
        label: the lesion label; both label maps are binarized as ``== label``.
        binarize: count every non-zero voxel of both label maps as lesion instead (``label`` is then not used).
        num_bootstrap: bootstrap resamples for the 95% confidence intervals.
        seed: seed of the bootstrap generator.
        num_workers: processes evaluating cases in parallel (1: in this process). Rows come back in
            case order either way, so results do not depend on it.
        progress: show a progress bar over cases (tqdm, on stderr).
        protocol: ``autoseg`` (default: autoseg's own metrics), ``isles22`` or ``atlas2`` (the challenge's published
            evaluation, :mod:`autoseg.evaluate.protocols`).

    Returns:
        An :class:`EvaluationResult`.

    Raises:
        EvaluationError: a folder is missing or holds no images, a case has no prediction (or
            probability map), an image is unreadable or not 3-D, a prediction's geometry differs
            from its reference, a label map holds values far from integers, or (without ``binarize``) a label map
            whose non-zero values include none of the evaluated labels (the message names the file and its values).
            Checked before any output is written.
        OutputPathError: ``output_dir`` is a file or read-only, or one of its output files is a folder
            (checked first).
        UnknownNameError: an unknown protocol.
        UsageError: probability maps with a challenge's protocol, which has no mDSC (checked first).
    """
    protocol = get_protocol(protocol)
    if probabilities_dir is not None and protocol.is_challenge:
        raise UsageError(
            f"probability maps ({probabilities_dir}) add mDSC, which is no metric of the {protocol.name} protocol; "
            "score them with the autoseg protocol"
        )
    if output_dir is not None:
        check_output_folder(output_dir)
        for name in OUTPUT_NAMES.values():
            check_output_file(Path(output_dir) / name)
    cases = pair_cases(reference_dir, prediction_dir, probabilities_dir)
    check_geometries(cases)
    score = partial(_evaluate_one, label=label, binarize=binarize, protocol=protocol)
    rows = map_cases(score, cases, num_workers, progress, "evaluating")
    for note in (note for row in rows for note in row.pop("notes")):
        warnings.warn(note, LabelValueWarning, stacklevel=2)
    per_case = pd.DataFrame(rows).set_index("case")
    for column in _COUNT_COLUMNS:
        if column in per_case:
            per_case[column] = per_case[column].astype(np.int64)
    # Every row says what produced it, so a CSV read on its own cannot be set beside the wrong table.
    per_case.insert(0, "protocol", protocol.name)
    per_case.insert(1, "lesion_connectivity", protocol.lesion_connectivity)
    quartiles = quartile_table(per_case, num_bootstrap, seed, protocol)
    summary = {
        "protocol": protocol.to_json(),
        "inputs": {
            "reference_dir": str(reference_dir),
            "prediction_dir": str(prediction_dir),
            "probabilities_dir": None if probabilities_dir is None else str(probabilities_dir),
            "label": label,
            "binarize": binarize,
            "protocol": protocol.name,
            "num_bootstrap": num_bootstrap,
            "seed": seed,
            "confidence": _CONFIDENCE,
        },
        **summarize(per_case, num_bootstrap, seed, protocol),
        "quartiles": quartiles.to_dict(orient="records"),
    }
    output_files = {} if output_dir is None else write_outputs(per_case, summary, quartiles, Path(output_dir))
    return EvaluationResult(per_case=per_case, summary=summary, quartiles=quartiles, output_files=output_files)


def find_images(folder: str | Path, role: str) -> dict[str, Path]:
    """Case name -> image file for the files in ``folder`` with a known image ending (hidden files skipped).

    Raises:
        EvaluationError: the folder does not exist, or two files share a case name.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{role} folder not found: {folder}")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        # Hidden names include the temporary files of an interrupted atomic write.
        if path.name.startswith(".") or not path.is_file() or not path.name.lower().endswith(IMAGE_ENDINGS):
            continue
        case, _ = split_ending(path)
        if case in found:
            raise EvaluationError(f"{role} folder {folder} holds case {case!r} twice: {found[case].name}, {path.name}")
        found[case] = path
    return found


def pair_cases(
    reference_dir: str | Path, prediction_dir: str | Path, probabilities_dir: str | Path | None = None
) -> list[CaseFiles]:
    """Pair every reference case with its prediction (and probability map), sorted by case name.

    Predictions without a reference are ignored. Raises :class:`EvaluationError` listing missing cases.
    """
    references = find_images(reference_dir, "reference")
    if not references:
        raise EvaluationError(f"reference folder {reference_dir} holds no images (endings {', '.join(IMAGE_ENDINGS)})")
    predictions = find_images(prediction_dir, "prediction")
    require_all(references, predictions, "prediction", prediction_dir)
    probabilities: dict[str, Path] = {}
    if probabilities_dir is not None:
        probabilities = find_images(probabilities_dir, "probabilities")
        require_all(references, probabilities, "probability map", probabilities_dir)
    return [
        CaseFiles(case, references[case], predictions[case], probabilities.get(case)) for case in sorted(references)
    ]


def check_geometries(cases: Sequence[CaseFiles]) -> None:
    """Check from the headers alone that every file is 3-D and lies exactly on its reference's grid.

    Grids are compared in the canonical orientation (``autoseg.io.images``), as the voxels are read: a prediction
    stored in another axis order or sign than its reference, covering the same voxels, is accepted and scored
    voxel for voxel in world space.

    Raises:
        EvaluationError: naming the file and each mismatching field (reference value vs file value).
    """
    for files in cases:
        reference = _header(files.reference)
        for other in (files.prediction, files.probabilities):
            if other is None:
                continue
            differences = reference.differences(_header(other))
            if differences:
                raise EvaluationError(
                    f"{other}: geometry differs from reference {files.reference} "
                    f"(reference vs this file): {'; '.join(differences)}"
                )


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, num_resamples: int = 1000, seed: int = 0, confidence: float = _CONFIDENCE
) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the mean; NaN values are dropped first.

    Args:
        values: one value per case, shape (N,).
        num_resamples: resamples with replacement, each of size N.
        seed: seed of ``numpy.random.default_rng``; equal seeds give equal intervals.
        confidence: coverage of the interval (0.95: the 2.5th and 97.5th percentiles of the means).

    Returns:
        (low, high); (NaN, NaN) when no finite value is left or ``num_resamples`` is 0.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0 or num_resamples <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(num_resamples, values.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def summarize_values(values: Sequence[float] | pd.Series, num_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """Mean, std (ddof=1), median, bootstrap CI of the mean, n (finite values) and n_nan of one metric."""
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    low, high = bootstrap_ci(finite, num_bootstrap, seed)
    return {
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std(ddof=1)) if finite.size > 1 else math.nan,
        "median": float(np.median(finite)) if finite.size else math.nan,
        "ci_low": low,
        "ci_high": high,
        "n": int(finite.size),
        "n_nan": int(values.size - finite.size),
    }


def summarize(
    per_case: pd.DataFrame, num_bootstrap: int = 1000, seed: int = 0, protocol: str | Protocol = DEFAULT_PROTOCOL
) -> dict[str, Any]:
    """Data-set summary of a per-case table: statistics per metric of ``protocol`` (those in the table), micro-Dice,
    Dice-vs-volume fit."""
    metrics = get_protocol(protocol).metrics
    totals = per_case[["tp_voxels", "fp_voxels", "fn_voxels"]].sum()
    return {
        "num_cases": len(per_case),
        "num_empty_reference": int((per_case["volume_reference_mm3"] == 0).sum()),
        "num_empty_prediction": int((per_case["volume_prediction_mm3"] == 0).sum()),
        "metrics": {
            name: summarize_values(per_case[name], num_bootstrap, seed) for name in metrics if name in per_case
        },
        "micro_dice": dice_from_counts(int(totals["tp_voxels"]), int(totals["fp_voxels"]), int(totals["fn_voxels"])),
        "dice_vs_volume": fit_dice_vs_volume(per_case),
    }


def quartile_metrics(protocol: str | Protocol = DEFAULT_PROTOCOL) -> tuple[str, ...]:
    """The metrics of the lesion-size quartile table: :data:`QUARTILE_METRICS` under the autoseg protocol, a
    challenge protocol's own metrics under it."""
    protocol = get_protocol(protocol)
    return protocol.metrics if protocol.is_challenge else QUARTILE_METRICS


def quartile_table(
    per_case: pd.DataFrame, num_bootstrap: int = 1000, seed: int = 0, protocol: str | Protocol = DEFAULT_PROTOCOL
) -> pd.DataFrame:
    """Metrics per lesion-size quartile, as Table 4 of Tomita et al. (chronic stroke, ATLAS).

    Cases are ranked by reference lesion volume (ties by case name) and split into four groups of
    (nearly) equal count; each row gives the group's volume range in mm^3 and, per metric of
    :func:`quartile_metrics`, the mean and its bootstrap 95% CI. With fewer than four cases some
    groups are empty (NaN).
    """
    ranked = per_case.sort_index().sort_values("volume_reference_mm3", kind="mergesort")
    rows = []
    for name, positions in zip(QUARTILE_NAMES, np.array_split(np.arange(len(ranked)), len(QUARTILE_NAMES))):
        group = ranked.iloc[positions]
        volumes = group["volume_reference_mm3"]
        row: dict[str, Any] = {
            "quartile": name,
            "num_cases": len(group),
            "volume_min_mm3": float(volumes.min()) if len(group) else math.nan,
            "volume_max_mm3": float(volumes.max()) if len(group) else math.nan,
        }
        for metric in quartile_metrics(protocol):
            stats = summarize_values(group[metric], num_bootstrap, seed)
            for statistic in ("mean", "ci_low", "ci_high"):
                row[f"{metric}_{statistic}"] = stats[statistic]
        rows.append(row)
    return pd.DataFrame(rows)


def fit_dice_vs_volume(per_case: pd.DataFrame) -> dict[str, float]:
    """Least-squares line Dice = slope * log10(reference volume in mm^3) + intercept, and its R^2.

    Cases with an empty reference (log undefined) or a NaN Dice are left out; ``num_cases`` says how
    many were used. Slope, intercept and R^2 are NaN with fewer than two distinct volumes; R^2 is NaN
    when all Dice values are equal.
    """
    usable = per_case[(per_case["volume_reference_mm3"] > 0) & per_case["dice"].notna()]
    x = np.log10(usable["volume_reference_mm3"].to_numpy(dtype=np.float64))
    y = usable["dice"].to_numpy(dtype=np.float64)
    fit = {"slope": math.nan, "intercept": math.nan, "r2": math.nan, "num_cases": int(x.size)}
    if x.size < 2 or np.ptp(x) == 0:
        return fit
    slope, intercept = np.polyfit(x, y, 1)
    residual = float(np.sum((y - (slope * x + intercept)) ** 2))
    total = float(np.sum((y - y.mean()) ** 2))
    fit.update(slope=float(slope), intercept=float(intercept), r2=1.0 - residual / total if total > 0 else math.nan)
    return fit


def write_outputs(
    per_case: pd.DataFrame, summary: dict[str, Any], quartiles: pd.DataFrame, output_dir: Path
) -> dict[str, Path]:
    """Write per_case.csv, summary.json, quartiles.csv and dice_vs_volume.png atomically; return their paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {key: output_dir / name for key, name in OUTPUT_NAMES.items()}
    with atomic_path(paths["per_case"], suffix=".csv") as temporary:
        per_case.to_csv(temporary, index=True, na_rep="NaN")
    with atomic_path(paths["quartiles"], suffix=".csv") as temporary:
        quartiles.to_csv(temporary, index=False, na_rep="NaN")
    write_json(_json_safe(summary), paths["summary"])
    figure = plot_dice_vs_volume(per_case, summary["dice_vs_volume"])
    with atomic_path(paths["plot"], suffix=".png") as temporary:
        figure.savefig(temporary, format="png", dpi=150)
    return paths


def plot_dice_vs_volume(per_case: pd.DataFrame, fit: dict[str, float]) -> Figure:
    """Scatter of Dice against reference lesion volume (mm^3, log10 axis) with the fitted line of ``fit``."""
    # A bare Figure renders with Agg and leaves pyplot's global state (and any GUI backend) alone.
    figure = Figure(figsize=(6.4, 5.2), layout="constrained")
    axes = figure.add_subplot()
    usable = per_case[(per_case["volume_reference_mm3"] > 0) & per_case["dice"].notna()]
    volumes = usable["volume_reference_mm3"].to_numpy(dtype=np.float64)
    axes.scatter(volumes, usable["dice"], s=24, alpha=0.8, color="tab:blue", label=f"cases (n = {len(usable)})")
    r2 = f"{fit['r2']:.2f}" if math.isfinite(fit["r2"]) else "undefined"
    if math.isfinite(fit["slope"]):
        line_x = np.logspace(np.log10(volumes.min()), np.log10(volumes.max()), 100)
        sign = "+" if fit["intercept"] >= 0 else "-"
        axes.plot(
            line_x,
            fit["slope"] * np.log10(line_x) + fit["intercept"],
            color="tab:red",
            label=f"linear fit: Dice = {fit['slope']:.3f} log10(V) {sign} {abs(fit['intercept']):.3f}, $R^2$ = {r2}",
        )
    axes.set_xscale("log")
    axes.set_ylim(-0.03, 1.03)
    axes.set_xlabel("Reference lesion volume V (mm$^3$, log10 scale)")
    axes.set_ylabel("Dice similarity coefficient")
    left_out = len(per_case) - len(usable)
    note = f"\n{left_out} case(s) with empty reference or NaN Dice not shown" if left_out else ""
    axes.set_title(f"Dice vs reference lesion volume ($R^2$ = {r2}){note}", fontsize=10)
    axes.grid(True, which="major", alpha=0.3)
    if len(usable):
        # Below the axes, so the legend never hides points.
        axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), fontsize=8, frameon=False)
    return figure


def format_summary_table(result: EvaluationResult) -> str:
    """Plain-text table for the terminal: the protocol's line, then metric, mean, median, 95% CI of the mean, n and
    NaN count."""
    header = ("Metric", "Mean", "Median", "95% CI of mean", "n", "NaN")
    rows = []
    for name, stats in result.summary["metrics"].items():
        title, digits = DISPLAY_NAMES.get(name, (name, 4))
        interval = f"[{format_number(stats['ci_low'], digits)}, {format_number(stats['ci_high'], digits)}]"
        rows.append(
            (title, format_number(stats["mean"], digits), format_number(stats["median"], digits), interval,
             str(stats["n"]), str(stats["n_nan"]))
        )  # fmt: skip
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]  # fmt: skip
    rule = "-" * len(lines[0])
    summary = result.summary
    footer = (
        f"micro-Dice (all voxels pooled): {format_number(summary['micro_dice'], 4)}   cases: {summary['num_cases']}"
        f" (empty reference: {summary['num_empty_reference']}, empty prediction: {summary['num_empty_prediction']})"
    )
    return "\n".join([f"protocol: {evaluation_protocol(summary).describe()}", lines[0], rule, *lines[1:], rule, footer])


def evaluation_protocol(summary: dict[str, Any]) -> Protocol:
    """The protocol an evaluation was made with: ``summary.json``'s ``protocol`` (autoseg's for files written
    before protocols were recorded)."""
    return get_protocol(summary.get("protocol", {}).get("name", DEFAULT_PROTOCOL))


def require_all(references: dict[str, Path], found: dict[str, Path], kind: str, folder: str | Path) -> None:
    """Raise :class:`EvaluationError` listing the cases of ``references`` missing from ``found`` (up to 20 names)."""
    missing = sorted(set(references) - set(found))
    if not missing:
        return
    names = ", ".join(missing[:_MAX_NAMES_IN_MESSAGE])
    if len(missing) > _MAX_NAMES_IN_MESSAGE:
        names += f" and {len(missing) - _MAX_NAMES_IN_MESSAGE} more"
    raise EvaluationError(f"missing {kind} for {len(missing)} of {len(references)} cases in {folder}: {names}")


def _header(path: Path) -> Geometry:
    """The canonical geometry of ``path`` from its header (see ``autoseg.io.geometry.canonical_geometry``)."""
    try:
        geometry, dimension, _ = read_header(path)
    except ImageReadError as error:
        raise EvaluationError(str(error)) from None
    if dimension != 3:
        raise EvaluationError(f"{path}: expected a 3-D single-channel image, found {dimension}-D")
    return canonical_geometry(geometry)


def _evaluate_one(
    files: CaseFiles, label: int, binarize: bool = False, protocol: Protocol = PROTOCOLS[DEFAULT_PROTOCOL]
) -> dict[str, Any]:
    """Read one case and score ``label`` (with ``binarize``: every non-zero voxel) with
    :func:`autoseg.evaluate.metrics.score_case` under ``protocol`` (as validation and find_best do); the row holds the
    case's rounding notes under ``notes``."""
    try:
        reference = read_label_file(files.reference)
        prediction = read_label_file(files.prediction)
        probabilities = None if files.probabilities is None else read_image(files.probabilities)[0]
    except (ImageReadError, LabelError) as error:
        raise EvaluationError(str(error)) from None
    masks = []
    for found, path, role in ((reference, files.reference, "reference"), (prediction, files.prediction, "prediction")):
        if binarize:
            masks.append(found.array != 0)
            continue
        others = [value for value in found.values if value != 0]
        if others and label not in others:
            raise EvaluationError(
                f"{path}: this {role} holds the values {format_values(found.values)}, none of them the evaluated "
                f"label {label} (a lesion stored as another value would be scored as empty); pass --label with the "
                "lesion's value, or --binarize to count every non-zero voxel as lesion"
            )
        masks.append(found.array == label)
    probabilities = None if probabilities is None else probabilities[None]
    metrics = score_case(masks[1], masks[0], reference.geometry.spacing, (1,), probabilities, protocol=protocol)[1]
    notes = [found.note for found in (reference, prediction) if found.note is not None]
    return {"case": files.case, **metrics, "notes": notes}


def format_number(value: float | None, digits: int) -> str:
    """``value`` with ``digits`` decimals; ``NaN`` for None, NaN or an infinity (JSON null reads back as None)."""
    return "NaN" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def _json_safe(value: Any) -> Any:
    """Turn NaN and infinities into None (JSON null) so summary.json is strict JSON."""
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value
