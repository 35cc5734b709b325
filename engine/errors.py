"""The project's errors that are the user's to fix (a config, a checkpoint, the data): the apps print them as
one line and exit with code 2 (data/errors.py; MULTISCALE_MAE_TRACEBACK=1 shows the traceback)."""

from __future__ import annotations

from contextlib import AbstractContextManager

from data import DataFailureError, FetchError, ShardSetError
from data.errors import InputError
from data.errors import one_line_errors as _one_line_errors
from models import CheckpointError, ModelConfigError

from .config import ConfigError

# A path given that cannot be used as such: missing, a file where a folder goes (or the other way), not allowed.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
USER_ERRORS = (ConfigError, CheckpointError, ModelConfigError, DataFailureError, ShardSetError, FetchError, InputError,
               *PATH_ERRORS)


def one_line_errors(*also: type[BaseException]) -> AbstractContextManager[None]:
    """Inside: a USER_ERRORS exception (or one of `also`) becomes `error: <message>` on stderr and exit 2."""
    return _one_line_errors(*USER_ERRORS, *also)
