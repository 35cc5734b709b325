"""Errors that are the user's to fix print as one line: `error: <message>` on stderr and exit code 2, with the
traceback only when MULTISCALE_MAE_TRACEBACK=1 asks for it. Every entry point uses this (engine/errors.py
lists the project's errors for the apps)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

TRACEBACK_ENV = "MULTISCALE_MAE_TRACEBACK"


class InputError(ValueError):
    """Inputs that cannot be made into a dataset as given (a list line, a label, a class list)."""


@contextmanager
def one_line_errors(*errors: type[BaseException]) -> Iterator[None]:
    """Inside: one of `errors` becomes `error: <message>` on stderr and exit 2."""
    try:
        yield
    except errors as err:
        if os.environ.get(TRACEBACK_ENV) == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err
