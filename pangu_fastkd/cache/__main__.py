"""Command line of the teacher-logit cache.

    python -m pangu_fastkd.cache verify DIR   full check of every shard; prints a summary
    python -m pangu_fastkd.cache info DIR     prints the manifest summary (reads no shard)

Exit code 0 on success; on a problem, one line ``cache error: ...`` on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .manifest import Manifest, read_manifest
from .spec import CacheError
from .verify import verify_cache


def _codec_lines(manifest: Manifest) -> list[str]:
    """How the cache stores ids and values: v1 dtypes, v2 bit widths."""
    spec = manifest.spec
    if spec.codec == "v1":
        return [f"value_dtype: {spec.value_dtype}", f"id_encoding: {manifest.id_encoding}"]
    return [
        f"value_bits: {spec.value_bits}",
        f"id_coding: {spec.id_coding}",
        f"id_bits: {spec.id_bits}",
    ]


def _info_lines(manifest: Manifest) -> list[str]:
    spec = manifest.spec
    lines = [
        f"format_version: {manifest.format_version}",
        f"vocab_size: {spec.vocab_size}",
        f"k: {spec.k}",
        f"temperature: {spec.temperature}",
        f"codec: {spec.codec}",
        *_codec_lines(manifest),
        f"sampled_k: {spec.sampled_k}",
        f"sampled_draws: {spec.sampled_draws}",
        f"label_conditioned: {spec.label_conditioned}",
        f"teacher_fingerprint: {spec.teacher_fingerprint}",
        f"tokenizer_fingerprint: {spec.tokenizer_fingerprint}",
        f"data_fingerprint: {spec.data_fingerprint}",
        f"world_size: {manifest.world_size}",
        f"sequences: {len(manifest.sequence_ids)}",
        f"tokens: {manifest.total_tokens}",
        f"shards: {len(manifest.shards)}",
        f"bytes: {manifest.total_bytes}",
        f"bytes_per_token: {manifest.bytes_per_token:.3f}",
    ]
    if spec.provenance:
        lines.append(f"provenance: {spec.provenance}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m pangu_fastkd.cache", description="Inspect a teacher-logit cache."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="check checksums, ids, values and alignment")
    verify.add_argument("directory")
    info = commands.add_parser("info", help="print the manifest summary")
    info.add_argument("directory")
    args = parser.parse_args(argv)
    try:
        if args.command == "verify":
            summary = verify_cache(args.directory)
            for key, value in summary.items():
                shown = f"{value:.3f}" if key == "bytes_per_token" else value
                print(f"{key}: {shown}")
            print("ok: cache verified")
        else:
            print("\n".join(_info_lines(read_manifest(args.directory))))
    except (CacheError, OSError) as exc:
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"cache error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
