"""Cohort-sized prediction: peak memory over 100 and 1,000 small cases, resuming a killed run, one bad case skipped.

Usage (from the repository root; nothing is downloaded):

    PYTHONPATH=$PWD .venv/bin/python tools/cohort_benchmark.py [--out DIR] [--cases 100 1000] [--threads 1]

1. Trains a tiny model once (the tiny ATLAS-like demo at 3.5 mm, a 3-level U-Net with 4-16 features and 32³ windows,
   one iteration, as ``tests/api/test_predict.py`` does): a case costs milliseconds of network time, so what is measured
   is the per-case machinery (reading, preprocessing, restoring, writing) over many cases.
2. Writes max(--cases) cases into OUT/cases: copies, in turn, of 20 generated tiny cases (42 x 52 x 45 voxels), plus
   one corrupt file (``case-0499-bad``), the 501st case: among the 1,000, not among the first 100.
3. For each N in --cases: ``autoseg_predict --list`` of the first N cases (N=1,000 includes the bad case) into a fresh
   folder, as its own process; records the wall time, the peak resident memory of the process (``os.wait4``'s
   ru_maxrss) and the resident memory sampled from /proc as the cases went by.
4. Kill and resume: the smallest N again, killed (SIGKILL) once a third of its cases are written, then the same
   command re-run; records what the kill left (finished cases, temporary files) and what the re-run's summary says.

Writes OUT/results.json and prints a Markdown table for ``documentation/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

NAME = "Dataset961_ATLASCohort"
BAD_CASE = "case-0499-bad"  # sorts between case-0499 and case-0500: predicted halfway through 1,000


def train_tiny_model(home: Path) -> None:
    """Generate the tiny demo dataset under ``home`` and train the tiny model on fold 0 (skipped when trained)."""
    from autoseg.api.plan import plan_and_preprocess
    from autoseg.api.train import TrainingOptions, train
    from autoseg.data.demo.atlas import make_atlas_like
    from autoseg.plans import Stage

    if any((home / "results" / NAME).glob("*/*/fold_0/checkpoint_final.pth")):
        return
    make_atlas_like(home / "raw" / NAME, num_cases=20, seed=0, tiny=True, progress=False)
    plans = plan_and_preprocess(NAME, progress=False).plans
    configuration = plans.configuration()
    network = dataclasses.replace(
        configuration.network,
        features=(4, 8, 16),
        strides=((1, 1, 1),) + ((2, 2, 2),) * 2,
        kernel_sizes=((3, 3, 3),) * 3,
    )
    schedule = dataclasses.replace(
        configuration.schedule,
        trainer="ResidualUNetTrainer",
        epochs=1,
        iterations_per_epoch=1,
        restart_period_epochs=None,
        stages=(Stage("full", 0, (32, 32, 32), 1, 1e-2),),
    )
    configuration = dataclasses.replace(
        configuration, network=network, patch_size=(32, 32, 32), batch_size=1, schedule=schedule, mirror_axes=(0,)
    )
    dataclasses.replace(plans, configurations={configuration.name: configuration}).to_json(
        home / "preprocessed" / NAME / "plans.json"
    )
    options = TrainingOptions(
        num_processes=0, echo=False, val_iterations=0, device="cpu", precision="fp32", validation=False
    )
    train(NAME, configuration.name, 0, options=options)


def write_cases(home: Path, folder: Path, count: int) -> list[str]:
    """``count`` cases in ``folder`` (copies of the generated ones in turn, one corrupt ``BAD_CASE`` halfway);
    returns their identifiers in sorted order."""
    sources = sorted((home / "raw" / NAME / "imagesTr").glob("*_0000.nii.gz"))
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count - 1):
        name = f"case-{index:04d}"  # not case_NNNN: a final _0000 names channel 0
        if not (folder / f"{name}.nii.gz").exists():
            shutil.copy(sources[index % len(sources)], folder / f"{name}.nii.gz")
        names.append(name)
    (folder / f"{BAD_CASE}.nii.gz").write_bytes(b"\x1f\x8b this is not an image")
    return sorted([*names, BAD_CASE])


def run_predict(arguments: list[str], output: Path, env: dict[str, str], kill_after: int | None = None) -> dict:
    """Run ``autoseg_predict ARGUMENTS`` as its own process and measure it; with ``kill_after``, SIGKILL it once that
    many label files are in ``output``. Returns wall seconds, exit code, peak RSS (MiB), RSS samples and the last
    lines it printed."""
    command = [sys.executable, "-m", "autoseg.commands.predict", *arguments]
    log = output.with_name(output.name + ".log")
    start = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    samples: list[tuple[int, float]] = []  # (label files written so far, resident MiB)
    while True:
        # wait4 (not Popen.poll) reaps the process, so that its own peak memory can be read
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        done = _labels_written(output)
        try:
            rss = (
                next(
                    int(line.split()[1])
                    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines()
                    if line.startswith("VmRSS:")
                )
                / 1024
            )
            samples.append((done, round(rss, 1)))
        except (OSError, StopIteration):
            pass
        if kill_after is not None and done >= kill_after:
            process.send_signal(signal.SIGKILL)
            _, status, usage = os.wait4(process.pid, 0)
            break
        time.sleep(0.2)
    process.returncode = os.waitstatus_to_exitcode(status)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "exit_code": process.returncode,
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "rss_samples": samples,
        "output": log.read_text().strip().splitlines()[-5:],
    }


def _labels_written(output: Path) -> int:
    """Label files in ``output`` (probability maps and temporary files not counted)."""
    return sum(1 for _ in output.glob("case-*[0-9].nii.gz")) if output.is_dir() else 0


def rss_when(samples: list[tuple[int, float]], fraction: float) -> float | None:
    """The first resident memory sampled once ``fraction`` of the label files the run wrote were there."""
    last = max((done for done, _ in samples), default=0)
    return next((rss for done, rss in samples if done >= fraction * last), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("cohort_benchmark"), help="work folder (kept for re-runs)")
    parser.add_argument("--cases", type=int, nargs="+", default=[100, 1000], help="cohort sizes (100 1000)")
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the predicting process (1)")
    parser.add_argument("--train-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    home = out / "home"
    os.environ["AUTOSEG_HOME"] = str(home)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": args.threads,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    if args.train_only:
        train_tiny_model(home)
        return 0
    started = time.perf_counter()
    # Trained in a process of its own: a child's peak memory (ru_maxrss) starts from its parent's at the fork, so
    # this process must stay small (no torch) for the predicting processes' peaks to be their own.
    subprocess.run([sys.executable, __file__, "--out", str(out), "--train-only"], env=env, check=True)
    names = write_cases(home, out / "cases", max(args.cases))
    print(f"model and {len(names)} cases ready in {time.perf_counter() - started:.0f} s", flush=True)
    common = ["-i", str(out / "cases"), "-d", NAME, "--no-tta", "--device", "cpu", "--no-progress"]
    results: dict[str, object] = {"threads": args.threads, "runs": {}}
    for count in sorted(args.cases):
        listing = out / f"list_{count}.txt"
        listing.write_text("".join(f"{name}\n" for name in names[:count]))
        output = out / f"predictions_{count}"
        shutil.rmtree(output, ignore_errors=True)
        run = run_predict([*common, "-o", str(output), "--list", str(listing)], output, env)
        run["summary"] = json.loads((output / "prediction_summary.json").read_text())["counts"]
        run["rss_at_10_percent_mib"] = rss_when(run["rss_samples"], 0.1)
        run["rss_at_end_mib"] = rss_when(run["rss_samples"], 1.0)
        results["runs"][count] = run
        print(
            f"N={count}: {run['seconds']} s, exit {run['exit_code']}, peak RSS {run['peak_rss_mib']} MiB "
            f"(at 10% of the cases: {run['rss_at_10_percent_mib']}, at the last: {run['rss_at_end_mib']}); "
            f"{run['summary']}",
            flush=True,
        )

    count = min(args.cases)
    output = out / "predictions_killed"
    shutil.rmtree(output, ignore_errors=True)
    arguments = [*common, "-o", str(output), "--list", str(out / f"list_{count}.txt"), "--save-probabilities"]
    killed = run_predict(arguments, output, env, kill_after=count // 3)
    left = {
        "labels": _labels_written(output),
        "temporary_files": len([p for p in output.iterdir() if p.name.startswith(".")]),
    }
    resumed = run_predict(arguments, output, env)
    summary = json.loads((output / "prediction_summary.json").read_text())
    complete = all(
        (output / f"{name}.nii.gz").is_file() and (output / f"{name}_probabilities.nii.gz").is_file()
        for name in names[:count]
        if name != BAD_CASE
    )
    results["kill_and_resume"] = {
        "cases": count,
        "killed_after_seconds": killed["seconds"],
        "left_by_the_kill": left,
        "resumed": {
            "seconds": resumed["seconds"],
            "exit_code": resumed["exit_code"],
            "counts": summary["counts"],
            "stale_temporaries_removed": summary["stale_temporaries_removed"],
            "failed": summary["failed"],
            "every_good_case_complete": complete,
            "temporary_files_left": len([p for p in output.iterdir() if p.name.startswith(".")]),
        },
    }
    print(f"kill and resume: {json.dumps(results['kill_and_resume'])}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")

    print(
        "\n| cases | wall time | s/case | peak RSS | RSS at 10% of the cases | RSS at the last case | written / skipped / "
        "failed | exit code |\n| --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    for count, run in results["runs"].items():
        counts = run["summary"]
        print(
            f"| {count} | {run['seconds']} s | {run['seconds'] / count:.2f} | {run['peak_rss_mib']:.0f} MiB | "
            f"{run['rss_at_10_percent_mib']} MiB | {run['rss_at_end_mib']} MiB | {counts['written']} / "
            f"{counts['skipped']} / {counts['failed']} | {run['exit_code']} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
