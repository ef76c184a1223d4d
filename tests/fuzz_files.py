"""Fuzz probes of the files a user hands the toolkit: a logit cache, data files, configs.

Each of these comes from outside the process (a teacher's cache copied from another machine, a
dataset from the internet, a hand-edited config), so each reader must turn every damaged or
hostile input into its one documented error, naming the file (and line, or config path), never
a traceback of another type, a hang or a silent acceptance:

- ``cache``: a real small cache written by the package's own writer (five of them: codec v1
  with int16 ids and sampled targets, v1 with 3-byte ids and fp32 values over two ranks; codec
  v2 with Elias-Fano ids and sampled targets, v2 with packed 17-bit ids and 7-bit codes over two
  ranks, v2 with Elias-Fano ids that have no low part), damaged one way per case on a fresh
  copy: bytes flipped, cut or appended, shards deleted, swapped, renamed or replaced by links,
  directories and FIFOs, and, re-signed the way an attacker would (the manifest's checksum is
  its own sha256), manifest fields, shard headers, shard metadata and stored values (v1's ids
  and float values; v2's unary and low id parts, packed id fields, codes and top-K mass), or
  the whole cache re-labelled for another codec. What the codec decides on is probed on both
  codecs. ``verify_cache`` and a ``CacheReader`` read the way the KD stage reads
  (``targets_for_batch`` per document with the data's ids and counts) must both raise
  ``CacheError``; valid variants (re-signed without change, key order, whitespace) of every
  pristine cache must verify and read back exactly.
- ``data``: generated JSONL files for ``read_jsonl`` (valid ones must parse to the expected
  ``Example`` list; every bad line must be a ``RecordError`` starting ``<file>:<line>:``) and
  Hugging Face tokenizer directories for ``load_tokenizer`` (a ``ValueError`` naming the file).
- ``config``: the shipped configs mutated (values out of their declared range, wrong types,
  bad names and references, unknown or missing keys, changed stage kinds, 10,000-deep nesting)
  through all three ways in (``config_from_dict``, a TOML file for ``load_config``, ``--set``
  overrides), bad override strings, corrupted TOML text and corrupted saved ``config.json``:
  a ``ConfigError`` naming the config path.

Every mutation is chosen to be certainly wrong, so "silently accepted" is a finding; the few
random corruptions whose validity cannot be known (bytes flipped in TOML text, or in a shard's
data under a re-signed manifest) accept either success or the documented error (for a shard:
the same verdict from ``verify_cache`` and the reader). ``PANGU_FUZZ_SCALE`` multiplies the
number of random cases.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fuzz_harness import Case
from test_cache import LENGTHS, _check_sampled, _check_topk, make_spec, sample_scores, write_cache
from test_cache_hardening import join_shard, record_shard, resign, rewrite_tensors, split_shard

from pangu_fastkd.cache import CacheError, CacheReader, CacheSpec, verify_cache
from pangu_fastkd.cache.manifest import read_manifest
from pangu_fastkd.cache.shards import expected_shard_tensors, shard_codec_metadata, shard_name
from pangu_fastkd.cache.spec import decode_ids, encode_ids
from pangu_fastkd.data.records import Example, Message, RecordError, read_jsonl
from pangu_fastkd.data.tokenizer import load_tokenizer
from pangu_fastkd.train.bounds import Range, range_of
from pangu_fastkd.train.config import (
    CONFIG_DIR,
    ConfigError,
    config_from_dict,
    load_config,
    load_saved_config,
)
from pangu_fastkd.train.stages import STAGE_KINDS

CATEGORIES = ("cache", "data", "config")
SCALE = float(os.environ.get("PANGU_FUZZ_SCALE", "1"))
# Deeper than any recursive parser goes (json, tomllib, serde_json).
DEEP = 10_000
# Deeper than the cache's JSON (32) and the config's (32) nesting limits, shallow enough for
# json.dumps to write it when re-signing.
OVER_LIMIT = 40


def scaled(count: int) -> int:
    """``count`` random cases at ``PANGU_FUZZ_SCALE``."""
    return max(1, round(count * SCALE))


def deep_list(depth: int) -> list:
    """``[[[...]]]`` nested ``depth`` levels, built without recursion."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def deep_text(depth: int, opening: str = "[", closing: str = "]") -> str:
    return opening * depth + closing * depth


def pick(items: list, fraction: float) -> Any:
    """The item at ``fraction`` (in [0, 1)) of ``items``: a choice drawn when the case was
    built, resolved against what the file holds when it runs."""
    return items[min(int(fraction * len(items)), len(items) - 1)]


def remove(path: Path) -> None:
    """Delete a file, link, FIFO or directory tree (never following links)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def expect_named(run: Callable[[], Any], pattern_of: Callable[[], str]) -> Callable[[], None]:
    """``run``, whose error must also match the pattern ``pattern_of()`` gives once it ran (the
    damaged file's name, known only after the damage was applied)."""

    def probe() -> None:
        try:
            run()
        except CacheError as err:
            pattern = pattern_of()
            if not re.search(pattern, str(err)):
                raise AssertionError(f"CacheError does not name {pattern!r}: {err}") from None
            raise

    return probe


# =============================================================================================
# cache: five tiny pristine caches, written once per child process by the package's own writer


@dataclass(frozen=True)
class Pristine:
    """A small cache as the writer makes it, and what it holds."""

    name: str  # its codec and id encoding, which name its cases
    spec_fields: tuple[tuple[str, Any], ...]
    lengths: tuple[int, ...]
    shard_tokens: int
    world_size: int

    @property
    def spec(self) -> CacheSpec:
        return _spec_of(self.spec_fields)

    @property
    def ids(self) -> list[str]:
        return [f"doc-{i}" for i in range(len(self.lengths))]

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return ("topk", "sampled") if self.spec.sampled_k else ("topk",)


@functools.cache
def _spec_of(fields: tuple[tuple[str, Any], ...]) -> CacheSpec:
    return make_spec(**dict(fields))


PRISTINES = (
    Pristine("int16", (("sampled_k", 3), ("sampled_draws", 12)), LENGTHS, 9, 1),
    Pristine(
        "uint24",
        (("vocab_size", 50_000), ("k", 5), ("value_dtype", "fp32")),
        (3, 6, 0, 2, 5, 1),
        4,
        2,
    ),
    # L = 7 low bits per id, 11 unary bits (2 bytes, 5 of padding), 6-bit codes, 10-bit sampled ids.
    Pristine("v2", (("codec", "v2"), ("sampled_k", 3), ("sampled_draws", 12)), LENGTHS, 9, 1),
    # Odd widths: 17-bit ids, 7-bit codes; int16 sampled counts.
    Pristine(
        "v2-packed",
        (
            ("codec", "v2"),
            ("id_coding", "packed"),
            ("vocab_size", 70_000),
            ("k", 5),
            ("value_bits", 7),
            ("sampled_k", 2),
            ("sampled_draws", 300),
        ),
        (3, 6, 0, 2, 5, 1),
        4,
        2,
    ),
    # V < 2K: L = 0, no id_low tensor; the unary part alone holds the ids.
    Pristine(
        "v2-no-id-low",
        (("codec", "v2"), ("vocab_size", 12), ("k", 8), ("value_bits", 7)),
        (4, 0, 6, 2, 3),
        5,
        1,
    ),
)
# The pristine caches of each codec (``cache_damages`` says which damages draw from each).
FAMILIES = {
    codec: tuple(kind for kind in PRISTINES if kind.spec.codec == codec) for codec in ("v1", "v2")
}
MANIFEST = r"manifest\.json"
SHARD = r"shard-r\d{3}-\d{5}\.safetensors"
ANY_FILE = rf"{MANIFEST}|{SHARD}"


def pristine_dir(kind: Pristine, workdir: Path) -> Path:
    """The pristine cache of ``kind``, written on first use; a child restarted after a crash
    finds it in place (it appears only once complete)."""
    path = workdir / f"pristine-{kind.name}"
    if not (path / "manifest.json").is_file():
        staging = workdir / f"pristine-{kind.name}.{os.getpid()}"
        remove(staging)
        write_cache(
            staging,
            kind.spec,
            kind.lengths,
            shard_tokens=kind.shard_tokens,
            world_size=kind.world_size,
        )
        remove(path)
        staging.rename(path)
    return path


@functools.cache
def pristine_files(kind: Pristine, workdir: Path) -> dict[str, bytes]:
    """Name -> bytes of every file of the pristine cache of ``kind``."""
    return {path.name: path.read_bytes() for path in sorted(pristine_dir(kind, workdir).iterdir())}


def fresh_copy(kind: Pristine, workdir: Path) -> Path:
    """A copy of the pristine cache to damage, and an empty ``workdir/outside``.

    The directories are kept from case to case, their entries removed and the pristine files
    written anew (new inodes, as a copy makes them): removing a directory took about 2 ms on
    the ext4 of a shared VM, more than most cases take, and truncating a file to rewrite it in
    place 1.6 ms, against 0.1 ms to create one.
    """
    directory = workdir / "case"
    emptied(directory)
    for name, data in pristine_files(kind, workdir).items():
        (directory / name).write_bytes(data)
    emptied(workdir / "outside")
    return directory


def emptied(directory: Path) -> None:
    """Make ``directory`` an empty directory (not a link), keeping it if it is one."""
    if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
        directory.unlink()
    directory.mkdir(exist_ok=True)
    with os.scandir(directory) as entries:
        paths = [entry.path for entry in entries]
    for path in paths:
        remove(Path(path))


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("shard-*.safetensors"))


def read_like_the_kd_stage(directory: Path, kind: Pristine, **options: Any) -> list:
    """Every document's targets, one batch each, of every target kind, through
    ``targets_for_batch`` with the ids and supervised counts the data has (as the KD stage's
    loop asks for them)."""
    reader = CacheReader(directory, **options)
    try:
        return [
            reader.targets_for_batch([doc], [count], target_kind)
            for doc, count in zip(kind.ids, kind.lengths, strict=True)
            for target_kind in kind.target_kinds
        ]
    finally:
        reader.close()


def same_target(a: Any, b: Any) -> bool:
    """Two targets with equal tensors (bit for bit) and equal temperature."""
    if type(a) is not type(b):
        return False
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        equal = torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
        if not equal:
            return False
    return True


@functools.cache
def reference_targets(kind: Pristine, workdir: Path) -> tuple:
    """What the pristine cache serves, after checking it against what the writer was handed
    (``test_cache``'s oracle: the value dtype's rounding of the log-probs, the rest exact)."""
    got = read_like_the_kd_stage(pristine_dir(kind, workdir), kind)
    spec = kind.spec
    per_doc = len(kind.target_kinds)
    for i, n in enumerate(kind.lengths):
        if n == 0:  # no rows to compare (and the oracle takes the max of its errors)
            continue
        scores = [sample_scores(i, n, spec)]
        _check_topk(got[per_doc * i], scores, spec)
        if spec.sampled_k:
            _check_sampled(got[per_doc * i + 1], scores, spec)
    return tuple(got)


def check_intact(directory: Path, kind: Pristine, workdir: Path) -> None:
    """The cache verifies and serves exactly what the pristine one serves."""
    summary = verify_cache(directory)
    assert summary["tokens"] == sum(kind.lengths), summary
    assert summary["sequences"] == len(kind.lengths), summary
    got = read_like_the_kd_stage(directory, kind)
    expected = reference_targets(kind, workdir)
    assert len(got) == len(expected), (len(got), len(expected))
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert same_target(a, b), f"target {i} differs from the pristine cache's"


# ---------------------------------------------------------------------------------------------
# cache: damages. ``apply(directory, workdir)`` damages a fresh copy and returns a pattern the
# error must match (the damaged file's name).

Apply = Callable[[Path, Path], str]


@dataclass(frozen=True)
class Damage:
    """One way to damage a fresh copy of a pristine cache.

    ``resigned``: the manifest vouches for the damage (sizes, sha256s, checksum recomputed), so
    the reader that does not hash shards (ranks other than 0 in the KD stage) must refuse it too.
    """

    name: str
    kind: Pristine
    apply: Apply
    resigned: bool = False


def damage_cases(damage: Damage, workdir: Path) -> list[Case]:
    """Cases of one damage: ``verify_cache``, and a read as the KD stage reads."""
    named: dict[str, str] = {}

    def damaged() -> Path:
        directory = fresh_copy(damage.kind, workdir)
        named["pattern"] = damage.apply(directory, workdir)
        return directory

    def pattern() -> str:
        return named["pattern"]

    probes = {
        "verify": lambda: verify_cache(damaged()),
        "read": lambda: read_like_the_kd_stage(damaged(), damage.kind),
    }
    if damage.resigned:
        probes["read-unhashed"] = lambda: read_like_the_kd_stage(
            damaged(), damage.kind, verify_checksums=False
        )
    return [
        Case(f"{damage.name}-{how}", expect_named(run, pattern), (CacheError,))
        for how, run in probes.items()
    ]


def _shard_at(directory: Path, fraction: float) -> Path:
    return pick(shard_paths(directory), fraction)


def _non_blank_offsets(data: bytes) -> list[int]:
    return [i for i, byte in enumerate(data) if byte not in b" \t\r\n"]


def byte_damages(rng: random.Random, kind: Pristine, i: int) -> Iterator[Damage]:
    """Bytes flipped, cut off or appended, in a shard or the manifest (not re-signed)."""
    which, where, mask = rng.random(), rng.random(), rng.randrange(1, 256)
    tail = bytes([rng.choice(b"x{}[]0,\x00\xff")]) + rng.randbytes(rng.randrange(0, 64))
    prefix = f"cache-{kind.name}"

    def flip_shard(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        data = bytearray(path.read_bytes())
        data[int(where * len(data))] ^= mask
        path.write_bytes(bytes(data))
        return re.escape(path.name)

    def cut_shard(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        data = path.read_bytes()
        path.write_bytes(data[: int(where * len(data))])
        return re.escape(path.name)

    def append_shard(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        path.write_bytes(path.read_bytes() + tail)
        return re.escape(path.name)

    def flip_manifest(directory: Path, _workdir: Path) -> str:
        # Not whitespace: a space turned into a newline is the same JSON, and rightly accepted.
        path = directory / "manifest.json"
        data = bytearray(path.read_bytes())
        data[pick(_non_blank_offsets(data), where)] ^= mask
        path.write_bytes(bytes(data))
        return MANIFEST

    def cut_manifest(directory: Path, _workdir: Path) -> str:
        # At least the closing brace goes (the trailing newline alone is no damage).
        path = directory / "manifest.json"
        data = path.read_bytes()
        path.write_bytes(data[: int(where * (len(data) - 1))])
        return MANIFEST

    def append_manifest(directory: Path, _workdir: Path) -> str:
        path = directory / "manifest.json"
        path.write_bytes(path.read_bytes() + tail)
        return MANIFEST

    for label, apply in (
        ("shard-byte-flip", flip_shard),
        ("shard-truncated", cut_shard),
        ("shard-appended", append_shard),
        ("manifest-byte-flip", flip_manifest),
        ("manifest-truncated", cut_manifest),
        ("manifest-appended", append_manifest),
    ):
        yield Damage(f"{prefix}-{label}-{i}", kind, apply)


def _other_kind(kind: Pristine, which: float) -> Pristine:
    """Another pristine cache: of the same codec or of the other one."""
    return pick([other for other in PRISTINES if other is not kind], which)


def _copy_resigned(source: Path, target: Path, directory: Path) -> None:
    record_shard(directory, target.name, source.read_bytes())


def file_damages(kind: Pristine, which: float) -> dict[str, Apply]:
    """Shards and the manifest deleted, swapped, copied, renamed, replaced by something that is
    not a regular file of the directory (link, directory, FIFO)."""

    def two_shards(directory: Path) -> tuple[Path, Path]:
        paths = shard_paths(directory)
        a = pick(paths, which)
        return a, next(p for p in paths if p != a)

    def deleted(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        path.unlink()
        return re.escape(path.name)

    def renamed(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        path.rename(directory / shard_name(0, 99))
        return re.escape(path.name)

    def swapped(directory: Path, _workdir: Path) -> str:
        a, b = two_shards(directory)
        data_a, data_b = a.read_bytes(), b.read_bytes()
        a.write_bytes(data_b)
        b.write_bytes(data_a)
        return SHARD

    def swapped_resigned(directory: Path, _workdir: Path) -> str:
        a, b = two_shards(directory)
        data_a, data_b = a.read_bytes(), b.read_bytes()
        record_shard(directory, a.name, data_b)
        record_shard(directory, b.name, data_a)
        return SHARD

    def duplicated(directory: Path, _workdir: Path) -> str:
        a, b = two_shards(directory)
        shutil.copyfile(b, a)
        return re.escape(a.name)

    def duplicated_resigned(directory: Path, _workdir: Path) -> str:
        a, b = two_shards(directory)
        _copy_resigned(b, a, directory)
        return re.escape(a.name)

    def foreign_resigned(directory: Path, workdir: Path) -> str:
        # A shard of the same name from another cache (other spec), vouched for by the manifest.
        path = shard_paths(directory)[0]
        other = pristine_dir(_other_kind(kind, which), workdir)
        _copy_resigned(other / path.name, path, directory)
        return re.escape(path.name)

    def shard_replaced(make: Callable[[Path, Path], None]) -> Apply:
        def apply(directory: Path, workdir: Path) -> str:
            path = _shard_at(directory, which)
            make(path, workdir / "outside")
            return re.escape(path.name)

        return apply

    def manifest_replaced(make: Callable[[Path, Path], None]) -> Apply:
        def apply(directory: Path, workdir: Path) -> str:
            make(directory / "manifest.json", workdir / "outside")
            return MANIFEST

        return apply

    def link_outside(path: Path, outside: Path) -> None:
        # A byte-identical copy, outside the directory: only the link itself is wrong.
        shutil.move(path, outside / path.name)
        path.symlink_to(outside / path.name)

    def link_dangling(path: Path, outside: Path) -> None:
        path.unlink()
        path.symlink_to(outside / "nothing-here")

    def link_device(path: Path, _outside: Path) -> None:
        path.unlink()
        path.symlink_to("/dev/zero")

    def link_sibling(path: Path, _outside: Path) -> None:
        sibling = next(p for p in shard_paths(path.parent) if p != path)
        path.unlink()
        path.symlink_to(sibling.name)

    def directory_instead(path: Path, _outside: Path) -> None:
        path.unlink()
        path.mkdir()

    def fifo_instead(path: Path, _outside: Path) -> None:
        # Opening a FIFO for reading blocks until a writer comes: none ever will.
        path.unlink()
        os.mkfifo(path)

    def emptied(path: Path, _outside: Path) -> None:
        path.write_bytes(b"")

    def gone(path: Path, _outside: Path) -> None:
        path.unlink()

    return {
        "shard-deleted": deleted,
        "shard-renamed": renamed,
        "shards-swapped": swapped,
        "shards-swapped-resigned": swapped_resigned,
        "shard-duplicated": duplicated,
        "shard-duplicated-resigned": duplicated_resigned,
        "shard-foreign-resigned": foreign_resigned,
        "shard-symlink-outside": shard_replaced(link_outside),
        "shard-symlink-dangling": shard_replaced(link_dangling),
        "shard-symlink-dev-zero": shard_replaced(link_device),
        "shard-symlink-sibling": shard_replaced(link_sibling),
        "shard-directory": shard_replaced(directory_instead),
        "shard-fifo": shard_replaced(fifo_instead),
        "manifest-symlink-outside": manifest_replaced(link_outside),
        "manifest-fifo": manifest_replaced(fifo_instead),
        "manifest-directory": manifest_replaced(directory_instead),
        "manifest-empty": manifest_replaced(emptied),
        "manifest-deleted": manifest_replaced(gone),
    }


# ---------------------------------------------------------------------------------------------
# cache: manifest fields edited and re-signed. A slot is a place in the manifest and the values
# certainly wrong there; ``locate(manifest, fraction)`` resolves the place against the file.

JUNK = [None, "x", "", [], {}, [1, 2], {"a": 1}, True, False, 1.5]


def changed_ints(n: int) -> list:
    """Values other than ``n`` for a field the reader checks exactly (a count, an offset, a
    format version): other ints, the same number as another type, huge ints, junk."""
    other_ints = [n + 1, n - 1, -n - 1, n + 1000, 10**30, -(10**30), 2**64]
    retyped = [float(n), str(n), [n], {"n": n}]
    return [*other_ints, *retyped, True, False, None, deep_list(OVER_LIMIT)]


def _bad_vocab(vocab: int, manifest: dict) -> list:
    # Row 0 of every sequence holds id V - 1, so any vocabulary up to V - 1 is too small.
    k = manifest["spec"]["k"]
    too_small = [vocab - 1, vocab // 2, k, k - 1, 0, -vocab]
    return [*too_small, 2**31 + 1, 10**30, float(vocab), "1000", True, None, []]


# The first entries of ``_bad_shard_names``, probed at every seed.
SHARD_NAME_PROBES = 12


def _bad_shard_names(name: str, manifest: dict) -> list:
    other = next((s["name"] for s in manifest["shards"] if s["name"] != name), name)
    rank = int(name[7:10])
    return [
        f"../outside/{name}",
        "@outside",  # the absolute path of a copy outside (filled in by the edit)
        f"./{name}",
        f"{name}/",
        name.upper(),
        name.replace(".safetensors", ".safetensors\x00"),
        f"shard-r{rank:03d}-1.safetensors",
        f"shard-r{rank:04d}-{int(name[11:16]):05d}.safetensors",
        f"shard-r{rank + 1:03d}-{int(name[11:16]):05d}.safetensors",
        shard_name(rank, 777),  # the writer's pattern, but no such file
        "shard-r٠٠٠-00000.safetensors",  # Arabic-Indic digits match \d, not [0-9]
        "../../../../etc/passwd",
        "manifest.json",
        "..",
        "",
        other,
        None,
        5,
        [],
    ]


def _bad_sha(sha: str, _manifest: dict) -> list:
    another_files = hashlib.sha256(b"").hexdigest()
    malformed = [sha.upper(), sha[:-1], sha + "0", " " + sha, "g" * 64, ""]
    return [another_files, *malformed, None, 0]


def _bad_ids(ids: list, _manifest: dict) -> list:
    wrong_length = [[], ids[:-1], [*ids, "extra"]]
    wrong_items = [[ids[0], *ids[:-1]], [*ids[:-1], 7], [*ids[:-1], None]]
    # Iterables whose items are as many distinct strings: a string of distinct letters, a dict.
    letters = "abcdefghijklmnopqrstuvwxyz"[: len(ids)]
    return [None, "x", {}, *wrong_length, *wrong_items, letters, dict.fromkeys(ids, 0)]


def _bad_counts(counts: list, _manifest: dict) -> list:
    values = [None, "x", {}, [], counts[:-1], [*counts, 0], [float(c) for c in counts]]
    values += [counts[::-1]] if counts != counts[::-1] else []
    return [*values, [True, *counts[1:]]]


def _bad_id(sequence_id: str, manifest: dict) -> list:
    other = next(s for s in manifest["sequence_ids"] if s != sequence_id)
    return [other, 5, None, [], {}, True]  # a repeated id, or not a string


def _bad_shards(shards: list, _manifest: dict) -> list:
    values = [None, {}, "x", [], shards[1:], shards[:-1], [*shards, shards[0]]]
    return values + ([shards[::-1]] if len(shards) > 1 else [])


def _bad_record(record: dict, _manifest: dict) -> list:
    without_sha = {k: v for k, v in record.items() if k != "sha256"}
    return [None, "x", [], 5, without_sha, {**record, "extra": 1}, {**record, "rank": None}]


def _bad_spec(spec: dict, _manifest: dict) -> list:
    without_k = {key: value for key, value in spec.items() if key != "k"}
    if "codec" in spec:  # v2: its codec fields dropped, or v1's field added
        v2_fields = ("codec", "value_bits", "id_coding")
        as_v1 = {key: value for key, value in spec.items() if key not in v2_fields}
        crossed = [as_v1, {**spec, "value_dtype": "bf16"}, {**spec, "codec": "v1"}]
    else:  # v1: v2's codec fields added (a v1 manifest has none)
        crossed = [{**spec, "codec": "v1"}, {**spec, "codec": "v2"}, {**spec, "value_bits": 6}]
    return [None, [], "x", 1, without_k, {**spec, "extra": 1}, {**spec, "K": spec["k"]}, *crossed]


def _bad_world(n: int, _manifest: dict) -> list:
    return [0, -1, -n, float(n), str(n), True, False, None, [], {}] + ([n - 1] if n > 1 else [])


def _bad_dtypes(dtypes: dict, _manifest: dict) -> list:
    first = next(iter(dtypes))
    changed = {**dtypes, first: "F64"}
    return [None, {}, "x", changed, {**dtypes, "extra": "U8"}, {first: dtypes[first]}]


def _bad_per_token(value: float, _manifest: dict) -> list:
    return [value * 2, value + 1, -value, int(value), None, "x", True, []]


def _other_strings(*options: str) -> Callable[[str, dict], list]:
    def bad(value: str, _manifest: dict) -> list:
        return [o for o in options if o != value] + [value.upper(), value + " ", "", None, 16, []]

    return bad


def _key(*path: Any) -> Callable[[dict, float], tuple]:
    return lambda _manifest, _fraction: path


def _item(list_key: str, *rest: Any) -> Callable[[dict, float], tuple]:
    """A path to item ``fraction`` of the manifest's list ``list_key``, then ``rest``."""

    def locate(manifest: dict, fraction: float) -> tuple:
        return (list_key, pick(list(range(len(manifest[list_key]))), fraction), *rest)

    return locate


def _shard_field(manifest: dict, fraction: float) -> tuple:
    fields = ("rank", "seq_start", "seq_stop", "num_tokens", "num_bytes")
    index = pick(list(range(len(manifest["shards"]))), fraction)
    return ("shards", index, fields[int(fraction * 997) % len(fields)])


def _fingerprint(_manifest: dict, fraction: float) -> tuple:
    keys = ("teacher_fingerprint", "tokenizer_fingerprint", "data_fingerprint")
    return ("spec", pick(list(keys), fraction))


MANIFEST_SLOTS: dict[str, tuple[Callable[[dict, float], tuple], Callable[[Any, dict], list]]] = {
    "format_version": (_key("format_version"), lambda n, _m: changed_ints(n)),
    "spec": (_key("spec"), _bad_spec),
    "spec-vocab_size": (_key("spec", "vocab_size"), _bad_vocab),
    "spec-k": (_key("spec", "k"), lambda n, _m: changed_ints(n)),
    "spec-temperature": (
        _key("spec", "temperature"),
        lambda _t, _m: [0, 0.0, -0.5, -1e300, "1.5", None, True, False, [], {}],
    ),
    "spec-fingerprint": (_fingerprint, lambda _v, _m: ["", 0, None, [], {}, True, 1.5]),
    "spec-label_conditioned": (
        _key("spec", "label_conditioned"),
        lambda _v, _m: [0, 1, "true", "False", None, [], {}],
    ),
    "spec-sampled_k": (_key("spec", "sampled_k"), lambda n, _m: changed_ints(n)),
    "spec-sampled_draws": (_key("spec", "sampled_draws"), lambda n, _m: changed_ints(n)),
    "spec-provenance": (
        _key("spec", "provenance"),
        lambda _v, _m: [None, "x", [], 1, True, {"deep": deep_list(OVER_LIMIT)}],
    ),
    "id_encoding": (
        _key("id_encoding"),
        _other_strings("int16", "uint24", "int32", "elias_fano", "packed"),
    ),
    "dtypes": (_key("dtypes"), _bad_dtypes),
    "world_size": (_key("world_size"), _bad_world),
    "num_sequences": (_key("num_sequences"), lambda n, _m: changed_ints(n)),
    "total_tokens": (_key("total_tokens"), lambda n, _m: changed_ints(n)),
    "total_bytes": (_key("total_bytes"), lambda n, _m: changed_ints(n)),
    "bytes_per_token": (_key("bytes_per_token"), _bad_per_token),
    "shards": (_key("shards"), _bad_shards),
    "shard-record": (_item("shards"), _bad_record),
    "shard-name": (_item("shards", "name"), _bad_shard_names),
    "shard-int-field": (_shard_field, lambda n, _m: changed_ints(n)),
    "shard-sha256": (_item("shards", "sha256"), _bad_sha),
    "sequence_ids": (_key("sequence_ids"), _bad_ids),
    "sequence-id": (_item("sequence_ids"), _bad_id),
    "token_counts": (_key("token_counts"), _bad_counts),
    "token-count": (_item("token_counts"), lambda n, _m: changed_ints(n)),
}
# The spec fields of one codec only (a v1 spec has no codec fields, a v2 spec no value_dtype).
CODEC_SLOTS: dict[str, dict[str, tuple[Callable[[dict, float], tuple], Callable]]] = {
    "v1": {
        "spec-value_dtype": (_key("spec", "value_dtype"), _other_strings("bf16", "fp16", "fp32")),
    },
    "v2": {
        "spec-codec": (_key("spec", "codec"), _other_strings("v1", "v2", "v3")),
        "spec-value_bits": (_key("spec", "value_bits"), lambda n, _m: [2, 17, *changed_ints(n)]),
        "spec-id_coding": (_key("spec", "id_coding"), _other_strings("elias_fano", "packed")),
    },
}


def manifest_slots(kind: Pristine) -> dict:
    """The manifest slots of ``kind``'s codec."""
    return {**MANIFEST_SLOTS, **CODEC_SLOTS[kind.spec.codec]}


UNKNOWN_KEYS = ("extra", "Checksum", "format_version ", "spec2", "", "shards\x00")
# Every key of the manifest but its checksum.
TOP_KEYS_TO_DROP = (
    "format_version spec id_encoding dtypes world_size num_sequences total_tokens total_bytes "
    "bytes_per_token shards sequence_ids token_counts"
).split()


def get_path(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data


def set_path(data: Any, path: tuple, value: Any) -> None:
    get_path(data, path[:-1])[path[-1]] = value


def manifest_edit(slot: str, fraction: float, choice: int) -> Apply:
    """Set the place ``slot`` names to one of its certainly-wrong values, and re-sign."""
    locate, bad_values = {**MANIFEST_SLOTS, **CODEC_SLOTS["v1"], **CODEC_SLOTS["v2"]}[slot]

    def apply(directory: Path, workdir: Path) -> str:
        def edit(manifest: dict) -> None:
            path = locate(manifest, fraction)
            original = get_path(manifest, path)
            values = bad_values(original, manifest)
            value = values[choice % len(values)]
            if value == "@outside":  # an absolute path to a byte-identical copy outside
                shutil.copy(directory / original, workdir / "outside" / original)
                value = str(workdir / "outside" / original)
            elif isinstance(value, str) and value.startswith("../outside/"):
                shutil.copy(directory / original, workdir / "outside" / original)
            set_path(manifest, path, value)

        resign(directory, edit)
        return ANY_FILE

    return apply


def manifest_unknown_key(key: str, value: Any) -> Apply:
    def apply(directory: Path, _workdir: Path) -> str:
        resign(directory, lambda manifest: manifest.__setitem__(key, value))
        return MANIFEST

    return apply


def manifest_dropped_key(key: str) -> Apply:
    def apply(directory: Path, _workdir: Path) -> str:
        resign(directory, lambda manifest: manifest.pop(key))
        return MANIFEST

    return apply


# Raw text no re-signing can hold: non-standard constants, floats that overflow, ints beyond
# Python's digit limit, nesting deeper than any parser, a repeated key.
RAW_VALUES = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e400",
    "-1e400",
    "9" * 5000,
    deep_text(100_000),
    deep_text(DEEP, '{"a":', "}"),
    '{"a": 1, "a": 1}',
)
RAW_SLOTS = (
    ("format_version",),
    ("spec", "k"),
    ("spec", "temperature"),
    ("spec", "provenance"),
    ("world_size",),
    ("total_tokens",),
    ("bytes_per_token",),
    ("token_counts", 0),
    ("shards", 0, "num_bytes"),
    ("sequence_ids", 0),
)
PLACEHOLDER = "@@fuzz-raw-value@@"


def manifest_raw(path: tuple, raw: str) -> Apply:
    """A value written as raw JSON text into a re-signed manifest."""

    def apply(directory: Path, _workdir: Path) -> str:
        resign(directory, lambda manifest: set_path(manifest, path, PLACEHOLDER))
        file = directory / "manifest.json"
        file.write_text(file.read_text().replace(json.dumps(PLACEHOLDER), raw))
        return MANIFEST

    return apply


# ---------------------------------------------------------------------------------------------
# cache: shard headers (the safetensors JSON) and the shard's own metadata, edited and re-signed

SAME_SIZE = {"I16": "F16", "U8": "I8", "F32": "I32", "BF16": "F16", "F16": "BF16", "I64": "F64"}
OTHER_SIZE = {"I16": "I32", "U8": "I16", "F32": "F64", "BF16": "F32", "F16": "F32", "I64": "I32"}
HEADER_LENGTHS = (2**63, 2**64 - 1, 0, 7, -8, 8, -1, 1 << 20 | 1)


def _tensor_names(header: dict) -> list[str]:
    return sorted(name for name in header if name != "__metadata__")


def _bad_shapes(entry: dict, _header: dict) -> list:
    shape = entry["shape"]
    malformed = [[-1], [[shape[0]]], [1.5], ["1"], [True], [2**49], [1] * 9, None, 5, "x"]
    other_layout = [[*shape, 1], [*shape[:-1], shape[-1] + 1]]
    return [*malformed, *other_layout, "@1e400"]


def _bad_offsets(entry: dict, header: dict) -> list:
    begin, end = entry["data_offsets"]
    other = next(e for n, e in header.items() if n != "__metadata__" and e is not entry)
    return [
        [begin + 1, end + 1],
        [max(begin - 1, 0), end - 1] if begin else [begin, end + 1],
        [begin, end + 1],
        [begin + 2**64, end + 2**64],
        [float(begin), float(end)],
        [str(begin), end],
        [begin],
        [begin, end, end],
        None,
        [-1, end - begin - 1],
        list(other["data_offsets"]),
        [end, begin] if end != begin else [begin, end + 8],
    ]


def _bad_dtypes_of(entry: dict, _header: dict) -> list:
    dtype = entry["dtype"]
    return [SAME_SIZE[dtype], OTHER_SIZE[dtype], "F128", dtype.lower(), "", None, 4, [dtype]]


def _bad_entries(entry: dict, _header: dict) -> list:
    keys = ("dtype", "shape", "data_offsets")
    without = [{k: v for k, v in entry.items() if k != key} for key in keys]
    return [None, "x", [], 5, *without, {**entry, "extra": 1}]


def _edit_entry(key: str, bad: Callable[[dict, dict], list]) -> Callable[[dict, str, int], bool]:
    """A header edit that sets ``key`` of the chosen tensor's entry (the whole entry for
    ``key=""``) to one of ``bad(entry, header)``; True when the shape must become ``[1e400]``,
    which only raw text can hold."""

    def edit(header: dict, name: str, choice: int) -> bool:
        options = bad(header[name], header)
        value = options[choice % len(options)]
        if value == "@1e400":
            return True
        if key:
            header[name][key] = value
        else:
            header[name] = value
        return False

    return edit


def _remove_entry(header: dict, name: str, _choice: int) -> bool:
    del header[name]
    return False


def _add_entry(header: dict, _name: str, choice: int) -> bool:
    end = max(e["data_offsets"][1] for n, e in header.items() if n != "__metadata__")
    at = (0, end)[choice % 2]  # an empty tensor tiles anywhere: only the layout check tells
    header["extra"] = {"dtype": "U8", "shape": [0], "data_offsets": [at, at]}
    return False


def _rename_entry(header: dict, name: str, choice: int) -> bool:
    header[(name.upper(), name + "_", "ids ", "seq_offsets2")[choice % 4]] = header.pop(name)
    return False


HEADER_EDITS = {
    "shape": _edit_entry("shape", _bad_shapes),
    "data_offsets": _edit_entry("data_offsets", _bad_offsets),
    "dtype": _edit_entry("dtype", _bad_dtypes_of),
    "entry": _edit_entry("", _bad_entries),
    "tensor-removed": _remove_entry,
    "tensor-added": _add_entry,
    "tensor-renamed": _rename_entry,
}


def header_edit(label: str, which: float, tensor: float, choice: int) -> Apply:
    """One tensor's header entry edited; the shard rewritten and re-signed."""

    def apply(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        header, body = split_shard(path.read_bytes())
        name = pick(_tensor_names(header), tensor)
        raw_shape = HEADER_EDITS[label](header, name, choice)
        text = json.dumps(header)
        if raw_shape:  # a shape of 1e400 (some tensor's: any of them is damage)
            text = text.replace(json.dumps(header[name]["shape"]), "[1e400]", 1)
        record_shard(directory, path.name, join_shard(text, body))
        return re.escape(path.name)

    return apply


def header_text(label: str, which: float, choice: int, junk: bytes) -> Apply:
    """The header's text or its length prefix replaced; the shard re-signed."""

    def apply(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        data = path.read_bytes()
        header, body = split_shard(data)
        text = json.dumps(header)
        if label == "length-prefix":
            real = len(data) - len(body) - 8
            delta = HEADER_LENGTHS[choice % len(HEADER_LENGTHS)]
            length = delta if delta > 8 or delta == 0 else real + delta
            shard = join_shard(text, body)
            shard = length.to_bytes(8, "little") + shard[8:]
        else:
            replacement = {
                "deep-array": '{"x": ' + deep_text(100_000) + "}",
                "deep-object": deep_text(DEEP, '{"a":', "}"),
                "not-an-object": ("[]", "null", "1", '"x"', deep_text(100_000))[choice % 5],
                "repeated-key": text[:-1] + ", " + json.dumps({"lse": header["lse"]})[1:],
                "garbage": junk,
                "invalid-utf8": text.replace('"lse"', '"ls\xff"').encode("latin-1"),
            }[label]
            shard = join_shard(replacement, body)
        record_shard(directory, path.name, shard)
        return re.escape(path.name)

    return apply


# Twice the length prefix: there are eight ways to get it wrong.
HEADER_TEXT_LABELS = (
    "length-prefix deep-array deep-object not-an-object repeated-key garbage invalid-utf8 "
    "length-prefix"
).split()
METADATA_KEY = "pangu_fastkd.cache"


# Every string a shard's metadata holds, of either codec.
METADATA_STRINGS = "int16 uint24 int32 bf16 fp16 fp32 v1 v2 elias_fano packed".split()


def _metadata_value(meta: dict, key: str, choice: int) -> Any:
    if isinstance(meta[key], str):
        options = [o for o in METADATA_STRINGS if o != meta[key]]
        options = [*options, meta[key].upper(), None, 5, ""]
        return options[choice % len(options)]
    values = changed_ints(meta[key])
    return values[choice % len(values)]


def _other_codec_metadata(spec: CacheSpec) -> dict:
    """What a shard of the other codec (same vocabulary and K) says about its encoding."""
    other = RECODINGS["v2-elias_fano-6" if spec.codec == "v1" else "v1-bf16"]
    return shard_codec_metadata(dataclasses.replace(spec, **other))


COMMON_METADATA_FIELDS = ("rank", "seq_start", "seq_stop", "format_version")
METADATA_FIELDS = {
    "v1": (*COMMON_METADATA_FIELDS, "id_encoding", "value_dtype"),
    "v2": (*COMMON_METADATA_FIELDS, "codec", "id_coding", "value_bits"),
}
# Beyond one field changed: a field dropped, the other codec's fields instead of its own.
METADATA_TARGETS = ("dropped", "other-codec", "text", "map")
METADATA_TEXTS = ("not json", "[]", "null", "", deep_text(DEEP), '{"rank": 0, "rank": 0}', "NaN")
METADATA_MAPS = (None, [], "x", 5, {METADATA_KEY: 5}, {}, {"other": "x"})


def metadata_edit(target: str, kind: Pristine, which: float, choice: int) -> Apply:
    """A field of the shard's own metadata changed (``target`` in ``METADATA_FIELDS``) or
    dropped (``"dropped"``), its codec fields replaced by the other codec's
    (``"other-codec"``), its JSON text replaced (``"text"``) or the ``__metadata__`` map
    broken (``"map"``); the shard re-signed."""

    def apply(directory: Path, _workdir: Path) -> str:
        path = _shard_at(directory, which)
        header, body = split_shard(path.read_bytes())
        if target == "text":
            header["__metadata__"][METADATA_KEY] = METADATA_TEXTS[choice % len(METADATA_TEXTS)]
        elif target == "map":
            header["__metadata__"] = METADATA_MAPS[choice % len(METADATA_MAPS)]
        else:
            meta = json.loads(header["__metadata__"][METADATA_KEY])
            if target == "dropped":
                del meta[sorted(meta)[choice % len(meta)]]
            elif target == "other-codec":  # under its own format version
                own = shard_codec_metadata(kind.spec)
                meta = {key: value for key, value in meta.items() if key not in own}
                meta.update(_other_codec_metadata(kind.spec))
                meta["format_version"] = own["format_version"]
            else:
                meta[target] = _metadata_value(meta, target, choice)
            header["__metadata__"][METADATA_KEY] = json.dumps(meta, sort_keys=True)
        record_shard(directory, path.name, join_shard(header, body))
        return re.escape(path.name)

    return apply


# ---------------------------------------------------------------------------------------------
# cache: the whole cache re-labelled for another codec, re-signed

# The codec fields a whole manifest may claim, rewritten consistently (format version, spec,
# id_encoding and dtypes as the package's own writer records them): only the shards' metadata
# and layout tell that they were written another way.
V1_FIELDS = {"codec": "v1", "value_bits": None, "id_coding": None}
V2_FIELDS = {"codec": "v2", "value_dtype": "bf16"}
RECODINGS = {
    "v1-bf16": {**V1_FIELDS, "value_dtype": "bf16"},
    "v1-fp32": {**V1_FIELDS, "value_dtype": "fp32"},
    "v2-elias_fano-6": {**V2_FIELDS, "value_bits": 6, "id_coding": "elias_fano"},
    "v2-elias_fano-7": {**V2_FIELDS, "value_bits": 7, "id_coding": "elias_fano"},
    "v2-packed-6": {**V2_FIELDS, "value_bits": 6, "id_coding": "packed"},
    "v2-packed-7": {**V2_FIELDS, "value_bits": 7, "id_coding": "packed"},
}


def recodings(kind: Pristine) -> list[str]:
    """The recodings that change ``kind``'s shard layout (a relabelled shard of the same layout
    would be another cache's, not certainly a damaged one)."""
    spec = kind.spec
    layout = expected_shard_tensors(spec)
    return [
        label
        for label, codec in RECODINGS.items()
        if expected_shard_tensors(dataclasses.replace(spec, **codec)) != layout
    ]


def manifest_recoded(label: str, relabel_shards: bool) -> Apply:
    """The manifest rewritten for the codec fields ``RECODINGS[label]`` as the package's own
    ``Manifest.to_json`` writes it (consistent and signed); with ``relabel_shards`` every
    shard's metadata too (re-signed), so that only the shards' layout tells."""

    def apply(directory: Path, _workdir: Path) -> str:
        manifest = read_manifest(directory)
        spec = dataclasses.replace(manifest.spec, **RECODINGS[label])
        if relabel_shards:
            own = shard_codec_metadata(manifest.spec)
            for record in manifest.shards:
                header, body = split_shard((directory / record.name).read_bytes())
                meta = json.loads(header["__metadata__"][METADATA_KEY])
                meta = {key: value for key, value in meta.items() if key not in own}
                meta.update(shard_codec_metadata(spec))
                header["__metadata__"][METADATA_KEY] = json.dumps(meta, sort_keys=True)
                record_shard(directory, record.name, join_shard(header, body))
            manifest = read_manifest(directory)
        recoded = dataclasses.replace(manifest, format_version=spec.format_version, spec=spec)
        (directory / "manifest.json").write_text(json.dumps(recoded.to_json()))
        return SHARD

    return apply


# ---------------------------------------------------------------------------------------------
# cache: stored values poisoned and re-signed (only the value checks stand in the way)


def _row_shard(directory: Path, fraction: float) -> str:
    """The name of shard ``fraction`` among those that hold rows."""
    shards = json.loads((directory / "manifest.json").read_text())["shards"]
    return pick([s["name"] for s in shards if s["num_tokens"] > 0], fraction)


def _stored_id(value: int, like: torch.Tensor) -> torch.Tensor | int:
    """``value`` as stored in v1 ids like ``like`` (3 little-endian bytes for uint24)."""
    if like.dtype == torch.uint8:
        return encode_ids(torch.tensor([[value]]), "uint24")[0, 0]
    return value


def _largest_stored_id(spec: CacheSpec) -> int:
    """The largest id the cache's id encoding stores that is not its empty slot."""
    if spec.codec == "v2":
        return (1 << spec.id_bits) - 2
    return {"int16": (1 << 15) - 1, "uint24": (1 << 24) - 2}[spec.id_encoding]


def _out_of_range_id(spec: CacheSpec, offset: int, top: int | None = None) -> int:
    """An id in ``[V, top]`` (by default up to the largest the id encoding stores)."""
    top = _largest_stored_id(spec) if top is None else top
    return spec.vocab_size + offset % (top - spec.vocab_size + 1)


Poison = Callable[[dict, int, int, Pristine], None]


def _poison_values(value: float) -> Poison:
    def poison(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
        tensors["values"][row, choice % kind.spec.k] = value

    return poison


def _poison_row_mass(tensors: dict, row: int, _choice: int, _kind: Pristine) -> None:
    tensors["values"][row, :] = 0.0  # K tokens of probability 1 each


def _poison_empty_slot(tensors: dict, row: int, _choice: int, _kind: Pristine) -> None:
    # Slot 0 holds the top logit (finite): an empty id there leaves a value without a token.
    ids = tensors["ids"]
    ids[row, 0] = 0xFF if ids.dtype == torch.uint8 else -1


def _poison_id_range(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
    ids = tensors["ids"]
    ids[row, choice % kind.spec.k] = _stored_id(_out_of_range_id(kind.spec, choice), ids)


def _poison_negative_id(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
    ids = tensors["ids"]
    if ids.dtype == torch.uint8:  # no negative ids in 3 bytes: the largest non-empty one
        ids[row, choice % kind.spec.k] = torch.tensor([0xFE, 0xFF, 0xFF], dtype=torch.uint8)
    else:
        ids[row, choice % kind.spec.k] = -2 - choice % 30000


def _poison_duplicate_id(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
    ids = tensors["ids"]
    ids[row, 1 + choice % (kind.spec.k - 2)] = ids[row, 0]  # slots 0..K-2 are never empty


def _poison_tensor(name: str, values: tuple[float, ...]) -> Poison:
    def poison(tensors: dict, row: int, choice: int, _kind: Pristine) -> None:
        tensors[name][row] = values[choice % len(values)]

    return poison


def _poison_offsets(tensors: dict, _row: int, choice: int, _kind: Pristine) -> None:
    offsets = tensors["seq_offsets"]
    offsets[choice % len(offsets)] += (1, -1, 1000)[choice % 3]


# v2's bit fields, edited with plain Python ints after docs/cache-format.md (not with the
# package's bitpack.py, whose reading is under test): field j of w bits is bits [j w, (j + 1) w)
# of the row, bit i being bit i mod 8 of byte i div 8. Elias-Fano: L = floor(log2(V / K)) low
# bits per id (0 when V <= K), high parts in a unary part of K + ((V - 1) >> L) bits.


def _fields(row: torch.Tensor, width: int, count: int) -> list[int]:
    """The first ``count`` ``width``-bit fields of a ``[bytes]`` uint8 row."""
    bits = int.from_bytes(bytes(row.tolist()), "little")
    return [(bits >> (j * width)) & ((1 << width) - 1) for j in range(count)]


def _set_fields(row: torch.Tensor, width: int, values: list[int]) -> None:
    """Overwrite the first ``len(values)`` fields of ``row`` in place (the other bits kept)."""
    bits = int.from_bytes(bytes(row.tolist()), "little")
    for j, value in enumerate(values):
        bits &= ~(((1 << width) - 1) << (j * width))
        bits |= value << (j * width)
    row.copy_(torch.tensor(list(bits.to_bytes(row.numel(), "little")), dtype=torch.uint8))


def _codes(tensors: dict, row: int, spec: CacheSpec) -> list[int]:
    return _fields(tensors["codes"][row], spec.value_bits, spec.k)


def _filled_slots(tensors: dict, row: int, spec: CacheSpec) -> int:
    """Slots of a row whose code is not the empty one (under elias_fano, the first ones)."""
    empty = (1 << spec.value_bits) - 1
    return sum(code != empty for code in _codes(tensors, row, spec))


def _low_bits(spec: CacheSpec) -> int:
    # floor(log2(x)) == floor(log2(floor(x))) for x >= 1: exact in integers.
    return (spec.vocab_size // spec.k).bit_length() - 1


def _high_bits(spec: CacheSpec) -> int:
    return spec.k + ((spec.vocab_size - 1) >> _low_bits(spec))


def _unary(tensors: dict, row: int) -> list[int]:
    """Every bit of a row's ``id_high``, padding included."""
    high = tensors["id_high"][row]
    return _fields(high, 1, 8 * high.numel())


def _ef_ids(tensors: dict, row: int, spec: CacheSpec) -> list[int]:
    """A well-formed Elias-Fano row's ids: entry j set unary bit ``(id_j >> L) + j``, its low
    ``L`` bits are field j of ``id_low``."""
    low_bits = _low_bits(spec)
    ones = [i for i, bit in enumerate(_unary(tensors, row)) if bit]
    low = _fields(tensors["id_low"][row], low_bits, spec.k) if low_bits else [0] * spec.k
    return [((position - j) << low_bits) | low[j] for j, position in enumerate(ones)]


def _set_ef_ids(tensors: dict, row: int, spec: CacheSpec, ids: list[int]) -> None:
    """Code ``ids`` (high parts non-decreasing, in the vocabulary or not) into a row."""
    low_bits = _low_bits(spec)
    unary = [0] * len(_unary(tensors, row))
    for j, value in enumerate(ids):
        unary[(value >> low_bits) + j] = 1
    _set_fields(tensors["id_high"][row], 1, unary)
    if low_bits:
        low = [value & ((1 << low_bits) - 1) for value in ids]
        _set_fields(tensors["id_low"][row], low_bits, low)


def _largest_ef_id(spec: CacheSpec) -> int:
    """The largest id an Elias-Fano row of V can hold: the top high part, all low bits set."""
    low_bits = _low_bits(spec)
    return ((((spec.vocab_size - 1) >> low_bits) + 1) << low_bits) - 1


def _poison_unary(how: str) -> Poison:
    """A row's unary part without exactly K set bits in its first ``high_bits``, or with a
    padding bit set: a corrupt row, whatever its other bits."""

    def poison(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
        high_bits = _high_bits(kind.spec)
        bits = _unary(tensors, row)
        if how == "zeroed":
            bits = [0] * len(bits)
        else:
            places = {
                "bit-set": [i for i in range(high_bits) if not bits[i]],
                "bit-cleared": [i for i in range(high_bits) if bits[i]],
                "padding-bit": list(range(high_bits, len(bits))),
            }[how]
            bits[places[choice % len(places)]] ^= 1
        _set_fields(tensors["id_high"][row], 1, bits)

    return poison


def _poison_ef_duplicate(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
    # Re-coded well formed (K set bits): only the repeated id tells.
    spec = kind.spec
    ids = _ef_ids(tensors, row, spec)
    slot = 1 + choice % (_filled_slots(tensors, row, spec) - 1)
    ids[slot] = ids[slot - 1]
    _set_ef_ids(tensors, row, spec, ids)


def _poison_ef_range(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
    # The row's largest id moved past V - 1 within the top high part: well formed, and the
    # filler ids of empty slots after it keep their (top) high part.
    spec = kind.spec
    ids = _ef_ids(tensors, row, spec)
    ids[_filled_slots(tensors, row, spec) - 1] = _out_of_range_id(
        spec, choice, _largest_ef_id(spec)
    )
    _set_ef_ids(tensors, row, spec, ids)


def _packed_poison(name: str, change: Callable[[list[int], int, CacheSpec], None]) -> Poison:
    """Row ``row`` of the packed-field tensor ``name`` (``ids`` or ``codes``, K fields) as
    ``change`` rewrites its fields."""

    def poison(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
        spec = kind.spec
        width = spec.id_bits if name == "ids" else spec.value_bits
        values = _fields(tensors[name][row], width, spec.k)
        change(values, choice, spec)
        _set_fields(tensors[name][row], width, values)

    return poison


# Slots 0..K-2 of a packed row always hold an id and a value (the teacher's order is kept).


def _id_emptied(ids: list[int], choice: int, spec: CacheSpec) -> None:
    ids[choice % (spec.k - 1)] = (1 << spec.id_bits) - 1  # its code still a value


def _code_emptied(codes: list[int], choice: int, spec: CacheSpec) -> None:
    codes[choice % (spec.k - 1)] = (1 << spec.value_bits) - 1  # its id field still an id


def _id_beyond(ids: list[int], choice: int, spec: CacheSpec) -> None:
    ids[choice % (spec.k - 1)] = _out_of_range_id(spec, choice)


def _id_repeated(ids: list[int], choice: int, spec: CacheSpec) -> None:
    ids[1 + choice % (spec.k - 2)] = ids[0]


def _poison_count(delta: int | None) -> Poison:
    def poison(tensors: dict, row: int, _choice: int, _kind: Pristine) -> None:
        counts = tensors["sampled_counts"]
        counts[row, 0] = 0 if delta is None else counts[row, 0] + delta

    return poison


def _sampled_poison(change: Callable[[list[int], int, CacheSpec], None]) -> Poison:
    """Row ``row`` of ``sampled_ids`` (either codec; ``-1`` = empty) as ``change`` rewrites it."""

    def poison(tensors: dict, row: int, choice: int, kind: Pristine) -> None:
        spec, stored = kind.spec, tensors["sampled_ids"]
        if spec.codec == "v2":
            empty = (1 << spec.id_bits) - 1
            fields = _fields(stored[row], spec.id_bits, spec.sampled_k)
            ids = [-1 if value == empty else value for value in fields]
            change(ids, choice, spec)
            _set_fields(stored[row], spec.id_bits, [empty if i < 0 else i for i in ids])
        else:
            ids = decode_ids(stored[row][None], spec.id_encoding)[0].tolist()
            change(ids, choice, spec)
            stored[row] = encode_ids(torch.tensor([ids]), spec.id_encoding)[0]

    return poison


def _sampled_repeated(ids: list[int], _choice: int, _spec: CacheSpec) -> None:
    ids[1] = ids[0]  # slot 0 is never empty; slot 1 an id, or empty with count 0 (refused too)


def _sampled_beyond(ids: list[int], choice: int, spec: CacheSpec) -> None:
    ids[0] = _out_of_range_id(spec, choice)


def _sampled_emptied(ids: list[int], _choice: int, _spec: CacheSpec) -> None:
    ids[0] = -1  # its count stays >= 1


V1_POISONS: dict[str, Poison] = {
    "value-nan": _poison_values(math.nan),
    "value-inf": _poison_values(math.inf),
    "row-mass-above-1": _poison_row_mass,
    "empty-slot-with-value": _poison_empty_slot,
    "id-out-of-range": _poison_id_range,
    "id-negative": _poison_negative_id,
    "id-duplicate": _poison_duplicate_id,
}
# v2 rows hold no value that can be NaN or above 1 but the top-K mass.
ELIAS_FANO_POISONS: dict[str, Poison] = {
    "mass-logit-nan": _poison_tensor("mass_logit", (math.nan,)),
    "unary-bit-set": _poison_unary("bit-set"),
    "unary-bit-cleared": _poison_unary("bit-cleared"),
    "unary-padding-bit": _poison_unary("padding-bit"),
    "unary-zeroed": _poison_unary("zeroed"),
    "id-duplicate": _poison_ef_duplicate,
    "id-out-of-range": _poison_ef_range,
}
PACKED_POISONS: dict[str, Poison] = {
    "mass-logit-nan": _poison_tensor("mass_logit", (math.nan,)),
    "empty-id-with-code": _packed_poison("ids", _id_emptied),
    "empty-code-with-id": _packed_poison("codes", _code_emptied),
    "id-out-of-range": _packed_poison("ids", _id_beyond),
    "id-duplicate": _packed_poison("ids", _id_repeated),
}
COMMON_POISONS: dict[str, Poison] = {
    "lse": _poison_tensor("lse", (math.inf, -math.inf, math.nan, 3e38)),
    "label-value": _poison_tensor("label_value", (math.nan, math.inf, -math.inf, 0.5)),
    "seq-offsets": _poison_offsets,
}
SAMPLED_POISONS: dict[str, Poison] = {
    "sampled-count-plus-1": _poison_count(1),
    "sampled-count-zero": _poison_count(None),
    "sampled-id-duplicate": _sampled_poison(_sampled_repeated),
    "sampled-id-out-of-range": _sampled_poison(_sampled_beyond),
    "sampled-empty-slot-with-count": _sampled_poison(_sampled_emptied),
}


def poison_table(kind: Pristine) -> dict[str, Poison]:
    """The poisons that certainly damage ``kind``'s rows."""
    spec = kind.spec
    if spec.codec == "v1":
        own = V1_POISONS
    elif spec.id_coding == "packed":
        own = PACKED_POISONS
    else:
        own = dict(ELIAS_FANO_POISONS)
        if _high_bits(spec) % 8 == 0:  # no padding bit to set
            del own["unary-padding-bit"]
        if _largest_ef_id(spec) < spec.vocab_size:  # V a multiple of 2**L (as at L = 0)
            del own["id-out-of-range"]
    return {**own, **COMMON_POISONS, **(SAMPLED_POISONS if spec.sampled_k else {})}


# Poisons are drawn once per way of storing ids: v1's, Elias-Fano's and packed fields.
POISON_GROUPS = (
    FAMILIES["v1"],
    tuple(kind for kind in FAMILIES["v2"] if kind.spec.id_coding == "elias_fano"),
    tuple(kind for kind in FAMILIES["v2"] if kind.spec.id_coding == "packed"),
)


def poisoned(label: str, kind: Pristine, which: float, where: float, choice: int) -> Apply:
    poison = poison_table(kind)[label]

    def apply(directory: Path, _workdir: Path) -> str:
        name = _row_shard(directory, which)

        def edit(tensors: dict) -> None:
            poison(tensors, int(where * tensors["lse"].shape[0]), choice, kind)

        rewrite_tensors(directory, name, edit)
        return re.escape(name)

    return apply


# ---------------------------------------------------------------------------------------------
# cache: valid variants (must verify and read back exactly)


def _unchanged_resign(directory: Path) -> None:
    resign(directory, lambda manifest: None)


def _reordered_resign(directory: Path) -> None:
    def edit(manifest: dict) -> None:
        items = list(manifest.items())[::-1]
        manifest.clear()
        manifest.update(items)

    resign(directory, edit)


def _reindented(directory: Path) -> None:
    # The checksum covers the parsed content: whitespace is free.
    path = directory / "manifest.json"
    path.write_text(json.dumps(json.loads(path.read_text()), indent=4) + "\n\n")


def _shard_recorded_unchanged(directory: Path) -> None:
    path = shard_paths(directory)[-1]
    record_shard(directory, path.name, path.read_bytes())


def _tensors_rewritten_unchanged(directory: Path) -> None:
    rewrite_tensors(directory, shard_paths(directory)[0].name, lambda tensors: None)


def _header_reordered(directory: Path) -> None:
    path = shard_paths(directory)[0]
    header, body = split_shard(path.read_bytes())
    record_shard(directory, path.name, join_shard(dict(reversed(header.items())), body))


def _header_extra_metadata(directory: Path) -> None:
    # Only the cache's own metadata key is read; another tool's note is no damage.
    path = shard_paths(directory)[-1]
    header, body = split_shard(path.read_bytes())
    header["__metadata__"]["note"] = "added by another tool"
    record_shard(directory, path.name, join_shard(header, body))


VALID_VARIANTS: dict[str, Callable[[Path], None]] = {
    "pristine": lambda directory: None,
    "resigned-unchanged": _unchanged_resign,
    "resigned-keys-reversed": _reordered_resign,
    "manifest-reindented": _reindented,
    "shard-recorded-unchanged": _shard_recorded_unchanged,
    "tensors-rewritten-unchanged": _tensors_rewritten_unchanged,
    "header-keys-reversed": _header_reordered,
    "header-extra-metadata": _header_extra_metadata,
}


def valid_cache_case(kind: Pristine, label: str, workdir: Path) -> Case:
    def run() -> None:
        directory = fresh_copy(kind, workdir)
        VALID_VARIANTS[label](directory)
        check_intact(directory, kind, workdir)

    return Case(f"cache-{kind.name}-valid-{label}", run)


def batched_read_case(kind: Pristine, rng: random.Random, workdir: Path) -> Case:
    """All documents in one batch, in a shuffled order, with the unhashed reader: the rows
    are the per-document references, concatenated in batch order."""
    order = list(range(len(kind.lengths)))
    rng.shuffle(order)

    def run() -> None:
        directory = fresh_copy(kind, workdir)
        reader = CacheReader(directory, verify_checksums=False)
        per_doc = len(kind.target_kinds)
        reference = reference_targets(kind, workdir)
        for t, target_kind in enumerate(kind.target_kinds):
            got = reader.targets_for_batch(
                [kind.ids[i] for i in order], [kind.lengths[i] for i in order], target_kind
            )
            parts = [reference[per_doc * i + t] for i in order]
            for field in dataclasses.fields(got):
                value = getattr(got, field.name)
                if isinstance(value, torch.Tensor):
                    expected = torch.cat([getattr(p, field.name) for p in parts])
                    assert torch.equal(value, expected), f"{target_kind}.{field.name} differs"
        reader.close()

    return Case(f"cache-{kind.name}-valid-batched-shuffled", run)


def flipped_resigned_case(kind: Pristine, rng: random.Random, i: int, workdir: Path) -> Case:
    """Bytes flipped in a shard's data region and the manifest re-signed over them. Whether the
    rows are still valid cannot be known (a flipped low id bit, code or lse bit may give other
    valid rows), so ``verify_cache`` and the reader must agree: both serve the rows, or both
    refuse them with a CacheError naming the shard (they run the same checks, on every row)."""
    which = rng.random()
    flips = [(rng.random(), rng.randrange(1, 256)) for _ in range(rng.randrange(1, 6))]

    def run() -> None:
        directory = fresh_copy(kind, workdir)
        path = _shard_at(directory, which)
        data = bytearray(path.read_bytes())
        body_start = len(data) - len(split_shard(bytes(data))[1])
        for where, mask in flips:
            data[body_start + int(where * (len(data) - body_start))] ^= mask
        record_shard(directory, path.name, bytes(data))
        verdicts = []
        for probe in (verify_cache, functools.partial(read_like_the_kd_stage, kind=kind)):
            try:
                probe(directory)
                verdicts.append("serves")
            except CacheError as err:
                if path.name not in str(err):
                    raise AssertionError(f"CacheError does not name {path.name}: {err}") from None
                verdicts.append("refuses")
        assert verdicts[0] == verdicts[1], (
            f"verify {verdicts[0]} the rows, the reader {verdicts[1]}"
        )

    return Case(f"cache-{kind.name}-shard-data-flipped-resigned-{i}", run)


# ---------------------------------------------------------------------------------------------
# cache: the category


def every_and_more(rng: random.Random, labels: list[str], more: int) -> list[str]:
    """Each label once (every known weak spot probed at every seed), then ``more`` drawn."""
    return [*labels, *rng.choices(labels, k=more)]


def cache_damages(rng: random.Random) -> Iterator[Damage]:
    """Every damage of the category, drawn from ``rng``.

    Damages that the codec decides on (the spec, shard layouts and metadata, the swapped and
    foreign shards) are drawn once per codec, poisons once per way of storing ids. Those
    refused before the codec matters (bytes the sha256 catches, the manifest's JSON and keys,
    shard names, the safetensors header's text) alternate between the codecs: drawing them
    twice would double their cost for nothing more probed.
    """
    families = list(FAMILIES.values())

    def alternate(i: int) -> Pristine:
        return rng.choice(families[i % len(families)])

    for i in range(scaled(2)):
        yield from byte_damages(rng, alternate(i), i)
    for family in families:
        yield from family_damages(rng, family)
    # Names that would read outside the directory, or files the writer never names: each one.
    for i in range(SHARD_NAME_PROBES):
        kind, apply = alternate(i), manifest_edit("shard-name", rng.random(), i)
        yield Damage(f"cache-{kind.name}-shard-name-probe-{i}", kind, apply)
    for i, key in enumerate(rng.sample(UNKNOWN_KEYS, 3)):
        kind, apply = alternate(i), manifest_unknown_key(key, rng.choice(JUNK))
        yield Damage(f"cache-{kind.name}-manifest-unknown-key-{i}", kind, apply)
    for i, key in enumerate(rng.sample(TOP_KEYS_TO_DROP, 4)):
        kind = alternate(i)
        yield Damage(f"cache-{kind.name}-manifest-without-{key}", kind, manifest_dropped_key(key))
    for i, raw in enumerate(RAW_VALUES):
        kind, path = alternate(i), rng.choice(RAW_SLOTS)
        yield Damage(f"cache-{kind.name}-manifest-raw-{i}", kind, manifest_raw(path, raw))
    for i, label in enumerate(HEADER_TEXT_LABELS):
        kind, junk = alternate(i), rng.randbytes(rng.randrange(1, 200))
        apply = header_text(label, rng.random(), rng.randrange(10**6), junk)
        yield Damage(f"cache-{kind.name}-header-{label}-{i}", kind, apply, resigned=True)
    for group in POISON_GROUPS:
        for label in dict.fromkeys(label for kind in group for label in poison_table(kind)):
            kind = rng.choice([kind for kind in group if label in poison_table(kind)])
            apply = poisoned(label, kind, rng.random(), rng.random(), rng.randrange(10**6))
            yield Damage(f"cache-{kind.name}-poison-{label}", kind, apply, resigned=True)


def family_damages(rng: random.Random, family: tuple[Pristine, ...]) -> Iterator[Damage]:
    """The file damages and the edits of manifest fields, shard headers and shard metadata,
    each on a cache drawn from ``family`` (the pristine caches of one codec)."""
    for label in file_damages(family[0], 0.0):
        kind, which = rng.choice(family), rng.random()
        apply = file_damages(kind, which)[label]
        resigned = label.endswith("-resigned")
        yield Damage(f"cache-{kind.name}-{label}", kind, apply, resigned=resigned)
    slots = sorted(manifest_slots(family[0]))
    for i, slot in enumerate(every_and_more(rng, slots, scaled(2))):
        kind, apply = rng.choice(family), manifest_edit(slot, rng.random(), rng.randrange(10**6))
        yield Damage(f"cache-{kind.name}-manifest-{slot}-{i}", kind, apply)
    kind = rng.choice(family)
    for label in recodings(kind):
        apply = manifest_recoded(label, relabel_shards=False)
        yield Damage(f"cache-{kind.name}-manifest-recoded-{label}", kind, apply, resigned=True)
    kind = rng.choice(family)
    for label in rng.sample(recodings(kind), 2):
        apply = manifest_recoded(label, relabel_shards=True)
        yield Damage(f"cache-{kind.name}-relabelled-{label}", kind, apply, resigned=True)
    for i, label in enumerate(every_and_more(rng, sorted(HEADER_EDITS), scaled(2))):
        kind = rng.choice(family)
        apply = header_edit(label, rng.random(), rng.random(), rng.randrange(10**6))
        yield Damage(f"cache-{kind.name}-header-{label}-{i}", kind, apply, resigned=True)
    for target in (*METADATA_FIELDS[family[0].spec.codec], *METADATA_TARGETS):
        kind = rng.choice(family)
        apply = metadata_edit(target, kind, rng.random(), rng.randrange(10**6))
        yield Damage(f"cache-{kind.name}-metadata-{target}", kind, apply, resigned=True)


def cache_cases(rng: random.Random, workdir: Path) -> list[Case]:
    cases = [
        valid_cache_case(kind, label, workdir) for kind in PRISTINES for label in VALID_VARIANTS
    ]
    cases += [batched_read_case(kind, rng, workdir) for kind in PRISTINES]
    cases += [
        flipped_resigned_case(rng.choice(family), rng, i, workdir)
        for family in FAMILIES.values()
        for i in range(scaled(4))
    ]
    for damage in cache_damages(rng):
        cases += damage_cases(damage, workdir)
    return cases


# =============================================================================================
# data: JSONL records for read_jsonl

TEXTS = (
    "",
    "2+2?",
    "4",
    "你好，世界",
    "🙂 hi",
    'quote " and \\',
    "line\nbreak",
    "tab\there",
    "\u2028 line separator",  # raw in the file: a reader splitting on it would cut the record
    "\x85 next line",
    "<|user|> <|end|> specials stay text",
    "e\u0301",
    "\x00 nul",
    "\r",
)
EXTRA_VALUES = ({"source": "web", "n": 3}, ["t", 1, None], "note", 12, None, deep_list(200))


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(TEXTS) for _ in range(rng.randrange(0, 4)))


def dump(record: Any, rng: random.Random) -> bytes:
    """One JSONL line; ``"@raw:<text>"`` strings become raw JSON text (NaN, 1e400, 5,000
    digits), which json.dumps does not write."""
    text = json.dumps(record, ensure_ascii=rng.random() < 0.5)
    text = re.sub(r'"@raw:([^"]*)"', lambda m: m[1], text)
    return text.encode("utf-8")


class JsonlFile:
    """A JSONL file being generated: its lines and the examples ``read_jsonl`` must return.

    Line numbers count every line, blank ones too, as the reader's errors do."""

    def __init__(self, rng: random.Random, stem: str, require_response: bool = True) -> None:
        self.rng, self.stem, self.require_response = rng, stem, require_response
        self.lines: list[bytes] = []
        self.examples: list[Example] = []
        self.ending = rng.choice((b"\n", b"\n", b"\r\n"))

    def add(self, line: bytes) -> int:
        """Append a raw line; returns its line number."""
        self.lines.append(line)
        return len(self.lines)

    def blanks(self) -> None:
        while self.rng.random() < 0.3:
            self.add(self.rng.choice((b"", b"   ", b"\t", b" \t ")))

    def record(self) -> None:
        """Append a valid record."""
        record, example = self._valid_record(len(self.lines) + 1)
        self.add(dump(record, self.rng))
        self.examples.append(example)

    def records(self, count: int) -> None:
        for _ in range(count):
            self.blanks()
            self.record()
        self.blanks()

    def data(self) -> bytes:
        tail = self.ending if self.lines and self.rng.random() < 0.8 else b""
        return self.ending.join(self.lines) + tail

    def _conversation(self) -> list[tuple[str, str]]:
        rng = self.rng
        turns = [("system", random_text(rng))] if rng.random() < 0.3 else []
        for _ in range(rng.randrange(1, 4)):
            turns += [("user", random_text(rng)), ("assistant", random_text(rng))]
        if not self.require_response and rng.random() < 0.5:
            turns.append(("user", random_text(rng)))
        return turns

    def _shape(self, record: dict) -> tuple[Message, ...]:
        """Fill in the conversation in one of the two shapes; returns its messages."""
        rng = self.rng
        turns = self._conversation()
        if len(turns) > 3 or rng.random() < 0.5:
            record["messages"] = [{"role": r, "content": c} for r, c in turns]
            if rng.random() < 0.2:
                record["messages"][0]["name"] = "extra keys of a message are ignored"
            return tuple(Message(r, c) for r, c in turns)
        messages = []
        if turns[0][0] == "system":
            record["system"] = turns[0][1]
            messages.append(Message("system", turns[0][1]))
        elif rng.random() < 0.2:
            record["system"] = None
        user, assistant = turns[-2:] if turns[-1][0] == "assistant" else (turns[-1], None)
        record["prompt"] = user[1]
        messages.append(Message("user", user[1]))
        if assistant is not None:
            record["response"] = assistant[1]
            messages.append(Message("assistant", assistant[1]))
        return tuple(messages)

    def _valid_record(self, lineno: int) -> tuple[dict, Example]:
        rng, index = self.rng, len(self.examples)
        record: dict[str, Any] = {}
        messages = self._shape(record)
        ids = (None, f"id-{index}", 100_000 + 7 * index, 10**40 + index)
        example_id = rng.choice((*ids, "absent"))
        if example_id != "absent":
            record["id"] = example_id
        mode = rng.choice((None, "reasoning", "fast", "absent"))
        if mode != "absent":
            record["mode"] = mode
        difficulty = rng.choice((None, 3, 2.5, -1.25, 0, 10**30, "absent"))
        if difficulty != "absent":
            record["difficulty"] = difficulty
        answer = rng.choice((None, "42", "", 7, 2.5, 10**50, "absent"))
        if answer != "absent":
            record["answer"] = answer
        if rng.random() < 0.3:
            record[rng.choice(("source", "meta", "tags", "x"))] = rng.choice(EXTRA_VALUES)
        return record, self._expected(record, messages, lineno)

    def _expected(self, record: dict, messages: tuple[Message, ...], lineno: int) -> Example:
        given_id = record.get("id")
        answer = record.get("answer")
        difficulty = record.get("difficulty")
        return Example(
            id=f"{self.stem}:{lineno}" if given_id is None else str(given_id),
            messages=messages,
            mode=record.get("mode"),
            difficulty=None if difficulty is None else float(difficulty),
            answer=None if answer is None else str(answer),
        )


def jsonl_path(workdir: Path, name: str) -> Path:
    return workdir / "data" / f"{name}.jsonl"


def write_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def valid_jsonl_case(name: str, file: JsonlFile, workdir: Path) -> Case:
    path, data, expected = jsonl_path(workdir, name), file.data(), list(file.examples)

    def run() -> None:
        got = read_jsonl(write_file(path, data), require_response=file.require_response)
        assert got == expected, f"read {len(got)} examples, not the {len(expected)} written"

    return Case(name, run)


def bad_jsonl_case(name: str, file: JsonlFile, lineno: int, workdir: Path) -> Case:
    """A file whose first bad line is ``lineno``: a RecordError naming the file and line."""
    path, data = jsonl_path(workdir, name), file.data()

    def run() -> None:
        read_jsonl(write_file(path, data), require_response=file.require_response)

    return Case(name, run, (RecordError,), rf"^{re.escape(str(path))}:{lineno}: ")


INVALID_UTF8 = (b"\xff", b"\xc3(", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\x80")
NOT_OBJECTS = ([1, 2], 5, None, "x", True, [[{}]], 1.5, [], "@raw:NaN", "@raw:-Infinity")
MISSING_FIELDS = (
    {},
    {"id": "x"},
    {"response": "r"},
    {"system": "s", "response": "r"},
    {"mode": "fast", "answer": "4"},
    {"messages": [{"content": "c"}]},
    {"messages": [{"role": "user"}]},
    {"messages": [{"role": "user", "content": "u"}, {"role": "assistant"}]},
    {"messages": [{"role": "user", "content": "u"}], "prompt": "p", "response": "r"},
)
NON_FINITE = ("@raw:NaN", "@raw:Infinity", "@raw:-Infinity", "@raw:1e400", "@raw:-1e400")
WRONG_TYPES = {
    "messages": ("hi", 5, {}, None, True),
    "message": ("hi", 5, None, [], True),
    "role": (5, None, [], {}, "tool", "User", "", "assistant "),
    "content": (5, None, [], {}, True, 1.5),
    "prompt": (5, [], {}, True, None),
    "response": (5, [], {}, True, None),
    "system": (5, [], {}, True),
    "id": (1.5, True, False, [], {}, "", "@raw:" + "9" * 5000),
    "mode": ("slow", "Fast", "", 5, True, [], {}),
    "difficulty": ("hard", True, [], {}, 10**400, *NON_FINITE, "@raw:" + "9" * 5000),
    "answer": ([], {}, True, False, *NON_FINITE),
}
BAD_ORDERS = (
    ("assistant",),
    ("system", "assistant"),
    ("assistant", "user"),
    ("user", "assistant", "user"),
    ("user",),
    ("system",),
    ("system", "user"),
    ("assistant", "assistant"),
)
MALFORMED = (
    b'{"prompt": "p", "response": "r"} {"prompt": "q", "response": "s"}',
    b'{"prompt": "p", "response": "r",}',
    b"{'prompt': 'p', 'response': 'r'}",
    b'{"prompt": "p", "response": "r"} // a comment',
    b'{"prompt": "p", "response": "r"}\r{"prompt": "q", "response": "s"}',
    b'{"prompt": "p\x01", "response": "r"}',
    b'"\xef\xbb\xbf"',
    b"x" * 1_000_000,
    b"[" * DEEP + b"]" * DEEP,
    deep_text(DEEP, '{"a":', "}").encode(),
)


def _wrong_type_record(rng: random.Random, field: str) -> dict:
    value = rng.choice(WRONG_TYPES[field])
    chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    if field in ("messages", "message", "role", "content"):
        record: dict[str, Any] = {"messages": chat}
        if field == "messages":
            record["messages"] = value
        elif field == "message":
            chat[rng.randrange(2)] = value
        else:
            chat[rng.randrange(2)][field] = value
        return record
    if field in ("prompt", "response", "system") or rng.random() < 0.5:
        record = {"prompt": "p", "response": "r"}
    else:
        record = {"messages": chat}
    record[field] = value
    return record


def bad_line(rng: random.Random, family: str, file: JsonlFile) -> bytes:
    """One certainly bad line of ``family``."""
    if family == "not-an-object":
        return dump(rng.choice(NOT_OBJECTS), rng)
    if family == "garbage":  # starts with a character no JSON object starts with
        start = bytes([rng.choice(b"x!#%&()*+-./0123456789:;<=>?@ABZ^_`|~")])
        return start + rng.randbytes(rng.randrange(0, 80)).replace(b"\n", b"")
    if family == "invalid-utf8":
        text = dump({"prompt": "p@@q", "response": "r"}, rng)
        return text.replace(b"@@", rng.choice(INVALID_UTF8))
    if family == "bom":
        return b"\xef\xbb\xbf" + dump({"prompt": "p", "response": "r"}, rng)
    if family == "missing-field":
        return dump(rng.choice(MISSING_FIELDS), rng)
    if family == "wrong-type":
        return dump(_wrong_type_record(rng, rng.choice(sorted(WRONG_TYPES))), rng)
    if family == "bad-order":
        roles = rng.choice(BAD_ORDERS)
        return dump({"messages": [{"role": r, "content": "c"} for r in roles]}, rng)
    if family == "lone-surrogate":
        where = rng.choice(("prompt", "response", "system"))
        text = json.dumps({"prompt": "p", "response": "r", where: "x\ud800y"})
        return text.encode("ascii")
    if family == "deep-field":
        return f'{{"prompt": "p", "response": "r", "extra": {deep_text(DEEP)}}}'.encode()
    if family == "duplicate-id":
        earlier = next(ex.id for ex in file.examples)
        chat = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
        return dump({"id": earlier, "messages": chat}, rng)
    return rng.choice(MALFORMED)  # "malformed"


# Thrice wrong-type: it has the most fields to get wrong.
BAD_FAMILIES = (
    "not-an-object garbage invalid-utf8 bom missing-field wrong-type wrong-type wrong-type "
    "bad-order lone-surrogate deep-field duplicate-id malformed"
).split()


def bad_jsonl_cases(rng: random.Random, workdir: Path) -> list[Case]:
    """Valid records, one bad line, then more valid records: the error names the bad line."""
    cases = []
    for i in range(scaled(150)):
        family = rng.choice(BAD_FAMILIES)
        name = f"data-jsonl-{family}-{i}"
        file = JsonlFile(rng, name)
        # A duplicate needs an earlier id; a BOM is most often on line 1.
        before = 0 if family == "bom" and rng.random() < 0.5 else rng.randrange(1, 5)
        file.records(max(before, family == "duplicate-id"))
        lineno = file.add(bad_line(rng, family, file))
        file.records(rng.randrange(0, 3))
        cases.append(bad_jsonl_case(name, file, lineno, workdir))
    return cases


def valid_jsonl_cases(rng: random.Random, workdir: Path) -> list[Case]:
    cases = []
    for i in range(scaled(25)):
        file = JsonlFile(rng, f"data-jsonl-valid-{i}")
        file.records(rng.randrange(1, 12))
        cases.append(valid_jsonl_case(file.stem, file, workdir))
    for i in range(scaled(10)):
        file = JsonlFile(rng, f"data-jsonl-valid-prompt-only-{i}", require_response=False)
        file.records(rng.randrange(1, 8))
        cases.append(valid_jsonl_case(file.stem, file, workdir))
    empty = JsonlFile(rng, "data-jsonl-valid-empty")
    blank = JsonlFile(rng, "data-jsonl-valid-blank-lines-only")
    blank.lines = [b"", b"  ", b"\t", b""]
    long_line = JsonlFile(rng, "data-jsonl-valid-1mb-line")
    long_line.add(json.dumps({"prompt": "p" * 1_000_000, "response": "r"}).encode())
    long_line.examples.append(
        Example(
            f"{long_line.stem}:1", (Message("user", "p" * 1_000_000), Message("assistant", "r"))
        )
    )
    cases += [valid_jsonl_case(f.stem, f, workdir) for f in (empty, blank, long_line)]
    return cases


# ---------------------------------------------------------------------------------------------
# data: Hugging Face tokenizer directories for load_tokenizer

VOCAB = {"a": 0, "b": 1, "</s>": 2, "<s>": 3, "<pad>": 4, "[UNK]": 5}
TOKENIZER_CONFIGS = {
    "tokenizer_config.json": {"eos_token": "</s>", "bos_token": "<s>"},
    "special_tokens_map.json": {"pad_token": {"content": "<pad>", "lstrip": False}},
}


def pristine_tokenizer(workdir: Path) -> Path:
    """A word-level tokenizer directory with both special-token configs, made on first use."""
    directory = workdir / "tokenizer-pristine"
    if not (directory / "tokenizer.json").is_file():
        import tokenizers  # an optional dependency of the package: imported only here

        directory.mkdir(parents=True, exist_ok=True)
        for name, config in TOKENIZER_CONFIGS.items():
            (directory / name).write_text(json.dumps(config))
        model = tokenizers.models.WordLevel(VOCAB, unk_token="[UNK]")
        tokenizers.Tokenizer(model).save(str(directory / "tokenizer.json.partial"))
        (directory / "tokenizer.json.partial").rename(directory / "tokenizer.json")
    return directory


def tokenizer_case(name: str, workdir: Path, damage: Callable[[Path], str] | None) -> Case:
    """``load_tokenizer`` on a copy of the pristine directory after ``damage``, which returns
    the file the ValueError must name; with no damage the ids must be the configured ones."""
    directory = workdir / "tokenizers" / name

    def prepared() -> str:
        remove(directory)
        shutil.copytree(pristine_tokenizer(workdir), directory)
        return damage(directory) if damage else ""

    def run_valid() -> None:
        prepared()
        tokenizer = load_tokenizer(directory)
        ids = (tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id)
        assert ids == (2, 3, 4), ids

    def run_bad() -> None:
        file = prepared()
        try:
            load_tokenizer(directory)
        except ValueError as err:
            if str(directory / file) not in str(err):
                raise AssertionError(f"ValueError does not name {file}: {err}") from None
            raise

    if damage is None:
        return Case(name, run_valid)
    return Case(name, run_bad, (ValueError,))


def _replaced(file: str, data: bytes) -> Callable[[Path], str]:
    def damage(directory: Path) -> str:
        (directory / file).write_bytes(data)
        return file

    return damage


def _token_set(file: str, key: str, value: Any) -> Callable[[Path], str]:
    """A special token set to ``value`` in ``file``; a token the vocabulary lacks is named by
    the tokenizer file it is looked up in."""

    def damage(directory: Path) -> str:
        path = directory / file
        config = json.loads(path.read_text())
        config[key] = value
        path.write_text(json.dumps(config))
        return "tokenizer.json" if isinstance(value, str) else file

    return damage


def _truncated_tokenizer(fraction: float) -> Callable[[Path], str]:
    def damage(directory: Path) -> str:
        path = directory / "tokenizer.json"
        data = path.read_bytes()
        path.write_bytes(data[: int(fraction * (len(data) - 1))])  # the closing brace goes
        return "tokenizer.json"

    return damage


BAD_JSON_TEXTS = (
    b"[]",
    b"null",
    b"1",
    b'"x"',
    b"{",
    b"\xff\xfe{}",
    b"\xef\xbb\xbf{}",
    b"9" * 5000,
    deep_text(DEEP).encode(),
    deep_text(DEEP, '{"a":', "}").encode(),
)
# Tokens the configs may not hold: not a string, or not in the vocabulary. A token that
# special_tokens_map.json overrides is not looked up, so only those it does not override.
BAD_TOKENS = (5, [], True, 1.5, {"content": 5}, "<nope>", "", "A")
UNOVERRIDDEN = (
    ("tokenizer_config.json", "eos_token"),
    ("tokenizer_config.json", "bos_token"),
    ("special_tokens_map.json", "pad_token"),
    ("special_tokens_map.json", "eos_token"),
)


def tokenizer_cases(rng: random.Random, workdir: Path) -> list[Case]:
    cases = [tokenizer_case("data-tokenizer-valid", workdir, None)]
    for i in range(scaled(14)):
        file = rng.choice(sorted(TOKENIZER_CONFIGS))
        garbage = bytes([rng.choice(b"x!0-]")]) + rng.randbytes(rng.randrange(0, 40))
        data = rng.choice((*BAD_JSON_TEXTS, garbage))
        cases.append(
            tokenizer_case(f"data-tokenizer-config-text-{i}", workdir, _replaced(file, data))
        )
    for i in range(scaled(12)):
        file, key = rng.choice(UNOVERRIDDEN)
        damage = _token_set(file, key, rng.choice(BAD_TOKENS))
        cases.append(tokenizer_case(f"data-tokenizer-token-{key}-{i}", workdir, damage))
    for i in range(scaled(10)):
        if rng.random() < 0.4:
            damage = _truncated_tokenizer(rng.random())
        else:
            damage = _replaced("tokenizer.json", rng.choice((*BAD_JSON_TEXTS, b"{}")))
        cases.append(tokenizer_case(f"data-tokenizer-json-{i}", workdir, damage))
    return cases


def data_cases(rng: random.Random, workdir: Path) -> list[Case]:
    return (
        valid_jsonl_cases(rng, workdir)
        + bad_jsonl_cases(rng, workdir)
        + tokenizer_cases(rng, workdir)
    )


# =============================================================================================
# config: the shipped configs, mutated, through config_from_dict, a TOML file and --set

SHIPPED = tuple(sorted(path.stem for path in CONFIG_DIR.glob("*.toml")))
CHANNELS = ("dict", "toml", "override")


@functools.cache
def shipped_text(name: str) -> str:
    return (CONFIG_DIR / f"{name}.toml").read_text(encoding="utf-8")


def shipped_raw(name: str) -> dict:
    """A fresh copy of a shipped config as parsed TOML."""
    return copy.deepcopy(_parsed(name))


@functools.cache
def _parsed(name: str) -> dict:
    return tomllib.loads(shipped_text(name))


@functools.cache
def shipped_config(name: str):
    return config_from_dict(shipped_raw(name))


def toml_value(value: Any) -> str:
    """``value`` as TOML text (inline tables and arrays; JSON's string escapes are TOML's)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    raise TypeError(f"no TOML for {type(value).__name__}")


def to_toml(raw: dict) -> str:
    """A whole config as TOML: one ``key = <inline value>`` line per top-level key."""
    return "".join(
        f"{json.dumps(k, ensure_ascii=False)} = {toml_value(v)}\n" for k, v in raw.items()
    )


def in_toml(value: Any) -> bool:
    """Whether TOML can hold ``value`` (no null; ints Python can convert from text)."""
    if value is None:
        return False
    if isinstance(value, int) and not isinstance(value, bool):
        return value.bit_length() < 10_000
    if isinstance(value, list):
        return all(in_toml(item) for item in value)
    if isinstance(value, dict):
        return all(in_toml(item) for item in value.values())
    return True


def config_parts(path: str) -> list[str | int]:
    return [int(part) if part.isdigit() else part for part in path.split(".")]


def set_config(raw: dict, path: str, value: Any) -> None:
    """Set ``path`` (``stages.2.train.optim.lr``) in ``raw``, making missing tables."""
    node: Any = raw
    parts = config_parts(path)
    for part in parts[:-1]:
        node = node[part] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value


def delete_config(raw: dict, path: str) -> None:
    parts = config_parts(path)
    del get_path(raw, tuple(parts[:-1]))[parts[-1]]


def names_path(path: str) -> str:
    """A pattern matching the config path ``path`` itself in a message (not a longer name)."""
    return rf"(?<![\w.]){re.escape(path)}(?!\w)"


def load_mutated(base: str, channel: str, path: str, value: Any, workdir: Path, name: str):
    """Set ``path`` to ``value`` in the shipped config ``base`` and load it through
    ``channel``."""
    if channel == "override":
        return load_config(base, [f"{path}={toml_value(value)}"])
    raw = shipped_raw(base)
    set_config(raw, path, value)
    if channel == "dict":
        return config_from_dict(raw)
    file = write_file(workdir / "configs" / f"{name}.toml", to_toml(raw).encode())
    return load_config(file)


def mutation_case(
    name: str, base: str, channel: str, path: str, value: Any, match: str, workdir: Path
) -> Case:
    if channel != "dict" and not in_toml(value):
        channel = "dict"  # only a dict holds null or an int TOML cannot parse
    name = f"{name}-{channel}"
    return Case(
        name, lambda: load_mutated(base, channel, path, value, workdir, name), (ConfigError,), match
    )


# ---------------------------------------------------------------------------------------------
# config: where the fields are


def tables(config) -> Iterator[tuple[str, Any]]:
    """``(config path, table)`` of every table (dataclass) the config has."""
    pending: list[tuple[str, Any]] = [("", config)]
    while pending:
        where, table = pending.pop()
        yield where, table
        for field in dataclasses.fields(table):
            value = getattr(table, field.name)
            path = f"{where}.{field.name}" if where else field.name
            if dataclasses.is_dataclass(value):
                pending.append((path, value))
        if where == "":
            pending += [(f"teachers.{n}", t) for n, t in config.teachers.items()]
            pending += [(f"stages.{i}", s) for i, s in enumerate(config.stages)]


def in_raw(raw: dict, where: str) -> bool:
    """Whether the table at ``where`` is written in the raw config (setting one key of a
    table left to its defaults would make a table of that key alone: a student without its
    default preset)."""
    node: Any = raw
    for part in config_parts(where) if where else []:
        if isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False
    return True


def leaves(base: str) -> list[tuple[str, dataclasses.Field]]:
    """``(config path, field)`` of every field of every table the shipped config ``base``
    writes, nested tables included."""
    return [
        (f"{where}.{field.name}" if where else field.name, field)
        for where, table in tables(shipped_config(base))
        if in_raw(_parsed(base), where)
        for field in dataclasses.fields(table)
    ]


def out_of_range(declared: Range, is_int: bool) -> list:
    """Values certainly outside ``declared``: just beyond each bound, and far beyond."""
    values: list = []
    if declared.at_least is not None:
        values += [declared.at_least - 1, declared.at_least - 10**6]
    if declared.above is not None:
        values += [declared.above, declared.above - 1]
    if declared.at_most is not None:
        values += [declared.at_most + 1, declared.at_most * 10 + 10]
    if declared.below is not None:
        values += [declared.below, declared.below + 0.5]
    return [int(v) if is_int else float(v) for v in values]


def not_a_number(is_int: bool) -> list:
    """Values no numeric field takes: non-finite, beyond int64 (for an int field; 2**63 is a
    float like any other), bools, floats for ints, other types."""
    values = [math.nan, math.inf, -math.inf, 10**5000, -(10**5000), True, False, "1", [1], {}]
    return values + ([2**63, 1.5, 2.0, None] if is_int else [None])


WRONG_TYPES_OF = {
    "int": (True, 1.5, "1", [], {}, None),
    "float": (True, "1", [], {}, None),
    "bool": (1, 0, "true", 1.5, [], {}, None),
    "bool | str": (1, 0, "every", "every_0", "every_-1", "True", 1.5, [], {}, None),
    "str": (5, 1.5, True, [], {}, ["x"]),
    "str | None": (5, 1.5, True, [], {}, ["x"]),
    "list[str]": ("x", 5, {}, True, [5], ["nope"], ["train_fast", "train_fast"]),
    "list[int]": ("x", 5, {}, True, ["x"], [1.5], [True], [-1], [2**63], [1, 1]),
    "list[list[str]]": ("x", 5, {}, ["x"], [["init"]], [["init", 5]], [["nope", "init"]]),
    "dict[str, Any]": ("x", 5, [], True),
    "list[Stage]": ({}, "x", 5, [5], [{}]),
    "dict[str, ModelSpec]": ("x", [], 5),
}
TABLE_TYPES = ("DataSpec", "EvalSpec", "ModelSpec", "TrainSpec", "OptimSpec", "TrainSpec | None")


def wrong_types(field: dataclasses.Field) -> tuple:
    if field.type in TABLE_TYPES:
        return (5, "x", [], True)
    return WRONG_TYPES_OF[field.type]


def _stage_names(config, kinds: tuple[str, ...], before: int | None = None, after: int = -1):
    return [
        s.name
        for i, s in enumerate(config.stages)
        if s.kind in kinds and (before is None or i < before) and i > after
    ]


def bad_strings(config, path: str) -> list:
    """Strings certainly wrong at ``path``: unusable names, unknown choices, references to what
    does not exist or comes later."""
    parts = path.split(".")
    key = parts[-1]
    index = int(parts[1]) if parts[0] == "stages" and len(parts) == 3 else None
    later = (
        []
        if index is None
        else _stage_names(config, ("sft", "kd", "rollout", "score"), after=index)
    )
    by_key = {
        "name": ["", "../x", "a/b", ".", "..", "init", "x" * 101, "-x", "名前"],
        "data": ["nope", "train_slow", "eval_fast", *later[:1]],
        "cache": ["nope", "", *later[:1], *_stage_names(config, ("sft", "rollout"), index)[:1]],
        "teacher": ["nope", "", "student"],
        "start_from": ["nope", "INIT", *later[:1], *_stage_names(config, ("score",), index)[:1]],
        "divergence": ["nope", "KL", ""],
        "missing_mass": ["nope", ""],
        "target": ["nope", "TOPK"],
        "value_dtype": ["fp8", "BF16", ""],
        "mode": ["slow", "Fast", ""],
        "schedule": ["nope", ""],
        "difficulty": ["nope", ""],
        "source": ["nope", "FILES", "", "files"],
        "tokenizer": ["", "student"],
        "chat_template": ["nope", ""],
        "preset": ["nope", "TINY", ""],
        "dtype": ["fp64", "", "FP32"],
        "backend": ["nope", ""],
        "run_dir": [""],
        "kind": ["bogus", "", "SFT"],
    }
    values = by_key.get(key, [])
    if index is not None and key == "name" and index > 0:
        values.append(config.stages[index - 1].name)  # used twice
    if key == "tokenizer" and config.student.path is not None:
        values.remove("student")
    current = get_config_value(config, path)
    return [value for value in values if value != current]  # "files" where it is the source


def _certainly_bad_string(config, path: str, field: dataclasses.Field) -> bool:
    if path.endswith(".preset") and get_config_value(config, path) is None:
        return False  # a path model given a preset as well: "exactly one of", not this key
    return field.type in ("str", "str | None") and bool(bad_strings(config, path))


def get_config_value(config, path: str) -> Any:
    node: Any = config
    for part in config_parts(path):
        node = node[part] if isinstance(node, list | dict) else getattr(node, part)
    return node


# ---------------------------------------------------------------------------------------------
# config: the mutations


def range_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    cases = []
    for i in range(count):
        base = rng.choice(SHIPPED)
        numeric = [(p, f) for p, f in leaves(base) if range_of(f) is not None]
        path, field = rng.choice(numeric)
        beyond = out_of_range(range_of(field), field.type == "int")
        value = rng.choice(beyond if rng.random() < 0.6 else not_a_number(field.type == "int"))
        name = f"config-{base}-out-of-range-{path}-{i}"
        cases.append(
            mutation_case(name, base, rng.choice(CHANNELS), path, value, names_path(path), workdir)
        )
    return cases


def type_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    cases = []
    for i in range(count):
        base = rng.choice(SHIPPED)
        path, field = rng.choice(leaves(base))
        value = rng.choice(wrong_types(field))
        name = f"config-{base}-wrong-type-{path}-{i}"
        cases.append(
            mutation_case(name, base, rng.choice(CHANNELS), path, value, names_path(path), workdir)
        )
    return cases


def string_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    cases = []
    for i in range(count):
        base = rng.choice(SHIPPED)
        config = shipped_config(base)
        strings = [(p, f) for p, f in leaves(base) if _certainly_bad_string(config, p, f)]
        path, _ = rng.choice(strings)
        value = rng.choice(bad_strings(config, path))
        name = f"config-{base}-bad-string-{path}-{i}"
        match = names_path(path)
        cases.append(mutation_case(name, base, rng.choice(CHANNELS), path, value, match, workdir))
    return cases


UNKNOWN_CONFIG_KEYS = ("bogus", "Seed", "lr_", "k2", "train_steps", "_", "名前", "stages_")


def unknown_key_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    cases = []
    for i in range(count):
        base = rng.choice(SHIPPED)
        written = [(w, t) for w, t in tables(shipped_config(base)) if in_raw(_parsed(base), w)]
        where, table = rng.choice(written)
        known = {field.name for field in dataclasses.fields(table)}
        key = rng.choice([k for k in UNKNOWN_CONFIG_KEYS if k not in known])
        path = f"{where}.{key}" if where else key
        match = rf"{re.escape(where or 'the config')}: unknown key\(s\) \[{re.escape(repr(key))}\]"
        name = f"config-{base}-unknown-key-{path}-{i}"
        cases.append(mutation_case(name, base, rng.choice(CHANNELS), path, 1, match, workdir))
    return cases


def _required(cls: type) -> set[str]:
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


def removal_case(name: str, base: str, path: str, match: str) -> Case:
    def run() -> None:
        raw = shipped_raw(base)
        delete_config(raw, path)
        config_from_dict(raw)

    return Case(name, run, (ConfigError,), match)


def removable(base: str, index: int) -> list[tuple[str, str]]:
    """``(config path, pattern the error must match)`` of keys certainly missed when removed:
    stage ``index``'s kind and required keys, a model's preset or path, a score stage a KD
    stage reads (named by that KD stage, one place earlier once the score stage is gone)."""
    config = shipped_config(base)
    required = sorted(_required(type(config.stages[index])) | {"kind"})
    choices = [(f"stages.{index}.{key}", names_path(f"stages.{index}")) for key in required]
    models = [
        ("student", config.student),
        *((f"teachers.{n}", t) for n, t in config.teachers.items()),
    ]
    for where, spec in models:
        if in_raw(_parsed(base), where):
            source = "preset" if spec.preset is not None else "path"
            choices.append((f"{where}.{source}", rf"{re.escape(where)}: give exactly one"))
    for j, stage in enumerate(config.stages):
        readers = [k for k, s in enumerate(config.stages) if getattr(s, "cache", "") == stage.name]
        if stage.kind == "score" and readers:
            choices.append((f"stages.{j}", names_path(f"stages.{readers[0] - 1}.cache")))
    return choices


def removal_cases(rng: random.Random, count: int) -> list[Case]:
    cases = []
    for i in range(count):
        base = rng.choice([b for b in SHIPPED if shipped_config(b).stages])
        index = rng.randrange(len(shipped_config(base).stages))
        path, match = rng.choice(removable(base, index))
        cases.append(removal_case(f"config-{base}-removed-{path}-{i}", base, path, match))
    return cases


def kind_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    """A stage's kind changed to one whose table its keys do not fit (or no kind at all)."""
    cases = []
    for i in range(count * 3):
        if len(cases) == count:
            break
        base = rng.choice([b for b in SHIPPED if shipped_config(b).stages])
        index = rng.randrange(len(shipped_config(base).stages))
        keys = set(_parsed(base)["stages"][index])
        kind = rng.choice([*STAGE_KINDS, "bogus", "", "SFT", "Kd"])
        if kind in STAGE_KINDS:
            fields = {f.name for f in dataclasses.fields(STAGE_KINDS[kind])}
            if keys <= fields and _required(STAGE_KINDS[kind]) <= keys:
                continue  # the keys fit the new kind: not certainly wrong
        path = f"stages.{index}.kind"
        name = f"config-{base}-kind-{kind or 'empty'}-stages.{index}-{i}"
        match = names_path(f"stages.{index}")
        cases.append(mutation_case(name, base, rng.choice(CHANNELS), path, kind, match, workdir))
    return cases


def deep_cases(workdir: Path) -> list[Case]:
    """10,000-deep arrays, inline tables and dotted keys, through each way in."""
    path = "stages.0.train.optim.lr"

    def dict_channel() -> None:
        raw = shipped_raw("tiny")
        set_config(raw, path, deep_list(DEEP))
        config_from_dict(raw)

    def just_over_the_limit() -> None:
        raw = shipped_raw("tiny")
        raw["data"]["chat_template_kwargs"] = {"x": deep_list(31)}
        config_from_dict(raw)

    def toml_text(text: str) -> Callable[[], None]:
        def run() -> None:
            file = workdir / "configs" / "deep.toml"
            load_config(write_file(file, (shipped_text("tiny") + text).encode()))

        return run

    def overrides(*items: str) -> Callable[[], None]:
        return lambda: load_config("tiny", list(items))

    nested = r"nest|deeply|deep"
    return [
        Case("config-deep-dict", dict_channel, (ConfigError,), nested),
        Case("config-deep-dict-33-levels", just_over_the_limit, (ConfigError,), nested),
        Case(
            "config-deep-toml-array",
            toml_text(f"\nx = {deep_text(DEEP)}\n"),
            (ConfigError,),
            nested,
        ),
        Case(
            "config-deep-toml-inline-table",
            toml_text("\ny = " + deep_text(DEEP, "{a=", "}")),
            (ConfigError,),
            nested,
        ),
        Case(
            "config-deep-toml-dotted-key",
            toml_text("\n" + "a." * DEEP + "a = 1\n"),
            (ConfigError,),
            nested,
        ),
        Case(
            "config-deep-override-value",
            overrides(f"{path}={deep_text(DEEP)}"),
            (ConfigError,),
            names_path(path),
        ),
        Case("config-deep-override-key", overrides("a." * DEEP + "a=1"), (ConfigError,), nested),
    ]


BAD_OVERRIDES = (
    ("seed.x=1", r"override 'seed\.x=1': seed is 0, not a table"),
    ("stages.99.k=1", r"override 'stages\.99\.k=1': no list item '99'"),
    ("=1", r"override '=1' must look like key\.path=value"),
    ("seed", r"override 'seed' must look like"),
    ("", r"override '' must look like"),
    ("a..b=1", r"override 'a\.\.b=1': empty key"),
    (".seed=1", r"override '\.seed=1': empty key"),
    ("seed.=1", r"override 'seed\.=1': empty key"),
    ("stages.-1.k=1", r"no list item '-1'"),
    ("stages.x.k=1", r"no list item 'x'"),
    ("stages.²=1", r"no list item '²'"),
    ("stages.9999999999.k=1", r"no list item '9999999999'"),
    ("stages.0.train.optim.lr.x=1", r"stages\.0\.train\.optim\.lr is .*not a table"),
    ("teachers.teacher.preset.x=1", r"teachers\.teacher\.preset is '\w+', not a table"),
    ("seed=1\nthreads = 2", r"the value must be one TOML value"),
    ("seed=" + "9" * 5000, r"override 'seed=9{60}.*the number is too long"),
    ("stages=1", r"stages: expected an array"),
    ("stages.0=5", r"stages\.0: a stage needs a 'kind'"),
    ("teachers=5", r"teachers: expected a table of models"),
    ("data=[]", r"data: expected a table, got list"),
    ("student={}", r"student: give exactly one of 'preset' and 'path'"),
    ("eval.compare=[[1, 2]]", r"eval\.compare\[0\]: expected \[stage, baseline\]"),
    ("seed=nan", names_path("seed")),
    ("seed=1.5", names_path("seed")),
    ("seed=true", names_path("seed")),
    ("seed='x'", names_path("seed")),
    ("seed=-1", r"seed must be >= 0, got -1"),
    ("threads=[1]", names_path("threads")),
)


def override_cases(rng: random.Random) -> list[Case]:
    """Bad ``--set`` strings, alone and after good ones (a later override of the same key
    would rightly replace the bad value): each is named."""
    cases = []
    good = ["stages.0.train.steps=2", "eval.max_examples=5", "data.train_problems=100"]
    for i, (item, match) in enumerate(BAD_OVERRIDES):
        overrides = [*rng.sample(good, rng.randrange(0, 3)), item]
        cases.append(
            Case(
                f"config-override-{i}",
                lambda overrides=overrides: load_config("tiny", overrides),
                (ConfigError,),
                match,
            )
        )
    return cases


def toml_corruption_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    """Random byte edits of a shipped TOML file: whatever they make, it loads or is a
    ConfigError naming the file (validity cannot be known in advance)."""
    cases = []
    for i in range(count):
        base = rng.choice(SHIPPED)
        edits = [
            (rng.random(), rng.choice(("flip", "insert", "delete")), rng.randrange(1, 256))
            for _ in range(rng.randrange(1, 4))
        ]
        name = f"config-{base}-toml-bytes-{i}"
        cases.append(
            Case(name, _corrupted_toml_run(base, edits, workdir / "configs" / f"{name}.toml"))
        )
    return cases


def _corrupted_toml_run(base: str, edits: list, file: Path) -> Callable[[], None]:
    def run() -> None:
        data = bytearray(shipped_text(base).encode())
        for where, how, byte in edits:
            at = int(where * len(data))
            if how == "flip":
                data[at] ^= byte
            elif how == "insert":
                data.insert(at, byte)
            else:
                del data[at]
        write_file(file, bytes(data))
        try:
            load_config(file)
        except ConfigError as err:
            if file.name not in str(err):
                raise AssertionError(f"ConfigError does not name {file.name}: {err}") from None

    return run


def saved_config_cases(rng: random.Random, workdir: Path, count: int) -> list[Case]:
    """``load_saved_config`` on a run directory's config.json, intact and corrupted."""
    cases = []
    for base in SHIPPED:
        file = workdir / "saved" / f"valid-{base}" / "config.json"
        cases.append(Case(f"config-saved-valid-{base}", _saved_valid_run(base, file)))
    for i in range(count):
        base = rng.choice(SHIPPED)
        file = workdir / "saved" / f"bad-{i}" / "config.json"
        corruption = rng.choice(SAVED_CORRUPTIONS)
        text = json.dumps(shipped_raw(base))
        data = corruption(text, rng)
        name = f"config-saved-{corruption.__name__.strip('_')}-{i}"
        cases.append(
            Case(name, _saved_bad_run(file, data), (ConfigError,), rf"^{re.escape(str(file))}: ")
        )
    return cases


def _saved_valid_run(base: str, file: Path) -> Callable[[], None]:
    def run() -> None:
        write_file(file, json.dumps(shipped_raw(base)).encode())
        assert load_saved_config(file) == shipped_config(base)

    return run


def _saved_bad_run(file: Path, data: bytes) -> Callable[[], None]:
    return lambda: load_saved_config(write_file(file, data))


def _truncated(text: str, rng: random.Random) -> bytes:
    return text.encode()[: rng.randrange(0, len(text) - 1)]  # the closing brace goes


def _garbage(_text: str, rng: random.Random) -> bytes:
    return bytes([rng.choice(b"x!0-]")]) + rng.randbytes(rng.randrange(0, 200))


def _invalid_utf8(text: str, rng: random.Random) -> bytes:
    at = rng.randrange(len(text))
    return text[:at].encode() + rng.choice(INVALID_UTF8) + text[at:].encode()


def _bom(text: str, _rng: random.Random) -> bytes:
    return b"\xef\xbb\xbf" + text.encode()


def _not_an_object(_text: str, rng: random.Random) -> bytes:
    return rng.choice((b"[]", b"5", b"null", b'"x"', b"[{}]"))


def _deep(_text: str, rng: random.Random) -> bytes:
    return rng.choice((deep_text(DEEP), deep_text(DEEP, '{"a":', "}"))).encode()


def _long_digits(text: str, _rng: random.Random) -> bytes:
    return text.replace('"seed": ', '"seed": ' + "9" * 5000 + ', "x": ', 1).encode()


def _non_finite(text: str, rng: random.Random) -> bytes:
    raw = json.loads(text)
    value = rng.choice((math.nan, math.inf, -math.inf))
    raw.setdefault("eval", {})["max_new_tokens" if rng.random() < 0.5 else "batch_size"] = value
    return json.dumps(raw).encode()


SAVED_CORRUPTIONS = (
    _truncated,
    _garbage,
    _invalid_utf8,
    _bom,
    _not_an_object,
    _deep,
    _long_digits,
    _non_finite,
)


def valid_config_cases(workdir: Path) -> list[Case]:
    """Each shipped config through each way in, unchanged: the same config as its dict."""
    cases = []
    for base in SHIPPED:

        def via_toml(base: str = base) -> None:
            file = write_file(
                workdir / "configs" / f"valid-{base}.toml", to_toml(shipped_raw(base)).encode()
            )
            assert load_config(file) == shipped_config(base)

        def via_name(base: str = base) -> None:
            assert load_config(base) == shipped_config(base)

        def via_override(base: str = base) -> None:
            seed = shipped_config(base).seed
            assert load_config(base, [f"seed={seed}"]) == shipped_config(base)

        cases += [
            Case(f"config-{base}-valid-toml", via_toml),
            Case(f"config-{base}-valid-file", via_name),
            Case(f"config-{base}-valid-override", via_override),
        ]

    def nested_within_limit() -> None:
        raw = shipped_raw("tiny")
        raw["data"]["chat_template_kwargs"] = {"x": deep_list(20)}
        config_from_dict(raw)

    return [*cases, Case("config-valid-nested-20-levels", nested_within_limit)]


def config_cases(rng: random.Random, workdir: Path) -> list[Case]:
    return (
        valid_config_cases(workdir)
        + range_cases(rng, workdir, scaled(60))
        + type_cases(rng, workdir, scaled(45))
        + string_cases(rng, workdir, scaled(35))
        + unknown_key_cases(rng, workdir, scaled(20))
        + removal_cases(rng, scaled(12))
        + kind_cases(rng, workdir, scaled(10))
        + deep_cases(workdir)
        + override_cases(rng)
        + toml_corruption_cases(rng, workdir, scaled(20))
        + saved_config_cases(rng, workdir, scaled(15))
    )


# =============================================================================================

BUILDERS = {"cache": cache_cases, "data": data_cases, "config": config_cases}


def make_cases(category: str, seed: int, workdir: Path) -> list[Case]:
    """The cases of ``category`` for ``seed`` (the same list for the same seed)."""
    return BUILDERS[category](random.Random(seed), Path(workdir))
