"""The errors fedexits raises on purpose, one class per kind of bad input.

Everything here is the user's to fix and is reported as one line (exit code 2 on the command
line). Any other exception is a bug: it keeps its traceback and fails the run.

- `SettingsError`: a setting (command line, YAML, dataclass field) has a value that cannot work.
- `DataError`: a data set, data file or data configuration cannot be used; stops the job.
- `UserDataError`: one user's data cannot be used (too few images, labels outside the model's
  classes, nothing to train on); that user fails alone and the run goes on.
- `CheckpointError`: a model, checkpoint or exported-model file is missing, corrupt or does not fit.

All derive from ValueError, so notebook code that catches ValueError keeps working.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2  # the exit code of a command given bad input


class FedexitsError(ValueError):
    """Bad input the user can fix; the message is one line naming the thing and what was expected."""


class SettingsError(FedexitsError):
    """A setting has a value that cannot work (checked before any work starts)."""


class DataError(FedexitsError):
    """A data set, data file or data configuration cannot be used."""


class UserDataError(DataError):
    """One user's data cannot be used; that user fails alone."""


class CheckpointError(FedexitsError):
    """A model or checkpoint file is missing, corrupt or made for another architecture."""


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (or its type's name)."""
    for line in str(exc).strip().splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def exits_2_on_bad_input(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a command's `main` (returning its exit code): bad input (FedexitsError) prints one line
    on stderr and returns EXIT_BAD_INPUT; any other exception is a bug and keeps its traceback."""

    @functools.wraps(main)
    def command(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except FedexitsError as exc:
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return EXIT_BAD_INPUT

    return command


def check_settings(section: str, settings, checks: list[tuple[str, bool, str]]) -> None:
    """Raise SettingsError for the first failed check: `section.name must be expected, got value`.

    `checks` holds (field name, whether its value is fine, what is expected)."""
    for name, ok, expected in checks:
        if not ok:
            raise SettingsError(f"{section}.{name} must be {expected}, got {getattr(settings, name)!r}")


def config_error_line(error: Exception, prefix: str = "") -> str:
    """One line for an OmegaConf/Hydra error: the full key it concerns and what went wrong."""
    key = getattr(error, "full_key", None)
    message = one_line(getattr(error, "msg", None) or error)
    return f"{prefix}{key}: {message}" if key else message
