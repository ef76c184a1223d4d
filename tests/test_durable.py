"""pangu_fastkd.durable: the atomic writers and the directory swap every file writer uses."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import pytest

from pangu_fastkd import durable


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".old")))


def test_atomic_write_bytes_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    durable.atomic_write_bytes(path, b"old")
    durable.atomic_write_bytes(path, b"new content")
    assert path.read_bytes() == b"new content"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0600
    assert _leftovers(tmp_path) == []


def test_text_is_utf8_with_newlines_untranslated(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    durable.atomic_write_text(path, "é\r\nb\n")
    assert path.read_bytes() == "é\r\nb\n".encode()


def test_an_interrupted_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        durable.atomic_write(path, half_then_fail, tag="r000.")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_the_temp_file_carries_the_tag_and_the_rename_is_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    synced_dirs: list[bool] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced_dirs.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    durable.atomic_write(tmp_path / "x.json", lambda tmp: seen.append(tmp.name), tag="r007.")
    assert len(seen) == 1 and seen[0].startswith(".x.json.r007.") and seen[0].endswith(".tmp")
    assert synced_dirs == [False, True]  # the file, then its directory


def test_replace_dir_swaps_and_keeps_no_old(tmp_path: Path) -> None:
    target, new = tmp_path / "ckpt", tmp_path / "ckpt.tmp"
    target.mkdir()
    (target / "f").write_text("old")
    new.mkdir()
    (new / "f").write_text("new")
    durable.replace_dir(new, target)
    assert (target / "f").read_text() == "new" and not new.exists()
    assert _leftovers(tmp_path) == []
    # Into a place that does not exist yet, and with a named old directory.
    other = tmp_path / "other.tmp"
    other.mkdir()
    durable.replace_dir(other, tmp_path / "fresh", old=tmp_path / "fresh.old")
    assert (tmp_path / "fresh").is_dir() and not (tmp_path / "fresh.old").exists()


def test_replace_dir_puts_the_target_back_when_the_move_fails(tmp_path: Path) -> None:
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "f").write_text("old")
    with pytest.raises(FileNotFoundError):
        durable.replace_dir(tmp_path / "missing", target, old=tmp_path / "ckpt.old")
    assert (target / "f").read_text() == "old" and not (tmp_path / "ckpt.old").exists()


def test_sha256_file_and_fsync_tree(tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    (tmp_path / "blob").write_bytes(data)
    assert durable.sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()
    durable.fsync_tree(tmp_path)  # files and the directory; must not raise
