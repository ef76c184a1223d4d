"""Cost of the reader's value checks: KD batches read from a cache with and without them.

``CacheReader`` checks every batch it serves (ids in range and distinct per row, values and
decoded logits finite or -inf, probabilities summing to at most 1, lse and label finite,
sampled counts consistent; ``pangu_fastkd/cache/values.py``). This script writes a cache of
openPangu-like shape (V = 151 936, 3-byte ids, bf16 values), then reads it as the KD stage does
(shuffled sequences, packed into batches of about ``--batch-tokens`` supervised tokens),
alternating readers with and without the checks on the same batches, and reports the median
time per batch of each, their ratio, and the time of one full ``CacheReader.verify``.

    PYTHONPATH=. python bench/bench_cache_read.py --tokens 100000   # the figures below
    PYTHONPATH=. python bench/bench_cache_read.py --k 16 --tokens 20000 --repeats 3

Measured (2 shared AMD EPYC cores, one torch thread, 100k tokens, K = 64, 12 batches of ~8192
tokens): reading a batch costs 9.5 ms CPU without the checks and 15.2 ms with them (+5.7 ms;
with 16 sampled ids per token as well: 14.2 -> 21.2 ms). The duplicate-id test sorts each row
and is most of the cost; numpy's sort keeps it at about 0.7 ms. A full ``verify`` reads about
150k tokens/s.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import machine_info

from pangu_fastkd.cache import CacheReader, CacheSpec, CacheWriter, SequenceScores, finalize_cache


def synthetic_scores(seq_index: int, n: int, spec: CacheSpec, gen: torch.Generator):
    """Valid scores of one sequence: distinct ids, sorted logits, a log-partition above them."""
    V, K = spec.vocab_size, spec.k
    base = torch.randint(0, V, (n, 1), generator=gen)
    stride = torch.randint(1, V // K + 1, (n, 1), generator=gen)
    ids = (base + torch.arange(K) * stride) % V  # distinct: j * stride < V for j < K
    logits = (12 + 3 * torch.randn(n, K, generator=gen)).sort(dim=1, descending=True).values
    ids[::5, -1] = -1  # some empty slots, as a label-conditioned scorer leaves them
    real = (logits / spec.temperature).masked_fill(ids < 0, -math.inf)
    lse = torch.logsumexp(real, dim=1) + torch.nn.functional.softplus(torch.randn(n, generator=gen))
    label_logit = logits[:, 0] - 4 * torch.rand(n, generator=gen)
    scores = SequenceScores(seq_index, ids, logits, lse, label_logit)
    if spec.sampled_k:
        Ks, draws = spec.sampled_k, spec.sampled_draws
        scores.sampled_ids = (base + torch.arange(Ks) * (V // Ks)) % V
        counts = torch.full((n, Ks), draws // Ks, dtype=torch.int64)
        counts[:, 0] += draws - counts.sum(dim=1)
        scores.sampled_counts = counts
    return scores


def write(directory: Path, args: argparse.Namespace) -> list[int]:
    spec = CacheSpec(
        vocab_size=args.vocab,
        k=args.k,
        temperature=1.0,
        teacher_fingerprint="bench",
        tokenizer_fingerprint="bench",
        data_fingerprint="bench",
        sampled_k=args.sampled_k,
        sampled_draws=4 * args.sampled_k,
    )
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(args.seq_tokens // 2, args.seq_tokens * 3 // 2, (10**6,), generator=gen)
    count = int((lengths.cumsum(0) < args.tokens).sum()) + 1
    lengths = lengths[:count].tolist()
    with CacheWriter(directory, spec, [f"s{i}" for i in range(count)]) as writer:
        while (i := writer.next_sequence) is not None:
            writer.add(synthetic_scores(i, lengths[i], spec, gen))
    finalize_cache(directory)
    return lengths


def batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    out, current, tokens = [], [], 0
    for i in order:
        current.append(i)
        tokens += lengths[i]
        if tokens >= batch_tokens:
            out.append(current)
            current, tokens = [], 0
    return out + ([current] if current else [])


def time_epoch(reader: CacheReader, plan: list[list[int]], sampled: bool) -> tuple[float, float]:
    """``(wall, CPU)`` seconds per batch, medians over the epoch's batches.

    CPU time is reported too: on a shared machine it is the steadier of the two.
    """
    wall, cpu = [], []
    for batch in plan:
        started, started_cpu = time.perf_counter(), time.process_time()
        reader.topk_target(batch)
        if sampled:
            reader.sampled_target(batch)
        wall.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--sampled-k", type=int, default=0)
    parser.add_argument("--tokens", type=int, default=200_000, help="supervised tokens cached")
    parser.add_argument("--seq-tokens", type=int, default=400, help="mean tokens per sequence")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (configs use 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        lengths = write(directory, args)
        plan = batches(lengths, args.batch_tokens)
        checked = CacheReader(directory)
        unchecked = CacheReader(directory, check_values=False)
        started = time.perf_counter()
        checked.verify()  # also hashes every shard once, so neither timed reader hashes
        verify_s = time.perf_counter() - started
        unchecked.verify()
        sampled = args.sampled_k > 0
        with_checks, without = [], []
        for _ in range(args.repeats):  # alternate: both see the same page cache and CPU load
            with_checks.append(time_epoch(checked, plan, sampled))
            without.append(time_epoch(unchecked, plan, sampled))
        on = [statistics.median(times) for times in zip(*with_checks, strict=True)]
        off = [statistics.median(times) for times in zip(*without, strict=True)]
        info = machine_info()
        print(f"machine: {info}")
        print(
            f"cache: {sum(lengths)} tokens, {len(lengths)} sequences, V={args.vocab}, K={args.k}, "
            f"sampled_k={args.sampled_k}, {checked.manifest.total_bytes / 2**20:.1f} MiB; "
            f"{len(plan)} batches of ~{args.batch_tokens} tokens"
        )
        print(f"per batch, median of {args.repeats} epochs   wall ms    CPU ms")
        print(f"  without value checks:            {1e3 * off[0]:8.2f}  {1e3 * off[1]:8.2f}")
        print(f"  with value checks:               {1e3 * on[0]:8.2f}  {1e3 * on[1]:8.2f}")
        print(
            f"  checks cost:                     {1e3 * (on[0] - off[0]):+8.2f}  "
            f"{1e3 * (on[1] - off[1]):+8.2f}  (x{on[1] / off[1]:.2f} CPU)"
        )
        print(
            f"full CacheReader.verify(): {verify_s:.2f} s ({sum(lengths) / verify_s:,.0f} tokens/s)"
        )


if __name__ == "__main__":
    main()
