"""The one line a command prints for an error the user can fix (bad input, a refused output, the
file system saying no); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno

_OS_FIX = {errno.EROFS: "write somewhere else (--out)",
           errno.ENOSPC: "free some space or write somewhere else (--out)",
           errno.EDQUOT: "free some space or write somewhere else (--out)",
           errno.EACCES: "write somewhere you may (--out) or fix the permissions",
           errno.EPERM: "write somewhere you may (--out) or fix the permissions",
           errno.ENOENT: "check the path",
           errno.ENOTDIR: "a part of the path is a file; check the path",
           errno.EISDIR: "give a file name"}


def user_errors() -> tuple[type[Exception], ...]:
    """The exception types that are the user's to fix (imported here, not at start-up: they pull in torch)."""
    from taskprune.data import DataError
    from taskprune.evaluate.sandbox import SandboxUnavailable
    from taskprune.executors import ExecutorError
    from taskprune.models import ModelLoadError, UnsupportedArchitectureError
    from taskprune.options import ConfigError
    from taskprune.plan import PlanError
    from taskprune.profile import ProfileError
    from taskprune.recover import RecoveryError
    from taskprune.results import ResultsError
    return (ConfigError, RecoveryError, DataError, ModelLoadError, UnsupportedArchitectureError, PlanError,
            ProfileError, ResultsError, SandboxUnavailable, ExecutorError, ValueError, OSError)


def one_line(err: Exception) -> str:
    """`err` as one line; an OSError as `PATH: what the system said (what to do)`."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror is not None:
        where = err.filename if err.filename is not None else "output"
        if err.filename2 is not None:
            where = f"{where} -> {err.filename2}"
        fix = _OS_FIX.get(err.errno)
        return f"{where}: {err.strerror}" + (f" ({fix})" if fix else "")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines) or "failed"
