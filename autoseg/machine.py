"""The machine autoseg runs on: usable CPU cores, CPU/GPU model, native bf16, device and precision choices.

One place answers "what is this computer and how should torch use it": the commands call
:func:`configure_threads` once, trainers and predictors call :func:`choose_device` and :func:`choose_precision`,
and the compute-budget probe (``autoseg.plan.probe``) keys its cache on :func:`machine_description`;
:func:`deterministic_algorithms` sets (and restores) torch's algorithm choice for a block.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from autoseg.errors import UsageError

__all__ = [
    "PRECISIONS",
    "Precision",
    "available_cores",
    "choose_device",
    "choose_precision",
    "configure_threads",
    "cpu_has_fast_bf16",
    "load_average",
    "cpu_model",
    "device_model",
    "machine_description",
]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def available_cores() -> int:
    """CPU cores this process may run on: its affinity mask (taskset, cgroups' cpusets), else the CPU count.

    A container that shows 64 CPUs but lets the process use 2 gets 2, so torch does not start 64 threads that
    wait for each other.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The system's load average over the last minute (runnable processes, all cores together); None where the
    system does not say (Windows)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`available_cores`, or ``OMP_NUM_THREADS`` when
    the user set it) and return the number set."""
    if threads is None:
        requested = os.environ.get("OMP_NUM_THREADS", "")
        threads = int(requested) if requested.isdigit() and int(requested) > 0 else available_cores()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC 9R14``; ``platform.processor()`` elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_model(device: torch.device) -> str:
    """The GPU's name for a CUDA device, the CPU's model (with its vector capability) otherwise."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()})"


def machine_description(device: torch.device, precision: str) -> dict[str, str | int]:
    """What makes timings on this machine comparable: device model, threads, torch version and precision.

    The compute-budget probe caches its timings under this description; any change (another CPU, another
    thread count, a torch upgrade, another precision) means a new probe.
    """
    return {
        "device": device.type,
        "model": device_model(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else 0,
        "torch": torch.__version__,
        "precision": precision,
    }


#: The devices autoseg runs on: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.
DEVICE_NAME = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_name(requested: str) -> str:
    """``requested`` when it is a device autoseg runs on (:data:`DEVICE_NAME`).

    Raises:
        UsageError: ``--device NAME: not a device autoseg runs on; use auto, cpu, cuda or cuda:N``.
    """
    if not DEVICE_NAME.match(str(requested)):
        raise UsageError(f"--device {requested}: not a device autoseg runs on; use auto, cpu, cuda or cuda:N")
    return requested


def choose_device(requested: str = "auto") -> tuple[torch.device, str]:
    """The device to train on and why.

    Raises:
        UsageError: a device autoseg does not run on (:func:`check_device_name`), or CUDA requested but not
            available.
    """
    check_device_name(requested)
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"CUDA is available ({torch.cuda.get_device_name(0)})"
        return torch.device("cpu"), "no CUDA device found"
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested}: no CUDA device is available (torch.cuda.is_available() is False)")
    return device, "requested"


@dataclass(frozen=True)
class Precision:
    """Numeric precision of the forward and backward passes.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16``.
        autocast_dtype: dtype for ``torch.autocast``, None for plain float32.
        grad_scaler: whether the loss is scaled (fp16 gradients underflow without it).
        reason: why this precision was chosen.
    """

    name: str
    autocast_dtype: torch.dtype | None
    grad_scaler: bool
    reason: str


def cpu_has_fast_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), and its capability string.

    Without those instructions bf16 is emulated: on an AVX2 CPU a bf16-autocast convolution is about 100 times
    slower than float32.
    """
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        return False, capability
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    answers = [bool(probe()) for probe in probes if probe is not None]
    return (any(answers) if answers else True), capability


def choose_precision(device: torch.device, requested: str = "auto") -> Precision:
    """Mixed precision where it is fast: bf16 on CUDA if supported else fp16 with loss scaling; on the CPU bf16
    only with native bf16 instructions (AVX512-BF16/AMX), float32 otherwise.

    Raises:
        ValueError: an unknown name, or fp16 on the CPU (no loss scaling there).
    """
    if requested not in PRECISIONS:
        raise UsageError(f"unknown precision '{requested}', use one of {list(PRECISIONS)}")
    if requested == "fp32":
        return Precision("fp32", None, False, "requested")
    if device.type == "cuda":
        if requested == "bf16" or (requested == "auto" and torch.cuda.is_bf16_supported()):
            return Precision(
                "bf16",
                torch.bfloat16,
                False,
                "requested" if requested == "bf16" else "CUDA device supports bf16 (no loss scaling needed)",
            )
        return Precision(
            "fp16",
            torch.float16,
            True,
            "requested" if requested == "fp16" else "CUDA device without bf16: fp16 with a GradScaler",
        )
    if requested == "fp16":
        raise UsageError("fp16 mixed precision needs CUDA; on the CPU use fp32 or bf16")
    fast, capability = cpu_has_fast_bf16()
    if requested == "bf16":
        return Precision(
            "bf16",
            torch.bfloat16,
            False,
            "requested"
            + (
                ""
                if fast
                else (f"; CPU capability {capability} has no native bf16, expect it to be much slower than fp32")
            ),
        )
    if fast:
        return Precision("bf16", torch.bfloat16, False, f"CPU capability {capability} with native bf16 instructions")
    return Precision(
        "fp32",
        None,
        False,
        f"CPU capability {capability} has no native bf16 (AVX512-BF16 or AMX): "
        "bf16 autocast would be far slower than float32",
    )


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool, cudnn_benchmark: bool = False) -> Iterator[None]:
    """Within the block: ``torch.use_deterministic_algorithms(True, warn_only=True)`` when ``enabled``, and cuDNN's
    autotuner (``cudnn.benchmark``) on when ``cudnn_benchmark`` and not ``enabled``; the previous settings come
    back afterwards, so a run leaves the process as it found it."""
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = cudnn_benchmark and not enabled
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
