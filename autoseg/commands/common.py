"""What every ``autoseg_*`` command shares: torch's threads set to the usable cores, and expected errors turned
into one clear line and exit code 1, and warnings about a file's header shown as one ``warning:`` line."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

import torch

from autoseg import distributed
from autoseg.dataset import DatasetError
from autoseg.io import DiskFullError, GeometryWarning, ImageReadError
from autoseg.machine import configure_threads
from autoseg.plans import PlansError

#: Errors that mean "the input is wrong" or "the disk is full", reported without a traceback. A full disk is
#: recognized where files are written (``autoseg.io.atomic_path``), whichever library wrote them, and reported
#: as ``error: no space left on device while writing PATH``; a damaged preprocessed array is a ValueError.
USER_ERRORS = (DatasetError, PlansError, ImageReadError, DiskFullError, FileNotFoundError, FileExistsError, KeyError,
               ValueError)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                  line: str | None = None) -> None:
    """A :class:`GeometryWarning` as one ``warning: ...`` line on stderr (it names its file); others as Python shows them."""
    if issubclass(category, GeometryWarning):
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
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        if not distributed.report_error(str(message)) and distributed.current().is_main:
            print(f"error: {message}", file=sys.stderr)  # one line, from one rank of a torchrun run
        return 1
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to continue", file=sys.stderr)
        return 130
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
