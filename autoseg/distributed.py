"""Data-parallel training on PyTorch's own engine: torchrun starts the processes, DistributedDataParallel
averages their gradients. The one place that knows about ranks.

How a run becomes distributed: ``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK`` in every process it starts; :func:`current` reads them, and a trainer that
sees a world size above one joins the process group (:func:`join`: NCCL between GPUs, gloo on the CPU), trains
on its share of every batch and leaves the group at the end (:func:`leave`). ``autoseg_train --num-gpus N``
starts torchrun itself (:func:`launch`).

What is shared and what is not:

- Each rank draws its own patches (its loader is seeded by the run's seed, the epoch and its rank), so a run is
  reproducible for a given world size; the plans' batch is the *global* batch, split over the ranks by
  :func:`split_batch`.
- Gradients are averaged by DDP after every backward pass. Each rank's loss is weighted by its share of the
  global batch (:func:`loss_weight`), so ranks with unequal shares still give the gradient of the global
  batch's mean loss; the soft Dice's sums run over the global batch (:func:`sum_across_ranks`, differentiable),
  as nnU-Net does for its batch Dice.
- GroupNorm needs no statistics from other ranks; BatchNorm networks are converted to ``SyncBatchNorm`` on GPUs.
  PyTorch's ``SyncBatchNorm`` runs on GPUs only, so on the CPU each rank normalizes with its own batch and DDP
  copies rank 0's running statistics to the others at every forward pass.
- Only rank 0 writes the log, plot and checkpoints; validation counts and the end-of-fold case metrics are
  gathered from every rank.

If one process dies, the others fail in their next collective operation and torchrun ends the whole job; the
run's ``checkpoint_latest.pth`` (written by rank 0 after every epoch) lets ``--continue`` resume it.
"""

from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autoseg.errors import UsageError

__all__ = [
    "DistributedContext",
    "barrier",
    "current",
    "gather_objects",
    "join",
    "launch",
    "leave",
    "loss_weight",
    "report_error",
    "sum_across_ranks",
    "sum_",
    "split_batch",
    "wrap_network",
]

#: How long a rank waits in a collective operation for the others before it fails (a hung peer).
TIMEOUT = datetime.timedelta(minutes=30)
#: Set by :func:`launch` for its processes: a file where they record user-facing errors (:func:`report_error`).
REPORT_VARIABLE = "AUTOSEG_RUN_REPORT"


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in a data-parallel run.

    Attributes:
        rank: 0..world_size-1 over every process of every node.
        world_size: processes in the run; 1 for an ordinary run.
        local_rank: index of this process on its node (its GPU index).
        local_world_size: processes on this node (they share its CPU cores).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        """More than one process: gradients, validation counts and case metrics are shared."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes the log, the plot and the checkpoints."""
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: its own GPU (``cuda:LOCAL_RANK``) in a distributed CUDA run, else ``device``."""
        if self.enabled and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device


def current() -> DistributedContext:
    """The context torchrun gave this process (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), else a single process.

    Raises:
        ValueError: the variables are not integers, or the rank lies outside the world size.
    """
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    if "WORLD_SIZE" not in os.environ:
        return DistributedContext()
    try:
        rank, world_size, local_rank = (int(os.environ.get(name, "0")) for name in names[:3])
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    except ValueError:
        raise UsageError(
            "RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (as torchrun sets them), got "
            + ", ".join(f"{name}={os.environ.get(name)!r}" for name in names)
        ) from None
    if not 0 <= rank < world_size:
        raise UsageError(f"RANK {rank} lies outside WORLD_SIZE {world_size}")
    return DistributedContext(rank, world_size, local_rank, max(1, local_world_size))


def join(context: DistributedContext, device: torch.device) -> str:
    """Join the process group of a distributed run (a no-op for one process); returns the backend.

    NCCL between CUDA devices, gloo on the CPU; the rendezvous address comes from torchrun's environment.
    """
    if not context.enabled:
        return "none"
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=context.rank, world_size=context.world_size, timeout=TIMEOUT)
    return backend


def leave() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def split_batch(global_batch: int, context: DistributedContext) -> int:
    """This rank's share of a global batch: ``global_batch // world_size``, the first ``global_batch %
    world_size`` ranks taking one more.

    Raises:
        ValueError: the global batch is smaller than the world size (a rank would get no sample).
    """
    if global_batch < context.world_size:
        raise UsageError(
            f"the plans' batch of {global_batch} cannot be split over {context.world_size} processes "
            f"(each needs at least one sample); use at most {global_batch} processes, or raise the "
            "batch size in plans.json"
        )
    share, extra = divmod(global_batch, context.world_size)
    return share + (1 if context.rank < extra else 0)


def loss_weight(global_batch: int, context: DistributedContext) -> float:
    """Factor for this rank's loss so that DDP's mean over ranks is the global batch's mean loss:
    ``local_batch * world_size / global_batch`` (1 when the batch splits evenly)."""
    return split_batch(global_batch, context) * context.world_size / global_batch


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every rank, differentiable (its gradient flows back to each rank's share);
    ``tensor`` itself outside a distributed run."""
    if not _active():
        return tensor
    from torch.distributed._functional_collectives import all_reduce  # differentiable (torch's own DTensor uses it)

    return all_reduce(tensor.float(), "sum", dist.group.WORLD)  # float32 on the wire: gloo and bf16 sums


def sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over every rank in place (no gradient; e.g. validation counts); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` by its element-wise maximum over every rank, in place (e.g. measured seconds, so that
    every rank takes the same timing decision); returns it."""
    if _active():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value`` (picklable plain data), in rank order, on every rank; ``[value]`` for one process."""
    if not _active():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every rank arrives here (nothing outside a distributed run)."""
    if _active():
        dist.barrier()


def wrap_network(network: nn.Module, device: torch.device) -> tuple[nn.Module, str]:
    """``network`` wrapped in DistributedDataParallel for this rank, and what was done to its normalization.

    BatchNorm layers become ``SyncBatchNorm`` on GPUs; on the CPU (where ``SyncBatchNorm`` cannot run) they
    stay per rank, with rank 0's running statistics broadcast at every forward pass.
    """
    batch_norms = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in network.modules())
    if not batch_norms:
        note = "no BatchNorm: nothing to synchronize"
    elif device.type == "cuda":
        network = nn.SyncBatchNorm.convert_sync_batchnorm(network)
        note = "BatchNorm converted to SyncBatchNorm"
    else:
        note = "BatchNorm statistics per rank (SyncBatchNorm needs GPUs); running statistics broadcast from rank 0"
    device_ids = [device.index] if device.type == "cuda" else None
    # Some parameters may get no gradient in a step: the coarsest deep-supervision head has loss weight 0, and a
    # frozen backbone stage trains only the new layers; DDP then has to look for them after every forward pass
    # (a graph traversal, small beside the convolutions). Buffers are synchronized by DDP's default.
    wrapped = nn.parallel.DistributedDataParallel(network, device_ids=device_ids, find_unused_parameters=True)
    return wrapped, note


def report_error(message: str) -> bool:
    """In a process started by :func:`launch`, record a user-facing error for the launcher to print once (instead
    of every rank printing it); returns False elsewhere, where the caller prints it itself."""
    path = os.environ.get(REPORT_VARIABLE)
    if not path:
        return False
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(message.replace("\n", " ") + "\n")
    return True


def launch(arguments: Sequence[str], processes: int, module: str = "autoseg.commands.train") -> int:
    """Run ``python -m module arguments`` under torchrun on this machine with ``processes`` processes
    (``--standalone``: torchrun picks a free port) and return its exit code.

    A user-facing error of the ranks (a missing dataset, a run that exists) is printed once, as one line. When a
    process fails otherwise or is killed, torchrun stops the others and this adds one line saying so and how to
    resume. SIGINT and SIGTERM sent to this process are passed on to torchrun, which stops its processes, so none
    outlives the launcher. Several machines: run torchrun on each with its rendezvous flags
    (``documentation/overview.md``).
    """
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        module,
        *arguments,
    ]
    handle, report = tempfile.mkstemp(prefix="autoseg_run_", suffix=".txt")
    os.close(handle)
    stopped: list[int] = []
    try:
        process = subprocess.Popen(command, env={**os.environ, REPORT_VARIABLE: report})

        def forward(number: int, frame: object) -> None:
            stopped.append(number)
            process.send_signal(number)

        previous = {number: signal.signal(number, forward) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            code = process.wait()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)
        errors = list(dict.fromkeys(Path(report).read_text(encoding="utf-8").splitlines()))
    finally:
        Path(report).unlink(missing_ok=True)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if errors:
        return 1
    if stopped:
        print(
            "interrupted; every process of the run has stopped. Resume it with the same command and --continue",
            file=sys.stderr,
        )
        return 130
    if code != 0:
        print(
            f"error: the distributed run stopped (torchrun exit code {code}): a process failed (its traceback is "
            "above) or was killed, and the others were ended with it. After a kill, resume it with the same "
            "command and --continue",
            file=sys.stderr,
        )
    return code
