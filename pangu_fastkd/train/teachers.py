"""Teachers a run trains itself (a ``[teachers.<name>]`` with ``train_on``), cached in the run
directory under ``teachers/<name>/`` and reused while what defines them is unchanged.

The cache key is the sha256 of the teacher's spec and the fingerprint of its training examples;
``--overwrite`` keeps these directories, so an ablation over the student does not retrain them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..backends import CausalLM, load_model_dir, resolve_backend
from ..data import Example, fingerprint_examples
from ..scoring import DEFAULT_CONDITION_TEMPLATE, condition_on_answer
from .config import ModelSpec
from .run_dir import read_record, write_record
from .training import DTYPES, train_model

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["teacher_examples", "teacher_key", "trained_teacher"]


def teacher_examples(spec: ModelSpec, splits: dict[str, list[Example]]) -> list[Example]:
    """The examples a teacher trains on: its ``train_on`` splits, then (with
    ``train_with_answer_hints``) a copy of each answered example conditioned on its answer."""
    examples = [ex for split in spec.train_on for ex in splits[split]]
    if spec.train_with_answer_hints:
        examples += [
            dataclasses.replace(
                condition_on_answer(ex, DEFAULT_CONDITION_TEMPLATE), id=f"{ex.id}+hint"
            )
            for ex in examples
            if ex.answer is not None
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
    if not spec.train_on:
        return pipeline.build_model(spec, name)
    examples = teacher_examples(spec, pipeline.splits)
    key = teacher_key(spec, examples)
    directory = pipeline.run_dir / "teachers" / name
    done = directory / "done.json"
    if done.exists() and read_record(done).get("key") == key:
        print(f"teacher {name!r}: reusing {directory / 'model'}", file=pipeline.out)
        pipeline.eval_rows.append(read_record(done)["eval"])
        backend = "embedded" if spec.path is None else resolve_backend(spec.path, spec.backend)
        return load_model_dir(directory / "model", backend, DTYPES[spec.dtype])
    if pipeline.context.is_main and directory.exists():
        shutil.rmtree(directory)
    pipeline.context.barrier()
    print(f"teacher {name!r}: training from scratch on {spec.train_on}", file=pipeline.out)
    model = pipeline.build_model(spec, name)
    label = f"teacher {name}"
    model = train_model(pipeline, model, examples, spec.train, directory / "work", label, None)
    row = pipeline.evaluate(model, label, f"teacher ({'+'.join(spec.train_on)})")
    pipeline.eval_rows.append(row)
    if pipeline.context.is_main:
        pipeline.save_model_dir(model, directory / "model")
        write_record(done, {"key": key, "eval": row})
    pipeline.context.barrier()
    return model
