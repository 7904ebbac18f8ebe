"""Outputs written all at once, and replaced only when taskprune wrote them.

`atomic_dir` builds a directory in a temporary sibling and renames it into place at the end.
`check_replaceable` is the one rule for `--overwrite`: an existing output is replaced only when it
is a directory that the same kind of command wrote (it holds that kind's marker file, e.g.
`pruning.json` for a pruned checkpoint) or an empty directory. A regular file, a link, an
unrelated directory or a non-empty directory without the marker is refused, with the path named.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# What each command writes, as alternative groups of marker files (a directory qualifies when it
# holds every file of one group).
MARKERS: dict[str, tuple[tuple[str, ...], ...]] = {
    "profile": (("profile.json",),),  # taskprune capture
    "checkpoint": (("pruning.json",),),  # taskprune prune
    "recovery": (("recovery.json",),),  # taskprune recover
    "eval": (("made_by.json",), ("summary.json",)),  # taskprune eval (made_by.json comes first)
    "study": (("config.yaml", "results.sqlite"),),  # taskprune run
}

_WHAT = {"profile": "profile", "checkpoint": "pruned checkpoint", "recovery": "recovered checkpoint",
         "eval": "evaluation directory", "study": "study directory"}


class OutputExistsError(FileExistsError):
    """An output path that exists and may not be replaced; the message names it and the fix."""


def check_replaceable(path: str | Path, kind: str, overwrite: bool = True) -> None:
    """Raise `OutputExistsError` unless writing a `kind` output to `path` loses nothing it should not.

    A missing path is fine. An existing one needs `overwrite`, and then must be an empty directory or
    a directory holding `kind`'s markers (`MARKERS[kind]`): what taskprune wrote there. Either way the
    place must be writable (`check_writable`: `OSError` on a read-only file system, say).
    """
    path = Path(path)
    groups = MARKERS[kind]
    if not path.exists() and not path.is_symlink():
        return check_writable(path)
    if not overwrite:
        raise OutputExistsError(f"output {path} exists; choose another --out or pass --overwrite")
    marker = " + ".join(groups[0])
    refuse = (f"; --overwrite only replaces a {_WHAT[kind]} taskprune wrote (with {marker}): "
              f"choose another --out or remove it yourself")
    if path.is_symlink():
        raise OutputExistsError(f"output {path} is a symbolic link{refuse}")
    if not path.is_dir():
        raise OutputExistsError(f"output {path} is a file, not a directory{refuse}")
    try:
        if not any(path.iterdir()):
            return check_writable(path)
    except OSError as err:
        raise OutputExistsError(f"output {path} cannot be read ({err.strerror}){refuse}") from None
    if any(all((path / name).is_file() for name in group) for group in groups):
        return check_writable(path)
    raise OutputExistsError(f"output {path} is a directory without {marker}{refuse}")


def check_writable(path: str | Path) -> None:
    """Raise the `OSError` that writing `path` would (read-only file system, no permission, a file in
    the way) before any work is done; nothing is written. A full disk is only found when writing."""
    path = Path(path).absolute()
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(parent))
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(path))


@contextmanager
def os_errors(path: str | Path) -> Iterator[None]:
    """Re-raise a safetensors write error that is really the file system's (full, read-only, no
    permission) as the `OSError` it wraps, naming `path`, so that it is reported like any other."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - only safetensors' I/O errors are translated
        match = re.search(r"I/O error: (.*?) \(os error (\d+)\)", str(err))
        if type(err).__name__ != "SafetensorError" or match is None:
            raise
        raise OSError(int(match.group(2)), match.group(1), str(path)) from None


def save_tensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file` with file system errors as `OSError` and the user's umask."""
    from safetensors.torch import save_file

    with os_errors(path):
        save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` when the block succeeds.

    On any failure (or interrupt) the temporary directory is removed and `path` is untouched, so
    a half-written output never exists under the final name. An existing `path` is replaced only
    when `overwrite` is set and `check_replaceable(path, kind)` allows it (`kind` None: only a
    missing or empty path). The directory gets the user's umask, like any `mkdir`.
    """
    path = Path(path)
    if kind is not None:
        check_replaceable(path, kind, overwrite)
    elif path.exists() or path.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"output {path} exists; choose another --out or pass --overwrite")
        if not path.is_dir() or path.is_symlink() or any(path.iterdir()):
            raise OutputExistsError(f"output {path} exists and is not an empty directory; choose another --out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    except OSError as err:  # name the output, not the temporary sibling
        raise OSError(err.errno, err.strerror, str(path)) from None
    try:
        mask = _umask()
        with os_errors(path):
            yield tmp
        for root, dirs, files in os.walk(tmp):  # safetensors and mkdtemp write 0600/0700
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        os.chmod(tmp, 0o777 & ~mask)
        if kind is not None:
            check_replaceable(path, kind, overwrite)  # again: it may have appeared meanwhile
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-old-"))
            os.replace(path, old / "x")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old / "x", path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
