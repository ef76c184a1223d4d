"""Teachers a run trains itself (a ``[teachers.<name>]`` with ``train_on``), cached in the run
directory under ``teachers/<name>/`` and reused while what defines them is unchanged.

The cache key is the sha256 of the teacher's spec and the fingerprint of its training examples;
``--overwrite`` keeps these directories, so an ablation over the student does not retrain them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..backends import CausalLM, load_model_dir, resolve_backend
from ..data import Example, fingerprint_examples, select_stage
from ..scoring import DEFAULT_CONDITION_TEMPLATE, condition_on_answer
from .config import ModelSpec
from .evaluate import exact_match_accuracy
from .run_dir import (
    StageOutputs,
    finished_record,
    read_record,
    write_finished_record,
    write_record,
)
from .training import DTYPES, train_model

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["TEACHER_OUTPUTS", "teacher_examples", "teacher_key", "trained_teacher"]

# What a trained teacher leaves (done.json vouches for it): its model directory.
TEACHER_OUTPUTS = StageOutputs(model_dirs=("model",))


def teacher_examples(spec: ModelSpec, splits: dict[str, list[Example]]) -> list[Example]:
    """The examples a teacher trains on: its ``train_on`` splits, then (with
    ``train_with_answer_hints``) a copy conditioned on its answer of each answered example, or
    of a seeded ``answer_hint_share`` of them."""
    examples = [ex for split in spec.train_on for ex in splits[split]]
    if spec.train_with_answer_hints:
        answered = [ex for ex in examples if ex.answer is not None]
        if spec.answer_hint_share < 1.0:
            count = round(spec.answer_hint_share * len(answered))
            picked = set(random.Random(spec.seed).sample(range(len(answered)), count))
            answered = [ex for i, ex in enumerate(answered) if i in picked]
        examples += [
            dataclasses.replace(
                condition_on_answer(ex, DEFAULT_CONDITION_TEMPLATE), id=f"{ex.id}+hint"
            )
            for ex in answered
        ]
    return examples


def teacher_key(spec: ModelSpec, examples: Sequence[Example]) -> str:
    """sha256 (hex) of what defines a trained teacher: its spec and its training data."""
    return hashlib.sha256(
        json.dumps(
            {"spec": dataclasses.asdict(spec), "data": fingerprint_examples(examples)},
            sort_keys=True,
        ).encode()
    ).hexdigest()


def trained_teacher(pipeline: Pipeline, name: str) -> CausalLM:
    """Teacher ``name``: loaded from its spec, or trained from scratch (once, then reused)."""
    spec = pipeline.config.teachers[name]
    label = f"teacher {name}"
    if not spec.train_on:
        model = pipeline.build_model(spec, name)
        # Evaluated like the students, so the table shows how far above them it is.
        pipeline.eval_rows.append(pipeline.evaluate(model, label, f"teacher ({spec.path})"))
        return model
    # In the order the teacher's schedule asks for: the loop packs examples as given, and the
    # hinted copies come after the plain ones.
    examples = teacher_examples(spec, pipeline.splits)
    if spec.train.mode is not None:
        examples = select_stage(examples, mode=spec.train.mode)
    examples = pipeline.training_order(examples, spec.train)
    key = teacher_key(spec, examples)
    directory = pipeline.teachers_dir / name
    record = finished_record(directory, TEACHER_OUTPUTS, label)
    if record is not None and record.get("key") == key:
        print(f"teacher {name!r}: reusing {directory / 'model'}", file=pipeline.out)
        pipeline.eval_rows.append(record["eval"])
        pipeline.seconds[label] = record.get("seconds")
        backend = "embedded" if spec.path is None else resolve_backend(spec.path, spec.backend)
        return load_model_dir(directory / "model", backend, DTYPES[spec.dtype])
    # An interrupted training of the same teacher resumes from its checkpoint in work/; a
    # teacher whose spec or data changed starts over.
    started_record = directory / "started.json"
    if pipeline.context.is_main:
        same = started_record.exists() and read_record(started_record).get("key") == key
        if directory.exists() and not same:
            shutil.rmtree(directory)
        if not same:
            directory.mkdir(parents=True)
            write_record(started_record, {"key": key})
    pipeline.context.barrier()
    print(f"teacher {name!r}: training from scratch on {spec.train_on}", file=pipeline.out)
    started = time.perf_counter()
    model = pipeline.build_model(spec, name)
    model = train_model(pipeline, model, examples, spec.train, directory / "work", label, None)
    row = pipeline.evaluate(model, label, f"teacher ({'+'.join(spec.train_on)})")
    pipeline.eval_rows.append(row)
    seconds = pipeline.seconds[label] = round(time.perf_counter() - started, 3)
    if pipeline.context.is_main:
        train_accuracy = _train_accuracy(pipeline, model, spec)
        for split, accuracy in train_accuracy.items():
            print(
                f"teacher {name!r}: {accuracy:.1%} on training problems of {split}",
                file=pipeline.out,
            )
        pipeline.save_model_dir(model, directory / "model")
        record = {"key": key, "eval": row, "seconds": seconds, "train_accuracy": train_accuracy}
        write_finished_record(directory, TEACHER_OUTPUTS, record)
    pipeline.context.barrier()
    return model


def _train_accuracy(pipeline: Pipeline, model: CausalLM, spec: ModelSpec) -> dict[str, float]:
    """Greedy exact match on as many of each training split's problems as the eval uses: set
    beside the held-out accuracy, it shows whether the teacher learned or memorised."""
    accuracy = {}
    was_training = model.training
    model.eval()
    try:
        for split in spec.train_on:
            examples = [ex for ex in pipeline.splits[split] if ex.answer is not None]
            examples = examples[: pipeline.config.eval.max_examples]
            if examples:
                accuracy[split] = exact_match_accuracy(
                    model, pipeline.tokenizer, pipeline.template, examples, pipeline.config.eval
                )
    finally:
        model.train(was_training)
    return accuracy
