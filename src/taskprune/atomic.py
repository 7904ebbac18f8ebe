"""Write a directory all at once: build it in a temporary sibling, rename it into place at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` when the block succeeds.

    On any failure (or interrupt) the temporary directory is removed and `path` is untouched, so
    a half-written output never exists under the final name.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} exists; choose another --out or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
