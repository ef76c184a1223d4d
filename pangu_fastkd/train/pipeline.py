"""The post-training pipeline: stages in order, each resumable, in one run directory.

Run directory::

    config.json                 the resolved configuration (a resume must match it)
    data/                       the generated curriculum (demo data)
    teachers/<name>/            teachers trained here from a preset (kept by --overwrite)
    stages/<i>-<name>/          per stage: checkpoint/, model/ (student after the stage),
                                rollouts.jsonl or cache/, done.json (written last)
    metrics.jsonl, eval.md, plot.png

A stage with ``done.json`` is finished and skipped on resume; an unfinished training stage
resumes from its last checkpoint. Rank 0 writes every shared file; other ranks train and score.

Models run on the embedded ``DecoderLM`` or, for checkpoints it does not support (or
``backend = "transformers"``), on transformers through ``pangu_fastkd.hf.HFCausalLM``; every
model directory is written by ``save_hf_student`` (with the tokenizer files when the tokenizer
is a directory), so each stage's ``model/`` loads in transformers as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from ..backends import (
    CausalLM,
    backend_of,
    copy_model,
    load_model_dir,
    load_model_spec,
    reload_like,
    resolve_backend,
    save_model_dir,
)
from ..cache import CacheReader
from ..data import (
    ChatRenderer,
    Example,
    default_template,
    fingerprint_examples,
    load_tokenizer,
    order_by_difficulty,
    pack_examples,
    read_jsonl,
    select_stage,
    tokenize_example,
)
from ..distributed import DistributedContext
from ..durable import atomic_write_text
from ..model import DecoderLM, GenerationConfig, ModelConfig, init_weights
from ..rollout import generate_rollouts, write_rollouts
from ..scoring import (
    DEFAULT_CONDITION_TEMPLATE,
    ScoringConfig,
    condition_on_answer,
    score_to_cache,
)
from .checkpoint import load_checkpoint, save_checkpoint
from .config import (
    STUDENT_TOKENIZER,
    DataSpec,
    KDStage,
    ModelSpec,
    PipelineConfig,
    RolloutStage,
    ScoreStage,
    SFTStage,
    TrainSpec,
)
from .eval_table import write_eval_table
from .evaluate import evaluate
from .loop import LossModule, StageRunner, StepPlan, make_optimizer
from .metrics import MetricsLog
from .plots import plot_run
from .progress import Progress

__all__ = ["Pipeline", "RunDirError"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODE_LETTER = {"train_reasoning": "R", "train_fast": "F"}


class RunDirError(ValueError):
    """The run directory cannot be used as asked (it holds another run, or nothing to resume)."""


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True))


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

    # -----------------------------------------------------------------------------------------
    # Set-up: run directory, data, tokenizer

    def _prepare_run_dir(self) -> None:
        resolved = dataclasses.asdict(self.config)
        saved = self.run_dir / "config.json"
        if self.context.is_main:
            has_run = saved.exists() or (self.run_dir / "stages").exists()
            if self.resume:
                if not saved.exists():
                    raise RunDirError(f"--resume: {self.run_dir} holds no run to resume")
                if json.loads(saved.read_text()) != json.loads(json.dumps(resolved)):
                    raise RunDirError(
                        f"--resume: the configuration differs from the one {self.run_dir} was "
                        "started with (config.json there); resume with the same config"
                    )
            elif has_run and not self.overwrite:
                raise RunDirError(
                    f"{self.run_dir} already holds a run: pass --resume to continue it, "
                    "--overwrite to start over, or another --run-dir"
                )
            elif has_run:
                for child in self.run_dir.iterdir():
                    if child.name != "teachers":
                        shutil.rmtree(child) if child.is_dir() else child.unlink()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(saved, resolved)
        self.context.barrier()

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

    def _save_model_dir(self, model: CausalLM, directory: Path) -> None:
        """A Hugging Face model directory (with the tokenizer files), replaced atomically."""
        save_model_dir(model, directory, self.tokenizer_dir)

    # -----------------------------------------------------------------------------------------
    # Models

    def _initial_student(self) -> CausalLM:
        return self._build_model(self.config.student, "student")

    def _build_model(self, spec: ModelSpec, name: str) -> CausalLM:
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

    def _teacher(self, name: str) -> CausalLM:
        spec = self.config.teachers[name]
        if not spec.train_on:
            return self._build_model(spec, name)
        # Trained here from scratch: cached under teachers/<name>, keyed by what defines it.
        examples = [ex for split in spec.train_on for ex in self.splits[split]]
        if spec.train_with_answer_hints:
            examples += [
                dataclasses.replace(
                    condition_on_answer(ex, DEFAULT_CONDITION_TEMPLATE), id=f"{ex.id}+hint"
                )
                for ex in examples
                if ex.answer is not None
            ]
        key = hashlib.sha256(
            json.dumps(
                {"spec": dataclasses.asdict(spec), "data": fingerprint_examples(examples)},
                sort_keys=True,
            ).encode()
        ).hexdigest()
        directory = self.run_dir / "teachers" / name
        done = directory / "done.json"
        if done.exists() and json.loads(done.read_text()).get("key") == key:
            print(f"teacher {name!r}: reusing {directory / 'model'}", file=self.out)
            self.eval_rows.append(json.loads(done.read_text())["eval"])
            backend = "embedded" if spec.path is None else resolve_backend(spec.path, spec.backend)
            return load_model_dir(directory / "model", backend, DTYPES[spec.dtype])
        if self.context.is_main and directory.exists():
            shutil.rmtree(directory)
        self.context.barrier()
        print(f"teacher {name!r}: training from scratch on {spec.train_on}", file=self.out)
        model = self._build_model(spec, name)
        label = f"teacher {name}"
        model = self._train(model, examples, spec.train, directory / "work", label, None)
        row = self._evaluate(model, label, f"teacher ({'+'.join(spec.train_on)})")
        self.eval_rows.append(row)
        if self.context.is_main:
            self._save_model_dir(model, directory / "model")
            _write_json(done, {"key": key, "eval": row})
        self.context.barrier()
        return model

    # -----------------------------------------------------------------------------------------
    # Training

    def _stage_examples(self, data: str, train: TrainSpec | None, mode: str | None) -> list:
        if data in self.splits:
            examples = self.splits[data]
        else:  # a rollout stage's responses
            examples = read_jsonl(self._stage_dir(self.config.stage(data)) / "rollouts.jsonl")
        if mode is not None:
            examples = select_stage(examples, mode=mode)
        if train is not None:
            examples = order_by_difficulty(
                examples,
                schedule=train.schedule,
                difficulty=train.difficulty,
                seed=self.config.seed,
            )
        if not examples:
            raise ValueError(f"no examples for data {data!r} (mode {mode!r})")
        return examples

    def _train(
        self,
        model: CausalLM,
        examples: Sequence[Example],
        train: TrainSpec,
        stage_dir: Path,
        stage_name: str,
        kd: KDStage | None,
        cache: CacheReader | None = None,
    ) -> CausalLM:
        tokenized = [tokenize_example(ex, self.tokenizer, self.template) for ex in examples]
        batches = pack_examples(tokenized, train.batch_tokens, order="keep")
        plan = StepPlan.build(len(batches), train, self.context.world_size)
        checkpoint = load_checkpoint(stage_dir)
        start = 0
        if checkpoint is not None:
            model = reload_like(model, checkpoint.model_dir)
            start = checkpoint.next_step
            if checkpoint.total_steps != plan.total_steps:
                raise ValueError(f"{stage_dir}: checkpoint is from a different plan")
            print(f"{stage_name}: resuming at step {start}/{plan.total_steps}", file=self.out)
            self.metrics.truncate_after(stage_name, start)
        module = LossModule(model, kd, autocast_bf16=self.config.autocast_bf16)
        wrapped = self._wrap(module)
        optimizer = make_optimizer(wrapped, train.optim)
        if checkpoint is not None:
            if self._sharded:
                from torch.distributed.checkpoint.state_dict import (
                    StateDictOptions,
                    set_optimizer_state_dict,
                )

                options = StateDictOptions(full_state_dict=True)
                set_optimizer_state_dict(
                    wrapped, optimizer, checkpoint.optimizer_state, options=options
                )
            else:
                optimizer.load_state_dict(checkpoint.optimizer_state)
        runner = StageRunner(
            wrapped,
            optimizer,
            batches,
            plan,
            train,
            self.context,
            cache=cache,
            kd_target=kd.target if kd else "topk",
        )
        progress = Progress(
            plan.total_steps, stage_name, enabled=self.context.is_main, initial_step=start
        )
        every = self.config.checkpoint_every

        def on_step(result) -> None:
            progress.update(result.step + 1, result.tokens, loss=result.loss)
            self.metrics.log(
                {
                    "kind": "train",
                    "stage": stage_name,
                    "step": result.step + 1,
                    "loss": result.loss,
                    "lr": result.lr,
                    "grad_norm": result.grad_norm,
                    "tokens": result.tokens,
                    "supervised": result.supervised,
                    "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
                }
            )
            next_step = result.step + 1
            if every and next_step % every == 0 and next_step < plan.total_steps:
                self._checkpoint(stage_dir, wrapped, optimizer, next_step, plan.total_steps)

        runner.run(start, on_step)
        progress.close()
        return self._checkpoint(stage_dir, wrapped, optimizer, plan.total_steps, plan.total_steps)

    @property
    def _sharded(self) -> bool:
        return self.config.fsdp and self.context.enabled

    def _wrap(self, module: LossModule) -> torch.nn.Module:
        if not self.context.enabled:
            return module
        if self.config.fsdp:
            if backend_of(module.model) == "transformers":
                raise ValueError(
                    "fsdp = true: a model on the transformers backend trains with DDP only; "
                    "set fsdp = false"
                )
            from torch.distributed.fsdp import fully_shard

            for layer in module.model.layers:
                fully_shard(layer)
            return fully_shard(module)
        return torch.nn.parallel.DistributedDataParallel(module)

    def _checkpoint(
        self, stage_dir: Path, wrapped: torch.nn.Module, optimizer, next_step: int, total: int
    ) -> CausalLM:
        """Saves a checkpoint (rank 0 writes) and returns the student with full weights."""
        if self._sharded:
            # Every rank takes part in gathering the shards; every rank gets the full weights
            # (the next stages, eval and generation run on the plain model).
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
            model_state, optimizer_state = get_state_dict(wrapped, optimizer, options=options)
            inner = wrapped.model
            model = DecoderLM(inner.config).to(_dtype_of_state(model_state))
            model.load_state_dict({k.removeprefix("model."): v for k, v in model_state.items()})
        else:
            module = wrapped.module if hasattr(wrapped, "module") else wrapped
            model, optimizer_state = module.model, optimizer.state_dict()
        if self.context.is_main:
            save_checkpoint(
                stage_dir, model, optimizer_state, next_step=next_step, total_steps=total
            )
        self.context.barrier()
        return model

    # -----------------------------------------------------------------------------------------
    # Stages

    def _stage_dir(self, stage) -> Path:
        return self.run_dir / "stages" / f"{self.config.stages.index(stage)}-{stage.name}"

    def _schedule_label(self, stage) -> str:
        if isinstance(stage, SFTStage):
            source = stage.data
        else:
            score = self.config.stage(stage.cache)
            source = score.data
        while source not in MODE_LETTER:  # a rollout stage's data
            source = self.config.stage(source).data
        return f"{'SFT' if isinstance(stage, SFTStage) else 'KD'}({MODE_LETTER[source]})"

    def _evaluate(self, model: CausalLM, stage_name: str, schedule: str) -> dict:
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
        table = write_eval_table(self.run_dir / "eval.md", self.eval_rows)
        print(table, file=self.out)
        plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "plot.png")

    def _preflight(self) -> None:
        """Fails before any training on what can be checked up front: model files and
        architectures, examples longer than a stage's batch, too few batches for the ranks."""
        for name, spec in self.config.teachers.items():
            if spec.path is not None:
                self._build_model(spec, name)
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
        self._load_data()  # bad data files fail before the run directory is touched
        self._prepare_run_dir()
        if self.config.data.source == "demo" and self.context.is_main:
            from ..data.demo_curriculum import write_curriculum

            write_curriculum(self.run_dir / "data", self._curriculum)
        if self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.context.is_main)
        initial_student = self._initial_student()
        self._preflight()
        # lineage: a trained student per training stage ("init" before any), with its schedule.
        lineage: dict[str, tuple[CausalLM, list[str]]] = {"init": (initial_student, [])}
        latest = "init"
        init_done = self.run_dir / "stages" / "init.json"
        if init_done.exists():
            self.eval_rows.append(json.loads(init_done.read_text()))
        else:
            row = self._evaluate(lineage["init"][0], "init", "none")
            self.eval_rows.append(row)
            if self.context.is_main:
                init_done.parent.mkdir(parents=True, exist_ok=True)
                _write_json(init_done, row)
        teachers: dict[str, CausalLM] = {}
        for stage in self.config.stages:
            stage_dir = self._stage_dir(stage)
            done = stage_dir / "done.json"
            base = getattr(stage, "start_from", "") or latest
            student, schedule = lineage[base]
            if isinstance(stage, SFTStage | KDStage):
                schedule = [*schedule, self._schedule_label(stage)]
            if done.exists():
                record = json.loads(done.read_text())
                if "eval" in record:
                    self.eval_rows.append(record["eval"])
                if (stage_dir / "model").exists():
                    trained = reload_like(student, stage_dir / "model")
                    lineage[stage.name] = (trained, schedule)
                    latest = stage.name
                print(f"{stage.name}: done (skipped)", file=self.out)
                continue
            print(f"== stage {stage.name} ({stage.kind}, from {base})", file=self.out)
            record: dict = {}
            if isinstance(stage, SFTStage | KDStage):
                cache = None
                if isinstance(stage, KDStage):
                    cache = CacheReader(self._stage_dir(self.config.stage(stage.cache)) / "cache")
                    cache.check_compatible(
                        tokenizer_fingerprint=self.tokenizer.fingerprint(),
                        vocab_size=student.config.vocab_size,
                    )
                    score = self.config.stage(stage.cache)
                    examples = self._stage_examples(score.data, stage.train, stage.train.mode)
                else:
                    examples = self._stage_examples(stage.data, stage.train, stage.train.mode)
                kd = stage if isinstance(stage, KDStage) else None
                # Train a copy: the base model may be the start of another branch.
                model = copy_model(student)
                model = self._train(model, examples, stage.train, stage_dir, stage.name, kd, cache)
                record["eval"] = self._evaluate(model, stage.name, " + ".join(schedule))
                self.eval_rows.append(record["eval"])
                if self.context.is_main:
                    self._save_model_dir(model, stage_dir / "model")
                lineage[stage.name] = (model, schedule)
                latest = stage.name
            elif isinstance(stage, RolloutStage):
                self._rollout(stage, student, stage_dir)
            elif isinstance(stage, ScoreStage):
                if stage.teacher not in teachers:
                    teachers[stage.teacher] = self._teacher(stage.teacher)
                self._score(stage, teachers[stage.teacher], stage_dir)
            if self.context.is_main:
                _write_json(done, record)
                if "eval" in record or isinstance(stage, ScoreStage):  # new rows to show
                    self._report()
            self.context.barrier()
        self.metrics.close()
        seconds = time.perf_counter() - started
        print(f"run finished in {seconds:.0f} s: {self.run_dir}", file=self.out)
        return self.eval_rows

    def _rollout(self, stage: RolloutStage, student: CausalLM, stage_dir: Path) -> None:
        if self.context.is_main:
            examples = self._stage_examples(stage.data, None, stage.mode)
            config = GenerationConfig(
                max_new_tokens=stage.max_new_tokens,
                temperature=stage.temperature,
                top_p=stage.top_p,
                seed=stage.seed,
            )
            rollouts = generate_rollouts(
                student,
                self.tokenizer,
                self.template,
                examples,
                config,
                samples_per_prompt=stage.samples_per_prompt,
                batch_size=self.config.eval.batch_size,
            )
            stage_dir.mkdir(parents=True, exist_ok=True)
            write_rollouts(stage_dir / "rollouts.jsonl", rollouts)
            stopped = sum(r.stopped for r in rollouts) / len(rollouts)
            print(f"{stage.name}: {len(rollouts)} responses, {stopped:.0%} ended", file=self.out)
        self.context.barrier()

    def _score(self, stage: ScoreStage, teacher: CausalLM, stage_dir: Path) -> None:
        examples = self._stage_examples(stage.data, None, stage.mode)
        config = ScoringConfig(
            k=stage.k,
            temperature=stage.temperature,
            value_dtype=stage.value_dtype,
            label_conditioned=stage.label_conditioned,
            sampled_draws=stage.sampled_draws,
        )
        report = score_to_cache(
            teacher,
            self.tokenizer,
            self.template,
            examples,
            stage_dir / "cache",
            config,
            context=self.context,
            provenance={"stage": stage.name, "teacher": stage.teacher},
        )
        if report.manifest is not None:
            print(
                f"{stage.name}: {report.manifest.total_tokens} supervised tokens, "
                f"{report.manifest.bytes_per_token:.1f} bytes/token",
                file=self.out,
            )


def _dtype_of_state(state: dict) -> torch.dtype:
    return next(v.dtype for v in state.values() if v.is_floating_point())
