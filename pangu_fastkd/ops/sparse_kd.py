"""Fused linear sparse-KD / cross-entropy loss: the public API.

``fused_linear_sparse_kd`` computes the student's loss straight from hidden states and the LM
head against a sparse teacher target, without materialising the ``[N, V]`` logits on devices with
a kernel (CPU now). What it computes is defined in ``docs/kd-losses.md``.

Dispatch (``sparse_kd_route``): CPU tensors go to the C++ kernel
``torch.ops.pangu_fastkd.sparse_kd_fused``, which returns the loss together with its gradients
(autograd only scales them by grad_output); ``npu`` tensors go to the same op when the build has
its Ascend C kernel (never run on hardware yet, docs/ascend.md); tensors on other devices, or a
build without the kernel for their device, use the PyTorch reference.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from .._native import native_available, npu_kernel_available
from .input_checks import (
    NonFiniteError,
    check_finite_rows,
    check_int64,
    check_positive_finite,
    check_same_device,
)
from .sparse_kd_options import check_option_types
from .sparse_kd_reference import check_options, sparse_kd_reference
from .sparse_kd_targets import (
    DIVERGENCES,
    MISSING_MASS_MODES,
    REDUCTIONS,
    KDStats,
    SampledTarget,
    TopKTarget,
)

__all__ = [
    "fused_linear_cross_entropy",
    "fused_linear_sparse_kd",
    "sparse_kd_op_args",
    "sparse_kd_route",
]

SparseKDRoute = Literal["cpu_kernel", "npu_kernel", "reference"]

_OP_NAME = "pangu_fastkd::sparse_kd_fused"
_API = "fused_linear_sparse_kd"


def fused_linear_sparse_kd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget | SampledTarget | None = None,
    *,
    bias: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "tail",
    include_label: bool | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | int | torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_stats: bool = False,
    chunk_rows: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KDStats]:
    """Sparse knowledge-distillation loss of an LM head, fused with its matmul.

    ``loss_i = kd_weight * T^2 * D_i + (1 - kd_weight) * CE_i + z_loss * lse_i^2`` over supervised
    positions, reduced by ``reduction`` or divided by ``num_items``; see ``docs/kd-losses.md``.

    Args:
        hidden: ``[N, d]`` student hidden states (float32, bfloat16, float16 or float64).
        weight: ``[V, d]`` LM-head weight, same dtype as ``hidden``.
        labels: ``[N]`` int64/int32 label ids; ``ignore_index`` marks unsupervised positions.
        target: ``TopKTarget`` (``ids``/``logits`` ``[N, K]``, ``lse``/``label_logit`` ``[N]``) or
            ``SampledTarget`` (``ids``/``weights`` ``[N, K]``); may be None when ``kd_weight == 0``.
        bias: optional ``[V]`` LM-head bias.
        kd_weight: weight of the distillation term in [0, 1]; 0 is plain cross-entropy.
        divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (sampled targets: forward only).
        beta: JSD mixture weight in [0, 1], TRL's convention ``m = beta p + (1 - beta) q``.
        temperature: distillation temperature T (CE is always at temperature 1).
        missing_mass: ``"tail"`` (needs T equal to the cache temperature) or ``"renorm"``.
        include_label: add the label token to the top-K support when it is missing (default True
            for top-K targets; must be False or None for sampled targets).
        ignore_index: label value of unsupervised positions.
        reduction: ``"mean"`` over supervised positions of this call, or ``"sum"``.
        num_items: divide the summed loss by this global count of supervised tokens instead
            (gradient accumulation and data parallelism give the gradient of one big batch).
        softcap: optional logit soft-capping ``c * tanh(z / c)``.
        z_loss: coefficient of the ``lse^2`` auxiliary loss.
        return_stats: also return per-token ``KDStats`` (each ``[N]`` float32).
        chunk_rows: rows per GEMM chunk; default from the memory budget
            (``PANGU_FASTKD_CHUNK_MB``, 128 MiB of logits).
        check_finite: raise ``NonFiniteError`` naming the tensor and its first bad row when
            hidden, weight or bias hold NaN or an infinity, or when finite inputs give a
            non-finite loss (the logits overflow); see ``docs/non-finite.md``. Costs one pass
            over the inputs. The teacher target is always checked.

    Returns:
        The scalar loss (float32; float64 for float64 inputs), and ``KDStats`` when
        ``return_stats``. ``reduction="mean"`` over no supervised row gives NaN (as
        ``torch.nn.functional.cross_entropy``) with zero gradients.

    Raises:
        ValueError: bad shapes, options, devices or target rows (message names which).
        NonFiniteError: with ``check_finite``, as above.
    """
    _check_arguments(hidden, weight, labels, target, bias, ignore_index, chunk_rows)
    check_option_types(
        kd_weight=kd_weight,
        beta=beta,
        temperature=temperature,
        z_loss=z_loss,
        softcap=softcap,
        num_items=num_items,
        include_label=include_label,
    )
    if check_finite:
        check_finite_rows(_API, {"hidden": hidden, "weight": weight, "bias": bias})
    include_label, num_items = check_options(
        target,
        kd_weight=kd_weight,
        divergence=divergence,
        missing_mass=missing_mass,
        include_label=include_label,
        reduction=reduction,
        num_items=num_items,
        softcap=softcap,
    )
    if sparse_kd_route(hidden, weight, labels) == "reference":
        loss, stats = sparse_kd_reference(
            hidden,
            weight,
            labels,
            target if kd_weight > 0 else None,
            bias=bias,
            kd_weight=kd_weight,
            divergence=divergence,
            beta=beta,
            temperature=temperature,
            missing_mass=missing_mass,
            include_label=include_label,
            ignore_index=ignore_index,
            reduction=reduction,
            num_items=num_items,
            softcap=softcap,
            z_loss=z_loss,
        )
        if check_finite:
            mean = reduction == "mean" and num_items is None
            _check_finite_result(loss, stats.detach(), labels, ignore_index, mean)
        return (loss, KDStats.from_matrix(stats.detach())) if return_stats else loss

    grad_on = torch.is_grad_enabled()
    args = sparse_kd_op_args(
        hidden,
        weight,
        labels,
        target if kd_weight > 0 else None,
        bias=bias,
        kd_weight=kd_weight,
        divergence=divergence,
        beta=beta,
        temperature=temperature,
        missing_mass=missing_mass,
        include_label=include_label,
        ignore_index=ignore_index,
        softcap=softcap,
        z_loss=z_loss,
        reduction=reduction,
        num_items=num_items,
        chunk_rows=chunk_rows,
        need_grad_input=grad_on and hidden.requires_grad,
        need_grad_weight=grad_on
        and (weight.requires_grad or (bias is not None and bias.requires_grad)),
        # check_finite names the first row whose loss overflowed, which the stats show.
        compute_stats=return_stats or check_finite,
    )
    loss, _, _, _, stats = torch.ops.pangu_fastkd.sparse_kd_fused(*args)
    if check_finite:
        mean = reduction == "mean" and num_items is None
        _check_finite_result(loss, stats, labels, ignore_index, mean)
    return (loss, KDStats.from_matrix(stats)) if return_stats else loss


def _check_arguments(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget | SampledTarget | None,
    bias: torch.Tensor | None,
    ignore_index: int,
    chunk_rows: int | None,
) -> None:
    """The checks of ``fused_linear_sparse_kd`` that come before routing: one device for every
    tensor, and integers that fit the op schema."""
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_API}: {name} must be a tensor, got {type(t).__name__}")
    tensors: dict[str, torch.Tensor | None] = {
        "hidden": hidden,
        "weight": weight,
        "bias": bias,
        "labels": labels,
    }
    if target is not None and isinstance(target, TopKTarget | SampledTarget):
        for field in dataclasses.fields(target):
            value = getattr(target, field.name)
            if isinstance(value, torch.Tensor):
                tensors[f"target.{field.name}"] = value
    check_same_device(_API, tensors)
    check_int64(_API, "ignore_index", ignore_index)
    if chunk_rows is not None and check_int64(_API, "chunk_rows", chunk_rows) < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if isinstance(target, TopKTarget):
        check_positive_finite(_API, "target.temperature", target.temperature)


def _check_finite_result(
    loss: torch.Tensor, stats: torch.Tensor, labels: torch.Tensor, ignore_index: int, mean: bool
) -> None:
    """With finite inputs (checked before), a non-finite loss means the logits overflowed,
    except for the NaN of a mean over no supervised row (``mean``: reduction "mean" without
    ``num_items``), which is the defined result."""
    if bool(torch.isfinite(loss)):
        return
    if mean and not bool((labels != ignore_index).any()):
        return
    bad_rows = (~torch.isfinite(stats)).any(dim=1).nonzero()
    if bad_rows.numel():
        where = f"first non-finite row: row {int(bad_rows[0, 0])}"
    else:  # every row's terms fit, their sum (or the z-loss's lse^2) does not
        lse = stats[:, KDStats._fields.index("student_lse")].abs()
        row = int(lse.argmax()) if lse.numel() else 0
        where = (
            f"largest student logsumexp: {lse[row].item() if lse.numel() else 0:.3g} in row {row}"
        )
    raise NonFiniteError(
        f"{_API}: the loss is {loss.item()} although hidden, weight and bias are finite "
        f"({where}): the logits or their logsumexp overflow; scale the hidden states down or "
        "compute in float32 (check_finite=True)"
    )


def sparse_kd_op_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    target: TopKTarget | SampledTarget | None,
    *,
    bias: torch.Tensor | None = None,
    kd_weight: float = 1.0,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    missing_mass: str = "tail",
    include_label: bool = True,
    ignore_index: int = -100,
    softcap: float | None = None,
    z_loss: float = 0.0,
    reduction: str = "mean",
    num_items: float | None = None,
    chunk_rows: int | None = None,
    need_grad_input: bool = True,
    need_grad_weight: bool = True,
    compute_stats: bool = False,
) -> list[Any]:
    """The positional arguments of ``torch.ops.pangu_fastkd.sparse_kd_fused``, in the order of
    its schema (``csrc/ops.cpp``), from ``fused_linear_sparse_kd``'s arguments.

    Option strings become their integer codes; ``None`` for softcap, ``num_items`` and
    ``chunk_rows`` becomes the schema's 0 ("not set"); ``include_label`` must already be
    resolved (a bool). Nothing is checked here: the op checks everything itself. For callers
    of the raw op (tests, ``torch.library.opcheck``, the Ascend smoke kit).
    """
    topk = target if isinstance(target, TopKTarget) else None
    sampled = target if isinstance(target, SampledTarget) else None
    return [
        hidden,
        weight,
        bias,
        labels,
        target.ids if target is not None else None,
        topk.logits if topk is not None else None,
        topk.lse if topk is not None else None,
        topk.label_logit if topk is not None else None,
        sampled.weights if sampled is not None else None,
        float(kd_weight),
        DIVERGENCES.index(divergence),
        float(beta),
        float(temperature),
        float(topk.temperature) if topk is not None else float(temperature),
        MISSING_MASS_MODES.index(missing_mass),
        bool(include_label),
        int(ignore_index),
        float(softcap) if softcap is not None else 0.0,
        float(z_loss),
        REDUCTIONS.index(reduction),
        float(num_items) if num_items is not None else 0.0,
        int(chunk_rows or 0),
        bool(need_grad_input),
        bool(need_grad_weight),
        bool(compute_stats),
    ]


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: float | int | torch.Tensor | None = None,
    softcap: float | None = None,
    z_loss: float = 0.0,
    return_stats: bool = False,
    chunk_rows: int | None = None,
    check_finite: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KDStats]:
    """Cross-entropy of an LM head fused with its matmul: the no-teacher case (SFT).

    Args:
        hidden: ``[N, d]`` hidden states; ``weight``: ``[V, d]``; ``labels``: ``[N]``.
        Other arguments as in ``fused_linear_sparse_kd``.

    Returns:
        The scalar loss, and ``KDStats`` when ``return_stats``.
    """
    return fused_linear_sparse_kd(
        hidden,
        weight,
        labels,
        None,
        bias=bias,
        kd_weight=0.0,
        ignore_index=ignore_index,
        reduction=reduction,
        num_items=num_items,
        softcap=softcap,
        z_loss=z_loss,
        return_stats=return_stats,
        chunk_rows=chunk_rows,
        check_finite=check_finite,
    )


def _device_type(t: torch.Tensor) -> str:
    """The tensor's device type (one function, so tests can pretend tensors are on the NPU)."""
    return t.device.type


def sparse_kd_route(*tensors: torch.Tensor) -> SparseKDRoute:
    """Which implementation ``fused_linear_sparse_kd`` runs for these tensors.

    Args:
        tensors: hidden, weight and labels (their devices matter, and the dtype of the first).

    Returns:
        ``"cpu_kernel"`` for CPU (and fake/meta tensors while tracing), ``"npu_kernel"`` for
        fp32/bf16/fp16 ``npu`` tensors when the Ascend C kernel is built (its epilogue takes
        only those), else ``"reference"``.
    """
    devices = {_device_type(t) for t in tensors}
    if native_available() and devices <= {"cpu", "meta"}:
        return "cpu_kernel"
    npu_dtype_ok = bool(tensors) and tensors[0].dtype in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    )
    if devices == {"npu"} and npu_dtype_ok and npu_kernel_available("sparse_kd_fused"):
        return "npu_kernel"
    return "reference"


# ---------------------------------------------------------------------------------------------
# Fake (meta) kernel and autograd of the C++ op, so that it traces under torch.compile and
# passes torch.library.opcheck.


def _can_hand_out(grad_loss: torch.Tensor | None) -> bool:
    """Whether backward may return the stored gradients themselves instead of scaled copies.

    Copying costs a pass over V x d (about 10% of the whole op at the openPangu-1B head). The
    stored tensors can be handed out when they are already the answer (grad_output == 1, the
    usual ``loss.backward()``) and this backward is the graph's last (no ``retain_graph``): an
    in-place update of ``.grad`` could otherwise change what a later backward returns. Traced
    tensors (torch.compile, opcheck) always take the copy, which needs no data-dependent branch.
    """
    if grad_loss is None or type(grad_loss) is not torch.Tensor:
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph():
        return False
    return bool(grad_loss == 1)


def _check_fake_devices(*tensors: torch.Tensor | None) -> None:
    """Every tensor argument of the op on the first one's device (the fake kernel's check)."""
    device = tensors[0].device
    for t in tensors:
        if t is None:
            continue
        other = t.device
        torch._check_value(
            other == device,
            lambda other=other: (
                f"{_OP_NAME}: tensor arguments on {device} and {other}; "
                "every tensor argument must be on one device"
            ),
        )


def _register() -> None:
    @torch.library.register_fake(_OP_NAME)
    def _sparse_kd_fused_fake(
        hidden, weight, bias, labels, ids, teacher_logits, teacher_lse, label_logit,
        sample_weights, kd_weight, divergence, beta, temperature, cache_temperature,
        missing_mass, include_label, ignore_index, softcap, z_loss, reduction, num_items,
        chunk_rows, need_grad_input, need_grad_weight, compute_stats,
    ):  # fmt: skip
        # Reached with a meta tensor among real ones too: refuse it rather than hand out
        # uninitialised memory on the real tensors' device.
        _check_fake_devices(
            hidden, weight, bias, labels, ids, teacher_logits, teacher_lse, label_logit,
            sample_weights,
        )  # fmt: skip
        torch._check(hidden.dim() == 2, lambda: f"hidden must be [N, d], got {tuple(hidden.shape)}")
        torch._check(weight.dim() == 2, lambda: f"weight must be [V, d], got {tuple(weight.shape)}")
        torch._check(weight.shape[1] == hidden.shape[1], lambda: "weight and hidden disagree on d")
        torch._check(labels.shape == (hidden.shape[0],), lambda: "labels must be [N]")
        acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        loss = hidden.new_empty((), dtype=acc)
        grad_hidden = hidden.new_empty(hidden.shape) if need_grad_input else hidden.new_empty(0)
        grad_weight = weight.new_empty(weight.shape) if need_grad_weight else weight.new_empty(0)
        has_bias_grad = need_grad_weight and bias is not None
        grad_bias = weight.new_empty(bias.shape) if has_bias_grad else weight.new_empty(0)
        rows = hidden.shape[0] if compute_stats else 0
        stats = hidden.new_empty((rows, 6), dtype=torch.float32)
        return loss, grad_hidden, grad_weight, grad_bias, stats

    def setup_context(ctx, inputs, output):
        _, grad_hidden, grad_weight, grad_bias, stats = output
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.mark_non_differentiable(grad_hidden, grad_weight, grad_bias, stats)
        # Only the loss is differentiated; without this, autograd would allocate and zero-fill
        # gradients for the other outputs (one of them V x d) on every backward.
        ctx.set_materialize_grads(False)

    def backward(ctx, grad_loss, *_unused_output_grads):
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            # The stored gradients are constants: a second derivative through them would be
            # silently zero, so refuse it.
            raise RuntimeError(
                "fused_linear_sparse_kd does not support double backward (create_graph=True)"
            )

        hand_out = _can_hand_out(grad_loss)

        def scaled(grad: torch.Tensor) -> torch.Tensor | None:
            # The op returns a 1-D empty tensor for a gradient it did not compute; hidden's
            # gradient of an empty batch is a real [0, d] one (PyTorch gives it too).
            if grad_loss is None or (grad.dim() == 1 and grad.numel() == 0):
                return None
            return grad if hand_out else grad * grad_loss.to(grad.dtype)

        n_other = 22  # labels, the target tensors and the scalar options get no gradient
        return (scaled(grad_hidden), scaled(grad_weight), scaled(grad_bias), *([None] * n_other))

    torch.library.register_autograd(_OP_NAME, backward, setup_context=setup_context)


if native_available():
    _register()
