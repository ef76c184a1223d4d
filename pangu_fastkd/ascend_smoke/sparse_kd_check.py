"""``sparse_kd_fused`` on a backend against ``sparse_kd_reference`` + autograd, and its timing.

Checked: the loss, the per-row losses from its statistics, and the gradients of hidden, weight
and bias; timed against the reference's forward + backward on the same device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..ops.sparse_kd import sparse_kd_op_args
from ..ops.sparse_kd_reference import sparse_kd_reference
from ..ops.sparse_kd_targets import TopKTarget
from .cases import SparseKDCase
from .compare import Output, Row, compare, judge, max_abs, max_err
from .op_backends import Backend
from .timing import Timer, time_baseline

IGNORE = -100  # the label of unsupervised rows


def _sparse_kd_inputs(case: SparseKDCase) -> dict[str, torch.Tensor | None]:
    """float32 CPU inputs: hidden [N, d], weight [V, d], bias [V], labels [N], a top-K target.

    Rows 1 and 5 are ignored; every third row's label is the teacher's top-1 (inside the
    support), the others' a random token (usually outside it, so include_label adds a slot).
    The student logits have std ~3, so the tail bucket's student mass never underflows.
    """
    g = torch.Generator().manual_seed(case.seed)
    n, vocab, d = case.n, case.vocab, case.d
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(vocab, d, generator=g) * (3.0 / math.sqrt(d))
    bias = torch.randn(vocab, generator=g) if case.bias else None
    teacher = torch.randn(n, vocab, generator=g) * 2.0
    ids = teacher.topk(case.k, dim=1).indices
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::3] = ids[::3, 0]
    inputs: dict[str, torch.Tensor | None] = {
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "labels": labels.clone().index_fill_(0, torch.tensor([1, 5]), IGNORE),
        "ids": None,
        "teacher_logits": None,
        "teacher_lse": None,
        "label_logit": None,
    }
    if case.target:
        inputs.update(
            ids=ids.to(torch.int32),
            teacher_logits=teacher.gather(1, ids),
            teacher_lse=torch.logsumexp(teacher / case.cache_temperature, dim=1),
            label_logit=teacher.gather(1, labels[:, None]).squeeze(1),
        )
    return inputs


def _target(case: SparseKDCase, x: Mapping[str, torch.Tensor | None]) -> TopKTarget | None:
    if not case.target:
        return None
    return TopKTarget(
        x["ids"], x["teacher_logits"], x["teacher_lse"], x["label_logit"], case.cache_temperature
    )


def _sparse_kd_args(case: SparseKDCase, x: Mapping[str, torch.Tensor | None]) -> list[Any]:
    """Positional arguments of ``torch.ops.pangu_fastkd.sparse_kd_fused``: mean reduction, no
    softcap or ``num_items``, both gradients and the stats."""
    return sparse_kd_op_args(
        x["hidden"],
        x["weight"],
        x["labels"],
        _target(case, x),
        bias=x["bias"],
        kd_weight=case.kd_weight,
        divergence=case.divergence,
        beta=case.beta,
        temperature=case.temperature,
        missing_mass=case.missing_mass,
        include_label=case.include_label and case.target,
        ignore_index=IGNORE,
        z_loss=case.z_loss,
        chunk_rows=case.chunk_rows,
        compute_stats=True,
    )


def _sparse_kd_with_grads(
    case: SparseKDCase, x: Mapping[str, torch.Tensor | None]
) -> tuple[torch.Tensor, ...]:
    """``sparse_kd_reference`` + autograd: (loss, grad_hidden, grad_weight, grad_bias, stats).

    ``grad_bias`` is ``[0]`` on the inputs' device without a bias, as the op returns it.
    """
    hidden, weight = (x[name].detach().clone().requires_grad_() for name in ("hidden", "weight"))
    bias = x["bias"].detach().clone().requires_grad_() if x["bias"] is not None else None
    loss, stats = sparse_kd_reference(
        hidden,
        weight,
        x["labels"],
        _target(case, x),
        bias=bias,
        kd_weight=case.kd_weight,
        divergence=case.divergence,
        beta=case.beta,
        temperature=case.temperature,
        missing_mass=case.missing_mass,
        include_label=case.include_label if case.target else None,
        ignore_index=IGNORE,
        reduction="mean",
        z_loss=case.z_loss,
    )
    loss.backward()
    grad_bias = bias.grad if bias is not None else hidden.new_empty(0)
    return loss.detach(), hidden.grad, weight.grad, grad_bias, stats.detach()


def _row_losses(case: SparseKDCase, stats: torch.Tensor) -> torch.Tensor:
    """Per-row losses from the ``[N, 6]`` statistics (KDStats' columns, docs/kd-losses.md)."""
    s = stats.detach().cpu().double()
    kd = case.kd_weight * case.temperature**2 * s[:, 0]
    return kd + (1 - case.kd_weight) * s[:, 1] + case.z_loss * s[:, 4] ** 2


def _cast(x: Mapping[str, torch.Tensor | None], dtype: torch.dtype) -> dict[str, Any]:
    """The floating inputs in ``dtype``; ids and labels as they are."""
    return {
        key: t.to(dtype) if t is not None and t.is_floating_point() else t for key, t in x.items()
    }


def check_sparse_kd(
    backend: Backend, case: SparseKDCase, dtype: torch.dtype, row: Row
) -> list[Any]:
    """Compare our outputs with the float64 reference; returns the device arguments for timing."""
    x = _cast(_sparse_kd_inputs(case), dtype)
    # Exact: the reference in float64 on the rounded values; plain: the reference in dtype.
    exact = _sparse_kd_with_grads(case, _cast(x, torch.float64))
    plain = _sparse_kd_with_grads(case, x)
    device_args = [backend.to_device(a) for a in _sparse_kd_args(case, x)]
    ours = backend.sparse_kd_fused(*device_args)
    backend.synchronize()
    loss, grad_hidden, grad_weight, grad_bias, stats = (t.cpu() for t in ours)

    rows_exact, rows_plain = _row_losses(case, exact[4]), _row_losses(case, plain[4])
    supervised = int((x["labels"] != IGNORE).sum())
    # The scalar loss is one sample: plain PyTorch's budget is the mean of its row errors.
    loss_budget = (rows_plain - rows_exact).abs().sum().item() / max(supervised, 1)
    if stats.shape != exact[4].shape:
        raise ValueError(f"stats has shape {tuple(stats.shape)}, expected {tuple(exact[4].shape)}")
    outputs = [
        Output("loss", max_err(loss, exact[0]), loss_budget, max_abs(exact[0])),
        compare("row_loss", _row_losses(case, stats), rows_exact, rows_plain, torch.float64),
        compare("grad_hidden", grad_hidden, exact[1], plain[1], dtype),
        compare("grad_weight", grad_weight, exact[2], plain[2], dtype),
    ]
    if case.bias:
        outputs.append(compare("grad_bias", grad_bias, exact[3], plain[3], dtype))
    judge(row, outputs)
    return device_args


def time_sparse_kd(
    backend: Backend, case: SparseKDCase, device_args: list[Any], timer: Timer, row: Row
) -> None:
    """Our op's time and the reference's (forward + backward) on the same device into ``row``."""
    row.ours_ms = timer(lambda: backend.sparse_kd_fused(*device_args))
    names = ("hidden", "weight", "bias", "labels", "ids", "teacher_logits", "teacher_lse")
    x = dict(zip((*names, "label_logit"), device_args[:8], strict=True))
    row.baseline = "reference"

    def reference() -> None:
        _sparse_kd_with_grads(case, x)

    row.baseline_ms = time_baseline(timer, reference, row, "reference")
