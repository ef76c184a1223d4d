"""The fused LM-head loss on Hugging Face causal-LM models, without materialising logits.

``causal_lm_loss`` runs only the model's base (decoder) module, takes its final hidden states
``[B, S, d]`` and hands them, with the LM head's ``weight [V, d]`` (and bias, logit scale and
final-logit softcap, see ``lm_head_parts``), to ``fused_linear_cross_entropy`` or
``fused_linear_sparse_kd``. The ``[B*S, V]`` logits of ``model(..., labels=...)`` are never built.

Label convention (the one of transformers' ``ForCausalLMLoss``): ``labels`` are aligned with
``input_ids`` and shifted here, so position ``t`` is trained on ``labels[:, t + 1]`` and the last
position of each row on nothing; ``ignore_index`` (-100) marks unsupervised tokens. A
precomputed ``shift_labels`` (already aligned with the positions that predict them) is used
as is. Packed batches: when ``position_ids`` are given and labels are shifted here, a position
whose successor starts a new document (``position_ids[t + 1] != position_ids[t] + 1``) is
ignored, so a document's last token never predicts the next document's first token. With labels
from ``DataCollatorWithFlattening`` (``-100`` at each document's first label) those positions
are ignored already and the loss equals transformers' own; with plain labels it is the loss
transformers would compute with the same ``-100`` separators.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any

import torch

from ..ops.sparse_kd import fused_linear_cross_entropy, fused_linear_sparse_kd
from ..ops.sparse_kd_targets import SampledTarget, TopKTarget
from ._require import require_transformers

__all__ = ["LMHead", "causal_lm_loss", "lm_head_parts", "shift_causal_labels"]

# ``logits = logits * x``, ``logits = self.lm_head(h) / x``, ``logits *= x``: every statement in a
# causal-LM forward that rescales the head's output. Each must be one we can express (below),
# otherwise the fused loss would silently differ from the model's logits.
_LOGIT_OP_RE = re.compile(
    r"logits\s*=\s*(?:logits|self\.lm_head\([^)]*\))\s*([*/])\s*([\w.]+)|logits\s*([*/])=\s*([\w.]+)"
)
_SOFTCAP_OPERANDS = {
    "self.config.final_logit_softcapping",
    "self.final_logit_softcapping",
    "final_logit_softcapping",
    "softcap_val",
}


@dataclass(frozen=True)
class LMHead:
    """A causal-LM head as the fused loss takes it: ``softcap(logit_scale * (h W^T + b))``.

    Attributes:
        weight: ``[V, d]`` the head's weight (the input embedding when tied), as the model holds it.
        bias: ``[V]`` the head's bias, or None.
        logit_scale: factor the model multiplies its logits by (Cohere's ``logit_scale``,
            ``1 / logits_scaling`` for Granite), or None.
        softcap: Gemma2-style ``final_logit_softcapping`` ``c`` in ``c * tanh(z / c)``, or None.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float | None
    softcap: float | None


def _logit_ops(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(operator, operand)`` of every logit-rescaling statement in the model's forward."""
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source (compiled / dynamic class): trust the config alone
        return []
    ops = []
    for m in _LOGIT_OP_RE.finditer(source):
        op, operand = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        ops.append((op, operand))
    return ops


def lm_head_parts(model: torch.nn.Module) -> LMHead:
    """The head of a transformers causal-LM model in the form the fused loss takes.

    Found from ``model.get_output_embeddings()`` (a linear layer; tied embeddings give the input
    embedding's weight, which is the same ``Parameter``), the config's ``final_logit_softcapping``
    and the model's logit scaling (Cohere ``logit_scale``, Granite ``logits_scaling``).

    Raises:
        ValueError: the model has no output embeddings, its head is not a linear map with a
            ``[V, d]`` weight, or its forward rescales logits in a way this cannot express.
    """
    require_transformers()
    name = type(model).__name__
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None:
        raise ValueError(f"{name} has no output embeddings (get_output_embeddings() is None)")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{name}'s output embeddings {type(head).__name__} have no [V, d] weight; "
            "only a linear LM head is supported"
        )
    if type(head).forward is not torch.nn.Linear.forward:
        # A subclass or wrapper (quantised, LoRA, ...) may compute something else than
        # h @ weight.T + bias, which is all the fused kernel computes.
        raise ValueError(
            f"{name}'s LM head is a {type(head).__name__} whose forward is not torch.nn.Linear's; "
            "only a plain linear head is supported"
        )
    bias = getattr(head, "bias", None)
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    logit_scale: float | None = None
    for op, operand in _logit_ops(model):
        if operand in _SOFTCAP_OPERANDS:
            continue  # guarded by ``if final_logit_softcapping is not None``: the config decides
        elif operand == "self.logit_scale" and op == "*":
            logit_scale = float(model.logit_scale)
        elif operand == "self.config.logits_scaling":
            s = float(config.logits_scaling)
            logit_scale = s if op == "*" else 1.0 / s
        else:
            raise ValueError(
                f"{name}'s forward rescales its logits with 'logits {op} {operand}', which the "
                "fused loss cannot express"
            )
    if logit_scale is not None and softcap is not None:
        # The kernel applies the scale (folded into W) before the softcap; a model doing both
        # might order them differently, so refuse rather than guess.
        raise ValueError(f"{name} both scales and softcaps its logits; not supported")
    return LMHead(
        weight=weight,
        bias=bias,
        logit_scale=logit_scale,
        softcap=float(softcap) if softcap is not None else None,
    )


def shift_causal_labels(
    labels: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Labels aligned with the positions that predict them, as transformers' ``ForCausalLMLoss``.

    Args:
        labels: ``[B, S]`` label ids aligned with ``input_ids``.
        position_ids: optional ``[B, S]`` (or ``[1, S]`` for ``B == 1``) positions; a position
            whose successor does not continue it (``p[t + 1] != p[t] + 1``) starts no prediction
            across the document boundary and gets ``ignore_index``.

    Returns:
        ``[B, S]`` int64: ``out[:, t] = labels[:, t + 1]``, ``out[:, -1] = ignore_index``.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, S], got shape {tuple(labels.shape)}")
    shifted = torch.full_like(labels, ignore_index, dtype=torch.long)
    shifted[:, :-1] = labels[:, 1:]
    if position_ids is not None:
        if position_ids.dim() != 2 or position_ids.shape[-1] != labels.shape[1]:
            raise ValueError(
                f"position_ids must be [B, S] matching labels {tuple(labels.shape)}, got "
                f"{tuple(position_ids.shape)}"
            )
        pos = position_ids.to(labels.device).expand(labels.shape[0], -1)
        starts = pos[:, 1:] != pos[:, :-1] + 1  # [B, S-1]: t + 1 begins a new document
        shifted[:, :-1] = shifted[:, :-1].masked_fill(starts, ignore_index)
    return shifted


def causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    target: TopKTarget | SampledTarget | None = None,
    position_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    shift_labels: torch.Tensor | None = None,
    model_kwargs: dict[str, Any] | None = None,
    **fused_kwargs: Any,
) -> torch.Tensor:
    """Causal-LM cross-entropy (or sparse KD) of a transformers model, its logits never built.

    Args:
        model: a transformers ``*ForCausalLM`` (base module in ``model.base_model``, linear head).
        input_ids: ``[B, S]`` token ids.
        labels: ``[B, S]`` labels aligned with ``input_ids`` (shifted here, see the module
            docstring), or None when ``shift_labels`` is given.
        target: optional sparse teacher target with ``[B*S, K]`` fields, row ``b*S + t`` for the
            position ``(b, t)`` that predicts ``labels[b, t + 1]``; None gives cross-entropy.
        position_ids: ``[B, S]`` positions, passed to the model and used to ignore predictions
            across packed documents.
        attention_mask: ``[B, S]`` padding mask passed to the model (the loss ignores it, like
            transformers: padded positions need ``-100`` labels).
        shift_labels: ``[B, S]`` labels already aligned with their predicting positions.
        model_kwargs: further keyword arguments of the base model's forward (``cu_seq_lens_q``
            and friends for packed attention, ...).
        **fused_kwargs: options of ``fused_linear_sparse_kd`` / ``fused_linear_cross_entropy``
            (``kd_weight``, ``temperature``, ``num_items``, ``ignore_index``, ...).

    Returns:
        The scalar loss; with no target and default options it equals
        ``model(input_ids, labels=labels).loss``.
    """
    require_transformers()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)
        raise ValueError(f"input_ids must be a [B, S] tensor, got {shape}")
    if (labels is None) == (shift_labels is None):
        raise ValueError("give exactly one of labels and shift_labels")
    given = labels if labels is not None else shift_labels
    if given.shape != input_ids.shape:
        which = "labels" if labels is not None else "shift_labels"
        raise ValueError(
            f"{which} must have the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {tuple(given.shape)}"
        )
    if fused_kwargs.get("return_stats"):
        raise ValueError("return_stats is not supported here; call the fused op directly")
    ignore_index = int(fused_kwargs.get("ignore_index", -100))
    if shift_labels is None:
        shift_labels = shift_causal_labels(labels, position_ids, ignore_index=ignore_index)

    head = lm_head_parts(model)
    base = model.base_model
    if base is model:
        raise ValueError(
            f"{type(model).__name__} has no separate base model to take hidden states from"
        )
    # use_cache=False unless asked otherwise: a training forward needs no KV cache, and
    # transformers' masking detects packed documents from position_ids only when there is none
    # (with the cache it makes by default, packed documents would attend to each other).
    kwargs = {"use_cache": False, **(model_kwargs or {})}
    out = base(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]  # [B, S, d]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [B*S, d]

    weight, bias = head.weight, head.bias
    if head.logit_scale is not None:
        # s * (h W^T + b) = h (s W)^T + s b: the same linear map, so folding the scale into the
        # head is exact in real arithmetic (bit-exact for powers of two; otherwise one rounding
        # of s*W per element, the size of the rounding of s*logits it replaces). Autograd
        # carries the gradient back through the product to the real W (dL/dW = s dL/d(sW)).
        weight = weight * head.logit_scale
        bias = bias * head.logit_scale if bias is not None else None
    common = {"bias": bias, "softcap": head.softcap, **fused_kwargs}
    flat_labels = shift_labels.reshape(-1)  # [B*S]
    if target is None:
        if fused_kwargs.get("kd_weight", 0.0) != 0.0:
            raise ValueError("kd_weight > 0 needs a teacher target")
        common.pop("kd_weight", None)
        return fused_linear_cross_entropy(hidden, weight, flat_labels, **common)
    if target.ids.shape[0] != flat_labels.shape[0]:
        raise ValueError(
            f"target has {target.ids.shape[0]} rows; expected B*S = {flat_labels.shape[0]} "
            "(one per position, aligned with the shifted labels)"
        )
    return fused_linear_sparse_kd(hidden, weight, flat_labels, target, **common)
