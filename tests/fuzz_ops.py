"""Fuzz categories of the ops: packed attention, the fused sparse-KD loss, the fused
cross-entropy and the document-boundary helpers (the protocol is in ``fuzz_harness.py``).

Why: the unit tests pin chosen shapes and options; a user combines them freely, and a careless or
hostile caller passes what nobody planned (a float window, an id of 2**32 + 1, a meta tensor
among CPU ones). Each category mixes

* valid random inputs (odd shapes: T = 1, documents of length 0 and 1, N = 0, every row ignored,
  K = 1, K = V, head dim 1, GQA ratios, fp32 / bf16 / fp16 / fp64, every option), checked
  against the readable PyTorch definitions: ``packed_attention_reference``,
  ``sparse_kd_reference``, and ``F.cross_entropy`` on materialised logits, with the tolerances
  of ``test_packed_attention.py`` and ``test_sparse_kd.py``, and the defined results of empty
  batches (``docs/kd-losses.md``, ``docs/non-finite.md``);
* known-bad mutations of a valid input, one at a time, that must raise ``ValueError``,
  ``TypeError`` or ``NonFiniteError`` with a message naming the argument or the problem;
* random combinations of 1-3 such mutations, which must still raise one of those types.

Every case is drawn from a ``random.Random`` seeded by the category and the seed; its tensors are
made inside its ``run`` from a per-case seed, so building the list is cheap and deterministic.
``PANGU_FUZZ_SCALE`` (a float, default 1) multiplies the number of cases.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from fuzz_harness import Case

from pangu_fastkd.data.boundaries import (
    check_cu_seqlens,
    check_position_ids,
    cu_seqlens_from_lengths,
    cu_seqlens_from_position_ids,
    positions_from_cu_seqlens,
    resolve_documents,
)
from pangu_fastkd.ops import (
    NonFiniteError,
    SampledTarget,
    TopKTarget,
    fused_linear_cross_entropy,
    fused_linear_sparse_kd,
    packed_attention,
    packed_attention_reference,
    sparse_kd_reference,
)
from pangu_fastkd.ops.packed_attention import attend_documents

CATEGORIES = ("packed_attention", "sparse_kd", "cross_entropy", "boundaries")

BAD_INPUT = (ValueError, TypeError)
NON_FINITE = (NonFiniteError,)
NON_FINITE_VALUES = (math.nan, math.inf, -math.inf)
LOW_PRECISION = (torch.bfloat16, torch.float16)

# Tensor sizes stay tiny, so that a category runs in seconds on two shared cores.
MAX_TOKENS = 48
MAX_VOCAB = 200
MAX_DIM = 32
MAX_ROWS = 12


def make_cases(category: str, seed: int, workdir: Path) -> list[Case]:
    """The cases of ``category`` for ``seed`` (``workdir`` is unused: the ops write no files)."""
    del workdir
    scale = float(os.environ.get("PANGU_FUZZ_SCALE", "1"))
    rng = random.Random(f"{category}:{seed}")
    drafts = _BUILDERS[category](rng, scale)
    # The running index makes names unique whatever two drafts are called.
    return [Case(f"{d.prefix}-{i}", d.run, d.expect, d.match) for i, d in enumerate(drafts)]


# ---------------------------------------------------------------------------------------------
# The machinery shared by the categories


@dataclass(frozen=True)
class Draft:
    """A case before its index is known: its name without the index, and the rest of it."""

    prefix: str
    run: Callable[[], None]
    expect: tuple[type[BaseException], ...] | None = None
    match: str | None = None


Args = dict[str, Any]  # the arguments of one call, mutated in place by a Bad


@dataclass(frozen=True)
class Bad:
    """One known-bad change of a valid call, and what the call must raise then.

    Attributes:
        tag: what the change is, for the case name ("cu_seqlens-decreasing").
        apply: makes the change on the call's arguments.
        expect, match: as in ``Case``.
        stage: the order when several are applied: 0 edits tensor values in place, 1 sets
            options, 2 replaces tensors (dtype, shape, device), so an edit never meets a tensor
            another change has already made unusable.
        combinable: False for a change that leaves no tensor to edit (a list instead of one).
    """

    tag: str
    apply: Callable[[Args], None]
    expect: tuple[type[BaseException], ...]
    match: str
    stage: int = 1
    combinable: bool = True


Mutator = Callable[[random.Random, Any], Bad | None]  # a Bad for this spec, or None


@dataclass(frozen=True)
class Family:
    """A kind of valid call that known-bad changes start from.

    Attributes:
        new_spec: a random valid input, described without tensors (cheap).
        build: the call's arguments for a spec, made in the case's run.
        invoke: the call under test.
        mutators: the known-bad changes that apply to this call.
    """

    new_spec: Callable[[random.Random], Any]
    build: Callable[[Any], Args]
    invoke: Callable[[Args], object]
    mutators: Sequence[Mutator]


def _count(base: int, scale: float) -> int:
    return max(1, round(base * scale))


def _run_mutated(family: Family, spec: Any, bads: Sequence[Bad]) -> None:
    args = family.build(spec)
    for bad in sorted(bads, key=lambda b: b.stage):
        try:
            bad.apply(args)
        except Exception as err:  # a bug of this module, not of the op: must not pass
            raise AssertionError(f"the fuzz case could not apply {bad.tag}: {err!r}") from err
    family.invoke(args)


def _draw(rng: random.Random, family: Family, mutators: Sequence[Mutator]) -> tuple | None:
    """A spec every one of ``mutators`` applies to and their Bads for it, or None when none of
    a few hundred specs fits them all (mutators that exclude each other)."""
    for _ in range(200):
        spec = family.new_spec(rng)
        bads = [mutate(rng, spec) for mutate in mutators]
        if all(bad is not None for bad in bads):
            return spec, bads
    return None


def _bad_drafts(rng: random.Random, family: Family, count: int) -> list[Draft]:
    """``count`` single mutations, cycling through the family's mutators."""
    drafts = []
    for i in range(count):
        mutator = family.mutators[i % len(family.mutators)]
        drawn = _draw(rng, family, [mutator])
        if drawn is None:
            raise RuntimeError(f"fuzz_ops: no valid input that {mutator.__name__} applies to")
        spec, (bad,) = drawn
        run = functools.partial(_run_mutated, family, spec, (bad,))
        drafts.append(Draft(f"bad-{bad.tag}", run, bad.expect, bad.match))
    return drafts


def _combo_drafts(rng: random.Random, family: Family, count: int) -> list[Draft]:
    """``count`` cases of 1-3 random mutations at once: any allowed error type will do."""
    drafts = []
    for _ in range(50 * count):  # bounded: some picks exclude each other and are drawn again
        if len(drafts) == count:
            break
        chosen = rng.sample(list(family.mutators), k=min(rng.randint(1, 3), len(family.mutators)))
        drawn = _draw(rng, family, chosen)
        if drawn is None or not all(bad.combinable for bad in drawn[1]):
            continue
        spec, bads = drawn
        run = functools.partial(_run_mutated, family, spec, tuple(bads))
        tags = "+".join(bad.tag for bad in bads)
        drafts.append(Draft(f"combo-{tags}", run, BAD_INPUT))
    return drafts


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _other_float_dtype(dtype: torch.dtype, rng: random.Random) -> torch.dtype:
    choices = [
        d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16) if d != dtype
    ]
    return rng.choice(choices)


def _random_dtype(rng: random.Random) -> torch.dtype:
    """Mostly fp32 and bf16 (the training dtypes); fp64 and fp16 now and then."""
    return rng.choices(
        [torch.float32, torch.bfloat16, torch.float64, torch.float16], weights=[55, 25, 12, 8]
    )[0]


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(dtype, "fp16")


def _assert_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float,
    what: str,
    *,
    floor: float = 0.0,
    atol: float = 0.0,
) -> None:
    """``max|actual - expected| <= rtol * max(max|expected|, floor) + atol`` (as
    ``test_sparse_kd.py``), same shape, both finite."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert bool(torch.isfinite(expected).all()), f"{what}: the expected value is not finite"
    assert bool(torch.isfinite(actual).all()), f"{what}: not finite: {actual}"
    if actual.numel() == 0:
        return
    err = (actual.double() - expected.double()).abs().max().item()
    scale = max(expected.double().abs().max().item(), floor)
    assert err <= rtol * scale + atol, f"{what}: error {err:.3e} > {rtol:g} x {scale:.3e} + {atol}"


# Low precision: on problems this small PyTorch's own error can vanish by luck, so the rule
# "at most twice PyTorch's error" gets a slack of a couple of bf16 roundings (2^-8 each) of the
# result's size (the larger of its largest value and its natural size, the floor).
LOW_PRECISION_SLACK = 1e-2


def _assert_low_precision(
    actual: torch.Tensor,
    torch_low: torch.Tensor,
    exact: torch.Tensor,
    what: str,
    floor: float = 1e-3,
) -> None:
    """flash-attention's rule (``test_sparse_kd.py``): the error in bf16/fp16 against the exact
    result (fp64 math on the same values) is at most twice plain PyTorch's error in the same
    dtype, plus the slack above."""
    assert actual.shape == exact.shape, f"{what}: shape {actual.shape} != {exact.shape}"
    assert bool(torch.isfinite(actual).all()), f"{what}: not finite: {actual}"
    if actual.numel() == 0:
        return
    err = (actual.double() - exact.double()).abs().max().item()
    torch_err = (torch_low.double() - exact.double()).abs().max().item()
    slack = LOW_PRECISION_SLACK * max(exact.double().abs().max().item(), floor)
    assert err <= 2 * torch_err + slack, (
        f"{what}: error {err:.3e} > 2 x PyTorch's {torch_err:.3e} + {slack:.2e}"
    )


def _random_lengths(rng: random.Random, max_total: int) -> tuple[int, ...]:
    """Document lengths: T = 0 now and then, one document, or several with 0s and 1s."""
    shape = rng.random()
    if shape < 0.07:
        return (0,) * rng.randint(1, 3)
    if shape < 0.25:
        return (rng.choice([1, rng.randint(1, max_total)]),)
    lengths = [rng.choice([0, 1, 1, 2, rng.randint(1, 16)]) for _ in range(rng.randint(2, 8))]
    while sum(lengths) > max_total:
        lengths[lengths.index(max(lengths))] //= 2
    return tuple(lengths)


def _bounds(lengths: Sequence[int]) -> list[int]:
    """cu_seqlens as Python ints: the plain computation the helpers are checked against."""
    return [0, *itertools.accumulate(lengths)]


def _positions(lengths: Sequence[int]) -> list[int]:
    return [p for length in lengths for p in range(length)]


# ---------------------------------------------------------------------------------------------
# packed_attention


@dataclass(frozen=True)
class AttentionSpec:
    """One packed-attention call; the tensors come from ``seed``."""

    lengths: tuple[int, ...]
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    causal: bool
    window: int | None
    softmax_scale: float | None
    max_seqlen: int | None
    check_finite: bool
    strided: bool  # q, k, v as non-contiguous views
    via_documents: bool  # attend_documents on resolve_documents' boundaries
    grad_of: tuple[str, ...]
    seed: int

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)


def _random_attention_spec(rng: random.Random) -> AttentionSpec:
    lengths = _random_lengths(rng, MAX_TOKENS)
    kv_heads = rng.choice([1, 1, 2, 3, 4])
    causal = rng.random() < 0.8
    window = None
    if causal and rng.random() < 0.4:
        window = rng.choice([0, 1, rng.randint(0, max(lengths) + 2)])
    return AttentionSpec(
        lengths=lengths,
        q_heads=kv_heads * rng.choice([1, 1, 2, 3, 4]),  # GQA ratios 1-4
        kv_heads=kv_heads,
        head_dim=rng.choice([1, 2, 3, 8, 16, MAX_DIM, rng.randint(1, MAX_DIM)]),
        dtype=_random_dtype(rng),
        causal=causal,
        window=window,
        softmax_scale=None if rng.random() < 0.6 else rng.uniform(0.05, 2.0),
        max_seqlen=rng.choice([None, None, max(lengths), max(lengths) + rng.randint(1, 5)]),
        check_finite=rng.random() < 0.2,
        strided=rng.random() < 0.15,
        via_documents=rng.random() < 0.1,
        grad_of=tuple(n for n in "qkv" if rng.random() < 0.7),
        seed=rng.randrange(2**31),
    )


def _describe_attention(spec: AttentionSpec) -> str:
    parts = [_dtype_name(spec.dtype), f"T{spec.total}", f"docs{len(spec.lengths)}"]
    parts.append(f"h{spec.q_heads}x{spec.kv_heads}-d{spec.head_dim}")
    parts.append("causal" if spec.causal else "full")
    if spec.window is not None:
        parts.append(f"window{spec.window}")
    if spec.via_documents:
        parts.append("documents")
    return "-".join(parts)


def _attention_args(spec: AttentionSpec) -> Args:
    g = torch.Generator().manual_seed(spec.seed)

    def make(heads: int) -> torch.Tensor:
        x = torch.randn(spec.total, heads, spec.head_dim, generator=g, dtype=torch.float64)
        x = x.to(spec.dtype)
        # The same values in an [H, T, D] buffer viewed as [T, H, D]: strided.
        return x.transpose(0, 1).contiguous().transpose(0, 1) if spec.strided else x

    options: dict[str, Any] = {
        "causal": spec.causal,
        "softmax_scale": spec.softmax_scale,
        "window": spec.window,
        "check_finite": spec.check_finite,
    }
    if spec.max_seqlen is not None:
        options["max_seqlen"] = spec.max_seqlen
    return {
        "q": make(spec.q_heads),
        "k": make(spec.kv_heads),
        "v": make(spec.kv_heads),
        "cu_seqlens": torch.tensor(_bounds(spec.lengths), dtype=torch.int32),
        "options": options,
    }


def _invoke_attention(args: Args) -> object:
    return packed_attention(args["q"], args["k"], args["v"], args["cu_seqlens"], **args["options"])


# Tolerances of test_packed_attention.py against float64: (out and lse, gradients).
ATTENTION_TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (1e-5, 1e-4)}


def _math_attention_low(q, k, v, bounds, *, causal, softmax_scale, window) -> torch.Tensor:
    """Plain PyTorch math attention in the inputs' dtype, document by document: scores,
    softmax and the product with v all in bf16 / fp16 (flash-attention's ``attention_ref``
    without upcast), what low-precision results are judged by.

    Not SDPA: on the CPU it keeps the scores in fp32, where the kernel's GEMM rounds them to the
    input dtype as ``q @ k.T`` does; that rounding dominates the error once the scores are
    large (a softmax_scale of 1.3 with D = 32 gives errors 10x SDPA's)."""
    group = q.shape[1] // k.shape[1]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[2])
    outs = [q[:0]]
    for start, end in itertools.pairwise(bounds):
        qd = q[start:end].transpose(0, 1)  # [Hq, L, D]
        kd = k[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        vd = v[start:end].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (qd @ kd.transpose(1, 2)) * scale
        i = torch.arange(end - start)[:, None]
        j = torch.arange(end - start)[None, :]
        allowed = (j <= i) if causal else torch.ones(end - start, end - start, dtype=torch.bool)
        if window is not None:
            allowed = allowed & (j >= i - window)
        probs = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
        outs.append((probs @ vd).transpose(0, 1))
    return torch.cat(outs, dim=0)


def _attention_output(spec: AttentionSpec, args: Args, q, k, v):
    """The op's ``(out, lse)`` (lse None on the ``attend_documents`` path)."""
    if spec.via_documents:
        documents = resolve_documents(torch.zeros(spec.total, dtype=torch.long), args["cu_seqlens"])
        options = {key: args["options"][key] for key in ("causal", "softmax_scale", "window")}
        return attend_documents(q, k, v, documents, **options), None
    return packed_attention(q, k, v, args["cu_seqlens"], return_lse=True, **args["options"])


def _check_attention(spec: AttentionSpec) -> None:
    """Output, lse and gradients of the op against the float64 reference on the same values;
    bf16 / fp16 within twice the error of plain PyTorch attention in that dtype
    (flash-attention's rule)."""
    args = _attention_args(spec)
    leaves = [args[n].requires_grad_(n in spec.grad_of) for n in "qkv"]
    out, lse = _attention_output(spec, args, *leaves)
    assert out.dtype == spec.dtype, f"out is {out.dtype}, q is {spec.dtype}"
    options = {key: args["options"][key] for key in ("causal", "softmax_scale", "window")}
    exact = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    ref, ref_lse = packed_attention_reference(*exact, args["cu_seqlens"], **options)
    g = torch.Generator().manual_seed(spec.seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = _grads(out, [t for t in leaves if t.requires_grad], grad_out.to(out.dtype))
    want = _grads(ref, [t for t in exact if t.requires_grad], grad_out)
    for name, got in zip(spec.grad_of, grads, strict=True):
        assert got.dtype == spec.dtype, f"grad {name} is {got.dtype}"
    if spec.dtype in LOW_PRECISION:
        low = [t.detach().clone().requires_grad_(t.requires_grad) for t in leaves]
        torch_out = _math_attention_low(*low, _bounds(spec.lengths), **options)
        torch_grads = _torch_grads(torch_out, [t for t in low if t.requires_grad], grad_out)
        floors = _attention_scales(spec, leaves, grad_out)
        _assert_low_precision(out, torch_out, ref, "out", floors["out"])
        for name, got, theirs, expected in zip(spec.grad_of, grads, torch_grads, want, strict=True):
            _assert_low_precision(got, theirs, expected, f"grad {name}", floors[name])
    else:
        out_tol, grad_tol = ATTENTION_TOL[spec.dtype]
        _assert_near(out.double(), ref, out_tol, "out")
        for name, got, expected in zip(spec.grad_of, grads, want, strict=True):
            _assert_near(got.double(), expected, grad_tol, f"grad {name}")
    if lse is not None:
        _check_lse(spec, lse, ref_lse)


def _check_lse(spec: AttentionSpec, lse: torch.Tensor, ref_lse: torch.Tensor) -> None:
    """``[Hq, T]`` float32 (float64 for float64 inputs, as the op's fake kernel says)."""
    lse_dtype = torch.float64 if spec.dtype == torch.float64 else torch.float32
    assert lse.dtype == lse_dtype, f"lse is {lse.dtype}"
    assert lse.shape == (spec.q_heads, spec.total), f"lse has shape {tuple(lse.shape)}"
    # The scores of bf16 / fp16 inputs are rounded to that dtype (see _math_attention_low).
    tol = 1e-2 if spec.dtype in LOW_PRECISION else 1e-5
    _assert_near(lse.float(), ref_lse, tol, "lse")


def _attention_scales(spec: AttentionSpec, qkv: list[torch.Tensor], grad_out: torch.Tensor):
    """The size of the output and gradients whatever their values: out is an average of v
    rows; dq = scale * sum_j p_ij (dO_i . v_j - D_i) k_j, and so on. A gradient that
    (nearly) cancels, such as dq of a one-token document, is judged against it: the kernel's
    D_i = rowsum(dO_i * O_i) uses the rounded O, as flash-attention's does."""
    q, k, v = (t.detach().double().abs().max().item() if t.numel() else 0.0 for t in qkv)
    scale = spec.softmax_scale or 1.0 / math.sqrt(spec.head_dim)
    do = grad_out.abs().max().item() if grad_out.numel() else 0.0
    return {"out": v, "q": scale * k * do * v, "k": scale * q * do * v, "v": do}


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple:
    return torch.autograd.grad(out, inputs, grad_out) if inputs else ()


def _torch_grads(out: torch.Tensor, inputs: list[torch.Tensor], grad_out: torch.Tensor) -> tuple:
    """Gradients of the math loop: zeros for an input no document used (T = 0)."""
    if not inputs:
        return ()
    if not out.requires_grad:
        return tuple(torch.zeros_like(t) for t in inputs)
    grad_out = grad_out.to(out.dtype)
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True, materialize_grads=True)


def _assert_near(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str) -> None:
    """``torch.testing.assert_close`` with rtol = atol = ``tol``, its message prefixed."""
    msg = functools.partial("{}: {}".format, what)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=msg)


def _set_option(name: str, value: object) -> Callable[[Args], None]:
    def apply(args: Args) -> None:
        args["options"][name] = value

    return apply


def _set_options(**values: object) -> Callable[[Args], None]:
    def apply(args: Args) -> None:
        args["options"].update(values)

    return apply


def _replace(name: str, make: Callable[[torch.Tensor], Any]) -> Callable[[Args], None]:
    def apply(args: Args) -> None:
        args[name] = make(args[name])

    return apply


def _replace_all(names: Sequence[str], make: Callable[[torch.Tensor], Any]):
    def apply(args: Args) -> None:
        for name in names:
            args[name] = make(args[name])

    return apply


def _fresh(shape: tuple[int, ...], fill: float = 1) -> Callable[[torch.Tensor], torch.Tensor]:
    """A replacement of ``shape``, with the dtype and device of the tensor it replaces. Only
    those are read: an earlier change may have altered its shape, and a replacement made from
    it (a slice) could then fail, or undo that change."""
    return lambda t: torch.full(shape, fill, dtype=t.dtype, device=t.device)


def _fresh_values(values: object) -> Callable[[torch.Tensor], torch.Tensor]:
    """A replacement holding ``values``, with the dtype and device of the tensor it replaces."""
    return lambda t: torch.tensor(values, dtype=t.dtype, device=t.device)


def _bad_zero_query_heads(rng: random.Random, spec: AttentionSpec) -> Bad:
    make = _fresh((spec.total, 0, spec.head_dim))
    return Bad("zero-query-heads", _replace("q", make), BAD_INPUT, r"query heads \(0\)", 2)


def _bad_zero_kv_heads(rng: random.Random, spec: AttentionSpec) -> Bad:
    apply = _replace_all("kv", _fresh((spec.total, 0, spec.head_dim)))
    return Bad("zero-kv-heads", apply, BAD_INPUT, r"multiple of kv heads \(0\)", 2)


def _bad_heads_not_divisible(rng: random.Random, spec: AttentionSpec) -> Bad:
    kv = spec.kv_heads if spec.kv_heads > 1 else rng.randint(2, 4)
    q = rng.choice([h for h in range(1, 17) if h % kv])

    def apply(args: Args) -> None:
        args["q"] = _fresh((spec.total, q, spec.head_dim))(args["q"])
        for name in "kv":
            args[name] = _fresh((spec.total, kv, spec.head_dim))(args[name])

    match = rf"query heads \({q}\) must be a positive multiple of kv heads \({kv}\)"
    return Bad("heads-not-divisible", apply, BAD_INPUT, match, 2)


def _bad_head_dims_differ(rng: random.Random, spec: AttentionSpec) -> Bad:
    other = rng.choice(
        [d for d in (1, 2, spec.head_dim + 1, spec.head_dim + 7) if d != spec.head_dim]
    )
    names = rng.choice(["kv", "v"])  # k and v together against q, or v against k
    apply = _replace_all(names, _fresh((spec.total, spec.kv_heads, other)))
    match = r"same head dim" if names == "kv" else r"k and v must have the same shape"
    return Bad(f"head-dim-{names}", apply, BAD_INPUT, match, 2)


def _bad_kv_heads_differ(rng: random.Random, spec: AttentionSpec) -> Bad:
    apply = _replace("v", _fresh((spec.total, spec.kv_heads + 1, spec.head_dim)))
    return Bad("kv-heads-differ", apply, BAD_INPUT, r"k and v must have the same shape", 2)


def _bad_cu_start(rng: random.Random, spec: AttentionSpec | BoundarySpec) -> Bad:
    first = rng.choice([1, 2, -1, -5])

    def apply(args: Args) -> None:
        args["cu_seqlens"][0] = first

    return Bad("cu_seqlens-start", apply, BAD_INPUT, rf"cu_seqlens must start at 0, got {first}", 0)


def _bad_cu_decreasing(rng: random.Random, spec: AttentionSpec | BoundarySpec) -> Bad:
    at = rng.randint(1, len(spec.lengths))  # before boundary `at`, a larger one
    jump = rng.randint(1, 5)

    def apply(args: Args) -> None:
        cu = args["cu_seqlens"]
        args["cu_seqlens"] = torch.cat([cu[:at], cu[at : at + 1] + jump, cu[at:]])

    return Bad("cu_seqlens-decreasing", apply, BAD_INPUT, r"cu_seqlens must be non-decreasing", 0)


def _bad_cu_end(rng: random.Random, spec: AttentionSpec | BoundarySpec) -> Bad | None:
    shift = rng.choice([1, 2, 9, -1])
    if shift < 0 and spec.lengths[-1] == 0:
        return None  # lowering the end would make the boundaries decrease instead
    end = spec.total + shift

    def apply(args: Args) -> None:
        args["cu_seqlens"][-1] = end

    match = rf"cu_seqlens must end at T = {spec.total}, got {end}"
    return Bad("cu_seqlens-end", apply, BAD_INPUT, match, 0)


def _bad_cu_dtype(rng: random.Random, spec: AttentionSpec) -> Bad:
    dtype = rng.choice([torch.float32, torch.int64, torch.int16, torch.float64])
    apply = _replace("cu_seqlens", lambda t: t.to(dtype))
    match = rf"cu_seqlens must be int32, got {re.escape(str(dtype))}"
    return Bad(f"cu_seqlens-{_short(dtype)}", apply, (TypeError,), match, 2)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _bad_cu_shape(rng: random.Random, spec: AttentionSpec | BoundarySpec) -> Bad:
    how, values = _bad_cu_form_values(rng, _bounds(spec.lengths))
    match = r"cu_seqlens must be \[B \+ 1\] with B >= 1"
    apply = _replace("cu_seqlens", _fresh_values(values))
    return Bad(f"cu_seqlens-{how}", apply, BAD_INPUT, match, 2)


def _bad_cu_form_values(rng: random.Random, bounds: list[int]) -> tuple[str, object]:
    """cu_seqlens of the wrong form: 2-D, a column, empty, a single boundary, a scalar."""
    return rng.choice(
        [
            ("2d", [bounds]),
            ("column", [[b] for b in bounds]),
            ("empty", []),
            ("single", [0]),
            ("scalar", 0),
        ]
    )


def _bad_cu_list(rng: random.Random, spec: AttentionSpec) -> Bad:
    apply = _replace("cu_seqlens", lambda t: t.tolist())
    return Bad("cu_seqlens-list", apply, (TypeError,), r"cu_seqlens must be a tensor", 2, False)


def _bad_cu_meta(rng: random.Random, spec: AttentionSpec) -> Bad:
    apply = _replace("cu_seqlens", _meta_like)
    return Bad("cu_seqlens-meta", apply, BAD_INPUT, r"cu_seqlens is on meta", 2)


def _bad_qkv_rank(rng: random.Random, spec: AttentionSpec) -> Bad:
    name = rng.choice("qkv")
    heads = spec.q_heads if name == "q" else spec.kv_heads
    T, D = spec.total, spec.head_dim
    how, shape = rng.choice([("2d", (T, D)), ("4d", (1, T, heads, D)), ("1d", (T * heads * D,))])
    make = _fresh(shape)
    match = rf"{name} must be \[T, H, D\]"
    return Bad(f"{name}-rank-{how}", _replace(name, make), BAD_INPUT, match, 2)


def _bad_mixed_dtypes(rng: random.Random, spec: AttentionSpec) -> Bad:
    name = rng.choice("qkv")
    dtype = _other_float_dtype(spec.dtype, rng)
    apply = _replace(name, lambda t: t.to(dtype))
    return Bad(f"{name}-{_short(dtype)}", apply, (TypeError,), r"q, k and v must share a dtype", 2)


def _bad_integer_dtype(rng: random.Random, spec: AttentionSpec) -> Bad:
    names = rng.choice(["q", "k", "v", "qkv"])
    dtype = rng.choice([torch.int64, torch.int32, torch.bool, torch.uint8])
    apply = _replace_all(names, lambda t: t.to(dtype))
    match = rf"{names[0]} must be a floating tensor"
    return Bad(f"{names}-{_short(dtype)}", apply, (TypeError,), match, 2)


def _bad_meta_tensor(rng: random.Random, spec: AttentionSpec) -> Bad:
    name = rng.choice("qkv")
    apply = _replace(name, _meta_like)
    return Bad(f"{name}-meta", apply, BAD_INPUT, rf"\b{name} is on meta", 2)


def _bad_non_finite_qkv(rng: random.Random, spec: AttentionSpec) -> Bad | None:
    if spec.total == 0:
        return None
    name = rng.choice("qkv")
    heads = spec.q_heads if name == "q" else spec.kv_heads
    token, head = rng.randrange(spec.total), rng.randrange(heads)
    col, value = rng.randrange(spec.head_dim), rng.choice(NON_FINITE_VALUES)

    def apply(args: Args) -> None:
        args[name][token, head, col] = value
        args["options"]["check_finite"] = True

    match = rf"{name} holds {value} in row {token} \(check_finite=True\)"
    return Bad(f"{name}-{value}-check_finite", apply, NON_FINITE, match, 0)


def _bad_softmax_scale(rng: random.Random, spec: AttentionSpec) -> Bad:
    value = rng.choice([math.nan, math.inf, -math.inf, 0.0, 0, -0.5, -1e-30, True, "0.5"])
    if isinstance(value, bool | str):
        expect, match = (TypeError,), r"softmax_scale must be a number"
    else:
        expect, match = BAD_INPUT, r"softmax_scale must be finite and > 0"
    return Bad(f"softmax_scale-{value}", _set_option("softmax_scale", value), expect, match)


def _bad_window(rng: random.Random, spec: AttentionSpec) -> Bad:
    value = rng.choice([-1, -rng.randint(2, 100), 1.5, 2.0, math.nan, True, "3", 2**63, 2**70])
    if isinstance(value, bool) or not isinstance(value, int):
        expect, match = (TypeError,), r"window must be an int"
    elif value < 0:
        expect, match = BAD_INPUT, rf"window must be >= 0, got {value}"
    else:
        expect, match = BAD_INPUT, r"window must fit in int64"
    apply = _set_options(window=value, causal=True)
    return Bad(f"window-{value}", apply, expect, match)


def _bad_window_not_causal(rng: random.Random, spec: AttentionSpec) -> Bad:
    apply = _set_options(window=rng.randint(0, 10), causal=False)
    return Bad("window-not-causal", apply, BAD_INPUT, r"window \(a left window size\) needs causal")


def _bad_causal(rng: random.Random, spec: AttentionSpec) -> Bad:
    value = rng.choice([None, "yes", "no", 1, 0, 1.0])
    apply = _set_option("causal", value)
    return Bad(f"causal-{value}", apply, (TypeError,), r"causal must be a bool")


def _bad_token_counts(rng: random.Random, spec: AttentionSpec) -> Bad:
    other = rng.choice(
        [
            t
            for t in (0, 1, spec.total - 1, spec.total + 1, spec.total + 5)
            if t >= 0 and t != spec.total
        ]
    )
    if rng.random() < 0.5:  # k and v together against q
        apply = _replace_all("kv", _fresh((other, spec.kv_heads, spec.head_dim)))
        match = rf"k and v must have T = {spec.total} tokens like q, got {other}"
        return Bad("kv-tokens", apply, BAD_INPUT, match, 2)
    apply = _replace("v", _fresh((other, spec.kv_heads, spec.head_dim)))
    return Bad("v-tokens", apply, BAD_INPUT, r"k and v must have the same shape", 2)


def _bad_qkv_not_a_tensor(rng: random.Random, spec: AttentionSpec) -> Bad:
    name = rng.choice("qkv")
    apply = _replace(name, lambda t: t.tolist())
    return Bad(f"{name}-list", apply, (TypeError,), rf"{name} must be a tensor", 2, False)


def _bad_max_seqlen(rng: random.Random, spec: AttentionSpec) -> Bad | None:
    value = rng.choice(["short", 2.5, math.nan, "8", True])
    if value == "short":
        if spec.longest == 0:
            return None
        short = spec.longest - rng.randint(1, spec.longest + 3)
        match = rf"max_seqlen={short} is shorter than the longest document \({spec.longest}\)"
        return Bad("max_seqlen-short", _set_option("max_seqlen", short), BAD_INPUT, match)
    apply = _set_option("max_seqlen", value)
    return Bad(f"max_seqlen-{value}", apply, (TypeError,), r"max_seqlen must be an int")


ATTENTION = Family(
    new_spec=_random_attention_spec,
    build=_attention_args,
    invoke=_invoke_attention,
    mutators=(
        _bad_zero_query_heads,
        _bad_zero_kv_heads,
        _bad_heads_not_divisible,
        _bad_head_dims_differ,
        _bad_kv_heads_differ,
        _bad_cu_start,
        _bad_cu_decreasing,
        _bad_cu_end,
        _bad_cu_dtype,
        _bad_cu_shape,
        _bad_cu_list,
        _bad_cu_meta,
        _bad_qkv_rank,
        _bad_mixed_dtypes,
        _bad_integer_dtype,
        _bad_meta_tensor,
        _bad_non_finite_qkv,
        _bad_softmax_scale,
        _bad_window,
        _bad_window_not_causal,
        _bad_causal,
        _bad_token_counts,
        _bad_qkv_not_a_tensor,
        _bad_max_seqlen,
    ),
)


def _attention_drafts(rng: random.Random, scale: float) -> list[Draft]:
    drafts = []
    for _ in range(_count(110, scale)):
        spec = _random_attention_spec(rng)
        run = functools.partial(_check_attention, spec)
        drafts.append(Draft(f"valid-{_describe_attention(spec)}", run))
    drafts += _bad_drafts(rng, ATTENTION, _count(120, scale))
    drafts += _combo_drafts(rng, ATTENTION, _count(40, scale))
    return drafts


# ---------------------------------------------------------------------------------------------
# fused_linear_sparse_kd and fused_linear_cross_entropy: problems


@dataclass(frozen=True)
class KDProblem:
    """One loss call; the tensors come from ``seed`` (as ``test_sparse_kd.sample_inputs``).

    Attributes:
        kind: ``"topk"``, ``"sampled"`` or ``"none"`` (cross-entropy: no teacher).
        ignored: per row, whether its label is ``ignore_index``.
        empty_slots: per row, how many trailing ids are ``-1`` (fewer than ``k``).
        label_in_support: per row, whether the label is drawn from the stored ids.
        neg_inf_teacher: about 30% of the teacher's vocabulary is impossible (``-inf``).
        garbage_on_ignored: the target rows (and hidden rows, without check_finite) of ignored
            positions hold garbage, which must change nothing (they are never read).
        strided: every tensor as a non-contiguous view of the same values.
        outer: the gradient the loss gets in backward (not 1: the stored gradients are scaled).
        options: keyword arguments of the op.
        grad_of: the student tensors that require a gradient.
    """

    n: int
    vocab: int
    dim: int
    k: int
    dtype: torch.dtype
    kind: str
    bias: bool
    cache_temperature: float
    ignored: tuple[bool, ...]
    empty_slots: tuple[int, ...]
    label_in_support: tuple[bool, ...]
    neg_inf_teacher: bool
    ignore_index: int
    logit_scale: float
    garbage_on_ignored: bool
    options: dict[str, Any] = field(default_factory=dict)
    grad_of: tuple[str, ...] = ("hidden", "weight", "bias")
    strided: bool = False
    outer: float = 1.0
    seed: int = 0

    @property
    def supervised_rows(self) -> list[int]:
        return [i for i, ignored in enumerate(self.ignored) if not ignored]

    def valid_slots(self, row: int) -> int:
        return self.k - self.empty_slots[row] if self.kind != "none" else 0


def _random_rows(rng: random.Random) -> int:
    return rng.choice([0, 1, 1, 2, rng.randint(2, MAX_ROWS), rng.randint(2, MAX_ROWS)])


def _random_vocab_and_k(rng: random.Random) -> tuple[int, int]:
    vocab = rng.choice([1, 2, 3, rng.randint(4, 40), rng.randint(4, MAX_VOCAB)])
    k = rng.choice([1, vocab, rng.randint(1, min(vocab, 16))])  # K = 1 and K = V included
    return vocab, k


def _random_ignored(rng: random.Random, n: int) -> tuple[bool, ...]:
    pattern = rng.choices(["none", "some", "all"], weights=[35, 55, 10])[0]
    if pattern == "all":
        return (True,) * n
    return tuple(pattern == "some" and rng.random() < 0.3 for _ in range(n))


def _random_reduction(rng: random.Random) -> dict[str, Any]:
    how = rng.choice(["mean", "sum", "num_items", "num_items_tensor"])
    if how.startswith("num_items"):
        count = rng.choice([1, 3, 17, 2.5])
        return {
            "reduction": "sum",
            "num_items": torch.tensor(count) if how.endswith("tensor") else count,
        }
    return {"reduction": how}


def _random_loss_options(rng: random.Random, n: int) -> dict[str, Any]:
    """The options both losses take."""
    options = _random_reduction(rng)
    if rng.random() < 0.3:
        options["softcap"] = rng.choice([rng.uniform(0.5, 30.0), 1.0])
    if rng.random() < 0.3:
        options["z_loss"] = rng.choice([1e-4, 1e-2, 0.3])
    if rng.random() < 0.3:
        options["chunk_rows"] = rng.randint(1, n + 2)
    options["return_stats"] = rng.random() < 0.5
    options["check_finite"] = rng.random() < 0.2
    return options


def _random_kd_options(rng: random.Random, kind: str, cache_temperature: float) -> dict[str, Any]:
    """The distillation options, within what the target kind allows."""
    if kind == "sampled":
        divergence, missing_mass = "forward_kl", rng.choice(["tail", "renorm"])
        include_label = rng.choice([None, False])
    else:
        divergence = rng.choice(["forward_kl", "reverse_kl", "jsd"])
        missing_mass = rng.choice(["tail", "renorm"])
        include_label = rng.choice([None, True, False])
    temperature = cache_temperature  # tail needs T == T_c
    if missing_mass == "renorm" or kind == "sampled":
        temperature = rng.choice([cache_temperature, 0.5, 1.0, 2.0, rng.uniform(0.3, 4.0)])
    return {
        "kd_weight": rng.choice([1.0, 0.5, 0.0, rng.random()]),
        "divergence": divergence,
        "beta": rng.choice([0.0, 0.5, 1.0, rng.random()]),
        "temperature": temperature,
        "missing_mass": missing_mass,
        "include_label": include_label,
    }


def _random_kd_problem(rng: random.Random, kind: str) -> KDProblem:
    n = _random_rows(rng)
    vocab, k = _random_vocab_and_k(rng)
    cache_temperature = rng.choice([1.0, 1.0, 0.5, 2.0, 0.7])
    options = _random_loss_options(rng, n)
    if kind != "none":
        options |= _random_kd_options(rng, kind, cache_temperature)
    if rng.random() < 0.25:
        options["ignore_index"] = rng.choice([-1, -7, vocab + 3, -(2**40)])
    ignored = _random_ignored(rng, n)
    return KDProblem(
        n=n,
        vocab=vocab,
        dim=rng.choice([1, 2, 5, 8, MAX_DIM, rng.randint(1, MAX_DIM)]),
        k=k,
        dtype=_random_dtype(rng),
        kind=kind,
        bias=rng.random() < 0.4,
        cache_temperature=cache_temperature,
        ignored=ignored,
        empty_slots=tuple(rng.choice([0, 0, 0, rng.randint(0, k - 1)]) for _ in range(n)),
        label_in_support=tuple(rng.random() < 0.5 for _ in range(n)),
        neg_inf_teacher=kind == "topk" and rng.random() < 0.2,
        ignore_index=options.get("ignore_index", -100),
        logit_scale=rng.choice([1.0, 5.0, 5.0, 20.0]),
        garbage_on_ignored=any(ignored) and rng.random() < 0.2,
        options=options,
        grad_of=tuple(t for t in ("hidden", "weight", "bias") if rng.random() < 0.8),
        strided=rng.random() < 0.15,
        outer=rng.choice([1.0, 1.0, 1.0, 0.37, -2.0]),
        seed=rng.randrange(2**31),
    )


def _kd_problem_for_bad_cases(rng: random.Random, kind: str) -> KDProblem:
    """A valid problem a mutation can break: at least one supervised row, the teacher used."""
    problem = _random_kd_problem(rng, kind)
    n = max(problem.n, 1)
    ignored = (*problem.ignored[:n], *([True] * (n - problem.n)))
    ignored = (False, *ignored[1:]) if all(ignored) else ignored
    changes: dict[str, Any] = {"ignored": ignored, "garbage_on_ignored": False}
    changes["empty_slots"] = (*problem.empty_slots[:n], *([0] * (n - problem.n)))
    changes["label_in_support"] = (*problem.label_in_support[:n], *([True] * (n - problem.n)))
    if kind != "none" and problem.options["kd_weight"] == 0:
        changes["options"] = {**problem.options, "kd_weight": rng.choice([1.0, 0.3])}
    return replace(problem, n=n, **changes)


def _teacher_rows(p: KDProblem, g: torch.Generator) -> torch.Tensor:
    teacher = torch.randn(p.n, p.vocab, generator=g) * 2.0  # float32, as the cache stores it
    if p.neg_inf_teacher and p.n:
        impossible = torch.rand(p.n, p.vocab, generator=g) < 0.3
        impossible[torch.arange(p.n), teacher.argmax(dim=1)] = False  # each row keeps a token
        teacher = teacher.masked_fill(impossible, -math.inf)
    return teacher


def _stored_ids(p: KDProblem, teacher: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """``[n, k]`` int32: the teacher's top-k, or k ids drawn without replacement; trailing
    ``-1`` slots as ``empty_slots`` says."""
    if p.kind == "topk":
        ids = teacher.topk(p.k, dim=1).indices
    elif p.n:
        probs = torch.softmax(teacher.double() / p.cache_temperature, dim=1)
        ids = torch.multinomial(probs, p.k, replacement=False, generator=g)
    else:
        ids = torch.zeros(0, p.k, dtype=torch.long)
    ids = ids.to(torch.int32)
    for row, empty in enumerate(p.empty_slots):
        if empty:
            ids[row, p.k - empty :] = -1
    return ids


def _labels(p: KDProblem, ids: torch.Tensor | None, g: torch.Generator) -> torch.Tensor:
    """Labels inside or outside the stored ids as ``label_in_support`` says (ignored later)."""
    labels = torch.empty(p.n, dtype=torch.long)
    for row in range(p.n):
        stored = [] if ids is None else [v for v in ids[row].tolist() if v >= 0]
        outside = sorted(set(range(p.vocab)) - set(stored))
        pool = stored if (p.label_in_support[row] and stored) or not outside else outside
        labels[row] = pool[int(torch.randint(len(pool), (), generator=g))]
    return labels


def _kd_args(p: KDProblem) -> Args:
    """The call's tensors: student in ``p.dtype``, teacher values float32, garbage in the empty
    slots (never read)."""
    g = torch.Generator().manual_seed(p.seed)
    hidden = torch.randn(p.n, p.dim, generator=g, dtype=torch.float64)
    weight = torch.randn(p.vocab, p.dim, generator=g, dtype=torch.float64)
    weight = weight * (p.logit_scale / math.sqrt(p.dim))
    bias = torch.randn(p.vocab, generator=g, dtype=torch.float64) if p.bias else None
    args: Args = {"kind": p.kind, "options": dict(p.options)}
    ids = None
    if p.kind != "none":
        teacher = _teacher_rows(p, g)
        ids = _stored_ids(p, teacher, g)
        args.update(_target_fields(p, teacher, ids))
    labels = _labels(p, ids, g)
    if p.kind == "topk":
        args["label_logit"] = teacher.gather(1, labels[:, None]).squeeze(1)
    ignored = torch.tensor(p.ignored, dtype=torch.bool)
    labels[ignored] = p.ignore_index
    args |= {"hidden": hidden.to(p.dtype), "weight": weight.to(p.dtype), "labels": labels}
    args["bias"] = bias.to(p.dtype) if bias is not None else None
    if p.garbage_on_ignored:
        _spoil_ignored_rows(args, ignored, p)
    if p.strided:  # the student tensors become strided views in _loss_run
        for name in ("labels", "ids", "logits", "lse", "label_logit", "weights"):
            if isinstance(args.get(name), torch.Tensor):
                args[name] = _strided(args[name])
    return args


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values as a non-contiguous view: every other element of a buffer twice as
    long in the last dimension."""
    wide = torch.stack([t, torch.zeros_like(t)], dim=-1)
    return wide[..., 0]


def _target_fields(p: KDProblem, teacher: torch.Tensor, ids: torch.Tensor) -> Args:
    valid = ids >= 0
    safe = ids.long().clamp(min=0)
    if p.kind == "topk":
        return {
            "ids": ids,
            "logits": teacher.gather(1, safe).masked_fill(~valid, 123.0),
            "lse": torch.logsumexp(teacher / p.cache_temperature, dim=1),
            "cache_temperature": p.cache_temperature,
        }
    probs = torch.softmax(teacher.double() / p.cache_temperature, dim=1)
    kept = probs.gather(1, safe).float().masked_fill(~valid, 0.0)
    weights = kept / kept.sum(dim=1, keepdim=True)
    return {"ids": ids, "weights": weights.masked_fill(~valid, 0.25)}


def _spoil_ignored_rows(args: Args, ignored: torch.Tensor, p: KDProblem) -> None:
    """Out-of-range and duplicated ids, NaN logits, infinite lse on ignored rows."""
    if p.kind != "none":
        args["ids"][ignored] = p.vocab + 7
        if p.k > 1:
            args["ids"][ignored, 1] = -5
    if p.kind == "topk":
        args["logits"][ignored] = math.nan
        args["lse"][ignored] = math.inf
        args["label_logit"][ignored] = math.nan
    if p.kind == "sampled":
        args["weights"][ignored] = -1.0
    if not p.options.get("check_finite"):
        args["hidden"][ignored] = math.nan


def _target(args: Args) -> TopKTarget | SampledTarget | None:
    if "target" in args:  # a mutation put something else there
        return args["target"]
    if args["kind"] == "topk":
        return TopKTarget(
            args["ids"], args["logits"], args["lse"], args["label_logit"], args["cache_temperature"]
        )
    if args["kind"] == "sampled":
        return SampledTarget(args["ids"], args["weights"])
    return None


def _invoke_sparse_kd(args: Args) -> object:
    return fused_linear_sparse_kd(
        args["hidden"],
        args["weight"],
        args["labels"],
        _target(args),
        bias=args["bias"],
        **args["options"],
    )


def _invoke_cross_entropy(args: Args) -> object:
    return fused_linear_cross_entropy(
        args["hidden"], args["weight"], args["labels"], bias=args["bias"], **args["options"]
    )


# ---------------------------------------------------------------------------------------------
# fused_linear_sparse_kd and fused_linear_cross_entropy: valid inputs

STUDENT = ("hidden", "weight", "bias")


@dataclass
class LossRun:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    stats: torch.Tensor | None  # [N, 6], the KDStats columns


def _leaves(args: Args, p: KDProblem, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Fresh copies of the student tensors (in ``dtype``), requiring grad as ``p.grad_of``."""
    leaves = {}
    for name in STUDENT:
        if args[name] is not None:
            t = args[name].detach().clone().to(dtype or args[name].dtype)
            leaves[name] = t.requires_grad_(name in p.grad_of)
    return leaves


def _loss_run(
    loss_of: Callable[[dict[str, torch.Tensor]], tuple],
    args: Args,
    p: KDProblem,
    dtype: torch.dtype | None = None,
) -> LossRun:
    """Loss, gradients of the leaves that require one, statistics; the student tensors reach
    the op as strided views of the leaves when the problem says so."""
    leaves = _leaves(args, p, dtype)
    loss, stats = loss_of({n: _strided(t) if p.strided else t for n, t in leaves.items()})
    wanted = {name: t for name, t in leaves.items() if t.requires_grad}
    if wanted:
        (loss * p.outer).backward()
    for name, t in wanted.items():
        assert t.grad is not None, f"{name} got no gradient"
    return LossRun(loss.detach(), {n: t.grad for n, t in wanted.items()}, stats)


def _kernel_loss(args: Args, kd: bool):
    """The op under test; its statistics when the case asks for them."""

    def loss_of(leaves: dict[str, torch.Tensor]) -> tuple:
        call = {**args, "bias": None, **leaves}
        result = (_invoke_sparse_kd if kd else _invoke_cross_entropy)(call)
        if not args["options"].get("return_stats"):
            return result, None
        loss, stats = result
        return loss, torch.stack(list(stats), dim=1)

    return loss_of


def _reference_loss(args: Args, p: KDProblem):
    options = {
        key: value
        for key, value in args["options"].items()
        if key not in ("chunk_rows", "return_stats", "check_finite")
    }
    if args["kind"] == "none":
        options["kd_weight"] = 0.0

    def loss_of(leaves: dict[str, torch.Tensor]) -> tuple:
        return sparse_kd_reference(
            leaves["hidden"],
            leaves["weight"],
            args["labels"],
            _target(args),
            bias=leaves.get("bias"),
            **options,
        )

    return loss_of


def _is_empty_mean(args: Args) -> bool:
    """A mean over no supervised row: NaN by definition."""
    options = args["options"]
    no_row = not bool((args["labels"] != options.get("ignore_index", -100)).any())
    mean = options.get("reduction", "mean") == "mean" and options.get("num_items") is None
    return no_row and mean


def _check_empty_result(kernel: LossRun, args: Args, p: KDProblem) -> None:
    """No supervised row (docs/kd-losses.md): a mean is NaN, a sum or num_items 0, gradients
    exactly 0 (a [0, d] one for N = 0), statistics 0."""
    if _is_empty_mean(args):
        assert bool(kernel.loss.isnan()), f"a mean over no row must be NaN, got {kernel.loss}"
    else:
        assert kernel.loss.item() == 0.0, f"a sum over no row must be 0, got {kernel.loss}"
    for name, grad in kernel.grads.items():
        assert grad.shape == args[name].shape, f"grad {name} has shape {grad.shape}"
        assert not bool(grad.any()), f"grad {name} is not 0"
    assert kernel.stats is None or not bool(kernel.stats.any()), "statistics must be 0"


RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}  # test_sparse_kd.py
STATS_RTOL = {torch.float64: 1e-6, torch.float32: 1e-5}


def _natural_scales(args: Args, p: KDProblem) -> dict[str, float]:
    """The size a loss and its gradients have whatever their value (``test_sparse_kd.py``'s
    floor): errors are judged against it, not against a gradient that nearly cancels.

    d(loss)/d(logits) is O(max(1, T)) per row times the reduction's scale and the outer
    gradient, so the gradient of hidden is of the size of W, that of W of the size of the
    (supervised) hidden rows, that of the bias 1; a token's loss is O(1)."""
    options = args["options"]
    supervised = args["labels"] != options.get("ignore_index", -100)
    if options.get("num_items") is not None:
        per_row = 1.0 / float(options["num_items"])
    elif options.get("reduction", "mean") == "mean":
        per_row = 1.0 / max(int(supervised.sum()), 1)
    else:
        per_row = 1.0
    per_row *= max(1.0, float(options.get("temperature", 1.0))) * abs(p.outer)
    hidden = args["hidden"][supervised].double()
    return {
        "loss": 1.0,
        "hidden": per_row * args["weight"].double().abs().max().item(),
        "weight": per_row * (hidden.abs().max().item() if hidden.numel() else 0.0),
        "bias": per_row,
    }


def _check_loss_against(kernel: LossRun, expected: LossRun, floors: dict, p: KDProblem) -> None:
    """Full-precision dtypes: loss, gradients and statistics within test_sparse_kd's rtol."""
    rtol = RTOL[p.dtype]
    acc = torch.float64 if p.dtype == torch.float64 else torch.float32
    assert kernel.loss.dtype == acc, f"the loss is {kernel.loss.dtype}, not {acc}"
    loss, expected_loss = kernel.loss, expected.loss.to(acc)
    _assert_close(loss, expected_loss, rtol, "loss", floor=floors["loss"], atol=1e-12)
    for name, grad in kernel.grads.items():
        assert grad.dtype == p.dtype, f"grad {name} is {grad.dtype}"
        want = expected.grads[name].to(p.dtype)
        _assert_close(grad, want, rtol, f"grad {name}", floor=floors[name])
    if kernel.stats is not None:
        # Not "correct" (the last column): an argmax flips on a tie of two logits.
        for col in range(5):
            got, want = kernel.stats[:, col], expected.stats[:, col].float()
            _assert_close(got, want, STATS_RTOL[p.dtype], f"stats column {col}", atol=1e-6)


def _check_low_precision(
    kernel: LossRun, torch_low: LossRun, exact: LossRun, floors: dict, p: KDProblem
) -> None:
    assert kernel.loss.dtype == torch.float32, f"the loss is {kernel.loss.dtype}, not float32"
    _assert_low_precision(kernel.loss, torch_low.loss, exact.loss, "loss", floors["loss"])
    for name, grad in kernel.grads.items():
        assert grad.dtype == p.dtype, f"grad {name} is {grad.dtype}"
        theirs, want = torch_low.grads[name], exact.grads[name]
        _assert_low_precision(grad, theirs, want, f"grad {name}", floors[name])


def _check_stats_shape(kernel: LossRun, args: Args, p: KDProblem) -> None:
    stats = kernel.stats
    if stats is None:
        return
    assert stats.shape == (p.n, 6) and stats.dtype == torch.float32, f"stats {stats.shape}"
    ignored = args["labels"] == args["options"].get("ignore_index", -100)
    assert not bool(stats[ignored].any()), "statistics of ignored rows must be 0"
    correct = stats[:, -1]
    assert bool(((correct == 0) | (correct == 1)).all()), "stats.correct must be 0 or 1"


def _check_sparse_kd(p: KDProblem) -> None:
    """The kernel against ``sparse_kd_reference`` in float64 on the same values (bf16 / fp16:
    within twice the error of the reference run in that dtype)."""
    args = _kd_args(p)
    kernel = _loss_run(_kernel_loss(args, kd=True), args, p)
    _check_stats_shape(kernel, args, p)
    if not bool((args["labels"] != p.ignore_index).any()):
        _check_empty_result(kernel, args, p)
        return
    # float64 math on the same values: the fp32 reference's own rounding can exceed rtol 1e-5
    # (1 - P_S of a support holding all but 1e-5 of the mass), and where the definition is
    # ill-conditioned (reverse KL with p(rest) = 1 - P_S at the rounding of a stored lse, floored
    # at 1e-12 inside the log) fp32 and fp64 can differ in the first digit.
    exact = _loss_run(_reference_loss(args, p), args, p, torch.float64)
    if p.dtype in LOW_PRECISION:
        torch_low = _loss_run(_reference_loss(args, p), args, p)
        _check_low_precision(kernel, torch_low, exact, _natural_scales(args, p), p)
    else:
        _check_loss_against(kernel, exact, _natural_scales(args, p), p)


def _torch_cross_entropy(args: Args, p: KDProblem):
    """Plain PyTorch: ``F.cross_entropy`` on the materialised (soft-capped) logits of the
    supervised rows, plus the z-loss, reduced as docs/kd-losses.md says. The logits are made in
    the leaves' dtype (as ``F.linear`` in bf16 would), the loss in float32 (float64)."""
    options = args["options"]
    labels = args["labels"]
    supervised = labels != options.get("ignore_index", -100)
    rows = supervised.nonzero().squeeze(1)

    def loss_of(leaves: dict[str, torch.Tensor]) -> tuple:
        logits = F.linear(leaves["hidden"][rows], leaves["weight"], leaves.get("bias"))
        z = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
        if options.get("softcap") is not None:
            z = options["softcap"] * torch.tanh(z / options["softcap"])
        ce = F.cross_entropy(z, labels[rows], reduction="none")
        lse = torch.logsumexp(z, dim=1)
        total = (ce + options.get("z_loss", 0.0) * lse * lse).sum()
        if options.get("num_items") is not None:
            total = total / float(options["num_items"])
        elif options.get("reduction", "mean") == "mean":
            total = total / rows.numel()
        stats = torch.zeros(p.n, 6, dtype=torch.float32)
        stats[rows, 1] = ce.detach().float()
        stats[rows, 4] = lse.detach().float()
        return total, stats

    return loss_of


def _check_cross_entropy(p: KDProblem) -> None:
    """The fused cross-entropy against ``F.cross_entropy`` on materialised float64 logits of
    the same values; for bf16 / fp16 within twice the error of ``F.linear`` in that dtype."""
    args = _kd_args(p)
    kernel = _loss_run(_kernel_loss(args, kd=False), args, p)
    _check_stats_shape(kernel, args, p)
    if not bool((args["labels"] != p.ignore_index).any()):
        _check_empty_result(kernel, args, p)
        expected = F.cross_entropy(
            torch.zeros(p.n, p.vocab), args["labels"], ignore_index=p.ignore_index
        )
        assert not _is_empty_mean(args) or bool(expected.isnan()), "PyTorch's mean is NaN"
        return
    exact = _loss_run(_torch_cross_entropy(args, p), args, p, torch.float64)
    if p.dtype in LOW_PRECISION:
        torch_low = _loss_run(_torch_cross_entropy(args, p), args, p)
        _check_low_precision(kernel, torch_low, exact, _natural_scales(args, p), p)
    else:
        _check_loss_against(kernel, exact, _natural_scales(args, p), p)


def _describe_problem(p: KDProblem) -> str:
    parts = [p.kind, _dtype_name(p.dtype), f"n{p.n}", f"v{p.vocab}", f"d{p.dim}"]
    if p.kind != "none":
        o = p.options
        parts += [f"k{p.k}", o["divergence"], o["missing_mass"], f"kd{o['kd_weight']:.2g}"]
    if all(p.ignored):
        parts.append("all-ignored")
    if p.garbage_on_ignored:
        parts.append("garbage-ignored")
    if p.options.get("softcap") is not None:
        parts.append("softcap")
    if p.options.get("z_loss"):
        parts.append("zloss")
    if p.strided:
        parts.append("strided")
    parts.append("num_items" if p.options.get("num_items") is not None else p.options["reduction"])
    return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# fused_linear_sparse_kd and fused_linear_cross_entropy: known-bad changes


def _supervised_row(rng: random.Random, p: KDProblem) -> int:
    return rng.choice(p.supervised_rows)


def _valid_slot(rng: random.Random, p: KDProblem, row: int) -> int:
    return rng.randrange(p.valid_slots(row))


def _set_entry(name: str, index: tuple, value: object, widen: bool = False):
    """Writes ``value`` at ``index`` of tensor ``name`` (int64 first when ``widen``: a value
    beyond int32 must reach the op unwrapped)."""

    def apply(args: Args) -> None:
        if widen:
            args[name] = args[name].long()
        args[name][index] = value

    return apply


def _range_message(what: str, vocab: int, value: int, row: int, ignore_index: int | None = None):
    tail = f" or equal ignore_index={ignore_index}" if ignore_index is not None else " or be -1"
    return rf"{what} must lie in \[0, {vocab}\){re.escape(tail)}, got {value} \(row {row}\)"


def _bad_ids_out_of_range(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind == "none":
        return None
    row = _supervised_row(rng, p)
    slot = _valid_slot(rng, p, row)
    # Just outside [0, V) and -1, far outside, and int64 values whose int32 wrap is legal.
    value = rng.choice(
        [
            p.vocab,
            p.vocab + rng.randint(1, 1000),
            -2,
            -2 - rng.randint(1, 1000),
            2**32 + 1,
            2**32 - 1,
            2**31,
            2**40,
            -(2**31) - 1,
            -(2**32) - 1,
        ]
    )
    wide = not -(2**31) <= value < 2**31
    apply = _set_entry("ids", (row, slot), value, widen=wide or rng.random() < 0.3)
    match = _range_message("target ids", p.vocab, value, row)
    return Bad(f"ids-{value}", apply, BAD_INPUT, match, 0)


def _bad_ids_duplicate(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind == "none":
        return None
    rows = [r for r in p.supervised_rows if p.valid_slots(r) >= 2]
    if not rows:
        return None
    row = rng.choice(rows)
    first, second = rng.sample(range(p.valid_slots(row)), 2)

    def apply(args: Args) -> None:
        args["ids"][row, second] = args["ids"][row, first]

    match = rf"target ids must be distinct within a row \(row {row}\)"
    return Bad("ids-duplicate", apply, BAD_INPUT, match, 0)


def _bad_label_out_of_range(rng: random.Random, p: KDProblem) -> Bad:
    row = rng.randrange(p.n)  # an ignored row becomes a supervised one with a bad label
    values = [p.vocab, p.vocab + rng.randint(1, 50), -1, -rng.randint(2, 50), 2**31, 2**32 + 1]
    value = rng.choice([v for v in values if v != p.ignore_index])
    apply = _set_entry("labels", (row,), value)
    match = _range_message("labels", p.vocab, value, row, p.ignore_index)
    return Bad(f"label-{value}", apply, BAD_INPUT, match, 0)


def _bad_label_dtype(rng: random.Random, p: KDProblem) -> Bad:
    dtype = rng.choice([torch.float32, torch.float64, torch.int16, torch.uint8, torch.bool])
    apply = _replace("labels", lambda t: t.to(dtype))
    return Bad(f"labels-{_short(dtype)}", apply, (TypeError,), r"labels must be int64 or int32", 2)


def _bad_label_shape(rng: random.Random, p: KDProblem) -> Bad:
    how, make = rng.choice(
        [
            ("2d", _fresh((1, p.n), 0)),
            ("short", _fresh((p.n - 1,), 0)),
            ("long", _fresh((p.n + 1,), 0)),
        ]
    )
    match = rf"labels must be \[N\] = \[{p.n}\]"
    return Bad(f"labels-{how}", _replace("labels", make), BAD_INPUT, match, 2)


def _bad_teacher_value(rng: random.Random, p: KDProblem) -> Bad | None:
    """A NaN or +inf teacher logit or label logit, a non-finite lse: the data the student
    cannot repair, always checked."""
    if p.kind != "topk":
        return None
    row = _supervised_row(rng, p)
    what = rng.choice(["logits", "lse", "label_logit"])
    if what == "lse":
        value = rng.choice(NON_FINITE_VALUES)
        apply = _set_entry("lse", (row,), value)
        match = rf"teacher lse must be finite, got {value} \(row {row}\)"
    else:
        value = rng.choice([math.nan, math.inf])  # -inf is an impossible token: legal
        index = (row, _valid_slot(rng, p, row)) if what == "logits" else (row,)
        apply = _set_entry(what, index, value)
        words = "teacher logits" if what == "logits" else "teacher label_logit"
        match = rf"{words} must be finite or -inf, got {value} \(row {row}\)"
    return Bad(f"teacher-{what}-{value}", apply, BAD_INPUT, match, 0)


def _bad_teacher_mass(rng: random.Random, p: KDProblem) -> Bad | None:
    """An lse lowered by log V + 2 gives the stored logits a mass above e^2 > 1: the max alone
    holds at least 1 / V before."""
    if p.kind != "topk":
        return None
    row = _supervised_row(rng, p)
    shift = math.log(p.vocab) + rng.uniform(2.0, 20.0)

    def apply(args: Args) -> None:
        args["lse"][row] -= shift

    match = rf"hold probability .* > 1 under their lse.*\(row {row}\)"
    return Bad("teacher-mass-above-1", apply, BAD_INPUT, match, 0)


def _bad_sampled_weights(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind != "sampled":
        return None
    row = _supervised_row(rng, p)
    how = rng.choice(["negative", "nan", "inf", "sum"])
    if how == "sum":
        factor = rng.choice([0.5, 0.9, 1.01, 1.5, 3.0])

        def apply(args: Args) -> None:
            args["weights"][row] *= factor

        match = rf"sampled weights must sum to 1 \(within 1e-3\).*\(row {row}\)"
        return Bad(f"weights-sum-x{factor}", apply, BAD_INPUT, match, 0)
    value = {"negative": -rng.uniform(0.01, 1.0), "nan": math.nan, "inf": math.inf}[how]
    apply = _set_entry("weights", (row, _valid_slot(rng, p, row)), value)
    match = rf"sampled weights must be >= 0 and finite, got .* \(row {row}\)"
    return Bad(f"weights-{how}", apply, BAD_INPUT, match, 0)


def _bad_target_shapes(rng: random.Random, p: KDProblem) -> Bad | None:
    """Target tensors that disagree with each other or with N."""
    if p.kind == "none":
        return None
    values = "logits" if p.kind == "topk" else "weights"
    values_words = "teacher logits" if values == "logits" else "sample_weights"
    n, k = p.n, p.k
    ids_match = r"target ids must be \[N, K\]"
    shapes = [
        ("ids-rows", ["ids"], (n + 1, k), ids_match),
        ("ids-1d", ["ids"], (n,), ids_match),
        ("ids-3d", ["ids"], (1, n, k), ids_match),
        ("k0", ["ids", values], (n, 0), r"target ids must have K >= 1 columns"),
        (f"{values}-columns", [values], (n, k + 1), rf"{values_words} must match ids"),
    ]
    if p.kind == "topk":
        shapes += [
            ("lse-rows", ["lse"], (n - 1,), rf"teacher lse must be \[N\] = \[{n}\]"),
            ("lse-2d", ["lse"], (1, n), rf"teacher lse must be \[N\] = \[{n}\]"),
            (
                "label_logit-rows",
                ["label_logit"],
                (n + 1,),
                rf"label_logit must be \[N\] = \[{n}\]",
            ),
        ]
    tag, names, shape, match = rng.choice(shapes)
    return Bad(f"target-{tag}", _replace_all(names, _fresh(shape, 0)), BAD_INPUT, match, 2)


def _bad_target_dtypes(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind == "none":
        return None
    names = {"topk": ["ids", "logits", "lse", "label_logit"], "sampled": ["ids", "weights"]}
    name = rng.choice(names[p.kind])
    if name == "ids":
        dtype = rng.choice([torch.float32, torch.bool])
        words = "target ids must be an integer tensor"
    else:
        dtype = rng.choice([torch.int64, torch.int32])
        words = {
            "logits": "teacher logits",
            "lse": "teacher lse",
            "label_logit": "label_logit",
            "weights": "sample_weights",
        }[name] + " must be a floating tensor"
    apply = _replace(name, lambda t: t.to(dtype))
    return Bad(f"target-{name}-{_short(dtype)}", apply, (TypeError,), words, 2)


def _bad_student_shapes(rng: random.Random, p: KDProblem) -> Bad:
    """hidden and the LM head that do not fit together."""
    d, vocab = p.dim, p.vocab
    shapes = [
        ("weight-d", "weight", (vocab, d + 1), rf"weight is \[V, d\] with d = {d + 1} but hidden"),
        ("hidden-3d", "hidden", (1, p.n, d), r"hidden must be \[N, d\]"),
        ("hidden-1d", "hidden", (p.n * d,), r"hidden must be \[N, d\]"),
        ("weight-1d", "weight", (vocab * d,), r"weight must be \[V, d\]"),
        ("bias-short", "bias", (vocab - 1,), rf"bias must be \[V\] = \[{vocab}\]"),
        ("bias-2d", "bias", (1, vocab), rf"bias must be \[V\] = \[{vocab}\]"),
    ]
    tag, name, shape, match = rng.choice(shapes)

    def apply(args: Args) -> None:
        args[name] = args["weight"].new_ones(shape)

    return Bad(tag, apply, BAD_INPUT, match, 2)


def _bad_student_dtypes(rng: random.Random, p: KDProblem) -> Bad:
    name = rng.choice(["weight", "bias", "hidden-int"])
    if name == "hidden-int":
        dtype = rng.choice([torch.int64, torch.int32])
        apply = _replace("hidden", lambda t: t.to(dtype))
        return Bad(
            f"hidden-{_short(dtype)}", apply, (TypeError,), r"hidden must be a floating tensor", 2
        )
    dtype = _other_float_dtype(p.dtype, rng)

    def apply(args: Args) -> None:
        args[name] = args["weight"].new_ones(p.vocab if name == "bias" else (p.vocab, p.dim))
        args[name] = args[name].to(dtype)

    match = rf"{name} dtype \w+ differs from hidden dtype"
    return Bad(f"{name}-{_short(dtype)}", apply, (TypeError,), match, 2)


def _tensor_names(p: KDProblem) -> list[str]:
    names = ["hidden", "weight", "labels"] + (["bias"] if p.bias else [])
    fields = {"topk": ["ids", "logits", "lse", "label_logit"], "sampled": ["ids", "weights"]}
    return names + fields.get(p.kind, [])


def _bad_meta_argument(rng: random.Random, p: KDProblem) -> Bad:
    name = rng.choice(_tensor_names(p))
    shown = name if name in ("hidden", "weight", "labels", "bias") else f"target.{name}"
    apply = _replace(name, _meta_like)
    return Bad(f"{shown}-meta", apply, BAD_INPUT, rf"{re.escape(shown)} is on meta", 2)


def _bad_non_finite_student(rng: random.Random, p: KDProblem) -> Bad:
    names = ["hidden", "weight"] + (["bias"] if p.bias else [])
    name = rng.choice(names)
    rows = {"hidden": p.n, "weight": p.vocab, "bias": p.vocab}[name]
    row, value = rng.randrange(rows), rng.choice(NON_FINITE_VALUES)
    index = (row,) if name == "bias" else (row, rng.randrange(p.dim))

    def apply(args: Args) -> None:
        args[name][index] = value
        args["options"]["check_finite"] = True

    match = rf"{name} holds {value} in row {row} \(check_finite=True\)"
    return Bad(f"{name}-{value}-check_finite", apply, NON_FINITE, match, 0)


def _bad_student_not_a_tensor(rng: random.Random, p: KDProblem) -> Bad:
    name = rng.choice(["hidden", "weight", "labels"])
    apply = _replace(name, lambda t: t.tolist())
    return Bad(f"{name}-list", apply, (TypeError,), rf"{name} must be a tensor", 2, False)


def _bad_empty_vocabulary(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind != "none":
        return None  # a target's ids would fail first
    shape = rng.choice(["vocab", "dim"])

    def apply(args: Args) -> None:
        if shape == "vocab":
            args["weight"] = _fresh((0, p.dim))(args["weight"])
            if args["bias"] is not None:
                args["bias"] = _fresh((0,))(args["bias"])
            args["labels"] = _fresh((p.n,), p.ignore_index)(args["labels"])
        else:
            args["hidden"] = _fresh((p.n, 0))(args["hidden"])
            args["weight"] = _fresh((p.vocab, 0))(args["weight"])

    return Bad(f"empty-{shape}", apply, BAD_INPUT, r"empty vocabulary or hidden size", 2)


# (option, bad values, the error type, what the message must say); kd: only with a teacher.
LOSS_OPTION_VALUES = [
    ("softcap", [0, 0.0, -1.0, math.inf, math.nan], BAD_INPUT, r"softcap must be finite and > 0"),
    ("softcap", ["30", True], (TypeError,), r"softcap must be a number"),
    ("z_loss", [-1e-4, -1, math.inf, math.nan], BAD_INPUT, r"z_loss must be finite and >= 0"),
    ("z_loss", ["0.1", None, True], (TypeError,), r"z_loss must be a number"),
    (
        "num_items",
        [0, 0.0, -1, -2.5, math.nan, math.inf],
        BAD_INPUT,
        r"num_items must be finite and > 0",
    ),
    ("num_items", [True, "8"], (TypeError,), r"num_items must be a number"),
    (
        "num_items",
        [torch.tensor(math.nan), torch.tensor(-3)],
        BAD_INPUT,
        r"num_items must be finite",
    ),
    (
        "num_items",
        [torch.tensor([4.0, 4.0]), torch.ones(0)],
        BAD_INPUT,
        r"num_items must be a number or a one-element tensor",
    ),
    ("reduction", ["none", "MEAN", "", None, 1], BAD_INPUT, r"reduction must be one of"),
    ("chunk_rows", [-3, 0, -(2**40)], BAD_INPUT, r"chunk_rows must be >= 1"),
    ("chunk_rows", [2.5, True, "4"], (TypeError,), r"chunk_rows must be an int"),
    ("ignore_index", [1.5, "a", None, True, -100.0], (TypeError,), r"ignore_index must be an int"),
    ("ignore_index", [2**64, 2**63, -(2**63) - 1], BAD_INPUT, r"ignore_index must fit in int64"),
]
KD_OPTION_VALUES = [
    (
        "temperature",
        [0, 0.0, -1.0, math.nan, math.inf, -math.inf],
        BAD_INPUT,
        r"temperature must be > 0",
    ),
    ("temperature", ["2.0", True, None], (TypeError,), r"temperature must be a number"),
    (
        "kd_weight",
        [-0.1, 1.5, -1e-9, math.nan, math.inf],
        BAD_INPUT,
        r"kd_weight must be in \[0, 1\]",
    ),
    ("kd_weight", ["0.5", True, None], (TypeError,), r"kd_weight must be a number"),
    ("beta", [-0.1, 1.01, math.nan, -math.inf], BAD_INPUT, r"beta must be in \[0, 1\]"),
    ("beta", ["0.5", False], (TypeError,), r"beta must be a number"),
    ("divergence", ["kl", "", "Forward_KL", 0, None], BAD_INPUT, r"divergence must be one of"),
    ("missing_mass", ["zero", "", None], BAD_INPUT, r"missing_mass must be one of"),
    ("include_label", ["yes", 1, 0, "False"], (TypeError,), r"include_label must be a bool"),
]


def _option_mutators(table: list) -> tuple[Mutator, ...]:
    """One mutator per option of ``table``, so that every option comes round in turn."""
    names = dict.fromkeys(name for name, *_ in table)
    return tuple(_option_mutator([row for row in table if row[0] == name]) for name in names)


def _option_mutator(rows: list) -> Mutator:
    def mutate(rng: random.Random, p: KDProblem) -> Bad:
        name, values, expect, match = rng.choice(rows)
        value = rng.choice(values)
        changes: dict[str, object] = {name: value}
        if name == "temperature" and p.kind == "topk":
            changes["missing_mass"] = "renorm"  # so that only the value is wrong, not T != T_c
        shown = "tensor" if isinstance(value, torch.Tensor) else value
        return Bad(f"{name}-{shown}", _set_options(**changes), expect, match)

    mutate.__name__ = f"option-{rows[0][0]}"
    return mutate


def _bad_cache_temperature(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind != "topk":
        return None
    value = rng.choice([0, 0.0, -1.0, math.nan, math.inf, "1.0", True])

    def apply(args: Args) -> None:
        args["cache_temperature"] = value
        args["options"]["missing_mass"] = "renorm"

    if isinstance(value, bool | str):
        expect, match = (TypeError,), r"target\.temperature must be a number"
    else:
        expect, match = BAD_INPUT, r"target\.temperature must be finite and > 0"
    return Bad(f"target.temperature-{value}", apply, expect, match)


def _bad_tail_temperature(rng: random.Random, p: KDProblem) -> Bad | None:
    """missing_mass="tail" needs T == T_c: the stored lse is at T_c."""
    if p.kind != "topk":
        return None
    temperature = p.cache_temperature * rng.choice([2.0, 0.5, 1.01, 0.99])
    apply = _set_options(temperature=temperature, missing_mass="tail")
    match = r"missing_mass='tail' needs temperature == cache temperature"
    return Bad("tail-temperature-mismatch", apply, BAD_INPUT, match)


def _bad_sampled_options(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind != "sampled":
        return None
    if rng.random() < 0.5:
        divergence = rng.choice(["reverse_kl", "jsd"])
        apply = _set_option("divergence", divergence)
        match = r"sampled targets support only divergence='forward_kl'"
        return Bad(f"sampled-{divergence}", apply, BAD_INPUT, match)
    apply = _set_option("include_label", True)
    match = r"include_label applies to top-K targets only"
    return Bad("sampled-include_label", apply, BAD_INPUT, match)


def _bad_target_object(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind == "none":
        return None
    how = rng.choice(["tuple", "dict", "string", "missing"])

    def apply(args: Args) -> None:
        fields = {key: args[key] for key in ("ids", "logits", "lse", "weights") if key in args}
        args["target"] = {
            "tuple": tuple(fields.values()),
            "dict": fields,
            "string": "topk",
            "missing": None,
        }[how]

    if how == "missing":
        return Bad("target-missing", apply, BAD_INPUT, r"kd_weight > 0 needs a teacher target", 2)
    match = r"target must be a TopKTarget, a SampledTarget or None"
    return Bad(f"target-{how}", apply, (TypeError,), match, 2)


def _bad_empty_support(rng: random.Random, p: KDProblem) -> Bad | None:
    """Every id of a supervised row -1 and no label to add: nothing to distil towards (top-K
    only: a sampled row's weights would then sum to 0, which may be reported first)."""
    if p.kind != "topk":
        return None
    row = _supervised_row(rng, p)

    def apply(args: Args) -> None:
        args["ids"][row] = -1
        args["options"]["include_label"] = False

    match = rf"supervised row {row} has an empty teacher support"
    return Bad("empty-support", apply, BAD_INPUT, match, 0)


def _bad_renorm_without_finite_logit(rng: random.Random, p: KDProblem) -> Bad | None:
    if p.kind != "topk":
        return None
    row = _supervised_row(rng, p)

    def apply(args: Args) -> None:
        args["logits"][row] = -math.inf
        args["label_logit"][row] = -math.inf
        args["options"]["missing_mass"] = "renorm"

    match = rf"row {row} has no finite teacher logit on its support; missing_mass='renorm'"
    return Bad("renorm-no-finite-logit", apply, BAD_INPUT, match, 0)


LOSS_MUTATORS = (
    _bad_label_out_of_range,
    _bad_label_dtype,
    _bad_label_shape,
    _bad_student_shapes,
    _bad_student_dtypes,
    _bad_meta_argument,
    _bad_non_finite_student,
    _bad_student_not_a_tensor,
    *_option_mutators(LOSS_OPTION_VALUES),
)

SPARSE_KD = Family(
    new_spec=lambda rng: _kd_problem_for_bad_cases(rng, rng.choice(["topk", "topk", "sampled"])),
    build=_kd_args,
    invoke=_invoke_sparse_kd,
    mutators=(
        *LOSS_MUTATORS,
        _bad_ids_out_of_range,
        _bad_ids_duplicate,
        _bad_teacher_value,
        _bad_teacher_mass,
        _bad_sampled_weights,
        _bad_target_shapes,
        _bad_target_dtypes,
        *_option_mutators(KD_OPTION_VALUES),
        _bad_cache_temperature,
        _bad_tail_temperature,
        _bad_sampled_options,
        _bad_target_object,
        _bad_empty_support,
        _bad_renorm_without_finite_logit,
    ),
)

CROSS_ENTROPY = Family(
    new_spec=lambda rng: _kd_problem_for_bad_cases(rng, "none"),
    build=_kd_args,
    invoke=_invoke_cross_entropy,
    mutators=(*LOSS_MUTATORS, _bad_empty_vocabulary),
)


def _sparse_kd_drafts(rng: random.Random, scale: float) -> list[Draft]:
    drafts = []
    for _ in range(_count(110, scale)):
        problem = _random_kd_problem(rng, rng.choice(["topk", "topk", "sampled"]))
        run = functools.partial(_check_sparse_kd, problem)
        drafts.append(Draft(f"valid-{_describe_problem(problem)}", run))
    drafts += _bad_drafts(rng, SPARSE_KD, _count(140, scale))
    drafts += _combo_drafts(rng, SPARSE_KD, _count(40, scale))
    return drafts


def _cross_entropy_drafts(rng: random.Random, scale: float) -> list[Draft]:
    drafts = []
    for _ in range(_count(110, scale)):
        problem = _random_kd_problem(rng, "none")
        run = functools.partial(_check_cross_entropy, problem)
        drafts.append(Draft(f"valid-{_describe_problem(problem)}", run))
    drafts += _bad_drafts(rng, CROSS_ENTROPY, _count(80, scale))
    drafts += _combo_drafts(rng, CROSS_ENTROPY, _count(30, scale))
    return drafts


# ---------------------------------------------------------------------------------------------
# Document boundaries (pangu_fastkd/data/boundaries.py)


@dataclass(frozen=True)
class BoundarySpec:
    """One call of a boundary helper on the documents ``lengths``.

    Attributes:
        form: how the input is given: ``"list"``, ``"tuple"``, ``"numpy"`` or a tensor dtype
            name (``"int64"``); for position ids ``"1d"`` or ``"row"`` ([1, T]) and ``dtype``.
        fn: which helper (or which way into ``resolve_documents``).
    """

    lengths: tuple[int, ...]
    form: str
    fn: str
    dtype: torch.dtype = torch.int64

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def documents(self) -> tuple[int, ...]:
        """The lengths position ids can express: a document of length 0 has no token."""
        return tuple(n for n in self.lengths if n)


def _lengths_input(spec: BoundarySpec) -> Any:
    if spec.form == "list":
        return list(spec.lengths)
    if spec.form == "tuple":
        return tuple(spec.lengths)
    if spec.form == "numpy":
        return [np.int64(n) for n in spec.lengths]
    return torch.tensor(spec.lengths, dtype=getattr(torch, spec.form))


def _position_ids(spec: BoundarySpec) -> torch.Tensor:
    pos = torch.tensor(_positions(spec.lengths), dtype=spec.dtype)
    return pos[None] if spec.form == "row" else pos


def _random_lengths_spec(rng: random.Random) -> BoundarySpec:
    form = rng.choice(["list", "tuple", "numpy", "int64", "int32", "int16"])
    lengths = _random_lengths(rng, MAX_TOKENS) if rng.random() < 0.9 else ()
    return BoundarySpec(lengths, form, "cu_seqlens_from_lengths")


def _random_positions_spec(rng: random.Random) -> BoundarySpec:
    fn = rng.choice(["cu_seqlens_from_position_ids", "check_position_ids", "resolve_documents"])
    dtype = rng.choice([torch.int64, torch.int32, torch.int16])
    return BoundarySpec(_random_lengths(rng, MAX_TOKENS), rng.choice(["1d", "row"]), fn, dtype)


def _random_cu_spec(rng: random.Random) -> BoundarySpec:
    fn = rng.choice(["check_cu_seqlens", "positions_from_cu_seqlens", "resolve_documents"])
    return BoundarySpec(_random_lengths(rng, MAX_TOKENS), "int32", fn)


def _check_boundaries(spec: BoundarySpec) -> None:
    """One helper against the plain Python computation of ``_bounds`` and ``_positions``."""
    bounds, positions = _bounds(spec.lengths), _positions(spec.lengths)
    if spec.fn == "cu_seqlens_from_lengths":
        cu = cu_seqlens_from_lengths(_lengths_input(spec))
        assert cu.dtype == torch.int32 and cu.tolist() == bounds, f"{cu.tolist()} != {bounds}"
    elif spec.fn == "cu_seqlens_from_position_ids":
        cu = cu_seqlens_from_position_ids(_position_ids(spec))
        expected = _bounds(spec.documents)
        assert cu.dtype == torch.int32 and cu.tolist() == expected, f"{cu.tolist()} != {expected}"
    elif spec.fn == "check_position_ids":
        pos = check_position_ids(_position_ids(spec), spec.total)
        assert pos.dtype == torch.int64 and pos.tolist() == positions
    elif spec.fn == "check_cu_seqlens":
        cu = torch.tensor(bounds, dtype=torch.int32)
        assert check_cu_seqlens(cu, spec.total) == bounds
    elif spec.fn == "positions_from_cu_seqlens":
        pos = positions_from_cu_seqlens(torch.tensor(bounds, dtype=torch.int32), spec.total)
        assert pos.dtype == torch.int64 and pos.tolist() == positions, f"{pos.tolist()}"
        back = cu_seqlens_from_position_ids(pos).tolist()  # the round trip drops empty documents
        assert back == _bounds(spec.documents), f"round trip {back}"
    else:
        _check_resolved(spec)


def _check_resolved(spec: BoundarySpec) -> None:
    """``resolve_documents`` from cu_seqlens, from position ids, or from neither (one
    document)."""
    input_ids = torch.zeros(spec.total, dtype=torch.long)
    if spec.form == "cu_seqlens":
        lengths = spec.lengths
        cu = torch.tensor(_bounds(lengths), dtype=torch.int32)
        documents = resolve_documents(input_ids, cu, max_positions=max(lengths))
    elif spec.form == "none":
        lengths = (spec.total,)
        documents = resolve_documents(input_ids)
    else:
        lengths = spec.documents
        documents = resolve_documents(input_ids, position_ids=_position_ids(spec))
    assert documents.bounds == tuple(_bounds(lengths)), f"bounds {documents.bounds}"
    assert documents.cu_seqlens.dtype == torch.int32
    assert documents.cu_seqlens.tolist() == _bounds(lengths)
    assert documents.max_seqlen == max(lengths) and documents.total == spec.total
    assert documents.positions.tolist() == _positions(lengths)


def _random_valid_boundary_spec(rng: random.Random) -> BoundarySpec:
    """A valid call of one helper: lengths to cu_seqlens (most of them: the input forms vary
    most), position ids to cu_seqlens or checked, cu_seqlens checked or turned into positions,
    or ``resolve_documents``."""
    kind = rng.choice(["lengths", "lengths", "positions", "cu", "resolve"])
    lengths = _random_lengths(rng, MAX_TOKENS)
    if kind == "lengths":
        return _random_lengths_spec(rng)
    if kind == "positions":
        fn = rng.choice(["cu_seqlens_from_position_ids", "check_position_ids"])
        dtype = rng.choice([torch.int64, torch.int32, torch.int16])
        return BoundarySpec(lengths, rng.choice(["1d", "row"]), fn, dtype)
    if kind == "cu":
        fn = rng.choice(["check_cu_seqlens", "positions_from_cu_seqlens"])
        return BoundarySpec(lengths, "int32", fn)
    form = rng.choice(["cu_seqlens", "none", "1d", "row"])
    if form in ("1d", "row") and sum(lengths) == 0:
        # Left out: position ids of an empty row fail with "max() arg is an empty sequence"
        # (resolve_documents; cu_seqlens_from_position_ids gives [0], which has no document).
        lengths = (*lengths, 1)
    return BoundarySpec(lengths, form, "resolve")


def _describe_boundaries(spec: BoundarySpec) -> str:
    return f"{spec.fn}-{spec.form}-docs{len(spec.lengths)}-T{spec.total}"


def _lengths_args(spec: BoundarySpec) -> Args:
    return {"lengths": _lengths_input(spec)}


def _invoke_lengths(args: Args) -> object:
    return cu_seqlens_from_lengths(args["lengths"])


def _bad_length_entry(rng: random.Random, spec: BoundarySpec) -> Bad | None:
    """An entry that is not a non-negative int: never truncated, never wrapped."""
    if spec.form not in ("list", "tuple", "numpy"):
        return None
    value = rng.choice(
        [
            1.5,
            2.0,
            math.nan,
            True,
            False,
            "3",
            None,
            -1,
            -rng.randint(2, 99),
            2**31,
            2**64,
            np.float32(2.0),
        ]
    )
    at = rng.randint(0, len(spec.lengths))

    def apply(args: Args) -> None:
        lengths = list(args["lengths"])
        lengths.insert(at, value)
        args["lengths"] = lengths

    if isinstance(value, bool) or not isinstance(value, int):
        expect, match = (
            (TypeError,),
            rf"document lengths must be ints, got {re.escape(repr(value))}",
        )
    elif value < 0:
        expect, match = BAD_INPUT, r"document lengths must be >= 0"
    elif value < 2**63:
        expect, match = BAD_INPUT, r"does not fit cu_seqlens' int32"
    else:
        expect, match = BAD_INPUT, rf"document length {value} does not fit int64"
    return Bad(f"lengths-entry-{value}", apply, expect, match, 0)


def _bad_lengths_tensor(rng: random.Random, spec: BoundarySpec) -> Bad | None:
    if spec.form in ("list", "tuple", "numpy") or not spec.lengths:
        return None
    how = rng.choice(["float32", "float64", "bool", "negative", "int32-overflow"])
    if how in ("float32", "float64", "bool"):
        dtype = getattr(torch, how)
        apply = _replace("lengths", lambda t: t.to(dtype))
        return Bad(f"lengths-{how}", apply, (TypeError,), r"document lengths must be integers", 2)
    at = rng.randrange(len(spec.lengths))
    if how == "negative":
        apply = _set_entry("lengths", (at,), -rng.randint(1, 99))
        return Bad("lengths-negative", apply, BAD_INPUT, r"document lengths must be >= 0", 0)
    apply = _set_entry("lengths", (at,), 2**31 + rng.randint(0, 9), widen=True)
    return Bad("lengths-int32-overflow", apply, BAD_INPUT, r"does not fit cu_seqlens' int32", 0)


LENGTHS = Family(
    new_spec=_random_lengths_spec,
    build=_lengths_args,
    invoke=_invoke_lengths,
    mutators=(_bad_length_entry, _bad_lengths_tensor),
)


def _positions_args(spec: BoundarySpec) -> Args:
    return {"pos": _position_ids(spec), "fn": spec.fn, "total": spec.total}


def _invoke_positions(args: Args) -> object:
    if args["fn"] == "cu_seqlens_from_position_ids":
        return cu_seqlens_from_position_ids(args["pos"])
    if args["fn"] == "check_position_ids":
        return check_position_ids(args["pos"], args["total"])
    return resolve_documents(torch.zeros(args["total"], dtype=torch.long), position_ids=args["pos"])


def _bad_positions_dtype(rng: random.Random, spec: BoundarySpec) -> Bad:
    dtype = rng.choice([torch.bool, torch.float32, torch.float64])
    apply = _replace("pos", lambda t: t.to(dtype))
    expect = (TypeError,) if dtype == torch.bool else BAD_INPUT
    match = r"position_ids must be an integer"
    return Bad(f"position_ids-{_short(dtype)}", apply, expect, match, 2)


def _bad_positions_shape(rng: random.Random, spec: BoundarySpec) -> Bad:
    positions = _positions(spec.lengths)
    how, values = rng.choice([("2-rows", [positions] * 2), ("3d", [[positions]]), ("scalar", 0)])
    make = _fresh_values(values)
    match = r"position_ids must be (an integer )?\[T\] or \[1, T\]"
    return Bad(f"position_ids-{how}", _replace("pos", make), BAD_INPUT, match, 2)


def _bad_positions_length(rng: random.Random, spec: BoundarySpec) -> Bad | None:
    """position ids for another number of tokens than the row's."""
    if spec.fn == "cu_seqlens_from_position_ids":
        return None  # it takes T from the position ids themselves
    total = rng.choice(
        [
            t
            for t in (0, spec.total - 1, spec.total + 1, spec.total + 4)
            if t >= 0 and t != spec.total
        ]
    )

    def apply(args: Args) -> None:
        args["total"] = total

    match = rf"position_ids must be \[T\] or \[1, T\] with T = {total}"
    return Bad("position_ids-length", apply, BAD_INPUT, match, 1)


def _bad_positions_restart(rng: random.Random, spec: BoundarySpec) -> Bad | None:
    """Positions that do not start at 0 or do not count up by 1 inside a document."""
    if spec.fn == "check_position_ids" or spec.total < 2:
        return None  # check_position_ids checks shape and dtype only
    how = rng.choice(["start", "jump", "negative"])
    if how == "start":
        first = rng.choice([1, 2, 7, -1])
        apply = _set_flat("pos", 0, first)
        return Bad("position_ids-start", apply, BAD_INPUT, rf"must start at 0, got {first}", 0)
    at = rng.randint(1, spec.total - 1)
    negative = -rng.randint(1, 5)  # drawn here: a case's run must not draw from the list's rng

    def apply(args: Args) -> None:
        flat = args["pos"].view(-1)
        flat[at] = flat[at - 1] + 2 if how == "jump" else negative

    match = rf"position_ids must count up by 1 inside a document \(index {at}\)"
    return Bad(f"position_ids-{how}", apply, BAD_INPUT, match, 0)


def _set_flat(name: str, index: int, value: object) -> Callable[[Args], None]:
    def apply(args: Args) -> None:
        args[name].view(-1)[index] = value

    return apply


POSITIONS = Family(
    new_spec=_random_positions_spec,
    build=_positions_args,
    invoke=_invoke_positions,
    mutators=(
        _bad_positions_dtype,
        _bad_positions_shape,
        _bad_positions_length,
        _bad_positions_restart,
    ),
)


def _cu_args(spec: BoundarySpec) -> Args:
    cu = torch.tensor(_bounds(spec.lengths), dtype=torch.int32)
    return {"cu_seqlens": cu, "fn": spec.fn, "total": spec.total, "resolve": {}}


def _invoke_cu(args: Args) -> object:
    cu = args["cu_seqlens"]
    if args["fn"] == "check_cu_seqlens":
        return check_cu_seqlens(cu, args["total"])
    if args["fn"] == "positions_from_cu_seqlens":
        return positions_from_cu_seqlens(cu, args["total"])
    input_ids = torch.zeros(args["total"], dtype=torch.long)
    return resolve_documents(input_ids, cu, **args["resolve"])


def _bad_cu_helper_dtype(rng: random.Random, spec: BoundarySpec) -> Bad:
    dtype = rng.choice([torch.int64, torch.float32, torch.int16])
    apply = _replace("cu_seqlens", lambda t: t.to(dtype))
    match = r"cu_seqlens must be (an )?int32"  # resolve_documents says "an int32 tensor"
    return Bad(f"cu_seqlens-{_short(dtype)}", apply, (TypeError,), match, 2)


def _bad_resolve_options(rng: random.Random, spec: BoundarySpec) -> Bad | None:
    if spec.fn != "resolve_documents":
        return None
    how = rng.choice(["both", "max_positions", "list"])
    if how == "both":
        apply = _set_resolve(position_ids=torch.tensor(_positions(spec.lengths)))
        return Bad("resolve-both", apply, BAD_INPUT, r"give cu_seqlens or position_ids, not both")
    if how == "list":
        apply = _replace("cu_seqlens", lambda t: t.tolist())
        return Bad(
            "resolve-cu_seqlens-list",
            apply,
            (TypeError,),
            r"cu_seqlens must be an int32 tensor",
            2,
            False,
        )
    longest = max(spec.lengths)
    if longest == 0:
        return None
    limit = rng.randint(0, longest - 1)
    match = rf"a document of {longest} tokens exceeds max_position_embeddings \({limit}\)"
    return Bad("resolve-max_positions", _set_resolve(max_positions=limit), BAD_INPUT, match)


def _set_resolve(**values: object) -> Callable[[Args], None]:
    def apply(args: Args) -> None:
        args["resolve"].update(values)

    return apply


CU_SEQLENS = Family(
    new_spec=_random_cu_spec,
    build=_cu_args,
    invoke=_invoke_cu,
    # The attention op's cu_seqlens mutations, on the helpers themselves.
    mutators=(
        _bad_cu_start,
        _bad_cu_decreasing,
        _bad_cu_end,
        _bad_cu_shape,
        _bad_cu_helper_dtype,
        _bad_resolve_options,
    ),
)


def _boundary_drafts(rng: random.Random, scale: float) -> list[Draft]:
    drafts = []
    for _ in range(_count(110, scale)):
        spec = _random_valid_boundary_spec(rng)
        run = functools.partial(_check_boundaries, spec)
        drafts.append(Draft(f"valid-{_describe_boundaries(spec)}", run))
    for family in (LENGTHS, POSITIONS, CU_SEQLENS):
        drafts += _bad_drafts(rng, family, _count(30, scale))
        drafts += _combo_drafts(rng, family, _count(12, scale))
    return drafts


_BUILDERS: dict[str, Callable[[random.Random, float], list[Draft]]] = {
    "packed_attention": _attention_drafts,
    "sparse_kd": _sparse_kd_drafts,
    "cross_entropy": _cross_entropy_drafts,
    "boundaries": _boundary_drafts,
}
