"""Summarize tools/nnunet_benchmark.sh: nnU-Net v2's training at a wall-clock budget and its held-out scores.

Usage: python tools/nnunet_benchmark_summary.py OUT_FOLDER [--speed-only]

Reads OUT_FOLDER/info.json and timings/*.s (written by the script; OUT_FOLDER/speed/ holds the speed mode's), the trainer's walltime_summary.json, the
plans nnU-Net made and autoseg_evaluate's evaluation/summary.json; writes OUT_FOLDER/nnunet_benchmark.json
(or nnunet_speed.json with --speed-only) and prints a short summary. Standard library only, so any Python runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Held-out metrics copied into the benchmark file (autoseg_evaluate's names).
METRICS = ("dice", "lesion_f1", "hausdorff95", "sensitivity", "precision", "max_dice")
#: Per-iteration figures of walltime_summary.json that the benchmark file carries.
TRAINING_KEYS = (
    "budget_minutes", "wall_s", "startup_s", "training_loop_s", "stopped_by_budget", "epochs_run", "epochs_planned",
    "iterations_per_epoch", "val_iterations_per_epoch", "iterations", "val_iterations", "s_per_iteration_mean",
    "s_per_iteration_median", "s_first_iteration", "s_per_val_iteration_median", "loop_s_per_iteration",
    "final_lr", "batch_size", "patch_size", "torch_threads",
)  # fmt: skip


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def timings(*folders: Path) -> dict[str, float]:
    return {
        p.stem: round(float(p.read_text()), 1) for folder in folders for p in sorted((folder / "timings").glob("*.s"))
    }


def plan_summary(plans_file: Path, configuration: str = "3d_fullres") -> dict | None:
    """The default plan nnU-Net made: spacing, patch, batch, network stages and widths."""
    plans = read_json(plans_file)
    if plans is None:
        return None
    config = plans["configurations"][configuration]
    arch = config.get("architecture", {}).get("arch_kwargs", {})
    return {
        "configuration": configuration,
        "spacing": config.get("spacing"),
        "median_image_size": config.get("median_image_size_in_voxels"),
        "patch_size": config.get("patch_size"),
        "batch_size": config.get("batch_size"),
        "network": config.get("architecture", {}).get("network_class_name"),
        "stages": arch.get("n_stages"),
        "features_per_stage": arch.get("features_per_stage"),
    }


def metrics_summary(summary_file: Path) -> dict | None:
    summary = read_json(summary_file)
    if summary is None:
        return None
    found = {name: summary["metrics"][name] for name in METRICS if name in summary.get("metrics", {})}
    return {
        "num_cases": summary.get("num_cases"),
        "micro_dice": summary.get("micro_dice"),
        **{
            name: {k: stats.get(k) for k in ("mean", "median", "ci_low", "ci_high", "n", "n_nan")}
            for name, stats in found.items()
        },
    }


def fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--speed-only", action="store_true")
    args = parser.parse_args(argv)
    out: Path = args.out
    meta = out / "speed" if args.speed_only else out
    info = read_json(meta / "info.json") or {}
    results = meta / "nnUNet_results"
    trainer_runs = sorted(results.glob("*/nnUNetTrainer_WallTime__*__3d_fullres/fold_0/walltime_summary.json"))
    walltime = read_json(trainer_runs[-1]) if trainer_runs else None
    plans = sorted((out / "nnUNet_preprocessed").glob("*/nnUNetPlans.json"))
    report = {
        **info,
        "mode": "speed" if args.speed_only else "budget",
        "timings_s": {"plan": timings(out).get("plan"), **timings(meta)} if args.speed_only else timings(out),
        "plan": plan_summary(plans[-1]) if plans else None,
        "training": {k: walltime.get(k) for k in TRAINING_KEYS} if walltime else None,
        "schedule": walltime.get("schedule") if walltime else None,
    }
    if not args.speed_only:
        report["held_out"] = metrics_summary(out / "evaluation" / "summary.json")
    target = out / ("nnunet_speed.json" if args.speed_only else "nnunet_benchmark.json")
    target.write_text(json.dumps(report, indent=2) + "\n")

    plan, training = report["plan"] or {}, report["training"] or {}
    print(
        f"nnU-Net v2 {info.get('nnunetv2_version', '?')} (torch {info.get('torch_version', '?')}), "
        f"plan 3d_fullres: spacing {plan.get('spacing')}, patch {plan.get('patch_size')}, "
        f"batch {plan.get('batch_size')}, {plan.get('stages')} stages {plan.get('features_per_stage')}"
    )
    print(f"timings (s): {report['timings_s']}")
    if training:
        print(
            f"training: {training['iterations']} iterations in {training['epochs_run']} epochs "
            f"(planned {training['epochs_planned']} x {training['iterations_per_epoch']}, "
            f"{training['val_iterations']} validation batches), wall {fmt(training['wall_s'], 1)} s, "
            + (
                "no budget"
                if training["budget_minutes"] is None
                else f"budget {fmt(training['budget_minutes'], 1)} min, stopped by the budget: "
                f"{training['stopped_by_budget']}"
            )
        )
        print(
            f"s/iteration: median {fmt(training['s_per_iteration_median'])}, mean "
            f"{fmt(training['s_per_iteration_mean'])} (first {fmt(training['s_first_iteration'])}; "
            f"whole loop incl. validation and checkpoints {fmt(training['loop_s_per_iteration'])})"
        )
    held_out = report.get("held_out")
    if held_out:
        parts = [
            f"{name} {fmt(held_out[name]['mean'])} [{fmt(held_out[name]['ci_low'])}, {fmt(held_out[name]['ci_high'])}]"
            for name in ("dice", "lesion_f1", "hausdorff95")
            if name in held_out
        ]
        print(f"held-out ({held_out['num_cases']} cases, mean [95% CI]): " + ", ".join(parts))
    print(f"wrote {target}")
    return 0 if training else 1


if __name__ == "__main__":
    sys.exit(main())
