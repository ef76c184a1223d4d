"""Providers of packed-sequence causal attention, for bench/bench_packed_attention.py and its tests.

Every attention provider takes a ``PackedInputs`` (``q [T, Hq, D]``, ``k``/``v [T, Hkv, D]``,
``cu_seqlens [B + 1]``) and returns ``out [T, Hq, D]``, differentiable with respect to q, k, v.

- ``kernel``: the C++ kernel behind ``pangu_fastkd.ops.packed_attention``.
- ``sdpa_loop``: one ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` per
  document on ``[1, H, L, D]`` views, outputs concatenated.
- ``sdpa_dense``: one SDPA call over the whole row with a dense ``[T, T]`` block-diagonal causal
  boolean mask (built once in ``make_inputs``, outside the timed call).
- ``gemm``: not attention: one ``[T, D] x [D, T]`` matmul, the GEMM rate of the machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.ops.packed_attention import packed_attention

__all__ = [
    "ATTENTION_PROVIDERS",
    "PROVIDERS",
    "PackedInputs",
    "attention_flops",
    "block_causal_mask",
    "gemm",
    "kernel",
    "layout_lengths",
    "make_inputs",
    "sdpa_dense",
    "sdpa_loop",
]


def layout_lengths(layout: str, T: int) -> list[int]:
    """Document lengths of a named layout of ``T`` tokens.

    ``uniform``: 8 equal documents; ``skewed``: one document of ``T / 2``, then 64-token
    documents (the last one shorter if needed); ``many``: 64 equal documents. A comma-separated
    list of integers (e.g. ``"40,24,32"``) is taken as the lengths themselves.
    """
    if layout == "uniform":
        lengths = [T // 8] * 8
    elif layout == "many":
        lengths = [T // 64] * 64
    elif layout == "skewed":
        rest = T - T // 2
        lengths = [T // 2] + [64] * (rest // 64) + ([rest % 64] if rest % 64 else [])
    else:
        lengths = [int(x) for x in layout.split(",")]
    if sum(lengths) != T or min(lengths) <= 0:
        raise ValueError(f"layout {layout!r} does not split T={T} into non-empty documents")
    return lengths


def attention_flops(lengths: list[int], n_heads_q: int, head_dim: int) -> int:
    """Causal forward FLOPs, counted as dense: ``sum_docs 2 L^2 Hq D`` (backward is 2.5x)."""
    return sum(2 * L * L * n_heads_q * head_dim for L in lengths)


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """``[T, T]`` bool, True where query i may attend key j: same document and ``j <= i``."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return (doc[:, None] == doc[None, :]).tril_()


@dataclass
class PackedInputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens: torch.Tensor
    lengths: list[int]
    mask: torch.Tensor | None = None  # only for sdpa_dense

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.q, self.k, self.v)

    def input_bytes(self) -> int:
        extra = [self.mask] if self.mask is not None else []
        return sum(t.numel() * t.element_size() for t in [*self.tensors(), *extra])

    def clear_grads(self) -> None:
        for t in self.tensors():
            t.grad = None


def make_inputs(
    lengths: list[int],
    n_heads_q: int = 12,
    n_heads_kv: int = 6,
    head_dim: int = 128,
    dtype: torch.dtype = torch.float32,
    requires_grad: bool = False,
    with_mask: bool = False,
    seed: int = 0,
) -> PackedInputs:
    """Random q, k, v (std 1) for documents of the given lengths."""
    gen = torch.Generator().manual_seed(seed)
    T = sum(lengths)

    def rand(heads: int) -> torch.Tensor:
        x = torch.randn(T, heads, head_dim, generator=gen).to(dtype)
        return x.requires_grad_(requires_grad)

    return PackedInputs(
        q=rand(n_heads_q),
        k=rand(n_heads_kv),
        v=rand(n_heads_kv),
        cu_seqlens=cu_seqlens_from_lengths(lengths),
        lengths=list(lengths),
        mask=block_causal_mask(lengths) if with_mask else None,
    )


def kernel(inputs: PackedInputs) -> torch.Tensor:
    return packed_attention(
        inputs.q, inputs.k, inputs.v, inputs.cu_seqlens, max(inputs.lengths), causal=True
    )


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).unsqueeze(0)  # [L, H, D] -> [1, H, L, D], a view


def sdpa_loop(inputs: PackedInputs) -> torch.Tensor:
    outs = []
    bounds = inputs.cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        q, k, v = (_heads_first(t[start:end]) for t in inputs.tensors())
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        outs.append(out[0].transpose(0, 1))
    return torch.cat(outs, dim=0)


def sdpa_dense(inputs: PackedInputs) -> torch.Tensor:
    mask = inputs.mask if inputs.mask is not None else block_causal_mask(inputs.lengths)
    q, k, v = (_heads_first(t) for t in inputs.tensors())
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return out[0].transpose(0, 1).contiguous()


def gemm(inputs: PackedInputs) -> torch.Tensor:
    """``[T, D] x [D, T]`` of q's first head and k's first head: ``2 T^2 D`` FLOPs."""
    return inputs.q[:, 0].detach().contiguous() @ inputs.k[:, 0].detach().T.contiguous()


ATTENTION_PROVIDERS: dict[str, Callable[[PackedInputs], torch.Tensor]] = {
    "kernel": kernel,
    "sdpa_loop": sdpa_loop,
    "sdpa_dense": sdpa_dense,
}
PROVIDERS: dict[str, Callable[[PackedInputs], torch.Tensor]] = {**ATTENTION_PROVIDERS, "gemm": gemm}
