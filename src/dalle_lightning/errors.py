"""User-facing errors: a mistake in a config, a path or an input is reported as one line, not a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class UserError(Exception):
    """A mistake the user can fix (config value, path, missing export). The message names problem and fix."""


@contextmanager
def report_user_errors() -> Iterator[None]:
    """Turn a `UserError` (and OmegaConf's missing-value errors) into `error: ...` on stderr and exit code 2."""
    from omegaconf.errors import MissingMandatoryValue

    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", "") or str(err)
        print(
            f"error: missing required config value '{key}': set it on the command line ({key}=...)",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(2)
