"""User-facing errors: a mistake in a config, a path or an input is reported as one line, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

log = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake the user can fix (config value, path, missing export). The message names problem and fix."""


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a `UserError` (and OmegaConf's missing-value errors) into `error: ...` on stderr and exit code 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except MissingMandatoryValue as err:
        _exit(missing_value_message(getattr(err, "full_key", "") or str(err)))
    except Exception as err:
        # hydra.utils.instantiate wraps what a constructor raises: look through the causes.
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is None:
            raise
        _exit(one_line(cause))


def missing_value_message(key: str) -> str:
    """The error for a required config value (`???`) left unset."""
    return f"missing required config value '{key}': set it on the command line ({key}=...)"


def one_line(err: UserError) -> str:
    """The error's message. A UserError raised in a DataLoader worker reaches the main process re-raised by
    torch with the worker's whole traceback as its message ("Caught UserError in DataLoader worker process 0.
    Original Traceback ..."): the message is then the traceback's last line, after the exception's name."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    name = f"{type(err).__module__}.{type(err).__qualname__}: "
    lines = [line for line in text.splitlines() if line.startswith(name)]
    return lines[-1][len(name) :] if lines else text.strip().splitlines()[-1]


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
