"""Errors that are the user's to fix (a config, a checkpoint, the data): the apps print them as one line and
exit with code 2, without a traceback unless MULTISCALE_MAE_TRACEBACK=1 asks for one."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from data import DataFailureError, FetchError, ShardSetError
from models import CheckpointError

from .config import ConfigError

USER_ERRORS = (ConfigError, CheckpointError, DataFailureError, ShardSetError, FetchError, FileNotFoundError)


@contextmanager
def one_line_errors(*also: type[BaseException]) -> Iterator[None]:
    """Inside: a USER_ERRORS exception (or one of `also`) becomes `error: <message>` on stderr and exit 2."""
    try:
        yield
    except (*USER_ERRORS, *also) as err:
        if os.environ.get("MULTISCALE_MAE_TRACEBACK") == "1":
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        raise SystemExit(2) from err
