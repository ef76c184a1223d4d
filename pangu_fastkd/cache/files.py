"""Opening the files of a cache directory so that a hostile directory cannot misdirect a read.

Every file the cache reads (``manifest.json``, ``sequences.json``, progress files, shards) is
opened here, and only as a regular file that is the directory entry itself: never through a
symbolic link (``O_NOFOLLOW``), never a FIFO, device, socket or directory. The open is
non-blocking (``O_NONBLOCK``) because opening a FIFO for reading otherwise waits for a writer
forever; the type is then checked on the open descriptor (``fstat``), so the file checked is the
file read, whatever is renamed into the directory meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from .spec import CacheError

__all__ = ["open_regular", "read_regular", "sha256_fd"]

_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)
_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


@contextlib.contextmanager
def open_regular(
    path: Path, *, label: str | None = None, missing: str = "file not found"
) -> Iterator[tuple[int, os.stat_result]]:
    """Open ``path`` read-only as a regular file; yields ``(fd, fstat result)``.

    Args:
        path: the file; its last component must not be a symbolic link.
        label: how errors name the file (default: the path).
        missing: what the error says when the file does not exist.

    Raises:
        CacheError: naming the file if it is missing, unreadable, a symbolic link or anything
            but a regular file. Nothing blocks: a FIFO is refused, not waited on.
    """
    where = "" if label is None else f" ({path})"
    label = str(path) if label is None else label
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise CacheError(f"{label}: {missing}{where}") from None
    except OSError as exc:
        raise CacheError(f"{label}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(before.st_mode):
        raise CacheError(f"{label}: not a regular file but {_kind(before.st_mode)}")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise CacheError(f"{label}: {missing}{where}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a link swapped in after the lstat
            raise CacheError(f"{label}: not a regular file but a symbolic link") from None
        raise CacheError(f"{label}: cannot read: {exc.strerror}") from None
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise CacheError(f"{label}: not a regular file but {_kind(status.st_mode)}")
        yield fd, status
    finally:
        os.close(fd)


def read_regular(path: Path, *, max_bytes: int, label: str | None = None) -> bytes:
    """The whole content of the regular file ``path`` (see ``open_regular``).

    Raises:
        CacheError: as ``open_regular``, or the file is larger than ``max_bytes``.
    """
    label = str(path) if label is None else label
    with open_regular(path, label=label) as (fd, status):
        if status.st_size > max_bytes:
            raise CacheError(
                f"{label}: is {status.st_size} bytes, more than the {max_bytes} a cache file "
                "of this kind may hold"
            )
        parts = []
        size = 0
        while chunk := os.read(fd, _CHUNK):
            size += len(chunk)
            if size > max_bytes:  # the file grew while it was read
                raise CacheError(f"{label}: grew past {max_bytes} bytes while being read")
            parts.append(chunk)
    return b"".join(parts)


def sha256_fd(fd: int) -> str:
    """sha256 (hex) of everything in the open file ``fd`` from offset 0."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()
