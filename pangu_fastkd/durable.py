"""Durable files: the one place that writes a file or swaps a directory so a crash cannot tear it.

Every writer of the package (data records, the teacher-logit cache, model and trainer
checkpoints, run-directory records, reports) goes through these functions:

- ``atomic_write`` / ``atomic_write_bytes`` / ``atomic_write_text``: the content goes to a
  temporary file in the target's directory, is fsynced, renamed over the target, and the
  directory is fsynced so the rename itself survives a crash. Readers see the old file or the
  whole new one, never a prefix.
- ``replace_dir``: a finished directory moved over an existing one (two renames: POSIX cannot
  rename a directory over a non-empty one), with the old one kept under a known or hidden name
  until the new one is in place.
- ``fsync_dir``, ``fsync_tree``, ``sha256_file``: the pieces the above and the verifying readers
  share.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "fsync_dir",
    "fsync_tree",
    "replace_dir",
    "sha256_file",
]

# Files we write are readable by others (mkstemp would leave them 0600), as open() would make them.
_FILE_MODE = 0o644


def fsync_dir(directory: Path) -> None:
    """fsync a directory, making the renames and creations inside it durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file directly in ``directory`` and the directory itself."""
    for path in directory.iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(directory)


def atomic_write(path: Path, write: Callable[[Path], object], *, tag: str = "") -> None:
    """Create ``path`` atomically with ``write(tmp)``, a function that writes a whole file at the
    temporary path it is given (``torch.save``, ``safetensors.torch.save_file``, ...).

    The temporary file is ``.{name}.{tag}XXXX.tmp`` beside ``path``; ``tag`` lets a writer
    recognise its own leftovers after being killed. Whatever interrupts the write, the temporary
    file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{tag}", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(Path(tmp_name))
        with open(tmp_name, "rb+") as handle:
            os.fchmod(handle.fileno(), _FILE_MODE)
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_dir(directory)


def atomic_write_bytes(path: Path, data: bytes, *, tag: str = "") -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_write``)."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data), tag=tag)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8, newlines untranslated, to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_dir(new: Path, target: Path, *, old: Path | None = None) -> None:
    """Move the finished directory ``new`` to ``target``, replacing what is there.

    An existing ``target`` is first renamed to ``old`` (default: a unique hidden name beside it),
    then ``new`` takes its place, the parent is fsynced and ``old`` is deleted. A reader that
    knows ``old`` (the trainer's checkpoint loader does) finds a complete directory at one of the
    two names at every moment; if the second rename fails, ``target`` is put back.
    """
    if old is None and target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
        old.rmdir()  # only the unique name is wanted
    moved = False
    if target.exists():
        assert old is not None
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        moved = True
    try:
        os.rename(new, target)
    except BaseException:
        if moved:
            os.rename(old, target)
        raise
    fsync_dir(target.parent)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
