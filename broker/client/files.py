"""Files the client side writes for others to read: replaced atomically, never seen partial."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so that no reader ever sees a partial file.

    A temporary file in the same directory (created with `mode`, so the token is never
    readable by others even briefly), written and fsynced, renamed over `path`, then the
    directory fsynced so the rename survives a crash. Missing parent directories are created
    (0700, plus read and search for group/others when `mode` lets them read the file).
    """
    directory = path.parent
    if not directory.is_dir():
        # Searchable by those the file's mode lets read it.
        shared = (0o050 if mode & 0o040 else 0) | (0o005 if mode & 0o004 else 0)
        directory.mkdir(mode=0o700 | shared, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
