"""The post-training pipeline: stages in order, each resumable, in one run directory.

Run directory::

    config.json                 the resolved configuration (a resume must match it)
    run.json                    the config's digest, sealed (an edited config.json is refused)
    data/                       the generated curriculum (demo data)
    teachers/<name>/            teachers trained here from a preset (kept by --overwrite)
    stages/init.json            the initial student's eval row
    stages/<i>-<name>/          per stage: checkpoint/ and checkpoint.old/ (the previous one),
                                model/ (student after the stage), rollouts.jsonl or cache/,
                                done.json (written last, sealed, with its outputs' sha256)
    metrics.jsonl, eval.md, plot.png
    tensorboard/<stage>/        with [logging] tensorboard = true: each training stage's steps

A stage with ``done.json`` is finished and skipped on resume, once the files it vouches for
(its model, rollouts or cache manifest) match their sha256 and the stages it was made from are
still the ones it recorded; an unfinished training stage resumes from its last good checkpoint.
A stage always starts from the student its config names (``start_from``, else the latest
training stage before it), never from another one because a file is missing. Rank 0 writes
every shared file; other ranks train and score.

Models run on the embedded ``DecoderLM`` or, for checkpoints it does not support (or
``backend = "transformers"``), on transformers through ``pangu_fastkd.hf.HFCausalLM``; every
model directory is written by ``backends.save_model_dir`` (with the tokenizer files when the
tokenizer is a directory), so each stage's ``model/`` loads in transformers as it is.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch

from ..backends import (
    CausalLM,
    load_model_spec,
    reload_like,
    save_model_dir,
)
from ..data import (
    ChatRenderer,
    Example,
    default_template,
    load_tokenizer,
    order_by_difficulty,
    read_jsonl,
    select_stage,
    tokenize_example,
)
from ..distributed import DistributedContext
from ..model import DecoderLM, ModelConfig, init_weights
from .config import (
    STUDENT_TOKENIZER,
    DataSpec,
    ModelLimits,
    ModelSpec,
    PipelineConfig,
    SFTStage,
    TrainSpec,
    check_model_limits,
)
from .evaluate import evaluate
from .integrity import IntegrityError, canonical_digest
from .metrics import MetricsLog, read_metrics
from .plots import plot_run
from .run_dir import (
    DONE_NAME,
    RunDirError,
    finished_record,
    prepare_run_dir,
    read_record,
    write_finished_record,
    write_record,
)
from .stage_runners import STAGE_OUTPUTS, STAGE_RUNNERS, TRAINING_KINDS
from .summary import write_run_report
from .teachers import trained_teacher
from .tensorboard_log import require_tensorboard
from .training import DTYPES

__all__ = ["Pipeline", "RunDirError"]

MODE_LETTER = {"train_reasoning": "R", "train_fast": "F"}


def tokenizer_source(spec: DataSpec, student_path: str | None) -> str:
    """The tokenizer spec ``load_tokenizer`` reads: ``"student"`` is the student's directory."""
    if spec.tokenizer == STUDENT_TOKENIZER:
        if student_path is None:
            raise ValueError(f"data.tokenizer = {STUDENT_TOKENIZER!r} needs a student 'path'")
        return student_path
    return spec.tokenizer


def chat_renderer(spec: DataSpec, tokenizer_spec: str, tokenizer) -> ChatRenderer:
    """The template every conversation is rendered with: with ``chat_template = "auto"`` the
    tokenizer directory's own template when it stores one, else ``default_template``."""
    if spec.chat_template == "auto" and Path(tokenizer_spec).is_dir():
        from ..hf.chat import template_for

        own = template_for(tokenizer_spec, **spec.chat_template_kwargs)
        if own is not None:
            return own
    if spec.chat_template_kwargs:
        raise ValueError(
            f"data.chat_template_kwargs is set but {tokenizer_spec!r} has no chat template of "
            "its own to pass them to"
        )
    return default_template(tokenizer)


class Pipeline:
    """One run of a pipeline config.

    Args:
        config: the validated configuration.
        context: this process's rank (torchrun) or the single process.
        resume: continue the run already in ``config.run_dir``.
        overwrite: discard the run in ``config.run_dir`` (trained teachers are kept).
        log: where progress lines and tables go (rank 0 only).
    """

    def __init__(
        self,
        config: PipelineConfig,
        context: DistributedContext,
        *,
        resume: bool = False,
        overwrite: bool = False,
        log=None,
    ):
        self.config, self.context = config, context
        self.run_dir = Path(config.run_dir)
        self.resume, self.overwrite = resume, overwrite
        self.out = (log or sys.stdout) if context.is_main else open(os.devnull, "w")
        self.eval_rows: list[dict] = []
        self.seconds: dict[str, float] = {}  # wall time per stage (and per teacher trained here)
        # Teachers trained here; the runs of a config with seeds share their parent's.
        self.teachers_dir = self.run_dir / "teachers"

    # -----------------------------------------------------------------------------------------
    # Set-up: run directory, data, tokenizer

    def _prepare_run_dir(self) -> None:
        resolved = dataclasses.asdict(self.config)
        prepare_run_dir(
            self.run_dir, resolved, self.context, resume=self.resume, overwrite=self.overwrite
        )

    def _load_data(self) -> None:
        spec = self.config.data
        self.splits: dict[str, list[Example]] = {}
        self.eval_sets: dict[str, list[Example]] = {}
        if spec.source == "demo":
            from ..data.demo_curriculum import make_curriculum

            curriculum = make_curriculum(
                seed=spec.seed,
                n_train=spec.train_problems,
                n_eval=spec.eval_problems,
                max_difficulty=spec.max_difficulty,
                min_difficulty=spec.min_difficulty,
                max_operand=spec.max_operand,
            )
            self._curriculum = curriculum
            self.splits = {
                "train_reasoning": curriculum.train_reasoning,
                "train_fast": curriculum.train_fast,
            }
            self.eval_sets = {m: curriculum.eval_examples(m) for m in ("reasoning", "fast")}
        else:
            for name in ("train_reasoning", "train_fast"):
                path = getattr(spec, name)
                self.splits[name] = read_jsonl(path) if path else []
            for mode in ("reasoning", "fast"):
                path = getattr(spec, f"eval_{mode}")
                self.eval_sets[mode] = read_jsonl(path) if path else []
        source = tokenizer_source(spec, self.config.student.path)
        self.tokenizer = load_tokenizer(source)
        self.template = chat_renderer(spec, source, self.tokenizer)
        # Saved model directories carry the tokenizer when it is a directory.
        self.tokenizer_dir = source if Path(source).is_dir() else None

    def save_model_dir(self, model: CausalLM, directory: Path) -> None:
        """A Hugging Face model directory (with the tokenizer files), replaced atomically."""
        save_model_dir(model, directory, self.tokenizer_dir)

    # -----------------------------------------------------------------------------------------
    # Models

    def _initial_student(self) -> CausalLM:
        return self.build_model(self.config.student, "student")

    def build_model(self, spec: ModelSpec, name: str) -> CausalLM:
        dtype = DTYPES[spec.dtype]
        if spec.path is not None:
            model = load_model_spec(spec.path, spec.backend, dtype)
        else:
            model = DecoderLM(ModelConfig.preset(spec.preset, self.tokenizer.vocab_size))
            init_weights(model, seed=spec.seed)
            model = model.to(dtype)
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model {name!r} has a vocabulary of {model.config.vocab_size} but the "
                f"tokenizer has {self.tokenizer.vocab_size} tokens"
            )
        return model

    # -----------------------------------------------------------------------------------------
    # Training

    def training_order(self, examples: list[Example], train: TrainSpec) -> list[Example]:
        """``examples`` in the order ``train.schedule`` asks for (the loop packs them as given)."""
        return order_by_difficulty(
            examples, schedule=train.schedule, difficulty=train.difficulty, seed=self.config.seed
        )

    def stage_examples(
        self, data: str, train: TrainSpec | None, mode: str | None, *, limit: int = 0
    ) -> list:
        """The examples of ``data`` (a split or a rollout stage) of ``mode``, the first
        ``limit`` of them (0: all), in the order ``train`` asks for (None: as stored)."""
        if data in self.splits:
            examples = self.splits[data]
        else:  # a rollout stage's responses
            examples = read_jsonl(self.stage_dir(self.config.stage(data)) / "rollouts.jsonl")
        if mode is not None:
            examples = select_stage(examples, mode=mode)
        if limit:
            examples = examples[:limit]
        if train is not None:
            examples = self.training_order(examples, train)
        if not examples:
            raise ValueError(f"no examples for data {data!r} (mode {mode!r})")
        return examples

    # -----------------------------------------------------------------------------------------
    # Stages

    def stage_dir(self, stage) -> Path:
        return self.run_dir / "stages" / f"{self.config.stages.index(stage)}-{stage.name}"

    def source_split(self, data: str) -> str:
        """The data split behind ``data``: itself, or the split a rollout stage answered."""
        while data not in self.splits and data not in MODE_LETTER:
            data = self.config.stage(data).data
        return data

    def _schedule_label(self, stage) -> str:
        data = stage.data if isinstance(stage, SFTStage) else self.config.stage(stage.cache).data
        letter = MODE_LETTER.get(self.source_split(data), "?")
        return f"{'SFT' if isinstance(stage, SFTStage) else 'KD'}({letter})"

    def stage_inputs(self, stage, base: str) -> dict[str, str]:
        """``{stage name: digest of its outputs}`` of the earlier stages ``stage`` reads: the
        student it starts from (``base``) and the rollouts or cache it trains on or scores."""
        names = [base] if stage.kind in TRAINING_KINDS | {"rollout"} and base != "init" else []
        stage_names = {s.name for s in self.config.stages}
        for reference in (getattr(stage, "data", None), getattr(stage, "cache", None)):
            if reference in stage_names:
                names.append(reference)
        return {name: self.output_digests[name] for name in names}

    def _finished(self, stage, stage_dir: Path, base: str) -> dict | None:
        """The verified ``done.json`` of ``stage`` (None when it has not finished).

        Raises:
            RunDirError: the record or an output of the stage fails its checks, or the stage
                was made from earlier stages whose outputs have changed since.
        """
        what = f"stage {stage.name!r}"
        record = finished_record(stage_dir, STAGE_OUTPUTS[stage.kind], what)
        if record is None:
            return None
        expected = self.stage_inputs(stage, base)
        if record.get("inputs") != expected:
            raise RunDirError(
                f"{what} ({stage_dir / DONE_NAME}) was made from {sorted(expected)} as they "
                "were then, and their outputs have changed since (run again or replaced); "
                f"delete {stage_dir} and the stages after it to run them again"
            )
        return record

    def _record_outputs(self, stage, stage_dir: Path) -> None:
        """Remembers the digest of a finished stage's outputs, for the stages that read them."""
        files = read_record(stage_dir / DONE_NAME)["files"]
        self.output_digests[stage.name] = canonical_digest(files)

    def evaluate(self, model: CausalLM, stage_name: str, schedule: str) -> dict:
        row = {"stage": stage_name, "schedule": schedule}
        if self.context.is_main:
            row.update(
                evaluate(model, self.tokenizer, self.template, self.eval_sets, self.config.eval)
            )
            self.metrics.log({"kind": "eval", "stage": stage_name, "step": 0, **row})
        self.context.barrier()
        return row

    def _report(self) -> None:
        if not self.context.is_main:
            return
        compare = [tuple(pair) for pair in self.config.eval.compare]
        metrics = read_metrics(self.run_dir / "metrics.jsonl")
        report = write_run_report(self.run_dir, self.eval_rows, compare, metrics, self.seconds)
        print(report, file=self.out)
        plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "plot.png")

    def _preflight(self, initial_student: CausalLM) -> None:
        """Fails before any training on what can be checked up front: model files and
        architectures, config values the models' sizes rule out (a score stage's ``k``,
        ``max_new_tokens``), examples longer than a stage's batch, too few batches for the
        ranks."""
        loaded = {"student": ModelLimits.of(initial_student)}
        for name, spec in self.config.teachers.items():
            if spec.path is not None:
                loaded[f"teachers.{name}"] = ModelLimits.of(self.build_model(spec, name))
        check_model_limits(self.config, self.tokenizer.vocab_size, loaded)
        checks = [
            (stage.name, stage.data, stage.train)
            for stage in self.config.stages
            if isinstance(stage, SFTStage) and stage.data in self.splits
        ]
        for name, spec in self.config.teachers.items():
            checks += [(f"teacher {name}", split, spec.train) for split in spec.train_on]
        for where, split, train in checks:
            examples = self.splits[split]
            if train.mode is not None:
                examples = select_stage(examples, mode=train.mode)
            if not examples:
                raise ValueError(f"{where}: no training examples in {split!r}")
            lengths = [
                len(tokenize_example(ex, self.tokenizer, self.template).input_ids)
                for ex in examples
            ]
            if max(lengths) > train.batch_tokens:
                raise ValueError(
                    f"{where}: an example of {max(lengths)} tokens does not fit batch_tokens="
                    f"{train.batch_tokens}"
                )
            if sum(lengths) < train.batch_tokens * (self.context.world_size - 1):
                raise ValueError(
                    f"{where}: {sum(lengths)} tokens cannot make a batch for each of "
                    f"{self.context.world_size} ranks at batch_tokens={train.batch_tokens}"
                )

    def run(self) -> list[dict]:
        """Runs (or resumes) every stage; returns the eval rows."""
        started = time.perf_counter()
        if self.config.logging.tensorboard:
            require_tensorboard()  # on every rank, before anything is touched
        self._load_data()  # bad data files fail before the run directory is touched
        self._prepare_run_dir()
        if self.config.data.source == "demo" and self.context.is_main:
            from ..data.demo_curriculum import write_curriculum

            write_curriculum(self.run_dir / "data", self._curriculum)
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.context.is_main)
        initial_student = self._initial_student()
        self._preflight(initial_student)
        # lineage: a trained student per training stage ("init" before any), with its schedule.
        lineage: dict[str, tuple[CausalLM, list[str]]] = {"init": (initial_student, [])}
        latest = "init"
        init_done = self.run_dir / "stages" / "init.json"
        if init_done.exists():
            try:
                self.eval_rows.append(read_record(init_done))
            except IntegrityError as err:
                raise RunDirError(
                    f"{err}; delete it to evaluate the initial student again"
                ) from None
        else:
            row = self.evaluate(lineage["init"][0], "init", "none")
            self.eval_rows.append(row)
            if self.context.is_main:
                init_done.parent.mkdir(parents=True, exist_ok=True)
                write_record(init_done, row)
        self.teachers: dict[str, CausalLM] = {}
        if not self.config.stages:
            # A run of teachers only: train (or reuse) each, and report them.
            for name, spec in self.config.teachers.items():
                if spec.train_on:
                    self.teachers[name] = trained_teacher(self, name)
            self._report()
        self.output_digests: dict[str, str] = {}
        for stage in self.config.stages:
            stage_dir = self.stage_dir(stage)
            # The config's parent, whatever is on disk: a finished stage whose model is gone
            # is an error below, never a reason to start from another student.
            base = getattr(stage, "start_from", "") or latest
            if stage.kind in TRAINING_KINDS:
                latest = stage.name
            student, schedule = lineage[base]
            if stage.kind in TRAINING_KINDS:
                schedule = [*schedule, self._schedule_label(stage)]
            record = self._finished(stage, stage_dir, base)
            if record is not None:
                teacher_row = record.get("teacher_eval")
                if teacher_row and all(r["stage"] != teacher_row["stage"] for r in self.eval_rows):
                    self.eval_rows.append(teacher_row)
                if "eval" in record:
                    self.eval_rows.append(record["eval"])
                if "seconds" in record:
                    self.seconds[stage.name] = record["seconds"]
                if stage.kind in TRAINING_KINDS:
                    trained = reload_like(student, stage_dir / "model")
                    lineage[stage.name] = (trained, schedule)
                self._record_outputs(stage, stage_dir)
                print(f"{stage.name}: done (skipped)", file=self.out)
                continue
            print(f"== stage {stage.name} ({stage.kind}, from {base})", file=self.out)
            stage_started = time.perf_counter()
            outcome = STAGE_RUNNERS[stage.kind](self, stage, student, schedule, stage_dir)
            self.seconds[stage.name] = outcome.record["seconds"] = round(
                time.perf_counter() - stage_started, 3
            )
            if "eval" in outcome.record:
                # The row is the one in eval_rows: the comparisons pair it with its start.
                outcome.record["eval"]["start"] = base
            if outcome.trained is not None:
                lineage[stage.name] = (outcome.trained, schedule)
            outcome.record["inputs"] = self.stage_inputs(stage, base)
            if self.context.is_main:
                write_finished_record(stage_dir, STAGE_OUTPUTS[stage.kind], outcome.record)
                if outcome.new_rows:
                    self._report()
            self.context.barrier()
            self._record_outputs(stage, stage_dir)
        self.metrics.close()
        seconds = time.perf_counter() - started
        print(f"run finished in {seconds:.0f} s: {self.run_dir}", file=self.out)
        return self.eval_rows
