"""``autoseg_find_best``: choose configurations and tune post-processing on the cross-validation
(see ``autoseg.api.select``)."""

from __future__ import annotations

import argparse

from autoseg.api.select import PROTOCOL_METRICS, find_best
from autoseg.commands.common import run
from autoseg.evaluate.option_effects import describe_difference
from autoseg.evaluate.protocols import DEFAULT_PROTOCOL, PROTOCOLS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_find_best",
        description="Compare every trained configuration and trainer and their ensembles on the validation "
        "predictions of all folds, tune threshold and minimum lesion size, say what each option "
        "(symmetric channels, histogram equalization, another trainer) changed against its baseline, "
        "and write model_selection.json and postprocessing.json to AUTOSEG_RESULTS/<dataset>/ "
        "(autoseg_predict applies the latter).",
    )
    p.add_argument("-d", "--dataset", help="trained dataset (name, number or folder); default: the only trained one")
    p.add_argument("-c", "--configurations", nargs="+", help="candidates (default: every trained configuration)")
    p.add_argument(
        "-tr",
        "--trainers",
        nargs="+",
        help="trainer folder(s): each configuration takes part with every "
        "one of them it was trained with, e.g. -tr PSPNetTrainer "
        "PSPNetCETrainer (default: every trainer it was trained with)",
    )
    p.add_argument(
        "--protocol",
        choices=list(PROTOCOLS),
        default=DEFAULT_PROTOCOL,
        help="whose metrics the grid search and the option differences use: autoseg (default), isles22 or atlas2 "
        "(the challenge's scorer: Dice, volume difference, lesion count difference, lesion F1 with 26- or "
        "6-connected lesions; see documentation/evaluation.md)",
    )
    p.add_argument(
        "--metric",
        default=None,
        choices=sorted({m for metrics in PROTOCOL_METRICS.values() for m in metrics}),
        help="score of the post-processing grid search. autoseg: dice_hausdorff (DSC·h/(DSC+h), default) or dice; "
        "isles22, atlas2: mean_rank (default: the challenges' mean rank over their four metrics), dice or lesion_f1",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


def option_lines(options: list[dict]) -> list[str]:
    """What each option changed (``model_selection.json``'s ``options``), a line or two each."""
    lines = (
        ["options (candidate vs baseline; differences candidate − baseline with paired bootstrap 95% CIs):"]
        if options
        else []
    )
    for option in options:
        lines.append(f"  {option['option']}: {option['candidate']} vs {option['baseline']}: {option['reason']}")
        differences = option.get("differences")
        if differences and differences["cases"]:
            metrics = [name for name in differences if name != "cases"]
            lines.append("    " + ", ".join(describe_difference(metric, differences[metric]) for metric in metrics))
        lines += [f"    to compare: {command}" for command in option.get("commands", [])]
    return lines


def _chosen_means(selection: dict) -> dict[str, float]:
    """The protocol's means at the chosen grid point (empty under the autoseg protocol, whose grid has none)."""
    chosen = selection["postprocessing"]
    for point in selection["grid"]:
        if (point["threshold"], point["min_lesion_voxels"]) == (chosen["threshold"], chosen["min_lesion_voxels"]):
            return point.get("means", {})
    return {}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def action() -> None:
        selection = find_best(
            args.dataset, args.configurations, args.trainers, args.metric, not args.no_progress, args.protocol
        )
        print(f"protocol: {PROTOCOLS[args.protocol].describe()}")
        for candidate in selection["candidates"]:
            print(f"{' + '.join(candidate['members'])}: mean Dice {candidate['mean_dice']:.4f}")
        chosen = selection["postprocessing"]
        print(
            f"chosen: {' + '.join(chosen['members'])}, threshold {chosen['threshold']}, minimum lesion "
            f"{chosen['min_lesion_mm3']:g} mm³ ({chosen['min_lesion_voxels']} voxels), {selection['metric']} "
            f"{chosen['score']:.4f} over {selection['cases']} case(s)"
        )
        means = _chosen_means(selection)
        if means:
            print("  its means: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
        for line in option_lines(selection["options"]):
            print(line)
        print(f"wrote model_selection.json and postprocessing.json in the results folder of {selection['dataset']}")

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
