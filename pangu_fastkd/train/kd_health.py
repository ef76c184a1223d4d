"""How well the student agrees with the teacher's top-K, for the training log.

For a supervised row whose cache entry stores the ids ``s_1..s_k`` (``-1`` slots left out) with
teacher probabilities ``p_j = exp(t_j / T_c - Lambda)`` (``docs/kd-losses.md``: exact, since
``Lambda`` is the teacher's full-vocabulary log-partition at the cache temperature ``T_c``), and
the student's full-vocabulary ``q = softmax(z / T_c)``:

- ``teacher_tail_mass = max(0, 1 - sum_j p_j)``: the teacher mass the cache did not keep;
- ``student_mass_on_teacher_topk = sum_j q(s_j)``;
- ``teacher_mass_in_student_topk``: the sum of ``p_j`` over the stored ids that are among the
  student's ``k`` most probable tokens. A student top-k token the cache did not store has a
  teacher probability the cache does not know, so this is a lower bound of the teacher's mass
  on the student's top-k, short by at most ``teacher_tail_mass``;
- ``topk_overlap``: the fraction of the ``k`` stored ids that are among the student's top-k.

Both distributions are taken at ``T_c``, the one temperature at which the cache gives the
teacher's exact probabilities; with ``missing_mass = "tail"`` (the default) the distillation
temperature is ``T_c`` too. The fused op's ``KDStats`` are not these numbers: its ``Q_S`` and
``P_S`` are over the loss's support, which also holds the label token (``include_label``) and
in ``renorm`` mode has ``P_S = 1`` by construction. What it does give (``CE_i``, ``D_i``) the
trainer takes from it.

The tail mass needs only the target and is taken over every row. The other three need the
student's logits; they are computed from the ``health_rows`` rows ``sample_rows`` picks, in
float64, one vocabulary chunk of the LM head at a time, so neither the ``[N, V]`` logits nor a
float64 copy of the head is ever made.
"""

from __future__ import annotations

import torch

from ..ops import TopKTarget

__all__ = ["AGREEMENT_KEYS", "HEALTH_KEYS", "kd_health", "sample_rows", "teacher_topk_probs"]

# The statistics that need the student's logits (of the sampled rows only).
AGREEMENT_KEYS = ("student_mass_on_teacher_topk", "teacher_mass_in_student_topk", "topk_overlap")
# In the order metrics.jsonl and the plot show them.
HEALTH_KEYS = (
    "student_mass_on_teacher_topk",
    "teacher_tail_mass",
    "teacher_mass_in_student_topk",
    "topk_overlap",
)

# LM-head rows turned into float64 at a time: 8192 x d x 8 bytes (64 MiB at d = 1024) on top of
# the [rows, V] float64 logits of the sample.
_VOCAB_CHUNK = 8192


def sample_rows(num_rows: int, max_rows: int) -> torch.Tensor:
    """At most ``max_rows`` distinct row indices, evenly spaced over ``[0, num_rows)`` (int64).

    Evenly spaced rather than random: the sample covers every document of a packed batch, and
    no random generator is drawn from, so a run trains the same with or without the statistics.
    """
    if num_rows <= max_rows:
        return torch.arange(num_rows)
    # Steps of num_rows / max_rows >= 1 in integer arithmetic: the floors are distinct.
    return torch.arange(max_rows) * num_rows // max_rows


def teacher_topk_probs(target: TopKTarget) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's probabilities of its stored ids at the cache temperature.

    Returns:
        ``p [N, K]`` float64 (0 in empty slots) and ``stored [N, K]`` bool (``ids >= 0``).
    """
    stored = target.ids >= 0
    log_p = target.logits.double() / target.temperature - target.lse.double()[:, None]
    return torch.where(stored, log_p.exp(), 0.0), stored


@torch.no_grad()
def kd_health(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: TopKTarget,
    *,
    bias: torch.Tensor | None = None,
    softcap: float | None = None,
    max_rows: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-row top-K agreement statistics of one batch (definitions in the module docstring).

    Args:
        hidden: ``[N, d]`` the student's hidden states of the supervised rows.
        weight: ``[V, d]`` its LM head (``bias [V]`` and ``softcap`` as the loss takes them).
        target: the batch's ``TopKTarget``, ``[N, K]`` rows aligned with ``hidden``.
        max_rows: rows whose student logits are computed (``sample_rows``); 0 for none.

    Returns:
        ``{"teacher_tail_mass": [N]}`` and, for each key of ``AGREEMENT_KEYS``, ``[M]`` values of
        the sampled rows that store at least one id (``M <= max_rows``); all float64.
    """
    p, stored = teacher_topk_probs(target)
    found = {"teacher_tail_mass": (1.0 - p.sum(-1)).clamp_min(0.0)}
    rows = sample_rows(hidden.shape[0], max_rows)
    rows = rows[stored[rows].any(-1)]
    if rows.numel() == 0:
        return found | {key: torch.zeros(0, dtype=torch.float64) for key in AGREEMENT_KEYS}
    p, stored, ids = p[rows], stored[rows], target.ids[rows].long()  # [M, K] each
    k = stored.sum(-1)  # [M]
    logits = _student_logits(hidden[rows], weight, bias, softcap)  # [M, V]
    log_q = torch.log_softmax(logits / target.temperature, dim=-1)
    q_stored = log_q.gather(1, ids.clamp_min(0)).exp() * stored  # [M, K]
    top = log_q.topk(int(k.max()), dim=-1).indices  # [M, k_max], most probable first
    in_top = torch.arange(top.shape[1], device=top.device) < k[:, None]  # each row's own k
    shared = ((ids[:, :, None] == top[:, None, :]) & in_top[:, None, :]).any(-1) & stored
    return found | {
        "student_mass_on_teacher_topk": q_stored.sum(-1),
        "teacher_mass_in_student_topk": (p * shared).sum(-1),
        "topk_overlap": shared.sum(-1).double() / k,
    }


def _student_logits(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
) -> torch.Tensor:
    """``[M, V]`` float64 logits ``c * tanh((hidden @ weight.T + bias) / c)``, computed one
    vocabulary chunk of the head at a time."""
    h = hidden.detach().double()
    logits = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float64, device=h.device)
    for start in range(0, weight.shape[0], _VOCAB_CHUNK):
        chunk = weight.detach()[start : start + _VOCAB_CHUNK].double()
        logits[:, start : start + chunk.shape[0]] = h @ chunk.T
    if bias is not None:
        logits += bias.detach().double()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits
