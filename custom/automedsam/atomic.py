"""Atomic file writes, the one home for them: every result, checkpoint, cache entry and export is
written to a temporary name in its target folder and renamed into place, so a kill at any
moment leaves the old file or the new one under the final name, never a partial one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], durable: bool = False) -> Path:
    """Call ``write(tmp)`` on a fresh temporary name beside ``path`` (same extension, so writers
    that go by it work), then ``os.replace`` it onto ``path``; on any failure the temporary file is
    removed and the error raised. ``durable``: fsync before the rename (checkpoints). The file gets
    the usual umask permissions (``mkstemp`` makes 0600 files)."""
    path = Path(path)
    tmp = temp_beside(path)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        publish(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    return path


def temp_beside(path: str | os.PathLike) -> str:
    """A fresh empty temporary file ``.tmp-*-<name>`` in ``path``'s folder (created if needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + path.name, dir=path.parent)
    os.close(fd)
    return tmp


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Give ``tmp`` the usual umask permissions (``mkstemp`` makes 0600 files) and rename it onto
    ``path`` (``os.replace``: atomic within a file system)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def discard(tmp: str | os.PathLike) -> None:
    """Remove a temporary file if it is still there."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
