"""A hostile cache directory: every way to misdirect, hang or poison the reader ends in a
CacheError naming the file.

The threat is a cache directory written by someone else. The manifest's checksum is its own
sha256, so anyone can edit the manifest and re-sign it: every test here builds a real cache
with the package's writer, tampers with it, then re-signs the manifest (recomputing sizes,
sha256s and the self-checksum the way an attacker would) so that only the hardening under test
stands between the damage and the KD stage.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_cache import LENGTHS, make_spec, sample_scores, write_cache

from pangu_fastkd.cache import (
    CacheError,
    CacheReader,
    CacheWriter,
    finalize_cache,
    verify_cache,
)
from pangu_fastkd.cache.__main__ import main as cli_main
from pangu_fastkd.cache.shards import encode_shard
from pangu_fastkd.cache.spec import encode_ids

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")

# Shard 1 of the pristine cache (shard_tokens=9 over LENGTHS) starts at sequence 4: its rows
# 0 | 1..7 | 8..11 are doc-4 | doc-5 | doc-6.
SHARD1 = "shard-r000-00001.safetensors"


# ---------------------------------------------------------------------------------------------
# Building and tampering


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("pristine")
    write_cache(directory, make_spec(sampled_k=3, sampled_draws=12))
    return directory


@pytest.fixture
def cache(tmp_path, pristine) -> Path:
    directory = tmp_path / "cache"
    shutil.copytree(pristine, directory)
    return directory


def resign(directory: Path, edit: Callable[[dict], None]) -> None:
    """Edit ``manifest.json`` as parsed JSON and recompute its self-checksum."""
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    body = {key: value for key, value in data.items() if key != "checksum"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    data["checksum"] = hashlib.sha256(canonical.encode()).hexdigest()
    path.write_text(json.dumps(data))


def record_shard(directory: Path, name: str, data: bytes) -> None:
    """Write ``data`` as shard ``name`` and re-sign the manifest over its size and sha256."""
    (directory / name).write_bytes(data)

    def edit(manifest: dict) -> None:
        for shard in manifest["shards"]:
            if shard["name"] == name:
                shard["num_bytes"] = len(data)
                shard["sha256"] = hashlib.sha256(data).hexdigest()
        manifest["total_bytes"] = sum(s["num_bytes"] for s in manifest["shards"])
        manifest["bytes_per_token"] = manifest["total_bytes"] / manifest["total_tokens"]

    resign(directory, edit)


def rewrite_tensors(directory: Path, name: str, edit: Callable[[dict], None]) -> None:
    """Change a shard's tensors, keep its metadata, re-sign."""
    path = directory / name
    tensors = load_file(path)
    with safe_open(str(path), framework="pt") as shard:
        metadata = json.loads(shard.metadata()["pangu_fastkd.cache"])
    edit(tensors)
    record_shard(directory, name, encode_shard(tensors, metadata))


def split_shard(data: bytes) -> tuple[dict, bytes]:
    """A safetensors file as (parsed header, data region)."""
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def join_shard(header: dict | str | bytes, body: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file from a header (dict, or raw JSON text) and a data region."""
    text = (
        header
        if isinstance(header, bytes)
        else header.encode()
        if isinstance(header, str)
        else json.dumps(header).encode()
    )
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text) if length is None else length) + text + body


def read_everything(directory: Path, **reader_options) -> None:
    reader = CacheReader(directory, **reader_options)
    everything = range(len(LENGTHS))
    reader.topk_target(everything)
    reader.sampled_target(everything)


def assert_refused(directory: Path, message: str) -> None:
    """The reader (with and without checksums), verify_cache and the CLI all raise/print a
    CacheError matching ``message``."""
    for options in ({}, {"verify_checksums": False}):
        with pytest.raises(CacheError, match=message):
            read_everything(directory, **options)
    with pytest.raises(CacheError, match=message):
        verify_cache(directory)


# ---------------------------------------------------------------------------------------------
# 1. Files outside the directory, links, FIFOs


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_shard_outside_the_directory_is_refused_before_any_read(tmp_path, cache, where):
    """A re-signed manifest naming ``../outside/<shard>`` (same bytes, same sha256) or an
    absolute path used to verify and serve the foreign rows."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(cache / SHARD1, outside / SHARD1)
    name = f"../outside/{SHARD1}" if where == "relative" else str(outside / SHARD1)

    def edit(manifest: dict) -> None:
        manifest["shards"][1]["name"] = name

    resign(cache, edit)
    assert_refused(cache, rf"manifest\.json: shard name '{name}' is not a shard of rank 0")


def test_etc_passwd_is_never_opened(cache, monkeypatch):
    """The name is matched against the writer's pattern before any file access."""
    name = "../../../../etc/passwd"

    def edit(manifest: dict) -> None:
        manifest["shards"][1]["name"] = name

    resign(cache, edit)
    touched: list[str] = []
    for function in ("open", "lstat", "stat"):
        real = getattr(os, function)

        def spy(path, *args, _real=real, **kwargs):
            touched.append(os.fspath(path) if isinstance(path, str | os.PathLike) else "")
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, function, spy)
    assert_refused(cache, r"manifest\.json: shard name '\.\./\.\./\.\./\.\./etc/passwd'")
    assert not [path for path in touched if path.endswith("etc/passwd")]


@pytest.mark.parametrize("prefix", ["", "./", "shard-r000-00001.safetensors/"])
def test_shard_names_other_than_the_writers_are_refused(cache, prefix):
    variants = {
        "": "shard-r000-1.safetensors",  # not zero-padded: not a name the writer gives
        "./": "./" + SHARD1,
        "shard-r000-00001.safetensors/": SHARD1 + "/",
    }
    name = variants[prefix]

    def edit(manifest: dict) -> None:
        manifest["shards"][1]["name"] = name

    resign(cache, edit)
    assert_refused(cache, r"manifest\.json: shard name .* is not a shard of rank 0")


def test_shard_that_is_a_symlink_is_refused(tmp_path, cache):
    """Even a link to a byte-identical copy: the cache reads only its own files."""
    outside = tmp_path / "outside.safetensors"
    shutil.copy(cache / SHARD1, outside)
    (cache / SHARD1).unlink()
    (cache / SHARD1).symlink_to(outside)
    assert_refused(cache, rf"^{SHARD1}: not a regular file but a symbolic link")


def test_shard_that_is_a_directory_is_refused(cache):
    (cache / SHARD1).unlink()
    (cache / SHARD1).mkdir()
    assert_refused(cache, rf"^{SHARD1}: not a regular file but a directory")


def test_manifest_that_is_a_symlink_is_refused(tmp_path, cache):
    moved = tmp_path / "elsewhere.json"
    shutil.move(cache / "manifest.json", moved)
    (cache / "manifest.json").symlink_to(moved)
    assert_refused(cache, r"manifest\.json: not a regular file but a symbolic link")


def _unblock_after(path: Path, seconds: float) -> threading.Timer:
    """Should a read of the FIFO ``path`` block, open its write end after ``seconds`` so the
    test fails instead of hanging."""

    def unblock() -> None:
        fd = os.open(path, os.O_WRONLY)  # pairs with the blocked reader
        os.close(fd)

    timer = threading.Timer(seconds, unblock)
    timer.daemon = True
    timer.start()
    return timer


@needs_fifo
@pytest.mark.parametrize("entry", ["verify", "reader", "cli"])
def test_manifest_that_is_a_fifo_does_not_hang(cache, entry, capsys):
    manifest = cache / "manifest.json"
    manifest.unlink()
    os.mkfifo(manifest)
    timer = _unblock_after(manifest, 5.0)
    started = time.monotonic()
    try:
        if entry == "cli":
            assert cli_main(["verify", str(cache)]) == 1
            assert "manifest.json: not a regular file but a named pipe" in capsys.readouterr().err
        else:
            with pytest.raises(CacheError, match=r"manifest\.json: not a regular file but a named"):
                verify_cache(cache) if entry == "verify" else CacheReader(cache)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 5.0


@needs_fifo
@pytest.mark.parametrize("name", ["sequences.json", "progress-r000.json", SHARD1])
def test_finalize_does_not_hang_on_a_fifo(tmp_path, name):
    spec = make_spec()
    with CacheWriter(
        tmp_path, spec, [f"doc-{i}" for i in range(len(LENGTHS))], shard_tokens=9
    ) as writer:
        while (i := writer.next_sequence) is not None:
            writer.add(sample_scores(i, LENGTHS[i], spec))
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)
    timer = _unblock_after(tmp_path / name, 5.0)
    try:
        with pytest.raises(CacheError, match=rf"{name}: not a regular file but a named pipe"):
            finalize_cache(tmp_path)
    finally:
        timer.cancel()


# ---------------------------------------------------------------------------------------------
# 2. Values of re-signed shards never reach the KD stage


def _set(name: str, index, value) -> Callable[[dict], None]:
    def edit(tensors: dict) -> None:
        tensors[name][index] = value

    return edit


def _duplicate(tensors: dict) -> None:
    tensors["ids"][3, 1] = tensors["ids"][3, 0]


ROW = r"row {row} \(sequence {seq} 'doc-{seq}', token {token}\)"
POISON = {
    "NaN value": (_set("values", (2, 0), math.nan), 2, 5, 1, r"values hold NaN or \+inf"),
    "+inf value": (_set("values", (4, 1), math.inf), 4, 5, 3, r"values hold NaN or \+inf"),
    "id out of range": (_set("ids", (9, 0), 1000), 9, 6, 1, r"ids holds id 1000 outside"),
    "negative id": (_set("ids", (1, 0), -7), 1, 5, 0, r"ids holds id -7 outside \[0, 1000\)"),
    "duplicate id": (_duplicate, 3, 5, 2, r"ids holds id \d+ twice"),
    "+inf lse": (_set("lse", 8, math.inf), 8, 6, 0, r"lse is not finite"),
    "NaN label": (_set("label_value", 0, math.nan), 0, 4, 0, r"label value is not finite"),
    # Finite everywhere, but T_c * (value + lse) overflows fp32: only the decoded logit shows it.
    "logit overflow": (_set("lse", 5, 3e38), 5, 5, 4, r"teacher logit .* is not finite"),
    "counts": (_set("sampled_counts", (6, 0), 0), 6, 5, 5, r"sampled_counts are not >= 1"),
    "weights sum": (_set("sampled_counts", (7, 0), 9), 7, 5, 6, r"sampled_counts do not sum"),
}


@pytest.mark.parametrize("case", list(POISON))
def test_reader_refuses_poisoned_rows_of_a_resigned_shard(cache, case):
    edit, row, seq, token, message = POISON[case]
    rewrite_tensors(cache, SHARD1, edit)
    where = ROW.format(row=row, seq=seq, token=token)
    sampled = case in ("counts", "weights sum")
    for options in ({}, {"verify_checksums": False}):
        reader = CacheReader(cache, **options)
        target = reader.sampled_target if sampled else reader.topk_target
        target([0, 1, 2, 3])  # shard 0 is intact
        with pytest.raises(CacheError, match=rf"^{SHARD1}: {where}: {message}"):
            target([6, 2, 5, 0, 4])  # out of order: the error still names the shard row
    with pytest.raises(CacheError, match=rf"^{SHARD1}: {where}: {message}"):
        CacheReader(cache).verify()
    with pytest.raises(CacheError, match=rf"^{SHARD1}: {where}: {message}"):
        verify_cache(cache)


def test_shard_changed_under_its_memory_map_is_refused(cache):
    """The checksum is checked once, when the shard is mapped; the value checks run on every
    batch, so bytes overwritten in place afterwards still cannot reach the loss."""
    reader = CacheReader(cache)
    reader.topk_target([4, 5])
    path = cache / SHARD1
    header, _ = split_shard(path.read_bytes())
    data_start = 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]
    begin = header["values"]["data_offsets"][0]
    with open(path, "r+b") as handle:  # bf16 NaN at row 0, slot 0
        handle.seek(data_start + begin)
        handle.write(struct.pack("<H", 0x7FC0))
    with pytest.raises(CacheError, match=rf"^{SHARD1}: {ROW.format(row=0, seq=4, token=0)}"):
        reader.topk_target([4, 5])


def test_verify_method_for_the_kd_stage(cache, monkeypatch):
    """``CacheReader.verify``: one full check, after which batches are not re-hashed."""
    reader = CacheReader(cache)
    summary = reader.verify()
    assert summary["tokens"] == sum(LENGTHS) and summary["shards"] == len(reader.manifest.shards)
    hashed = []
    monkeypatch.setattr(
        "pangu_fastkd.cache.shards.sha256_fd", lambda fd: hashed.append(fd) or "0" * 64
    )
    reader.topk_target(range(len(LENGTHS)))
    assert hashed == []


# ---------------------------------------------------------------------------------------------
# 3. Ids never wrap when narrowed


def test_vocab_beyond_int32_is_refused():
    """Ids are int32 at most: with V = 2**32 + 2, id 2**32 + 1 used to be stored as 1."""
    with pytest.raises(
        ValueError, match=r"vocab_size must be <= 2\*\*31 \(2147483648\), got 4294967298"
    ):
        make_spec(vocab_size=(1 << 32) + 2)
    with pytest.raises(ValueError, match=r"sampled_draws must be <= 2\*\*31 - 1"):
        make_spec(sampled_k=2, sampled_draws=1 << 32)


def test_resigned_manifest_with_a_huge_vocab_is_refused(cache):
    def edit(manifest: dict) -> None:
        manifest["spec"]["vocab_size"] = (1 << 32) + 2
        manifest["id_encoding"] = "int32"

    resign(cache, edit)
    assert_refused(cache, r"manifest\.json: invalid spec: vocab_size must be <= 2\*\*31")


@pytest.mark.parametrize(
    ("value", "encoding", "shown"),
    [
        ((1 << 32) + 1, "int32", "4294967297"),
        (1 << 31, "int32", "2147483648"),
        ((1 << 32) - 1, "int32", "4294967295"),
        (1 << 15, "int16", "32768"),
        ((1 << 16) - 1, "int16", "65535"),
        (1 << 24, "uint24", "16777216"),
        (-2, "int32", "-2"),
    ],
)
def test_encode_ids_range_checks_before_narrowing(value, encoding, shown):
    with pytest.raises(ValueError, match=rf"^id {shown} does not fit the {encoding} id encoding"):
        encode_ids(torch.tensor([[0, value]]), encoding)


def test_ids_at_the_int32_limit_verify_and_read_back(tmp_path):
    """V = 2**31: ids up to 2**31 - 1 are valid int32. Comparing int32 ids with V used to wrap
    V to -2**31, so every id was 'outside [0, V)'."""
    spec = make_spec(vocab_size=1 << 31)
    written = write_cache(tmp_path, spec, (3, 2))
    assert verify_cache(tmp_path)["vocab_size"] == 1 << 31
    ids = CacheReader(tmp_path).topk_target([0, 1]).ids
    assert torch.equal(ids, torch.cat([s.topk_ids for s in written]).to(torch.int32))
    assert int(ids.max()) == (1 << 31) - 1


@pytest.mark.parametrize(
    ("dtype", "value", "shown"),
    [
        (torch.int64, (1 << 32) + 1, "4294967297"),
        (torch.int64, 1 << 31, "2147483648"),
        (torch.uint64, (1 << 64) - 1, "18446744073709551615"),  # used to become -1: empty
        (torch.uint64, (1 << 32) + 1, "4294967297"),
        (torch.uint32, (1 << 31), "2147483648"),
    ],
)
def test_writer_reports_wide_ids_exactly(tmp_path, dtype, value, shown):
    spec = make_spec()
    scores = sample_scores(0, 3, spec)
    wide = torch.arange(1, 13).reshape(3, 4).to(dtype)  # no empty slot: unsigned has no -1
    wide[2, 1] = torch.tensor(value, dtype=torch.uint64 if value >= 1 << 63 else torch.int64).to(
        dtype
    )
    writer = CacheWriter(tmp_path, spec, ["doc-0"])
    with pytest.raises(ValueError, match=rf"topk_ids row 2 holds id {shown}, expected -1"):
        writer.add(dataclasses.replace(scores, topk_ids=wide))


# ---------------------------------------------------------------------------------------------
# 4. Crafted shard headers


def _header_case(edit: Callable[[dict, bytes], tuple]) -> Callable[[bytes], bytes]:
    def craft(data: bytes) -> bytes:
        header, body = split_shard(data)
        return join_shard(*edit(header, body))

    return craft


def _shift(name: str, delta: int):
    def edit(header, body):
        header[name]["data_offsets"] = [o + delta for o in header[name]["data_offsets"]]
        return header, body

    return edit


def _alias_values_to_ids(header, body):
    header["values"]["data_offsets"] = list(header["ids"]["data_offsets"])
    return header, body


def _field(name: str, key: str, value):
    def edit(header, body):
        header[name][key] = value
        return header, body

    return edit


def _raw_shape(text: str):
    """Replace the shape of ``lse`` by raw JSON text (``1e400`` cannot be a Python value)."""

    def craft(data: bytes) -> bytes:
        header, body = split_shard(data)
        header["lse"]["shape"] = "SHAPE"
        return join_shard(json.dumps(header).replace('"SHAPE"', text), body)

    return craft


def _nested(data: bytes) -> bytes:
    _, body = split_shard(data)
    return join_shard("{" + '"a":' + "[" * 100_000 + "]" * 100_000 + "}", body)


def _deep_metadata(data: bytes) -> bytes:
    header, body = split_shard(data)
    header["__metadata__"]["pangu_fastkd.cache"] = "[" * 100_000 + "]" * 100_000
    return join_shard(header, body)


def _huge_length(data: bytes) -> bytes:
    header, body = split_shard(data)
    return join_shard(header, body, length=(1 << 63) + 5)


def _padded(data: bytes) -> bytes:
    header, body = split_shard(data)
    return join_shard(header, body + b"\0" * 8)


def _duplicate_key(data: bytes) -> bytes:
    header, body = split_shard(data)
    text = json.dumps(header)
    entry = json.dumps({"lse": header["lse"]})[1:-1]
    return join_shard(text[:-1] + ", " + entry + "}", body)


HEADERS = {
    "lse +2 bytes": (_header_case(_shift("lse", 2)), r"tensor 'lse' starts at data byte"),
    "lse -2 bytes": (_header_case(_shift("lse", -2)), r"overlaps the previous tensor"),
    "values at the ids' offsets": (
        _header_case(_alias_values_to_ids),
        r"starts at data byte \d+, expected \d+: it (overlaps the previous tensor|leaves a gap)",
    ),
    "1e400 in a shape": (_raw_shape("[1e400]"), r"tensor 'lse' has shape \[inf\]"),
    "negative shape": (_header_case(_field("lse", "shape", [-1])), r"has shape \[-1\]"),
    "float offsets": (
        _header_case(_field("lse", "data_offsets", [0.0, 4.0])),
        r"data_offsets \[0\.0, 4\.0\]",
    ),
    "unknown dtype": (_header_case(_field("lse", "dtype", "F128")), r"unknown dtype 'F128'"),
    "100,000 nested [": (_nested, r"nests too deeply"),
    "deeply nested metadata": (_deep_metadata, r"shard metadata: JSON nests too deeply"),
    "huge header length": (_huge_length, r"header length 9223372036854775813 exceeds"),
    "padding after the data": (_padded, r"the tensors end at data byte"),
    "repeated key": (_duplicate_key, r"key 'lse' occurs twice"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_crafted_header_is_a_named_cache_error(cache, case):
    craft, message = HEADERS[case]
    record_shard(cache, SHARD1, craft((cache / SHARD1).read_bytes()))
    assert_refused(cache, rf"^{SHARD1}: .*{message}")


@pytest.mark.parametrize(
    "text",
    [
        '{"format_version": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"format_version": 1, "x": NaN}',
        '{"format_version": 1, "x": ' + "9" * 5000 + "}",
        '{"format_version": 1, "format_version": 1}',
    ],
    ids=["nested", "NaN", "5000 digits", "repeated key"],
)
def test_crafted_manifest_is_a_named_cache_error(cache, text):
    (cache / "manifest.json").write_text(text)
    assert_refused(cache, r"manifest\.json: (not valid JSON|JSON nests)")


# ---------------------------------------------------------------------------------------------
# 5. finalize re-hashes what it vouches for


def test_finalize_refuses_a_shard_altered_after_commit(tmp_path):
    spec = make_spec()
    ids = [f"doc-{i}" for i in range(len(LENGTHS))]
    with CacheWriter(tmp_path, spec, ids, shard_tokens=9) as writer:
        while (i := writer.next_sequence) is not None:
            writer.add(sample_scores(i, LENGTHS[i], spec))
    path = tmp_path / SHARD1
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # same size, header intact: only the sha256 tells
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=rf"^{SHARD1}: sha256 does not match the one recorded"):
        finalize_cache(tmp_path)
    assert not (tmp_path / "manifest.json").exists()


def test_a_clean_cache_still_reads_and_verifies(cache):
    assert verify_cache(cache)["tokens"] == sum(LENGTHS)
    assert CacheReader(cache).verify()["tokens"] == sum(LENGTHS)
    read_everything(cache)
