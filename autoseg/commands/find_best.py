"""``autoseg_find_best``: choose configurations and tune post-processing on the cross-validation
(see ``autoseg.api.select``)."""

from __future__ import annotations

import argparse

from autoseg.api.select import METRICS, find_best
from autoseg.commands.common import run
from autoseg.evaluate.option_effects import OPTION_METRICS, describe_difference


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
        "--metric",
        default="dice_hausdorff",
        choices=METRICS,
        help="score of the post-processing grid search: dice_hausdorff (DSC·h/(DSC+h), default) or dice",
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
            lines.append(
                "    " + ", ".join(describe_difference(metric, differences[metric]) for metric in OPTION_METRICS)
            )
        lines += [f"    to compare: {command}" for command in option.get("commands", [])]
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    def action() -> None:
        selection = find_best(args.dataset, args.configurations, args.trainers, args.metric, not args.no_progress)
        for candidate in selection["candidates"]:
            print(f"{' + '.join(candidate['members'])}: mean Dice {candidate['mean_dice']:.4f}")
        chosen = selection["postprocessing"]
        print(
            f"chosen: {' + '.join(chosen['members'])}, threshold {chosen['threshold']}, minimum lesion "
            f"{chosen['min_lesion_mm3']:g} mm³ ({chosen['min_lesion_voxels']} voxels), {selection['metric']} "
            f"{chosen['score']:.4f} over {selection['cases']} case(s)"
        )
        for line in option_lines(selection["options"]):
            print(line)
        print(f"wrote model_selection.json and postprocessing.json in the results folder of {selection['dataset']}")

    return run(action)


if __name__ == "__main__":
    raise SystemExit(main())
