"""Data-parallel training (torchrun + DistributedDataParallel) on the CPU with the gloo backend: two processes
train one fold of tiny data; the result has the single-process layout and loads into ``autoseg_predict``; two
ranks and one rank reach the same weights on the same global batch; a killed rank ends the whole job and
``--continue`` resumes it.

The plans' batch is 3, so the two ranks get unequal shares (2 + 1) and the loss weighting is exercised too.
Every process is started with ``--precision fp32``: the subprocesses do not see the suite's pinned CPU probe.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import home_environment, tiny_configuration

from autoseg import distributed
from autoseg.api.plan import plan_and_preprocess
from autoseg.commands.predict import main as predict_main
from autoseg.data.demo.atlas import make_atlas_like
from autoseg.io.checkpoints import load_checkpoint
from autoseg.io.files import read_json
from autoseg.paths import run_folder
from autoseg.plans import Plans

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset961_ATLASParallel"
FOLD_0 = ("3d_resunet", "ResidualUNetTrainer", 0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 tiny ATLAS-like cases planned with a 4-8-16-32 network, 16³ patches, batch 3, 5 epochs of 6 iterations."""
    home = tmp_path_factory.mktemp("distributed_home")
    with home_environment(home):
        make_atlas_like(home / "raw" / DATASET, num_cases=5, seed=0, tiny=True, progress=False)
        plans = plan_and_preprocess(DATASET, progress=False).plans
    # 4 levels, as planned networks have: the coarsest deep-supervision head has loss weight 0, so its parameters
    # get no gradient, which DDP must be told about
    configuration = tiny_configuration(
        plans.configuration(), (4, 8, 16, 32), (16, 16, 16), 3, epochs=5, iterations_per_epoch=6, deep_supervision=True
    )
    path = home / "preprocessed" / DATASET / "plans.json"
    dataclasses.replace(plans, configurations={configuration.name: configuration}).to_json(path)
    Plans.from_json(path)  # still valid
    return home


def _environment(home: Path) -> dict[str, str]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    }
    environment.update(
        AUTOSEG_HOME=str(home),
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    return environment


def _train(home: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "autoseg.commands.train",
        "-d",
        DATASET,
        "-f",
        "0",
        "--num-gpus",
        "2",
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "-np",
        "0",
        *extra,
    ]


# ---------------------------------------------------------------------------- the pieces
def test_the_global_batch_is_split_over_the_ranks_and_the_losses_weighted() -> None:
    ranks = [distributed.DistributedContext(rank, 2) for rank in range(2)]
    assert [distributed.split_batch(5, c) for c in ranks] == [3, 2]
    assert [distributed.loss_weight(5, c) for c in ranks] == pytest.approx([1.2, 0.8])  # 3·2/5, 2·2/5
    assert [distributed.split_batch(4, c) for c in ranks] == [2, 2]
    assert distributed.loss_weight(4, ranks[1]) == 1.0
    with pytest.raises(ValueError, match="batch of 1 cannot be split over 2 processes"):
        distributed.split_batch(1, ranks[0])


def test_torchrun_variables_make_the_context(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.current() == distributed.DistributedContext()  # no torchrun: one process
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    context = distributed.current()
    assert (context.rank, context.world_size, context.local_rank, context.local_world_size) == (3, 4, 1, 2)
    assert context.enabled and not context.is_main
    assert context.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert context.device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK 4 lies outside WORLD_SIZE 4"):
        distributed.current()


# ---------------------------------------------------------------------------- whole runs
def test_a_user_error_in_the_ranks_is_one_line_not_a_crash_report(home: Path) -> None:
    command = [arg if arg != DATASET else "NoSuchDataset" for arg in _train(home)]
    done = subprocess.run(command, env=_environment(home), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no dataset 'NoSuchDataset'" in errors[0], done.stderr[-2000:]
    assert "was killed" not in done.stderr and "Traceback" not in done.stderr  # checked before torchrun starts


def test_two_processes_train_a_fold_with_the_single_process_layout(home: Path) -> None:
    done = subprocess.run(_train(home), env=_environment(home), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("results: ") == 1  # only rank 0 reports
    folder = home / "results" / DATASET / "3d_resunet" / "ResidualUNetTrainer" / "fold_0"
    log = (folder / "log.txt").read_text()
    assert "world size 2" in log and "distributed: world size 2 (gloo, DistributedDataParallel)" in log
    assert "full 3 = 2 + 1" in log  # the global batch of 3, split unevenly
    assert log.count("autoseg training: trainer") == 1  # one writer
    state = load_checkpoint(folder / "checkpoint_final.pth")
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not any(key.startswith("module.") for key in state["network"])  # the plain network, not the DDP wrapper
    losses = state["history"]["train_loss"]
    assert len(losses) == 5 and losses[-1] < losses[0]  # the loss goes down
    summary = read_json(folder / "validation" / "summary.json")
    splits = read_json(home / "preprocessed" / DATASET / "splits_final.json")
    assert sorted(summary["cases"]) == sorted(splits[0]["val"])  # gathered from both ranks
    # the checkpoint loads into autoseg_predict like a single-process one
    images = home / "raw" / DATASET / "imagesTr"
    assert (
        predict_main(
            [
                "-i",
                str(images),
                "-o",
                str(home / "predicted"),
                "-d",
                DATASET,
                "-f",
                "0",
                "--device",
                "cpu",
                "--no-progress",
                "--tta",
                "none",
            ]
        )
        == 0
    )
    assert len(list((home / "predicted").glob("*.nii.gz"))) == 5


def test_two_ranks_reach_the_weights_of_one_rank_on_the_same_global_batch(home: Path, tmp_path: Path) -> None:
    """Tolerance: 2e-5 absolute on every weight after 3 SGD steps in fp32 (measured 4e-6: the all-reduce only
    reorders sums; without the global-batch Dice sums the ranks land 1e-4 away)."""
    script = str(REPO / "tests" / "distributed_steps.py")
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    for command, output in (
        ([sys.executable, script], one),
        ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script], two),
    ):
        done = subprocess.run(
            [*command, DATASET, "3", str(output)], env=_environment(home), capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, done.stderr[-3000:]
    single, parallel = (torch.load(path, weights_only=True) for path in (one, two))
    keys = [key for key, value in single["network"].items() if value.is_floating_point()]
    difference = max(float((single["network"][k] - parallel["network"][k]).abs().max()) for k in keys)
    moved = max(float((single["network"][k] - single["initial"][k]).abs().max()) for k in keys)
    assert difference < 2e-5 < 1e-3 < moved  # the steps moved the weights far more than the ranks disagree
    assert all(torch.equal(single["initial"][k], parallel["initial"][k]) for k in keys)  # same start


def _rank_pids(home: Path, rank: int) -> list[int]:
    """Processes of this test's run (by AUTOSEG_HOME) that torchrun started as ``rank``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            variables = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"AUTOSEG_HOME={home}".encode() in variables and f"RANK={rank}".encode() in variables:
            found.append(int(entry.name))
    return found


def _start_after_first_epoch(home: Path, epochs: int) -> tuple[subprocess.Popen, Path]:
    """A 2-process run of ``epochs`` epochs started in the background; returns once its first epoch is saved."""
    plans_path = home / "preprocessed" / DATASET / "plans.json"
    plans = Plans.from_json(plans_path)
    configuration = plans.configuration()
    longer = dataclasses.replace(configuration, schedule=dataclasses.replace(configuration.schedule, epochs=epochs))
    dataclasses.replace(plans, configurations={longer.name: longer}).to_json(plans_path)
    folder = run_folder(DATASET, *FOLD_0)
    run = subprocess.Popen(
        _train(home, "--no-validation"),
        env=_environment(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while not (folder / "checkpoint_latest.pth").is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return run, folder


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_whole_job_and_continue_resumes_it(home: Path) -> None:
    run, folder = _start_after_first_epoch(home, epochs=15)
    victims = _rank_pids(home, 1)
    assert run.poll() is None and victims, "the run ended before a rank could be killed"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    _, stderr = run.communicate(timeout=300)
    assert run.returncode != 0
    assert "the distributed run stopped" in stderr and "--continue" in stderr
    assert not (folder / "checkpoint_final.pth").exists()
    stopped_after = load_checkpoint(folder / "checkpoint_latest.pth")["epoch"]
    assert stopped_after < 15
    done = subprocess.run(
        _train(home, "--no-validation", "--continue"),
        env=_environment(home),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = (folder / "log.txt").read_text()
    assert "continuing from checkpoint_latest.pth after epoch" in log
    final = load_checkpoint(folder / "checkpoint_final.pth")
    assert final["epoch"] == 15 and len(final["history"]["train_loss"]) == 15


def test_stopping_the_launcher_stops_every_process_of_the_run(home: Path) -> None:
    """SIGTERM (a job scheduler, ``kill PID``) to ``autoseg_train --num-gpus`` reaches torchrun and its ranks."""
    run, _ = _start_after_first_epoch(home, epochs=200)
    assert run.poll() is None and _rank_pids(home, 0) and _rank_pids(home, 1)
    # Rank 0 holds the fold's lock (the launcher does not, so the ranks run): a second run of the fold is refused
    # by its launcher, before torchrun starts, naming rank 0.
    second = subprocess.run(
        _train(home, "--no-validation", "--continue"),
        env=_environment(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert second.returncode == 1 and len(errors) == 1, second.stderr[-2000:]
    assert f"is in use by another run (pid {_rank_pids(home, 0)[0]} on host " in errors[0]
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 130 and "resume it with the same command and --continue" in stderr.lower()
    deadline = time.monotonic() + 30
    while (_rank_pids(home, 0) or _rank_pids(home, 1)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _rank_pids(home, 0) and not _rank_pids(home, 1)  # no rank outlives the launcher
