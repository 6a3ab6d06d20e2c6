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
        key = getattr(err, "full_key", "") or str(err)
        _exit(f"missing required config value '{key}': set it on the command line ({key}=...)")
    except Exception as err:
        # hydra.utils.instantiate wraps what a constructor raises: look through the causes.
        cause: BaseException | None = err
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is None:
            raise
        _exit(str(cause))


def _exit(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)
