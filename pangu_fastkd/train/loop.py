"""One training stage (SFT or offline KD) of a student on packed batches.

Optimizer step ``s`` on rank ``r`` of ``W`` takes micro-batches ``(s * A + a) * W + r`` for
``a < A`` (``A`` = grad_accum) from the stage's batch list, wrapping around for more epochs. Every
rank can therefore count the supervised tokens of the whole step, and the loss of each
micro-batch is its summed per-token loss divided by that global count: accumulation and data
parallelism give the gradient of one big batch (the ``num_items`` rule of
``docs/kd-losses.md``). DDP averages gradients over ranks, so each rank scales its loss by ``W``.

A step whose loss or gradient norm is not finite (what one bad batch or an overflow gives) is
not applied: the gradients are zeroed and the optimizer does not step, so the weights and AdamW's
moments and step count stay as they were. The step still takes its index: its micro-batches are
passed over and the learning rate of the next step is the schedule's value for the next index,
so the plan (which batches each step uses, the number of steps) is the same as without the bad
step, and a resumed run follows it too. All ranks agree on the skip (the flag is summed over
ranks), and ``max_bad_steps`` bad steps in a row stop the stage with ``NonFiniteStepsError``.

Every step also logs per-row statistics (``step_stats``): the hard loss (CE) and, for KD, the
soft loss (the divergence before ``kd_weight * T^2``) of every supervised row, from the fused op's
``KDStats``, and for top-K targets the teacher-agreement statistics of ``kd_health``. They are
sums and counts that travel in the step's one all-reduce, so the figures are global.

The loop is deterministic on CPU (no dropout; the kernels' static work split under
``torch.use_deterministic_algorithms``), so a run resumed from a checkpoint ends with the same
weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..backends import CausalLM, head_parts
from ..cache import CacheReader
from ..data import PackedBatch
from ..distributed import DistributedContext
from ..ops import (
    KDStats,
    NonFiniteError,
    SparseKDOptions,
    TopKTarget,
    fused_linear_cross_entropy,
    fused_linear_sparse_kd,
)
from .config import OptimSpec, TrainSpec
from .kd_health import kd_health
from .step_stats import StepStats

__all__ = [
    "LossModule",
    "NonFiniteStepsError",
    "StageRunner",
    "StepPlan",
    "StepResult",
    "lr_at",
    "make_optimizer",
]


@dataclass(frozen=True)
class StepPlan:
    """Which micro-batches each optimizer step uses."""

    num_batches: int
    world_size: int
    grad_accum: int
    total_steps: int

    @classmethod
    def build(cls, num_batches: int, train: TrainSpec, world_size: int) -> StepPlan:
        per_step = world_size * train.grad_accum
        if num_batches < world_size:
            raise ValueError(
                f"the stage has {num_batches} packed batches for {world_size} ranks: lower "
                "batch_tokens or use fewer ranks"
            )
        steps = train.steps or max(1, math.ceil(train.epochs * num_batches / per_step))
        return cls(num_batches, world_size, train.grad_accum, steps)

    def micro_batches(self, step: int, rank: int) -> list[int]:
        """Indices into the batch list for ``rank`` at optimizer step ``step``."""
        base = step * self.grad_accum * self.world_size
        return [
            (base + a * self.world_size + rank) % self.num_batches for a in range(self.grad_accum)
        ]

    def all_micro_batches(self, step: int) -> list[int]:
        """The step's micro-batches over every rank."""
        return [i for r in range(self.world_size) for i in self.micro_batches(step, r)]


def lr_at(step: int, total: int, optim: OptimSpec) -> float:
    """Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio * lr``."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / (optim.warmup_steps + 1)
    decay_steps = max(1, total - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    floor = optim.min_lr_ratio * optim.lr
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, optim: OptimSpec) -> torch.optim.AdamW:
    """AdamW; no weight decay on norms and biases (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # foreach=False: the per-parameter loop gives the same bits whatever the parameter grouping.
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), foreach=False)


class LossModule(torch.nn.Module):
    """The student and its loss in one forward, so DDP / FSDP hooks see every parameter use.

    ``forward(batch, target, num_items)`` returns the summed loss of the batch's supervised
    rows divided by ``num_items``: cross-entropy when ``kd`` is None (SFT), the sparse-KD loss of
    ``docs/kd-losses.md`` with the options ``kd`` otherwise. The student is any ``CausalLM``
    backend; its head's bias and logit softcap (when it has them) go into the fused ops, so the
    loss is that of the model's exact logits.

    Each forward also adds its rows' statistics to ``stats`` (a ``StepStats``): the hard loss,
    the soft loss (KD), and with a top-K target and ``health_rows > 0`` the ``kd_health``
    statistics of at most ``health_rows`` rows. The runner takes them once per step; they reach
    it beside the loss, not in forward's result, which DDP and FSDP2 see.
    """

    def __init__(
        self,
        model: CausalLM,
        kd: SparseKDOptions | None = None,
        autocast_bf16: bool = False,
        health_rows: int = 0,
    ):
        super().__init__()
        self.model = model
        self.kd = kd
        self.autocast_bf16 = autocast_bf16
        self.health_rows = health_rows
        # What check_finite found in this rank's micro-batches since the runner last took it,
        # and the statistics of those micro-batches.
        self.non_finite: list[str] = []
        self.stats = StepStats()

    def forward(self, batch: PackedBatch, target, num_items: float) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast_bf16):
            hidden = self.model.hidden_states(batch.input_ids, batch.cu_seqlens)  # [T, d]
        rows = batch.labels != -100
        hidden, labels = hidden[rows], batch.labels[rows]  # [N, d], [N]
        weight, bias, softcap = head_parts(self.model)
        if hidden.dtype != weight.dtype:
            hidden = hidden.to(weight.dtype)
        try:
            loss, stats = self._loss(hidden, weight, bias, softcap, labels, target, num_items, True)
        except NonFiniteError as err:
            # The step must still run its backward (DDP and FSDP2 ranks meet in it), and must
            # not be applied: a NaN loss makes every gradient NaN, which the step guard skips.
            # The batch's statistics are left out: they would be NaN and hide the others'.
            self.non_finite.append(str(err))
            loss, _ = self._loss(hidden, weight, bias, softcap, labels, target, num_items, False)
            return loss * math.nan
        self._add_stats(stats, hidden, weight, bias, softcap, target)
        return loss

    def _add_stats(
        self,
        stats: KDStats,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        softcap: float | None,
        target,
    ) -> None:
        """Adds the batch's per-row statistics (``stats``: ``[N]`` each, the fused op's) to
        ``self.stats``."""
        self.stats.add("hard_loss", stats.cross_entropy)
        if self.kd is None:
            return
        if self.kd.kd_weight > 0:  # kd_weight = 0 computes no divergence
            self.stats.add("soft_loss", stats.divergence)
        if isinstance(target, TopKTarget) and self.health_rows > 0:
            health = kd_health(
                hidden, weight, target, bias=bias, softcap=softcap, max_rows=self.health_rows
            )
            for key, values in health.items():
                self.stats.add(key, values)

    def _loss(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        softcap: float | None,
        labels: torch.Tensor,
        target,
        num_items: float,
        check_finite: bool,
    ) -> tuple[torch.Tensor, KDStats]:
        # return_stats costs nothing more: check_finite has the kernel compute them anyway.
        if self.kd is None:
            return fused_linear_cross_entropy(
                hidden,
                weight,
                labels,
                bias=bias,
                softcap=softcap,
                reduction="sum",
                num_items=num_items,
                check_finite=check_finite,
                return_stats=True,
            )
        return fused_linear_sparse_kd(
            hidden,
            weight,
            labels,
            target,
            bias=bias,
            softcap=softcap,
            reduction="sum",
            num_items=num_items,
            check_finite=check_finite,
            return_stats=True,
            **self.kd.as_kwargs(),
        )


class NonFiniteStepsError(ValueError):
    """``max_bad_steps`` optimizer steps in a row had a non-finite loss or gradient norm."""


@dataclass
class StepResult:
    """One optimizer step as every rank saw it."""

    step: int
    loss: float  # mean loss per supervised token over all ranks
    tokens: int  # tokens processed by all ranks
    supervised: int
    lr: float
    grad_norm: float
    seconds: float
    skipped: bool = False  # non-finite loss or gradient: not applied to the weights
    # What the loss's check_finite found on this rank (the first micro-batch's error), if any.
    non_finite: str = ""
    # The means over the step's rows on all ranks of the STEP_STAT_KEYS the loss gave.
    stats: dict[str, float] = field(default_factory=dict)


class StageRunner:
    """Runs the optimizer steps of one stage from ``start_step``.

    Args:
        module: the ``LossModule`` (possibly wrapped in DDP or sharded by FSDP2).
        optimizer: its optimizer (state restored by the caller when resuming).
        batches: the stage's packed batches, in curriculum order.
        plan: which micro-batches each step uses.
        train: the stage's training settings.
        context: this process's rank.
        cache: the logit cache of a KD stage (None for SFT).
        kd_target: "topk" or "sampled".
        name: the stage's name, for errors.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        batches: Sequence[PackedBatch],
        plan: StepPlan,
        train: TrainSpec,
        context: DistributedContext,
        cache: CacheReader | None = None,
        kd_target: str = "topk",
        name: str = "stage",
    ):
        self.module, self.optimizer, self.batches = module, optimizer, batches
        self.plan, self.train, self.context = plan, train, context
        self.cache, self.kd_target, self.name = cache, kd_target, name
        # The LossModule itself (DDP wraps it; FSDP2 shards it in place).
        self.loss_module = getattr(module, "module", module)

    def _target(self, batch: PackedBatch):
        if self.cache is None:
            return None
        return self.cache.targets_for_batch(
            batch.example_ids, batch.supervised_counts, self.kd_target
        )

    def step(self, step: int) -> StepResult:
        started = time.perf_counter()
        plan, ctx = self.plan, self.context
        everyone = [self.batches[i] for i in plan.all_micro_batches(step)]
        global_supervised = sum(b.num_supervised for b in everyone)
        global_tokens = sum(b.num_tokens for b in everyone)
        lr = lr_at(step, plan.total_steps, self.train.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        found = getattr(self.loss_module, "non_finite", [])
        found.clear()
        stats = getattr(self.loss_module, "stats", None)
        stats = StepStats() if stats is None else stats
        stats.clear()
        local_loss = torch.zeros((), dtype=torch.float64)
        mine = plan.micro_batches(step, ctx.rank)
        for a, index in enumerate(mine):
            batch = self.batches[index]
            sync = a == len(mine) - 1  # DDP: all-reduce only after the last micro-batch
            no_sync = getattr(self.module, "no_sync", None)
            with no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext():
                loss = self.module(batch, self._target(batch), max(global_supervised, 1))
                (loss * ctx.world_size).backward()
            local_loss += loss.detach().double()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = 0.0
        if self.train.optim.clip > 0:
            # The global norm (FSDP2 reduces it over the shards), the same on every rank.
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.train.optim.clip))
            grads_bad = 0.0  # a non-finite gradient makes the norm non-finite
        else:
            grads_bad = 0.0 if _grads_finite(params) else 1.0
        # One all-reduce for the loss, the count of ranks whose own gradients (FSDP2: shards)
        # are not finite, so that every rank takes the same decision, and the step's statistics.
        head = torch.tensor([float(local_loss), grads_bad], dtype=torch.float64)
        reduced = ctx.all_reduce_sum(torch.cat([head, stats.flat()]))
        total_loss, bad_ranks = float(reduced[0]), float(reduced[1])
        skipped = bad_ranks > 0 or not (math.isfinite(total_loss) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        return StepResult(
            step=step,
            loss=total_loss,
            tokens=global_tokens,
            supervised=global_supervised,
            lr=lr,
            grad_norm=grad_norm,
            seconds=time.perf_counter() - started,
            skipped=skipped,
            non_finite=found[0] if found else "",
            stats=StepStats.from_flat(reduced[2:]).means(),
        )

    def run(
        self,
        start_step: int,
        on_step: Callable[[StepResult], None],
    ) -> None:
        """Steps ``start_step .. total_steps - 1``, calling ``on_step`` after each.

        Raises:
            NonFiniteStepsError: ``train.max_bad_steps`` steps in a row were skipped (after
                ``on_step`` of the last of them); names the stage and the steps.
        """
        self.module.train()
        bad_in_a_row = 0
        for step in range(start_step, self.plan.total_steps):
            result = self.step(step)
            bad_in_a_row = bad_in_a_row + 1 if result.skipped else 0
            on_step(result)
            if bad_in_a_row >= self.train.max_bad_steps:
                first = step + 2 - bad_in_a_row  # 1-based, as progress and metrics count
                raise NonFiniteStepsError(
                    f"{self.name}: stopped at step {step + 1}/{self.plan.total_steps}: "
                    f"{bad_in_a_row} steps in a row (steps {first}..{step + 1}) had a "
                    f"non-finite loss or gradient norm (last: loss {result.loss}, grad norm "
                    f"{result.grad_norm}) and were skipped (max_bad_steps = "
                    f"{self.train.max_bad_steps}). Lower the learning rate or check those "
                    "steps' batches"
                    + (
                        f"; the last step's loss found: {result.non_finite}"
                        if result.non_finite
                        else ""
                    )
                )


def _grads_finite(params: Sequence[torch.Tensor]) -> bool:
    """Whether this rank's gradients (its shards under FSDP2) are all finite."""
    for p in params:
        grad = p.grad
        if grad is None:
            continue
        local = grad.to_local() if hasattr(grad, "to_local") else grad  # a DTensor's shard
        if not bool(torch.isfinite(local).all()):
            return False
    return True
