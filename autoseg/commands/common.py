"""What every ``autoseg_*`` command shares: torch's threads set to the usable cores, and expected errors turned
into one clear line and exit code 1, and warnings about a file's header shown as one ``warning:`` line.

And the argument types of every numeric and device flag (:func:`positive_finite_float`, :func:`fraction`,
:func:`int_range` and its :data:`positive_int`, :data:`non_negative_int`, :data:`seed`, and :func:`device`), and
:func:`refuse_unused` for flags that would be silently ignored in a combination: a value out of range, ``inf``,
``nan`` or an unknown device stops the command before anything runs, with argparse's usage line and one
``error: argument --FLAG: ...`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import warnings
from collections.abc import Callable, Sequence

import torch

from autoseg import distributed
from autoseg.errors import AutosegError
from autoseg.io.geometry import GeometryWarning
from autoseg.labels import LabelValueWarning
from autoseg.machine import check_device_name, configure_threads

#: Errors that mean "the input is wrong" or "the disk is full", reported as one line without a traceback: every
#: :class:`autoseg.errors.AutosegError` (``DatasetError``, ``PlansError``, ``ImageReadError``, ``DiskFullError``, ...).
#: A full disk is recognized where files are written (``autoseg.io.files.atomic_path``), whichever library wrote them,
#: and reported as ``error: no space left on device while writing PATH``. Anything else is a bug: its traceback
#: is shown.
USER_ERRORS = (AutosegError,)


def _show_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None, line: str | None = None
) -> None:
    """A :class:`GeometryWarning` or :class:`LabelValueWarning` as one ``warning: ...`` line on stderr (it names its
    file); others as Python shows them."""
    if issubclass(category, (GeometryWarning, LabelValueWarning)):
        print(f"warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run(action: Callable[[], int | None]) -> int:
    """Run ``action`` with torch's intra-op threads set by :func:`autoseg.machine.configure_threads` (the cores
    of the process's affinity mask, or ``OMP_NUM_THREADS``); print an expected error as ``error: ...`` on stderr
    and return 1. The previous thread count is restored afterwards, for callers that run commands in-process."""
    threads = torch.get_num_threads()
    configure_threads()
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return action() or 0
    except USER_ERRORS as error:
        if not distributed.report_error(str(error)) and distributed.current().is_main:
            print(f"error: {error}", file=sys.stderr)  # one line, from one rank of a torchrun run
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def positive_finite_float(text: str) -> float:
    """argparse type: a number greater than 0 and finite (``inf``, ``nan``, ``0`` and ``-4`` are refused)."""
    value = _float(text, "a positive finite number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1], e.g. a sliding-window step as a fraction of the patch."""
    expected = "a number greater than 0 and at most 1"
    value = _float(text, expected)
    if not 0 < value <= 1:  # False for nan
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
    return value


def int_range(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse type: a whole number from ``low`` to ``high`` (inclusive; None: no upper limit)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f"at least {low}" if high is None else f"from {low} to {high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text!r}")
        return value

    parse.__name__ = f"int_from_{low}" + ("" if high is None else f"_to_{high}")
    return parse


#: argparse types: counts that must be at least 1 (epochs, parts, processes), or may be 0 (validation batches,
#: data-loading processes: 0 loads in the main process), and a seed numpy takes (0 to 2**32 - 1).
positive_int = int_range(1)
non_negative_int = int_range(0)
seed = int_range(0, 2**32 - 1)


def device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (``autoseg.machine.check_device_name``)."""
    try:
        return check_device_name(text)
    except AutosegError as error:
        raise argparse.ArgumentTypeError(str(error).removeprefix(f"--device {text}: ")) from None


def refuse_unused(
    parser: argparse.ArgumentParser, args: argparse.Namespace, flag: str, unused: Sequence[str], why: str
) -> None:
    """Stop (argparse's error, exit 2) when the option ``flag`` (a destination name) is given together with any of
    ``unused``, options it would silently ignore; an option counts as given when its value differs from its default.

    Example: ``refuse_unused(p, args, "verify", ["preprocess_only"], "--verify only verifies the dataset")`` turns
    ``--verify --preprocess-only`` into ``error: --preprocess-only has no effect with --verify: --verify only
    verifies the dataset``.
    """
    if not _given(parser, args, flag):
        return
    names = {action.dest: max(action.option_strings, key=len) for action in parser._actions if action.option_strings}
    ignored = [names[dest] for dest in unused if _given(parser, args, dest)]
    if ignored:
        parser.error(
            f"{', '.join(ignored)} {'has' if len(ignored) == 1 else 'have'} no effect with {names[flag]}: {why}"
        )


def _given(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str) -> bool:
    return getattr(args, dest) not in (None, False, parser.get_default(dest))


def _float(text: str, expected: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}") from None
