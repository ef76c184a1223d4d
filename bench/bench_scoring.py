"""Teacher scoring throughput and cache size: `score_to_cache` against the plain forward.

The plain forward is what scoring costs at least: one teacher pass over the packed tokens with
its full [T, V] logits (``DecoderLM.forward``). Scoring runs the same pass, then materialises
only the supervised rows' logits in chunks, reduces them to top-K / log-partition / label logit
and writes committed shards. Both run in the same process, alternating, on the same batches.

    python bench/bench_scoring.py --markdown            # the figures in bench/RESULTS.md
    python bench/bench_scoring.py --vocab 32000 --k 16  # one configuration
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from harness import machine_info

from pangu_fastkd.cache import CacheReader
from pangu_fastkd.data import ByteTokenizer, Example, Message, default_template, tokenize_example
from pangu_fastkd.data.boundaries import cu_seqlens_from_lengths
from pangu_fastkd.model import DecoderLM, ModelConfig, init_weights
from pangu_fastkd.scoring import ScoringConfig, score_to_cache


def synthetic_examples(n: int, prompt_chars: int, response_chars: int, seed: int) -> list[Example]:
    """Arithmetic-looking conversations of fixed size (byte tokenizer: one token per char)."""
    gen = torch.Generator().manual_seed(seed)
    alphabet = "0123456789+-*= abcdefghij\n"
    examples = []
    for i in range(n):
        idx = torch.randint(len(alphabet), (prompt_chars + response_chars,), generator=gen)
        text = "".join(alphabet[j] for j in idx.tolist())
        messages = (
            Message("user", text[:prompt_chars]),
            Message("assistant", text[prompt_chars:]),
        )
        examples.append(Example(id=f"bench-{i}", messages=messages, answer="42"))
    return examples


def teacher_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=max(1, args.hidden // 128),
    )


def run(args: argparse.Namespace, k: int) -> dict:
    tokenizer = ByteTokenizer()
    template = default_template(tokenizer)
    teacher = DecoderLM(teacher_config(args))
    init_weights(teacher, seed=0)
    teacher.eval()
    examples = synthetic_examples(args.sequences, args.prompt_chars, args.response_chars, 0)
    tokenized = [tokenize_example(ex, tokenizer, template) for ex in examples]
    lengths = [len(t.input_ids) for t in tokenized]
    tokens = sum(lengths)
    config = ScoringConfig(k=k, batch_tokens=args.batch_tokens, shard_tokens=1 << 20)

    def plain_forward() -> None:
        with torch.inference_mode():
            start = 0
            while start < len(tokenized):  # the same packing as scoring: batch_tokens per pass
                batch, used = [], 0
                while start < len(tokenized) and (
                    not batch or used + lengths[start] <= args.batch_tokens
                ):
                    batch.append(tokenized[start])
                    used += lengths[start]
                    start += 1
                ids = torch.tensor([t for b in batch for t in b.input_ids])
                cu = cu_seqlens_from_lengths([len(b.input_ids) for b in batch])
                teacher(ids, cu_seqlens=cu)

    root = Path(tempfile.mkdtemp(prefix="bench_scoring_"))
    bytes_per_token = None

    def scoring() -> None:
        nonlocal bytes_per_token
        out = root / "cache"
        shutil.rmtree(out, ignore_errors=True)
        report = score_to_cache(teacher, tokenizer, template, examples, out, config)
        bytes_per_token = CacheReader(out).bytes_per_token()
        assert report.sequences == len(examples)

    times = {"plain_forward": [], "scoring": []}
    calls = {"plain_forward": plain_forward, "scoring": scoring}
    try:
        for call in calls.values():  # warmup
            call()
        for _ in range(args.reps):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    supervised = sum(sum(t.supervised[1:]) for t in tokenized)
    medians = {name: statistics.median(v) for name, v in times.items()}
    return {
        "k": k,
        "vocab": args.vocab,
        "hidden": args.hidden,
        "layers": args.layers,
        "tokens": tokens,
        "supervised_tokens": supervised,
        "plain_forward_tokens_per_s": tokens / medians["plain_forward"],
        "scoring_tokens_per_s": tokens / medians["scoring"],
        "overhead": medians["scoring"] / medians["plain_forward"] - 1.0,
        "bytes_per_token": bytes_per_token,
        "bytes_budget": 5 * k + 8,
        "times_s": times,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vocab", type=int, default=151_936, help="teacher vocabulary (Qwen-sized)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--k", type=int, nargs="+", default=[16, 64])
    p.add_argument("--sequences", type=int, default=16)
    p.add_argument("--prompt-chars", type=int, default=96)
    p.add_argument("--response-chars", type=int, default=416)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/out/scoring.json"))
    p.add_argument("--markdown", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    meta = machine_info()
    results = [run(args, k) for k in args.k]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    header = (
        "| K | V | tokens (supervised) | plain forward tok/s | scoring tok/s | overhead "
        "| bytes/token | 5K+8 |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|"] if args.markdown else [header]
    for r in results:
        lines.append(
            f"| {r['k']} | {r['vocab']} | {r['tokens']} ({r['supervised_tokens']}) "
            f"| {r['plain_forward_tokens_per_s']:.0f} | {r['scoring_tokens_per_s']:.0f} "
            f"| {100 * r['overhead']:+.1f}% | {r['bytes_per_token']:.1f} | {r['bytes_budget']} |"
        )
    print(f"machine: {meta}")
    print(
        f"teacher: hidden {args.hidden}, {args.layers} layers, V = {args.vocab}; "
        f"{args.sequences} sequences of {args.prompt_chars} + {args.response_chars} chars, "
        f"{args.batch_tokens} tokens per pass, median of {args.reps}"
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
