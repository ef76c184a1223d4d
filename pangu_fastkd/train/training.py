"""One training run of a model on packed examples (an SFT or KD stage, or a teacher trained
here): resume from the stage's checkpoint, wrap for the ranks (DDP or FSDP2), the step loop with
its progress line, metrics and TensorBoard scalars, and the checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..backends import CausalLM, backend_of, reload_like
from ..cache import CacheReader
from ..data import Example, pack_examples, tokenize_example
from ..distributed import DistributedContext
from ..model import DecoderLM
from .checkpoint import load_checkpoint, save_checkpoint, set_aside_damaged
from .config import KDStage, PipelineConfig, TrainSpec
from .loop import LossModule, NonFiniteStepsError, StageRunner, StepPlan, StepResult, make_optimizer
from .metrics import read_metrics
from .progress import Progress
from .tensorboard_log import TENSORBOARD_DIR, StageTensorBoard

if TYPE_CHECKING:
    from .pipeline import Pipeline

__all__ = ["DTYPES", "train_model", "wrap_for_ranks"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def train_model(
    pipeline: Pipeline,
    model: CausalLM,
    examples: Sequence[Example],
    train: TrainSpec,
    stage_dir: Path,
    stage_name: str,
    kd: KDStage | None,
    cache: CacheReader | None = None,
) -> CausalLM:
    """``model`` trained on ``examples`` (in their order) for ``train``'s steps, resumed from
    ``stage_dir/checkpoint`` when one is there; KD with ``kd`` and ``cache``, else SFT.

    A damaged newest checkpoint is passed over for the previous one, with a warning. Steps with
    a non-finite loss or gradient norm are skipped and logged (``"skipped": true`` in
    metrics.jsonl); no checkpoint is written on a skipped step. Every step's record has the
    hard loss (and for KD the soft loss and, with a top-K cache, the ``kd_health`` statistics);
    with ``[logging] tensorboard`` it also goes to ``<run_dir>/tensorboard/<stage_name>``.

    Returns the trained model with full weights on every rank.

    Raises:
        CheckpointError: the stage has checkpoints and none is good.
        NonFiniteStepsError: ``train.max_bad_steps`` steps in a row were skipped; the last
            checkpoint written (from before them) is kept.
    """
    config, context = pipeline.config, pipeline.context
    tokenized = [tokenize_example(ex, pipeline.tokenizer, pipeline.template) for ex in examples]
    batches = pack_examples(tokenized, train.batch_tokens, order="keep")
    plan = StepPlan.build(len(batches), train, context.world_size)
    checkpoint = load_checkpoint(stage_dir)
    start = 0
    if checkpoint is not None:
        for problem in checkpoint.passed_over:
            print(
                f"{stage_name}: warning: passing over a damaged checkpoint ({problem}); "
                f"resuming from {checkpoint.directory}",
                file=pipeline.out,
            )
        model = reload_like(model, checkpoint.model_dir)
        start = checkpoint.next_step
        if checkpoint.total_steps != plan.total_steps:
            raise ValueError(f"{stage_dir}: checkpoint is from a different plan")
        print(f"{stage_name}: resuming at step {start}/{plan.total_steps}", file=pipeline.out)
        # Every rank has read its checkpoint before rank 0 moves the damaged one away.
        context.barrier()
        if checkpoint.passed_over and context.is_main:
            set_aside_damaged(stage_dir, checkpoint)
    # The records of the steps about to be redone go: those after the checkpoint, or all of the
    # stage's when a run was killed before its first checkpoint (it starts again from step 0).
    pipeline.metrics.truncate_after(stage_name, start)
    tensorboard = _stage_tensorboard(pipeline, stage_name)
    # On the model that trains (a resumed run's is the reloaded one). Layers checkpoint inside
    # their own forward, so DDP's and FSDP2's hooks stay outside the recomputed region.
    model.set_activation_checkpointing(train.checkpointing_every)
    options = kd.loss_options() if kd is not None else None
    module = LossModule(
        model,
        options,
        autocast_bf16=config.autocast_bf16,
        health_rows=config.logging.health_rows,
    )
    wrapped = wrap_for_ranks(module, config, context)
    optimizer = make_optimizer(wrapped, train.optim)
    if checkpoint is not None:
        if _sharded(config, context):
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
        context,
        cache=cache,
        kd_target=kd.target if kd else "topk",
        name=stage_name,
    )
    progress = Progress(plan.total_steps, stage_name, enabled=context.is_main, initial_step=start)
    every = config.checkpoint_every

    def checkpoint_at(next_step: int) -> CausalLM:
        return _checkpoint(
            stage_dir, wrapped, optimizer, next_step, plan.total_steps, config, context
        )

    def on_step(result: StepResult) -> None:
        record = {
            "kind": "train",
            "stage": stage_name,
            "step": result.step + 1,
            "loss": result.loss,
            **result.stats,
            "lr": result.lr,
            "grad_norm": result.grad_norm,
            "tokens": result.tokens,
            "supervised": result.supervised,
            "tokens_per_s": result.tokens / max(result.seconds, 1e-9),
        }
        if result.skipped:
            record["skipped"] = True
            found = ""
            if result.non_finite:
                record["non_finite"] = result.non_finite
                found = f" ({result.non_finite})"
            print(
                f"{stage_name}: step {result.step + 1}/{plan.total_steps} skipped: loss "
                f"{result.loss}, grad norm {result.grad_norm} (not finite){found}; weights "
                "unchanged",
                file=pipeline.out,
            )
        progress.update(result.step + 1, result.tokens, loss=result.loss)
        pipeline.metrics.log(record)
        tensorboard.log(record)
        next_step = result.step + 1
        # Not on a skipped step: a checkpoint in the middle of a run of bad steps would be
        # resumed into them; the last one before them is the one to keep.
        if every and next_step % every == 0 and next_step < plan.total_steps and not result.skipped:
            checkpoint_at(next_step)

    try:
        runner.run(start, on_step)
    except NonFiniteStepsError as err:
        kept = stage_dir / "checkpoint"
        where = f"the last good checkpoint {kept} is kept" if kept.exists() else "no checkpoint yet"
        raise NonFiniteStepsError(f"{err}; {where}") from None
    finally:
        progress.close()
        tensorboard.close()
    trained = checkpoint_at(plan.total_steps)
    trained.set_activation_checkpointing(0)  # each stage sets its own
    return trained


def _stage_tensorboard(pipeline: Pipeline, stage_name: str) -> StageTensorBoard:
    """The stage's TensorBoard writer (a no-op unless enabled, and on ranks other than 0), with
    the stage's records already in ``metrics.jsonl`` written again (``tensorboard_log``)."""
    enabled = pipeline.config.logging.tensorboard and pipeline.context.is_main
    replay = []
    if enabled:
        records = read_metrics(pipeline.metrics.path)
        replay = [r for r in records if r["kind"] == "train" and r["stage"] == stage_name]
    log_dir = pipeline.run_dir / TENSORBOARD_DIR / stage_name
    return StageTensorBoard(log_dir, replay=replay, enabled=enabled)


def wrap_for_ranks(
    module: LossModule, config: PipelineConfig, context: DistributedContext
) -> torch.nn.Module:
    """``module`` as the ranks train it: itself on one process, FSDP2 per layer with
    ``fsdp = true``, else DDP.

    Raises:
        ValueError: ``fsdp = true`` with a model on the transformers backend.
    """
    if not context.enabled:
        return module
    if config.fsdp:
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


def _sharded(config: PipelineConfig, context: DistributedContext) -> bool:
    return config.fsdp and context.enabled


def _checkpoint(
    stage_dir: Path,
    wrapped: torch.nn.Module,
    optimizer,
    next_step: int,
    total: int,
    config: PipelineConfig,
    context: DistributedContext,
) -> CausalLM:
    """Saves a checkpoint (rank 0 writes) and returns the student with full weights."""
    if _sharded(config, context):
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
    if context.is_main:
        save_checkpoint(stage_dir, model, optimizer_state, next_step=next_step, total_steps=total)
    context.barrier()
    return model


def _dtype_of_state(state: dict) -> torch.dtype:
    return next(v.dtype for v in state.values() if v.is_floating_point())
