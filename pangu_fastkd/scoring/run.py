"""Teacher scoring: run the teacher once over every sequence and fill the logit cache.

Each rank scores its own contiguous block of sequences (``CacheWriter.owned``), in packed
batches of at most ``batch_tokens`` tokens, and commits shards as it goes; a run that is killed
resumes at the first uncommitted sequence. Only the supervised rows' logits are materialised
([rows, V] in chunks), never the whole [T, V]. Sampling is seeded per sequence, so a resumed or
differently sharded run draws the same ids.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..backends import CausalLM, head_parts
from ..cache import CacheSpec, CacheWriter, Manifest, SequenceScores, finalize_cache
from ..cache.spec import DEFAULT_VALUE_BITS, codec_fields
from ..data import ChatRenderer, Example, Tokenizer, fingerprint_examples
from ..data.boundaries import cu_seqlens_from_lengths
from ..distributed import DistributedContext
from .sequences import DEFAULT_CONDITION_TEMPLATE, TeacherSequence, teacher_sequence
from .targets import RowTargets, rows_to_targets

__all__ = ["ScoringConfig", "ScoringReport", "score_to_cache"]


@dataclass(frozen=True)
class ScoringConfig:
    """How the teacher's outputs are reduced and stored.

    Attributes:
        k: top-K logits kept per supervised token.
        temperature: cache temperature ``T_c`` of the stored log-partition (and samples).
        codec: cache format, "v2" (bit-packed ids, ``value_bits``-bit log-probs) or "v1"
            (whole-byte ids, ``value_dtype`` log-probs); docs/cache-format.md.
        value_bits: v2: bits per quantised log-prob (3 to 16).
        id_coding: v2: "elias_fano" (ids sorted within a row) or "packed" (18-bit fields at
            V = 153,376, the teacher's order kept).
        value_dtype: v1: dtype of stored values: "bf16", "fp16" or "fp32".
        label_conditioned: give the teacher the reference answer in its context.
        condition_template: the text added to the first user message (``{answer}``).
        sampled_draws: random-sampling KD draws per token (0: no sampled targets).
        batch_tokens: packed tokens per teacher forward.
        shard_tokens: supervised tokens per cache shard (the unit of commit and resume).
        logits_chunk_mb: memory for one chunk of full-vocabulary logit rows.
        seed: seed of the sampled targets.
    """

    k: int = 16
    temperature: float = 1.0
    codec: str = "v2"
    value_bits: int = DEFAULT_VALUE_BITS
    id_coding: str = "elias_fano"
    value_dtype: str = "bf16"
    label_conditioned: bool = False
    condition_template: str = DEFAULT_CONDITION_TEMPLATE
    sampled_draws: int = 0
    batch_tokens: int = 8192
    shard_tokens: int = 1 << 16
    logits_chunk_mb: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.sampled_draws < 0:
            raise ValueError(f"sampled_draws must be >= 0, got {self.sampled_draws}")
        if self.batch_tokens < 1 or self.shard_tokens < 1 or self.logits_chunk_mb < 1:
            raise ValueError("batch_tokens, shard_tokens and logits_chunk_mb must be positive")
        codec_fields(self.codec, self.value_dtype, self.value_bits, self.id_coding)
        if self.label_conditioned and "{answer}" not in self.condition_template:
            raise ValueError("condition_template must contain '{answer}'")


@dataclass(frozen=True)
class ScoringReport:
    """What one rank did.

    Attributes:
        sequences: sequences this rank scored in this run (0 when resuming a finished cache).
        tokens: teacher tokens read (context included).
        supervised_tokens: cache rows written.
        seconds: wall time of the scoring loop.
        manifest: the finished cache's manifest (rank 0), else None.
    """

    sequences: int
    tokens: int
    supervised_tokens: int
    seconds: float
    manifest: Manifest | None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def teacher_batches(
    seqs: Sequence[TeacherSequence], indices: Sequence[int], batch_tokens: int
) -> Iterator[list[int]]:
    """Consecutive runs of ``indices`` whose teacher sequences fit ``batch_tokens`` together (a
    longer sequence goes alone)."""
    batch: list[int] = []
    used = 0
    for i in indices:
        n = len(seqs[i].teacher_ids)
        if batch and used + n > batch_tokens:
            yield batch
            batch, used = [], 0
        batch.append(i)
        used += n
    if batch:
        yield batch


def head_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The model's exact fp32 logits ``[n, V]`` of ``hidden [n, d]``: ``weight [V, d]``, the
    optional ``bias [V]`` and the optional final softcap ``c * tanh(z / c)``."""
    logits = hidden.float() @ weight.float().T  # [n, V]
    if bias is not None:
        logits = logits + bias.float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _sequence_targets(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    config: ScoringConfig,
    generator: torch.Generator | None,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
) -> RowTargets:
    """Targets of one sequence's rows: ``hidden [n, d]`` against the LM head ``weight [V, d]``
    (fp32, with the head's ``bias [V]`` and ``softcap`` when it has them), in row chunks of at
    most ``logits_chunk_mb``."""
    vocab = weight.shape[0]
    chunk = max(1, (config.logits_chunk_mb << 20) // (4 * vocab))
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        logits = head_logits(hidden[start : start + chunk], weight, bias, softcap)  # [rows, V]
        parts.append(
            rows_to_targets(
                logits,
                labels[start : start + chunk],
                k=config.k,
                temperature=config.temperature,
                draws=config.sampled_draws,
                generator=generator,
                overwrite=True,
            )
        )
    fields = {}
    for name in RowTargets.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        fields[name] = None if values[0] is None else torch.cat(values)
    return RowTargets(**fields)


def _sequence_generator(seed: int, seq_index: int) -> torch.Generator:
    # One stream per sequence: the draws do not depend on batching, sharding or resuming.
    return torch.Generator().manual_seed((seed * 1_000_003 + seq_index) % (1 << 63))


def score_to_cache(
    teacher: CausalLM,
    tokenizer: Tokenizer,
    template: ChatRenderer,
    examples: Sequence[Example],
    directory: str | Path,
    config: ScoringConfig,
    *,
    context: DistributedContext | None = None,
    provenance: dict | None = None,
) -> ScoringReport:
    """Scores ``examples`` with ``teacher`` into the cache at ``directory`` (resuming it).

    Args:
        teacher: the teacher model (embedded or transformers); its vocabulary is the cache's.
            Its logits include the head's bias and softcap when it has them.
        tokenizer: shared by teacher and student (its fingerprint goes into the manifest).
        template: chat template of the sequences.
        examples: the sequences in cache order (every rank passes the same list).
        directory: the cache directory.
        config: what to store.
        context: this process's rank; None runs alone.
        provenance: extra JSON-able facts recorded in the manifest (teacher path, data file).
    """
    context = context or DistributedContext(rank=0, world_size=1, local_rank=0)
    condition = config.condition_template if config.label_conditioned else None
    seqs = [
        teacher_sequence(ex, tokenizer, template, condition_template=condition) for ex in examples
    ]
    vocab = teacher.config.vocab_size
    if config.k > vocab:
        raise ValueError(f"k={config.k} is larger than the teacher's vocabulary ({vocab})")
    spec = CacheSpec(
        vocab_size=vocab,
        k=config.k,
        temperature=config.temperature,
        teacher_fingerprint=teacher.weights_fingerprint(),
        tokenizer_fingerprint=tokenizer.fingerprint(),
        data_fingerprint=fingerprint_examples(examples),
        label_conditioned=config.label_conditioned,
        **codec_fields(config.codec, config.value_dtype, config.value_bits, config.id_coding),
        sampled_k=config.sampled_draws,
        sampled_draws=config.sampled_draws,
        provenance={"scoring": asdict(config), **(provenance or {})},
    )
    writer = CacheWriter(
        directory,
        spec,
        [s.example_id for s in seqs],
        rank=context.rank,
        world_size=context.world_size,
        shard_tokens=config.shard_tokens,
    )
    first = writer.next_sequence
    todo = [] if first is None else [i for i in writer.owned if i >= first]
    tokens = rows_written = 0
    started = time.perf_counter()
    was_training = teacher.training
    teacher.eval()
    weight, bias, softcap = head_parts(teacher)
    weight = weight.detach().float()
    bias = None if bias is None else bias.detach().float()
    try:
        with torch.inference_mode():
            for batch in teacher_batches(seqs, todo, config.batch_tokens):
                lengths = [len(seqs[i].teacher_ids) for i in batch]
                input_ids = torch.tensor(
                    [t for i in batch for t in seqs[i].teacher_ids], dtype=torch.long
                )
                hidden = teacher.hidden_states(input_ids, cu_seqlens_from_lengths(lengths))
                offset = 0
                for i, length in zip(batch, lengths, strict=True):
                    seq = seqs[i]
                    rows = torch.tensor(seq.rows, dtype=torch.long) + offset
                    labels = torch.tensor(seq.labels, dtype=torch.long)
                    generator = (
                        _sequence_generator(config.seed, i) if config.sampled_draws else None
                    )
                    targets = _sequence_targets(
                        hidden[rows], weight, labels, config, generator, bias, softcap
                    )
                    writer.add(
                        SequenceScores(
                            seq_index=i,
                            topk_ids=targets.topk_ids,
                            topk_logits=targets.topk_logits,
                            lse=targets.lse,
                            label_logit=targets.label_logit,
                            sampled_ids=targets.sampled_ids,
                            sampled_counts=targets.sampled_counts,
                        )
                    )
                    offset += length
                    rows_written += len(seq.rows)
                tokens += sum(lengths)
        writer.close()
    finally:
        teacher.train(was_training)
    seconds = time.perf_counter() - started
    context.barrier()
    manifest = finalize_cache(directory, context.world_size) if context.is_main else None
    return ScoringReport(len(todo), tokens, rows_written, seconds, manifest)
