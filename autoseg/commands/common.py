"""What every ``autoseg_*`` command shares: torch's threads set to the usable cores, and expected errors turned
into one clear line and exit code 1, and warnings about a file's header shown as one ``warning:`` line."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch

from autoseg import distributed
from autoseg.errors import AutosegError
from autoseg.io import GeometryWarning
from autoseg.labels import LabelValueWarning
from autoseg.machine import configure_threads

#: Errors that mean "the input is wrong" or "the disk is full", reported as one line without a traceback: every
#: :class:`autoseg.errors.AutosegError` (``DatasetError``, ``PlansError``, ``ImageReadError``, ``DiskFullError``, ...).
#: A full disk is recognized where files are written (``autoseg.io.atomic_path``), whichever library wrote them,
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
