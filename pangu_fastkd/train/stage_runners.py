"""One runner per stage kind, in a table keyed by the kind: training (``sft`` and ``kd``),
``rollout`` and ``score``.

Every runner takes the pipeline, the stage, the student it starts from, the schedule so far and
the stage's directory, and returns a ``StageOutcome``: the record ``done.json`` keeps, the
trained student when the stage trains one, and whether the report has new rows to show.
``STAGE_OUTPUTS`` says which of a stage's files later stages read (``done.json`` vouches for
them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..backends import CausalLM, copy_model
from ..cache import CacheError, CacheReader
from ..model import GenerationConfig
from ..rollout import generate_rollouts, write_rollouts
from ..scoring import (
    DEFAULT_CONDITION_TEMPLATE,
    ScoringConfig,
    reference_agreement,
    score_to_cache,
)
from .config import KDStage, RolloutStage, ScoreStage, SFTStage, Stage
from .run_dir import StageOutputs
from .teachers import trained_teacher
from .training import train_model

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["STAGE_OUTPUTS", "STAGE_RUNNERS", "TRAINING_KINDS", "StageOutcome", "verified_cache"]

# The kinds that train a student (and add a step to the schedule label).
TRAINING_KINDS = frozenset({"sft", "kd"})

# What each kind leaves for later stages. A score stage's cache is vouched for by its manifest,
# which holds every shard's sha256 and its own checksum (the KD stage verifies the shards).
STAGE_OUTPUTS = {
    "sft": StageOutputs(model_dirs=("model",)),
    "kd": StageOutputs(model_dirs=("model",)),
    "rollout": StageOutputs(files=("rollouts.jsonl",)),
    "score": StageOutputs(files=("cache/manifest.json",)),
}


@dataclass
class StageOutcome:
    """What a finished stage leaves: its ``done.json`` record (with ``"eval"`` when it was
    evaluated), the student it trained (or None), and whether the eval table changed."""

    record: dict[str, Any] = field(default_factory=dict)
    trained: CausalLM | None = None
    new_rows: bool = False


def run_training(
    pipeline: Pipeline,
    stage: SFTStage | KDStage,
    student: CausalLM,
    schedule: list[str],
    stage_dir: Path,
) -> StageOutcome:
    """SFT on a split or a rollout stage's responses, or KD from a score stage's cache."""
    cache = None
    if isinstance(stage, KDStage):
        score = pipeline.config.stage(stage.cache)
        cache = verified_cache(pipeline, pipeline.stage_dir(score) / "cache", stage.name)
        cache.check_compatible(
            tokenizer_fingerprint=pipeline.tokenizer.fingerprint(),
            vocab_size=student.config.vocab_size,
        )
        examples = pipeline.stage_examples(
            score.data, stage.train, stage.train.mode, limit=score.max_examples
        )
        kd = stage
    else:
        examples = pipeline.stage_examples(stage.data, stage.train, stage.train.mode)
        kd = None
    # Train a copy: the base model may be the start of another branch.
    model = copy_model(student)
    model = train_model(pipeline, model, examples, stage.train, stage_dir, stage.name, kd, cache)
    row = pipeline.evaluate(model, stage.name, " + ".join(schedule))
    pipeline.eval_rows.append(row)
    if pipeline.context.is_main:
        pipeline.save_model_dir(model, stage_dir / "model")
    return StageOutcome(record={"eval": row}, trained=model, new_rows=True)


def verified_cache(pipeline: Pipeline, directory: Path, stage_name: str) -> CacheReader:
    """The logit cache in ``directory``, every shard and row checked (``CacheReader.verify``)
    before the stage's first step (on resume too: the cache may have been damaged in between),
    so a bad cache fails here, by name, not as a wrong loss some steps in.

    Rank 0 checks the manifest its reader serves from, the others wait for its verdict (one
    full read, not one per rank) and then read without hashing the shards again.

    Raises:
        CacheError: the cache fails a check (on every rank).
    """
    problem = ""
    reader: CacheReader | None = None
    try:
        reader = CacheReader(directory, verify_checksums=pipeline.context.is_main)
        if pipeline.context.is_main:
            started = time.perf_counter()
            summary = reader.verify()
            print(
                f"{stage_name}: verified the logit cache {directory} ({summary['tokens']:,} "
                f"tokens, {summary['bytes'] / 2**20:.1f} MiB) in "
                f"{time.perf_counter() - started:.2f} s",
                file=pipeline.out,
            )
    except CacheError as err:
        problem = str(err)
    # Every rank reaches the all-reduce, so one rank's failure cannot leave the others waiting.
    failed = pipeline.context.all_reduce_sum(torch.tensor(1.0 if problem else 0.0))
    if float(failed) > 0 or reader is None:
        raise CacheError(
            f"{stage_name}: the logit cache {directory} fails verification"
            + (f": {problem}" if problem else " (see rank 0's error)")
            + "; delete the score stage's directory to score again"
        )
    return reader


def run_rollout(
    pipeline: Pipeline,
    stage: RolloutStage,
    student: CausalLM,
    schedule: list[str],
    stage_dir: Path,
) -> StageOutcome:
    """The student answers the stage's prompts once (rank 0), into ``rollouts.jsonl``."""
    if pipeline.context.is_main:
        examples = pipeline.stage_examples(stage.data, None, stage.mode, limit=stage.max_prompts)
        config = GenerationConfig(
            max_new_tokens=stage.max_new_tokens,
            temperature=stage.temperature,
            top_p=stage.top_p,
            seed=stage.seed,
        )
        rollouts = generate_rollouts(
            student,
            pipeline.tokenizer,
            pipeline.template,
            examples,
            config,
            samples_per_prompt=stage.samples_per_prompt,
            batch_size=pipeline.config.eval.batch_size,
        )
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_rollouts(stage_dir / "rollouts.jsonl", rollouts)
        stopped = sum(r.stopped for r in rollouts) / len(rollouts)
        print(f"{stage.name}: {len(rollouts)} responses, {stopped:.0%} ended", file=pipeline.out)
    pipeline.context.barrier()
    return StageOutcome()


def run_score(
    pipeline: Pipeline,
    stage: ScoreStage,
    student: CausalLM,
    schedule: list[str],
    stage_dir: Path,
) -> StageOutcome:
    """The stage's teacher (loaded or trained here, once per run) scores into ``cache/``."""
    teachers = pipeline.teachers
    if stage.teacher not in teachers:
        teachers[stage.teacher] = trained_teacher(pipeline, stage.teacher)
    examples = pipeline.stage_examples(stage.data, None, stage.mode, limit=stage.max_examples)
    config = ScoringConfig(
        k=stage.k,
        temperature=stage.temperature,
        codec=stage.codec,
        value_bits=stage.value_bits,
        id_coding=stage.id_coding,
        value_dtype=stage.value_dtype,
        label_conditioned=stage.label_conditioned,
        sampled_draws=stage.sampled_draws,
    )
    report = score_to_cache(
        teachers[stage.teacher],
        pipeline.tokenizer,
        pipeline.template,
        examples,
        stage_dir / "cache",
        config,
        context=pipeline.context,
        provenance={"stage": stage.name, "teacher": stage.teacher},
    )
    if report.manifest is not None:
        print(
            f"{stage.name}: {report.manifest.total_tokens} supervised tokens, "
            f"{report.manifest.bytes_per_token:.1f} bytes/token",
            file=pipeline.out,
        )
    record: dict[str, Any] = {}
    # The teacher's eval row (added when it was loaded or trained), kept so that a resume that
    # skips this stage still shows the teacher and its comparisons.
    label = f"teacher {stage.teacher}"
    record["teacher_eval"] = next((r for r in pipeline.eval_rows if r["stage"] == label), None)
    if pipeline.context.is_main:
        record["reference_agreement"] = _reference_agreement(
            pipeline, stage, teachers[stage.teacher]
        )
    pipeline.context.barrier()
    return StageOutcome(record=record, new_rows=True)


AGREEMENT_EXAMPLES = 500


def _reference_agreement(pipeline: Pipeline, stage: ScoreStage, teacher: CausalLM) -> dict:
    """How often the teacher's top-1 is the reference token, plain and (for a label-conditioned
    stage) with the answer in its context, on up to ``AGREEMENT_EXAMPLES`` reference examples
    of the split the stage scores: how much of the cache is an echo of the reference."""
    split = pipeline.source_split(stage.data)
    examples = [ex for ex in pipeline.splits.get(split, []) if ex.answer is not None]
    examples = examples[:AGREEMENT_EXAMPLES]
    if not examples:
        return {}
    args = (teacher, pipeline.tokenizer, pipeline.template, examples)
    found = {"plain": reference_agreement(*args)}
    if stage.label_conditioned:
        found["conditioned"] = reference_agreement(
            *args, condition_template=DEFAULT_CONDITION_TEMPLATE
        )
    for how, agreement in found.items():
        context = "with the reference answer in its context" if how == "conditioned" else "plain"
        print(
            f"{stage.name}: teacher-forced {context}, the teacher's top-1 is the reference token "
            f"on {agreement.tokens:.1%} of tokens and on every token of {agreement.sequences:.1%} "
            f"of the {len(examples)} reference responses of {split}",
            file=pipeline.out,
        )
    return {"examples": len(examples), **{k: asdict(v) for k, v in found.items()}}


StageRunnerFn = Callable[[Any, Stage, CausalLM, list[str], Path], StageOutcome]
STAGE_RUNNERS: dict[str, StageRunnerFn] = {
    "sft": run_training,
    "kd": run_training,
    "rollout": run_rollout,
    "score": run_score,
}
