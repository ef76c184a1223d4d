"""The grid: which sparse-KD and packed-attention problems run, in which dtypes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The dtypes every case runs in, by the names the table and the JSON use.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class SparseKDCase:
    """One ``sparse_kd_fused`` problem (option names as in ``fused_linear_sparse_kd``).

    ``n`` rows of hidden size ``d`` against a ``vocab``-row LM head, a top-``k`` teacher target.
    """

    name: str
    n: int
    vocab: int
    d: int
    k: int = 8
    target: bool = True  # a TopKTarget; False: cross-entropy only (kd_weight must be 0)
    bias: bool = False
    kd_weight: float = 0.7
    divergence: str = "forward_kl"
    beta: float = 0.5
    temperature: float = 1.0
    cache_temperature: float = 1.0
    missing_mass: str = "tail"
    include_label: bool = True
    z_loss: float = 0.0
    chunk_rows: int = 0
    seed: int = 0


@dataclass(frozen=True)
class AttentionCase:
    """One packed-attention problem: document lengths, query and kv heads, head dim."""

    name: str
    lengths: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    seed: int = 0


def sparse_kd_cases(quick: bool) -> list[SparseKDCase]:
    """Odd vocabularies (not a multiple of any tile), ignored rows, a label outside the top-K."""
    # One case a line or two, as a table reads; the formatter would give every option a line.
    cases = [
        SparseKDCase("fkl-tail-label", n=37, vocab=1271, d=64, bias=True),
        SparseKDCase("rkl-renorm", n=29, vocab=999, d=48, k=16, kd_weight=1.0,
                     divergence="reverse_kl", temperature=2.0, missing_mass="renorm",
                     include_label=False, seed=1),
        SparseKDCase("ce-only", n=33, vocab=1001, d=40, target=False, kd_weight=0.0, z_loss=1e-3),
    ]  # fmt: skip
    if not quick:
        cases += [
            SparseKDCase("jsd-tail-chunks", n=256, vocab=4099, d=256, k=20, divergence="jsd",
                         beta=0.3, chunk_rows=64, seed=2),
            SparseKDCase("fkl-tail-1k-rows", n=1024, vocab=16001, d=512, k=32, kd_weight=0.5),
            SparseKDCase("ce-only-32k", n=512, vocab=32003, d=256, target=False, kd_weight=0.0,
                         seed=3),
        ]  # fmt: skip
    return cases


def attention_cases(quick: bool) -> list[AttentionCase]:
    """Ragged documents with a length-1 one; GQA and MHA; head dims 64 and 128."""
    cases = [
        AttentionCase("gqa42-d64", (1, 150, 13, 5), hq=4, hkv=2, d=64),
        AttentionCase("mha22-d128", (77, 1, 64), hq=2, hkv=2, d=128, seed=1),
    ]
    if not quick:
        cases += [
            AttentionCase("mqa81-d64-1k", (1, 600, 3, 420), hq=8, hkv=1, d=64, seed=2),
            AttentionCase("gqa82-d128-2k", (1, 1000, 517, 30, 500), hq=8, hkv=2, d=128, seed=3),
        ]
    return cases
