"""Tests of cache format v2: bit fields, Elias-Fano ids, quantised log-probs, v2 shards.

The codecs are checked against what they promise independently of their code: the bit layout
docs/cache-format.md gives, the quantiser's documented compander (a decoded distance to the row
max within half a code step), the top-K mass kept to fp32, and the KD loss on decoded targets
against the loss on the exact teacher arrays. Damage tests edit v2 tensors and re-sign the
manifest, as a buggy writer would; the generic damage, resume and multi-rank tests of
tests/test_cache.py run on v2 too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from test_cache import (
    LENGTHS,
    _check_sampled,
    _check_topk,
    _rewrite_shard,
    _tensor_edit,
    make_spec,
    sample_scores,
    shard_files,
    topk_tail_kl,
    v2_compand,
    write_cache,
    write_pristine,
)

from pangu_fastkd.cache import (
    CacheError,
    CacheReader,
    CacheSpec,
    CacheWriter,
    SequenceScores,
    finalize_cache,
    verify_cache,
)
from pangu_fastkd.cache.__main__ import main as cli_main
from pangu_fastkd.cache.bitpack import EliasFano, field_bytes, pack_fields, unpack_fields
from pangu_fastkd.cache.codec_v2 import encode_v2_topk, v2_shard_tensors
from pangu_fastkd.cache.manifest import read_manifest, write_manifest
from pangu_fastkd.cache.quantise import dequantise, empty_code, impossible_code, quantise
from pangu_fastkd.cache.shards import encode_shard
from pangu_fastkd.cache.spec import codec_fields
from pangu_fastkd.ops import TopKTarget, fused_linear_sparse_kd

OPENPANGU_VOCAB = 153_376

# ---------------------------------------------------------------------------------------------
# Bit fields and Elias-Fano


@pytest.mark.parametrize("width", [1, 3, 6, 8, 13, 18, 31, 56])
@pytest.mark.parametrize("count", [0, 1, 5, 64])
def test_bit_fields_round_trip_in_the_documented_layout(width, count):
    g = np.random.default_rng(width * 100 + count)
    values = g.integers(0, 1 << width, size=(7, count), dtype=np.int64)
    values[0] = (1 << width) - 1  # every bit set
    packed = pack_fields(values, width)
    assert packed.dtype == np.uint8 and packed.shape == (7, field_bytes(count, width))
    assert np.array_equal(unpack_fields(packed, count, width), values)
    # Field j of row i is bits [j * width, (j + 1) * width) of the row, little-endian.
    bits = np.unpackbits(packed, axis=1, bitorder="little")
    for j in range(count):
        weights = 1 << np.arange(width, dtype=np.int64)
        assert np.array_equal(bits[:, j * width : (j + 1) * width] @ weights, values[:, j])
    assert not bits[:, count * width :].any()  # padding is zero


def test_bit_fields_refuse_what_does_not_fit():
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*4\)"):
        pack_fields(np.array([[16]]), 4)
    with pytest.raises(ValueError, match=r"outside \[0, 2\*\*4\)"):
        pack_fields(np.array([[-1]]), 4)
    with pytest.raises(ValueError, match="width must be in"):
        pack_fields(np.array([[1]]), 0)
    with pytest.raises(ValueError, match="packed rows hold 2 bytes"):
        unpack_fields(np.zeros((1, 2), dtype=np.uint8), 3, 6)


@pytest.mark.parametrize(
    ("count", "universe"),
    [(64, OPENPANGU_VOCAB), (5, 1000), (8, 12), (1, 1), (3, 3), (16, 1 << 31)],
)
def test_elias_fano_round_trip_and_size(count, universe):
    g = np.random.default_rng(count + universe)
    rows = np.sort(g.integers(0, universe, size=(9, count)), axis=1)
    rows[0] = universe - 1  # all at the top (repeats allowed: the filler of empty slots)
    rows[1] = 0
    code = EliasFano(count, universe)
    low_bits = max(0, math.floor(math.log2(universe / count))) if universe > count else 0
    assert code.low_bits == low_bits
    assert code.high_bits == count + ((universe - 1) >> low_bits)
    high, low = code.encode(rows)
    assert high.shape == (9, field_bytes(code.high_bits, 1))
    assert low.shape == (9, field_bytes(count, low_bits))
    values, ok = code.decode(high, low)
    assert ok.all() and np.array_equal(values, rows)
    if (count, universe) == (64, OPENPANGU_VOCAB):
        assert (high.shape[1] + low.shape[1]) * 8 / count <= 13.5  # bits per id, against 18


def test_elias_fano_flags_a_damaged_unary_part():
    code = EliasFano(6, 1000)
    rows = np.array([[1, 5, 90, 400, 401, 999]] * 4)
    high, low = code.encode(rows)
    high[1, 0] ^= 0x04  # one set bit more (or fewer)
    high[2, :] = 0
    high[3, -1] |= 0x80  # a padding bit past high_bits
    values, ok = code.decode(high, low)
    assert ok.tolist() == [True, False, False, code.high_bits % 8 == 0]
    assert np.array_equal(values[0], rows[0])
    with pytest.raises(ValueError, match="non-decreasing"):
        code.encode(np.array([[5, 1, 2, 3, 4, 6]]))
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        code.encode(np.array([[1, 2, 3, 4, 5, 1000]]))


# ---------------------------------------------------------------------------------------------
# Quantised log-probs


def _teacher_rows(n: int, k: int, sharpness: float, seed: int) -> torch.Tensor:
    """``[n, K]`` top-K log-probs of random full-vocabulary teachers, flat to peaked."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 4096, generator=g) * sharpness
    return torch.log_softmax(logits, dim=1).topk(k, dim=1).values


@pytest.mark.parametrize("sharpness", [0.5, 2.0, 6.0])
@pytest.mark.parametrize("bits", [6, 8])
def test_quantiser_keeps_the_mass_and_the_kl_small(sharpness, bits):
    v = _teacher_rows(256, 64, sharpness, seed=int(sharpness * 10) + bits)
    empty = torch.zeros_like(v, dtype=torch.bool)
    codes, mass_logit = quantise(v, empty, bits)
    assert codes.min() >= 0 and codes.max() <= (1 << bits) - 3
    assert (codes.min(axis=1) == 0).all()  # each row's largest is its own reference
    decoded, got_empty = dequantise(codes, mass_logit, bits)
    assert not got_empty.any()
    assert torch.allclose(decoded.exp().sum(1), v.exp().sum(1), rtol=1e-5)
    top = v.amax(dim=1, keepdim=True)
    u_err = (v2_compand(decoded.amax(1, keepdim=True) - decoded) - v2_compand(top - v)).abs()
    assert u_err.max() <= 0.5 / ((1 << bits) - 3) + 1e-5
    kl = topk_tail_kl(v, decoded)
    assert kl.min() >= -1e-7
    assert kl.mean() <= (1e-3 if bits == 6 else 1e-4)


def test_quantiser_reserved_codes_and_extremes():
    bits = 6
    v = torch.tensor(
        [
            [-0.1, -math.inf, -2.0, 0.0],  # an impossible token; the last slot empty
            [0.0, -100.0, -31.0, -1e-8],  # P_S rounds to 1; beyond the range
            [-math.inf, -math.inf, 0.0, 0.0],  # only -inf (both slots after empty)
        ]
    )
    empty = torch.tensor(
        [[False, False, False, True], [False, False, False, False], [False, False, True, True]]
    )
    codes, mass_logit = quantise(v, empty, bits)
    assert codes[0, 1] == impossible_code(bits) and codes[0, 3] == empty_code(bits)
    assert codes[2].tolist() == [impossible_code(bits)] * 2 + [empty_code(bits)] * 2
    assert mass_logit[1] == math.inf and mass_logit[2] == -math.inf
    decoded, got_empty = dequantise(codes, mass_logit, bits)
    assert torch.equal(got_empty, empty)
    assert decoded[0, 1] == -math.inf and decoded[0, 3] == -math.inf
    assert (decoded[2] == -math.inf).all()
    assert float(decoded[1].exp().sum()) == pytest.approx(1.0, abs=1e-6)
    # A distance beyond the range decodes at the range: 1e-13 of the row max, not -inf.
    assert float(decoded[1, 0] - decoded[1, 1]) == pytest.approx(30.0, abs=1e-3)
    for bad in (2, 17):
        with pytest.raises(ValueError, match=r"value_bits must be in \[3, 16\]"):
            quantise(v, empty, bad)


# ---------------------------------------------------------------------------------------------
# Spec


def test_spec_codec_fields_and_json():
    v2 = make_spec(codec="v2")
    assert (v2.value_bits, v2.id_coding, v2.format_version, v2.id_bits) == (
        6,
        "elias_fano",
        2,
        10,
    )
    assert CacheSpec(**{**dataclasses.asdict(v2), "codec": "v2"}) == v2
    data = v2.to_json()
    assert "value_dtype" not in data and data["codec"] == "v2"
    assert CacheSpec.from_json(json.loads(json.dumps(data)), source="x") == v2
    v1 = make_spec(codec="v1", value_dtype="fp16")
    assert not {"codec", "value_bits", "id_coding"} & set(v1.to_json())  # as version 1 wrote
    assert CacheSpec.from_json(v1.to_json(), source="x") == v1
    assert make_spec(codec="v2", vocab_size=OPENPANGU_VOCAB).id_bits == 18

    with pytest.raises(ValueError, match="value_dtype applies to codec v1 only"):
        make_spec(codec="v2", value_dtype="fp32")
    with pytest.raises(ValueError, match="value_bits applies to codec v2 only"):
        make_spec(codec="v1", value_bits=8)
    with pytest.raises(ValueError, match="id_coding must be one of"):
        make_spec(codec="v2", id_coding="zstd")
    with pytest.raises(ValueError, match="value_bits must be <= 16"):
        make_spec(codec="v2", value_bits=17)
    with pytest.raises(ValueError, match="codec must be one of"):
        make_spec(codec="v3")
    with pytest.raises(CacheError, match="malformed spec"):
        CacheSpec.from_json({**data, "value_dtype": "bf16"}, source="x")
    assert codec_fields("v1", "fp32", 6, "elias_fano") == {"codec": "v1", "value_dtype": "fp32"}
    with pytest.raises(ValueError, match="apply to codec v2 only"):
        codec_fields("v1", "bf16", 8, "elias_fano")


# ---------------------------------------------------------------------------------------------
# Round trip


@pytest.mark.parametrize("id_coding", ["elias_fano", "packed"])
@pytest.mark.parametrize(
    ("vocab_size", "k"),
    [(1000, 5), (12, 8), (50_000, 3), ((1 << 24) + 5, 5), (OPENPANGU_VOCAB, 64)],
)
def test_round_trip(tmp_path, vocab_size, k, id_coding):
    """Every id back (sorted by id under elias_fano), values within half a code step, the
    sampled targets exact; shards hold the documented tensors."""
    draws = 300 if vocab_size == 50_000 else 40
    spec = make_spec(
        codec="v2", vocab_size=vocab_size, k=k, sampled_k=6, sampled_draws=draws,
        id_coding=id_coding, value_bits=7 if vocab_size == 12 else None,
    )  # fmt: skip
    written = write_cache(tmp_path, spec)
    reader = CacheReader(tmp_path)
    assert reader.manifest.spec == spec and reader.manifest.format_version == 2
    _check_topk(reader.topk_target(range(len(LENGTHS))), written, spec)
    order = [5, 1, 0, 3]
    _check_topk(reader.topk_target(order), [written[i] for i in order], spec)
    _check_sampled(reader.sampled_target(order), [written[i] for i in order], spec)
    assert reader.topk_target([]).ids.shape == (0, k)

    expected = v2_shard_tensors(spec)
    with safe_open(str(shard_files(tmp_path)[0]), framework="pt") as shard:
        assert set(shard.keys()) == {*expected, "seq_offsets"}
        for name, (dtype, tail) in expected.items():
            assert shard.get_slice(name).get_dtype() == dtype
            assert tuple(shard.get_slice(name).get_shape()[1:]) == tail
        metadata = json.loads(shard.metadata()["pangu_fastkd.cache"])
    assert metadata["codec"] == "v2" and metadata["value_bits"] == spec.value_bits
    assert verify_cache(tmp_path)["codec"] == "v2"


def test_bytes_per_token_at_openpangu_width(tmp_path):
    """K = 64, V = 153,376, 6-bit values: at most 2.5 bytes per entry + 8 per token (168),
    shard headers and offsets included; v1 takes 5K + 8 = 328."""
    spec = make_spec(codec="v2", vocab_size=OPENPANGU_VOCAB, k=64)
    write_cache(tmp_path, spec, (300, 17, 410, 250), shard_tokens=1 << 18)
    measured = CacheReader(tmp_path).bytes_per_token()
    print(f"v2 K=64: {measured:.3f} bytes per supervised token (target 168)")
    per_row = sum(
        math.prod(tail) * {"U8": 1, "F16": 2, "F32": 4}[dtype]
        for dtype, tail in v2_shard_tensors(spec).values()
    )
    assert per_row == 164
    assert 164 <= measured <= 168


def test_v2_loss_matches_v1_and_exact(tmp_path):
    """The fused KD loss on a v2 cache's targets is within 1e-3 relative of v1 (fp32) and of
    the loss on the teacher's exact top-K, for peaked and flat teachers."""
    V, K, T, d = 3000, 64, 1.0, 16
    g = torch.Generator().manual_seed(11)
    for sharpness in (1.0, 4.0):
        teacher = [torch.randn(n, V, generator=g) * sharpness for n in (40, 25)]
        labels = [torch.randint(0, V, (len(t),), generator=g) for t in teacher]
        losses = {}
        for codec, fields in (("v1", {"value_dtype": "fp32"}), ("v2", {})):
            spec = make_spec(codec=codec, vocab_size=V, k=K, temperature=T, **fields)
            directory = tmp_path / f"{codec}-{sharpness}"
            write_teacher_cache(directory, spec, teacher, labels)
            target = CacheReader(directory).targets_for_batch(["a", "b"], [40, 25])
            losses[codec] = _loss(target, torch.cat(labels), V, d, T)
        full = torch.cat(teacher)
        top = full.topk(K, dim=1)
        y = torch.cat(labels)
        exact = TopKTarget(
            ids=top.indices.to(torch.int32),
            logits=top.values,
            lse=torch.logsumexp(full / T, dim=1),
            label_logit=full.gather(1, y[:, None])[:, 0],
            temperature=T,
        )
        reference = _loss(exact, y, V, d, T)
        assert losses["v1"] == pytest.approx(reference, rel=1e-5)
        assert losses["v2"] == pytest.approx(losses["v1"], rel=1e-3)


def write_teacher_cache(directory, spec, teacher, labels) -> None:
    names = ["a", "b", "c"][: len(teacher)]
    with CacheWriter(directory, spec, names, shard_tokens=30) as writer:
        for i, (t, y) in enumerate(zip(teacher, labels, strict=True)):
            top = t.topk(spec.k, dim=1)
            lse = torch.logsumexp(t / spec.temperature, dim=1)
            writer.add(
                SequenceScores(i, top.indices, top.values, lse, t.gather(1, y[:, None])[:, 0])
            )
    finalize_cache(directory)


def _loss(target: TopKTarget, labels: torch.Tensor, V: int, d: int, T: float) -> float:
    hidden = torch.randn(len(labels), d, generator=torch.Generator().manual_seed(5))
    weight = torch.randn(V, d, generator=torch.Generator().manual_seed(6))
    return float(fused_linear_sparse_kd(hidden, weight, labels, target, temperature=T))


# ---------------------------------------------------------------------------------------------
# Damage


@pytest.fixture(scope="module")
def pristine_v2(tmp_path_factory):
    return write_pristine(tmp_path_factory, "v2")


@pytest.fixture(scope="module")
def pristine_packed(tmp_path_factory):
    return write_pristine(tmp_path_factory, "v2", id_coding="packed")


def _flip_unary(tensors: dict) -> None:
    tensors["id_high"][1, 0] ^= 0x01


def _repeat_id(tensors: dict, spec: CacheSpec) -> None:
    code = EliasFano(spec.k, spec.vocab_size)
    values, _ = code.decode(tensors["id_high"].numpy(), tensors["id_low"].numpy())
    values[2, 1] = values[2, 0]
    high, low = code.encode(values[2:3])
    tensors["id_high"][2] = torch.from_numpy(high[0])
    tensors["id_low"][2] = torch.from_numpy(low[0])


def _packed_empty_slot(tensors: dict, spec: CacheSpec) -> None:
    """Slot 0 of row 3 says "empty" while its code says a value (or the reverse)."""
    ids = unpack_fields(tensors["ids"].numpy(), spec.k, spec.id_bits)
    ids[3, 0] = (1 << spec.id_bits) - 1
    tensors["ids"] = torch.from_numpy(pack_fields(ids, spec.id_bits))


def _packed_out_of_range(tensors: dict, spec: CacheSpec) -> None:
    ids = unpack_fields(tensors["ids"].numpy(), spec.k, spec.id_bits)
    ids[2, 0] = spec.vocab_size
    tensors["ids"] = torch.from_numpy(pack_fields(ids, spec.id_bits))


def _edit(name: str, index, value):
    return lambda tensors, spec: _tensor_edit(name, index, value)(tensors)


BAD_V2_CONTENT = {
    "unary part": ("ef", lambda t, s: _flip_unary(t), r"row 1 .*the id code of the row is corrupt"),
    "repeated id": ("ef", _repeat_id, r"row 2 \(sequence 5 'doc-5', token 1\): .*id \d+ twice"),
    "empty slot mismatch": ("packed", _packed_empty_slot, r"row 3 .*id code of the row is corrupt"),
    "id out of range": ("packed", _packed_out_of_range, r"row 2 .*id 1000 outside \[0, 1000\)"),
    "NaN mass": ("ef", _edit("mass_logit", 0, math.nan), r"row 0 .*values hold NaN or \+inf"),
    "lse": ("ef", _edit("lse", 2, -math.inf), r"row 2 .*lse is not finite"),
    "label": ("ef", _edit("label_value", 1, math.nan), r"row 1 .*label value is not finite"),
    "counts": ("ef", _edit("sampled_counts", (3, 0), 0), r"row 3 .*sampled_counts"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_V2_CONTENT))
def test_verify_checks_every_v2_row(tmp_path, pristine_v2, pristine_packed, case):
    coding, edit, message = BAD_V2_CONTENT[case]
    source = pristine_v2 if coding == "ef" else pristine_packed
    directory = tmp_path / "cache"
    shutil.copytree(source, directory)
    spec = read_manifest(directory).spec
    name = _rewrite_shard(directory, 1, lambda tensors: edit(tensors, spec))
    with pytest.raises(CacheError, match=rf"^{name}: {message}"):
        verify_cache(directory)
    with pytest.raises(CacheError, match=name):  # the trainer's reader refuses it too
        reader = CacheReader(directory, verify_checksums=False)
        reader.topk_target(range(len(LENGTHS)))
        reader.sampled_target(range(len(LENGTHS)))


def test_shard_metadata_must_match_the_codec(tmp_path, pristine_v2):
    """A v2 shard whose metadata names other bit widths (re-signed) is refused by name."""
    directory = tmp_path / "cache"
    shutil.copytree(pristine_v2, directory)
    manifest = read_manifest(directory)
    path = directory / manifest.shards[0].name
    with safe_open(str(path), framework="pt") as shard:
        metadata = json.loads(shard.metadata()["pangu_fastkd.cache"])
        tensors = {key: shard.get_tensor(key) for key in shard.keys()}
    metadata["value_bits"] = 5
    data = encode_shard(tensors, metadata)
    path.write_bytes(data)
    record = dataclasses.replace(
        manifest.shards[0], num_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()
    )
    write_manifest(directory, dataclasses.replace(manifest, shards=(record, *manifest.shards[1:])))
    with pytest.raises(CacheError, match=rf"{path.name}: .*value_bits"):
        verify_cache(directory)


def test_manifest_version_must_match_the_codec(tmp_path, pristine_v2):
    directory = tmp_path / "cache"
    shutil.copytree(pristine_v2, directory)
    manifest = read_manifest(directory)
    write_manifest(directory, dataclasses.replace(manifest, format_version=1))  # re-signed
    with pytest.raises(CacheError, match=r"format version 1 does not match the spec's codec"):
        CacheReader(directory)


def test_v1_cache_still_reads_and_resumes_beside_v2(tmp_path, capsys):
    """A v1 cache (as earlier versions wrote it) verifies, resumes as v1 and is reported."""
    spec = make_spec(codec="v1")
    ids = ["a", "b", "c"]
    with CacheWriter(tmp_path, spec, ids, shard_tokens=2) as writer:
        writer.add(sample_scores(0, 3, spec))
    with pytest.raises(CacheError, match="different spec: codec is 'v1' there and 'v2' here"):
        CacheWriter(tmp_path, make_spec(codec="v2"), ids)
    with CacheWriter(tmp_path, spec, ids, shard_tokens=2) as writer:
        assert writer.next_sequence == 1
        while (i := writer.next_sequence) is not None:
            writer.add(sample_scores(i, 2, spec))
    assert finalize_cache(tmp_path).format_version == 1
    assert "codec" not in json.loads((tmp_path / "manifest.json").read_text())["spec"]
    assert cli_main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "codec: v1" in out and "value_dtype: bf16" in out and "format_version: 1" in out


def test_cli_info_prints_codec_and_bytes_per_token(tmp_path, pristine_v2, capsys):
    assert cli_main(["info", str(pristine_v2)]) == 0
    out = capsys.readouterr().out
    for line in ("codec: v2", "value_bits: 6", "id_coding: elias_fano", "bytes_per_token: "):
        assert line in out
    assert cli_main(["verify", str(pristine_v2)]) == 0
    assert "codec: v2" in capsys.readouterr().out


def test_encode_refuses_a_row_that_cannot_be_stored():
    """The writer checked rows before encoding; the encoder still refuses unsorted garbage
    rather than storing a wrong code."""
    spec = make_spec(codec="v2", k=3)
    ids = torch.tensor([[5, 5, 1000]])
    with pytest.raises(ValueError, match=r"outside \[0, 1000\)"):
        encode_v2_topk(ids, torch.zeros(1, 3) - 2, torch.zeros(1), torch.zeros(1) - 3, spec)
