"""The errors autoseg reports to its users, as one line, rather than as a crash.

Every error that means "the input, the data or the machine is not as it must be" derives from
:class:`AutosegError`; the commands (``autoseg.commands.common.run``) print those as ``error: MESSAGE`` and exit
with 1. Any other exception is a bug in autoseg (or in a trainer a user wrote) and keeps its traceback.

Each class also derives from the built-in exception it refines (``ValueError``, ``KeyError``, ...), so code that
catches the built-in one keeps working. Errors of one stage live beside it (``DatasetError`` in
``autoseg.data.dataset``, ``PlansError`` in ``autoseg.plans``, ``DiskFullError`` in ``autoseg.io.files``, ...); the ones
here are shared by every stage.
"""

from __future__ import annotations

__all__ = [
    "AutosegError",
    "DataError",
    "ExistingOutputError",
    "InvalidFileError",
    "MissingFileError",
    "UnknownNameError",
    "UsageError",
]


class AutosegError(Exception):
    """Base of the errors a user can fix (input, data, options, disk); the message names what and where."""


class UsageError(AutosegError, ValueError):
    """An option or argument is invalid: an unknown fold, device, checkpoint choice, a value out of range."""


class UnknownNameError(AutosegError, KeyError):
    """A name that is not known (trainer, planner, configuration, ...); the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(AutosegError, FileNotFoundError):
    """A file or folder the user named, or that an earlier stage should have written, does not exist."""


class ExistingOutputError(AutosegError, FileExistsError):
    """An output exists that the command would replace, and replacing it was not asked for."""


class DataError(AutosegError, ValueError):
    """The data cannot be used as they are: an image that is zero everywhere, a label on another grid than its
    image, no preprocessed voxels; the message names the case or file."""


class InvalidFileError(AutosegError, ValueError):
    """A file's content is not what it must be (JSON syntax, a value of the wrong kind); the message names it."""
