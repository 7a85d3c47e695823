"""``autoseg_plan``: verify, fingerprint, plan and preprocess a dataset."""

from __future__ import annotations

import argparse

from autoseg.api.plan import PlanResult, plan_and_preprocess, verify
from autoseg.commands.common import positive_finite_float, positive_int, refuse_unused, run
from autoseg.errors import UsageError
from autoseg.plan.topology import NORMALIZATION_OPTIONS
from autoseg.plans import UNET_LAYOUTS
from autoseg.train.splits import RESPLIT_OPTIONS
from planners import available_planners


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="autoseg_plan",
        description="Verify a raw dataset, fingerprint it, write plans.json (with a reason for every decision) and "
        "preprocess it. Outputs go to AUTOSEG_PREPROCESSED/<dataset>/.",
    )
    p.add_argument(
        "-d", "--dataset", required=True, help="dataset name (ATLAS), number (1) or folder (Dataset001_ATLAS)"
    )
    p.add_argument("-pl", "--planner", default="DefaultPlanner", help=f"planner class; one of {available_planners()}")
    p.add_argument("-c", "--configurations", nargs="+", help="preprocess only these configurations (default: all)")
    p.add_argument("-np", "--num-processes", type=positive_int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--gpu-memory-gb",
        type=positive_finite_float,
        help="memory budget that patch and batch sizes are fitted to (default: the planner's, 8 GB for DefaultPlanner)",
    )
    compute_budget = p.add_mutually_exclusive_group()
    compute_budget.add_argument(
        "--budget-minutes",
        type=positive_finite_float,
        metavar="M",
        help="compute budget: fit the plan to M minutes of training per fold (validation included) on --device: "
        "resolution, network, patch, batch and iterations are chosen from a timed probe of "
        "this machine (cached under AUTOSEG_HOME/compute_probes)",
    )
    compute_budget.add_argument(
        "--budget-hours", type=positive_finite_float, metavar="H", help="the same compute budget in hours"
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where training will run, for --budget-minutes (default: CUDA when available)",
    )
    p.add_argument(
        "--normalization",
        default="zscore",
        choices=NORMALIZATION_OPTIONS,
        help="zscore (default): each modality's z-score scheme; histeq: histogram equalization within the "
        "brain mask for every channel (Bhavnani et al.), preprocessed into folders of its own",
    )
    p.add_argument(
        "--resplit",
        choices=RESPLIT_OPTIONS,
        help="re-make splits_final.json after cases were added to or removed from the dataset (training refuses "
        "splits that name missing cases or leave cases out): keep: every remaining case stays in its fold and new "
        "cases are spread over the folds (a subject's cases into one fold), so folds whose validation cases are "
        "unchanged keep their trained models; fresh: new splits from scratch (retrain every fold)",
    )
    p.add_argument(
        "--like",
        metavar="MODEL",
        help="plan so the weights of MODEL (a model file from autoseg_export, or a trained dataset's name) fit: its "
        "configuration only, with its network, normalization, symmetric channels and trainer; spacing, patch, batch "
        "and schedule (led by a fine-tuning warm-up) for this dataset and budget. Channels are matched by name. "
        "Then: autoseg_train -d DATASET -f 0 --init-from MODEL",
    )
    p.add_argument(
        "--unet-layout",
        choices=UNET_LAYOUTS,
        help="the residual U-Net's block layout: residual_encoder (default: the first residual block of each stage "
        "downsamples, one conv per decoder level, as nnU-Net's ResidualEncoderUNet; about 3/4 of the other's "
        "operations at equal widths) or residual (a strided conv opens each stage, a residual block per decoder "
        "level: plans written before the choice)",
    )
    p.add_argument("--verify", action="store_true", help="only verify the dataset and report every problem")
    p.add_argument(
        "--preprocess-only",
        action="store_true",
        help="keep the existing plans.json (e.g. edited by hand), validate it and preprocess",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


#: Options that only planning uses: ``--verify`` writes nothing, and ``--preprocess-only`` keeps plans.json as it is.
PLANNING_OPTIONS = (
    "planner",
    "gpu_memory_gb",
    "budget_minutes",
    "budget_hours",
    "device",
    "normalization",
    "like",
    "unet_layout",
)


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    why = "it only verifies the dataset; it plans and preprocesses nothing"
    refuse_unused(p, args, "verify", ["preprocess_only", "configurations", *PLANNING_OPTIONS], why)
    why = "it keeps plans.json as it is and only preprocesses; leave it out to plan again"
    refuse_unused(p, args, "preprocess_only", PLANNING_OPTIONS, why)
    refuse_unused(p, args, "like", ["normalization"], "the normalization is the model's, channel by channel")
    refuse_unused(p, args, "like", ["unet_layout"], "the network, its layout included, is the model's")
    if args.device != "auto" and args.budget_minutes is None and args.budget_hours is None:
        p.error("--device has no effect without --budget-minutes or --budget-hours: it says where the budget is spent")
    progress = not args.no_progress

    def action() -> None:
        if args.verify and args.resplit:
            raise UsageError("--verify only checks the dataset; run --resplit without it")
        if args.verify:
            report = verify(args.dataset, args.num_processes, progress)
            for note in report.notes:
                print(note)
            notes = f" ({len(report.notes)} note(s) above)" if report.notes else ""
            print(f"{args.dataset}: {len(report.cases)} cases verified, no problems found{notes}")
            return
        minutes = args.budget_minutes if args.budget_hours is None else 60 * args.budget_hours
        result = plan_and_preprocess(
            args.dataset,
            args.planner,
            args.gpu_memory_gb,
            args.configurations,
            args.num_processes,
            args.preprocess_only,
            progress,
            budget_minutes=minutes,
            device=args.device,
            normalization=args.normalization,
            resplit=args.resplit,
            like=args.like,
            unet_layout=args.unet_layout,
        )
        _print_result(result, args.like is not None)

    return run(action)


def _print_result(result: PlanResult, like: bool) -> None:
    """What ``autoseg_plan`` planned and preprocessed, one line per item (the reasons are in plans.json)."""
    for note in [*result.notes, *result.case_changes]:
        print(note)
    print(f"fingerprint: {result.fingerprint_path}")
    print(f"plans:       {result.plans_path}")
    for name, configuration in result.plans.configurations.items():
        default = " (default)" if name == result.plans.default_configuration else ""
        print(
            f"  {name}{default}: spacing {list(configuration.target_spacing)} mm, patch "
            f"{list(configuration.patch_size)}, batch {configuration.batch_size}, "
            f"{configuration.network.architecture}, trainer {configuration.schedule.trainer}"
        )
    if result.plans.coregister_channels:
        reason = result.plans.reasons.get("coregister_channels", "on (plans.json: coregister_channels)")
        print(f"channel co-registration: {reason}")
    compute_budget = result.plans.compute_budget
    if compute_budget is not None:
        print(
            f"compute budget: {compute_budget.minutes:g} min per fold on {compute_budget.device} "
            f"({compute_budget.precision}); estimated {compute_budget.estimated_minutes:.1f} min: "
            f"{compute_budget.iterations} iterations at {compute_budget.seconds_per_iteration:.2f} s plus validation"
        )
        for name, reason in compute_budget.reasons.items():
            print(f"  {name}: {reason}")
    for identifier, cases in result.preprocessed.items():
        print(f"preprocessed {identifier}: {len(cases)} case(s) (re)computed; any others were up to date")
    if like:
        print(result.plans.reasons["like"])


if __name__ == "__main__":
    raise SystemExit(main())
