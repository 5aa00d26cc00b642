"""Files on the shared volume, written so that a reader (another rank, a restarted pod, `kubectl cp`)
never sees half of one: atomic file writes, whole-directory publishes, and file hashes.

Every file is written under a temporary name, fsynced, renamed over the old one, and the directory
fsynced (the rename itself is then durable); a directory is built under a temporary name and renamed
into place.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_with(path: Path, writer: Callable[[Path], object]) -> None:
    """`writer(tmp)` writes the new content at a temporary path; it then replaces `path` whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    write_with(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    write_with(path, lambda tmp: tmp.write_text(text))


def publish_dir(built: Path, target: Path) -> None:
    """Replace the directory `target` by `built` (a sibling built under a temporary name)."""
    shutil.rmtree(target, ignore_errors=True)
    os.rename(built, target)
    fsync_dir(Path(target).parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()
