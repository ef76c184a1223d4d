"""Score a JSONL data file with a teacher checkpoint into a logit cache.

    python -m pangu_fastkd.scoring --teacher runs/teacher --data data.jsonl --out cache/ --k 16
    torchrun --nproc_per_node 2 -m pangu_fastkd.scoring ...    (each rank scores its share)

Re-running the same command on a killed run resumes it. ``--backend`` picks how the teacher
runs (``auto``: the embedded model for checkpoints it supports, else transformers through
``pangu_fastkd.hf``); ``--chat-template auto`` renders with a tokenizer directory's own chat
template when it has one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..backends import load_model_spec
from ..cache import CacheError
from ..cache.spec import CODECS, DEFAULT_VALUE_BITS, ID_CODINGS
from ..data import default_template, load_tokenizer, read_jsonl
from ..distributed import init_distributed
from .run import ScoringConfig, score_to_cache
from .sequences import DEFAULT_CONDITION_TEMPLATE

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pangu_fastkd.scoring", description=__doc__)
    p.add_argument("--teacher", required=True, type=Path, help="HF-style model directory")
    p.add_argument("--data", required=True, type=Path, help="JSONL records")
    p.add_argument("--out", required=True, type=Path, help="cache directory")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte', a directory or a tokenizer.json (default: the teacher directory if it "
        "has a tokenizer.json, else 'byte')",
    )
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument(
        "--codec", choices=CODECS, default="v2",
        help="cache format: v2 bit-packs ids and quantises log-probs (default), v1 stores "
        "whole-byte ids and float log-probs",
    )  # fmt: skip
    p.add_argument(
        "--value-bits", type=int, default=DEFAULT_VALUE_BITS,
        help="v2: bits per quantised log-prob, 3 to 16",
    )  # fmt: skip
    p.add_argument("--id-coding", choices=ID_CODINGS, default=ID_CODINGS[0], help="v2: ids")
    p.add_argument(
        "--value-dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="v1: values"
    )
    p.add_argument("--label-conditioned", action="store_true")
    p.add_argument("--condition-template", default=DEFAULT_CONDITION_TEMPLATE)
    p.add_argument("--sampled-draws", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--shard-tokens", type=int, default=1 << 16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="teacher weights")
    p.add_argument(
        "--backend", choices=("auto", "embedded", "transformers"), default="auto",
        help="the embedded DecoderLM or transformers (default: embedded when it supports the "
        "checkpoint)",
    )  # fmt: skip
    p.add_argument(
        "--chat-template", choices=("auto", "default"), default="auto",
        help="auto: the tokenizer directory's own chat template when it has one",
    )  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    context = init_distributed("cpu")
    tokenizer_spec = args.tokenizer
    if tokenizer_spec is None:
        has_own = (args.teacher / "tokenizer.json").exists()
        tokenizer_spec = str(args.teacher) if has_own else "byte"
    try:
        tokenizer = load_tokenizer(tokenizer_spec)
        template = None
        if args.chat_template == "auto" and Path(tokenizer_spec).is_dir():
            from ..hf.chat import template_for

            template = template_for(tokenizer_spec)
        template = template or default_template(tokenizer)
        teacher = load_model_spec(args.teacher, args.backend, DTYPES[args.dtype])
        examples = read_jsonl(args.data)
        config = ScoringConfig(
            k=args.k,
            temperature=args.temperature,
            codec=args.codec,
            value_bits=args.value_bits,
            id_coding=args.id_coding,
            value_dtype=args.value_dtype,
            label_conditioned=args.label_conditioned,
            condition_template=args.condition_template,
            sampled_draws=args.sampled_draws,
            batch_tokens=args.batch_tokens,
            shard_tokens=args.shard_tokens,
            seed=args.seed,
        )
        report = score_to_cache(
            teacher,
            tokenizer,
            template,
            examples,
            args.out,
            config,
            context=context,
            provenance={"teacher": str(args.teacher), "data": str(args.data)},
        )
    except (CacheError, ValueError, OSError) as err:
        print(f"scoring error: {err}", file=sys.stderr)
        return 1
    print(
        f"rank {context.rank}: scored {report.sequences} sequences, {report.tokens} tokens "
        f"({report.supervised_tokens} supervised) in {report.seconds:.1f} s, "
        f"{report.tokens_per_second:.0f} tokens/s"
    )
    if report.manifest is not None:
        reader_bytes = report.manifest.bytes_per_token
        print(f"cache {args.out}: {reader_bytes:.1f} bytes per supervised token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
