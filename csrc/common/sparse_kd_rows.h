// The supervised rows of a sparse_kd_fused call, shared by every device's implementation: the
// checks of the labels' and the target's data (before any GEMM), the rows the epilogue sees, and
// the op's outputs assembled from their per-row results. Plain ATen on the inputs' device.
//
// The checks read nothing back per row: each is a tensor op producing a per-row flag, and the
// flags (with the supervised-row count that the mean reduction needs) come back in one
// device-to-host copy, which costs an NPU one sync and the CPU nothing. Only when a check fails
// are the offending row and value read back, to name them in the message.
#pragma once

#include <torch/extension.h>

#include <functional>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "common/sparse_kd_args.h"
#include "common/sparse_kd_chunks.h"

namespace pangu_fastkd::sparse_kd {

inline constexpr int64_t kStatColumns = 6;  // KDStats: D, CE, Q_S, P_S, lse, correct

// The rows the loss is taken over: those whose label is not ignore_index.
struct SupervisedRows {
  at::Tensor labels;  // [N] int64
  at::Tensor mask;    // [N] bool
  int64_t count = 0;
  at::Tensor index;  // [count] int64, increasing; undefined when every row is supervised

  bool all() const { return !index.defined(); }

  // Rows of `t` ([N, ...]) at the supervised positions, contiguous; undefined stays undefined.
  at::Tensor pick(const at::Tensor& t) const {
    if (!t.defined()) return t;
    return all() ? t.contiguous() : t.index_select(0, index).contiguous();
  }

  // `sup` ([count, ...]) put back at the supervised positions of an [N, ...] tensor of zeros.
  at::Tensor scatter(const at::Tensor& sup, int64_t N) const {
    if (all()) return sup;
    std::vector<int64_t> shape = sup.sizes().vec();
    shape[0] = N;
    return at::zeros(shape, sup.options()).index_copy_(0, index, sup);
  }
};

namespace detail {

inline std::string row_msg(int64_t row) { return " (row " + std::to_string(row) + ")"; }

// First index where a [n] bool mask is set (argmax returns the first maximum). Error path only.
inline int64_t first_set(const at::Tensor& mask) {
  return mask.to(at::kInt).argmax().item<int64_t>();
}

struct RowCheck {
  at::Tensor rows;                    // [N] bool: the check fails on this row
  std::function<void(int64_t)> fail;  // throws the check's message for that row
};

}  // namespace detail

// Checks the labels and the target's data on the supervised rows, in this order: labels, ids,
// target values, distinct ids, teacher lse and label_logit (top-K) or the weights' sum
// (sampled), a non-empty support, and a finite teacher logit on it under missing_mass='renorm'.
// Throws the first failing check's message, naming its first row; returns the supervised rows.
inline SupervisedRows check_rows(const Call& c, const LossOptions& o, const Target& tg) {
  using detail::first_set;
  using detail::row_msg;
  SupervisedRows rows;
  rows.labels = c.labels.to(at::kLong).contiguous();
  rows.mask = rows.labels != c.ignore_index;
  const at::Tensor& labels = rows.labels;
  const at::Tensor& supervised = rows.mask;
  const int64_t V = o.V, ignore_index = c.ignore_index;
  const bool sampled = o.kind == kSampled;
  std::vector<detail::RowCheck> checks;
  const at::Tensor bad_label = supervised & ((labels < 0) | (labels >= V));
  checks.push_back({bad_label, [&](int64_t r) {
                      TORCH_CHECK_VALUE(false, "sparse_kd: labels must lie in [0, ", V,
                                        ") or equal ignore_index=", ignore_index, ", got ",
                                        labels[r].item<int64_t>(), row_msg(r));
                    }});
  at::Tensor valid, bad_id, bad_value, label_seen;
  if (tg.defined()) {
    const at::Tensor& ids = tg.ids;
    const at::Tensor& values = tg.values;
    const at::Tensor sup2 = supervised.unsqueeze(1);
    bad_id = sup2 & ((ids < -1) | (ids >= V));
    checks.push_back({bad_id.any(1), [&](int64_t r) {
                        const int64_t j = first_set(bad_id[r]);
                        TORCH_CHECK_VALUE(false, "sparse_kd: target ids must lie in [0, ", V,
                                          ") or be -1, got ", ids[r][j].item<int64_t>(),
                                          row_msg(r));
                      }});
    valid = ids >= 0;
    if (!sampled) {
      bad_value = sup2 & valid & (at::isnan(values) | at::isposinf(values));
      checks.push_back({bad_value.any(1), [&](int64_t r) {
                          const int64_t j = first_set(bad_value[r]);
                          TORCH_CHECK_VALUE(false,
                                            "sparse_kd: teacher logits must be finite or -inf, got ",
                                            values[r][j].item<float>(), row_msg(r));
                        }});
    } else {
      bad_value = sup2 & valid & (~at::isfinite(values) | (values < 0));
      checks.push_back({bad_value.any(1), [&](int64_t r) {
                          const int64_t j = first_set(bad_value[r]);
                          TORCH_CHECK_VALUE(
                              false, "sparse_kd: sampled weights must be >= 0 and finite, got ",
                              values[r][j].item<float>(), row_msg(r));
                        }});
    }
    // Duplicates: equal neighbours among the sorted valid ids (-1 slots sort first).
    const at::Tensor sorted = std::get<0>(ids.sort(1));
    const int64_t K = ids.size(1);
    const at::Tensor dup = (sorted.narrow(1, 1, K - 1) == sorted.narrow(1, 0, K - 1)) &
                           (sorted.narrow(1, 1, K - 1) >= 0);
    checks.push_back({supervised & dup.any(1), [&](int64_t r) {
                        TORCH_CHECK_VALUE(false,
                                          "sparse_kd: target ids must be distinct within a row",
                                          row_msg(r));
                      }});
    if (!sampled) {
      const at::Tensor& lse = tg.teacher_lse;
      const at::Tensor& lab = tg.label_logit;
      checks.push_back({supervised & ~at::isfinite(lse), [&](int64_t r) {
                          TORCH_CHECK_VALUE(false, "sparse_kd: teacher lse must be finite, got ",
                                            lse[r].item<float>(), row_msg(r));
                        }});
      checks.push_back({supervised & (at::isnan(lab) | at::isposinf(lab)), [&](int64_t r) {
                          TORCH_CHECK_VALUE(
                              false, "sparse_kd: teacher label_logit must be finite or -inf, got ",
                              lab[r].item<float>(), row_msg(r));
                        }});
      label_seen = (ids == labels.unsqueeze(1)).any(1);
      // The cache's lse is the log-partition over the whole vocabulary, so the probability the
      // top-K logits (and the label's, when it is outside them) hold at T_c cannot exceed 1:
      // logits shifted or rescaled against their lse would otherwise yield P_S > 1 and a
      // negative tail mass without any single value being out of range.
      const double inv_tc = 1.0 / o.cache_temperature;
      const at::Tensor log_p = values * inv_tc - lse.unsqueeze(1);
      at::Tensor log_mass = log_p.masked_fill(~valid, -std::numeric_limits<float>::infinity())
                                .logsumexp(1);
      log_mass = at::where(label_seen, log_mass, at::logaddexp(log_mass, lab * inv_tc - lse));
      const at::Tensor bad_mass = supervised & (log_mass > std::log1p(1e-3));
      checks.push_back({bad_mass, [log_mass](int64_t r) {
                          TORCH_CHECK_VALUE(
                              false, "sparse_kd: the teacher logits (top-K and label) hold "
                              "probability ", std::exp(log_mass[r].item<double>()),
                              " > 1 under their lse: logits and lse do not belong together",
                              row_msg(r));
                        }});
    } else {
      // fp32 sum: the rows hold K weights, and fp64 is not a first-class NPU dtype.
      const at::Tensor wsum = values.masked_fill(~valid, 0.0f).sum(1);
      checks.push_back({supervised & ((wsum - 1.0f).abs() > 1e-3f), [wsum](int64_t r) {
                          TORCH_CHECK_VALUE(
                              false, "sparse_kd: sampled weights must sum to 1 (within 1e-3), got ",
                              wsum[r].item<float>(), row_msg(r));
                        }});
    }
    // The support is the valid ids, plus the label for top-K targets with the label included.
    if (!o.include_label) {
      checks.push_back({supervised & ~valid.any(1), [](int64_t r) {
                          TORCH_CHECK_VALUE(false, "sparse_kd: supervised row ", r,
                                            " has an empty teacher support (every id is -1) while "
                                            "kd_weight > 0");
                        }});
    }
    if (!sampled && o.missing_mass == kRenorm) {
      at::Tensor finite = (valid & at::isfinite(values)).any(1);
      if (o.include_label) finite = finite | (~label_seen & at::isfinite(tg.label_logit));
      checks.push_back({supervised & ~finite, [](int64_t r) {
                          TORCH_CHECK_VALUE(false, "sparse_kd: row ", r,
                                            " has no finite teacher logit on its support; "
                                            "missing_mass='renorm' needs one");
                        }});
    }
  }
  // One device-to-host copy: a flag per check, then the supervised-row count.
  std::vector<at::Tensor> flags;
  flags.reserve(checks.size() + 1);
  for (const auto& check : checks) flags.push_back(check.rows.any().to(at::kLong).reshape({1}));
  flags.push_back(supervised.sum().to(at::kLong).reshape({1}));
  const at::Tensor host = at::cat(flags).cpu();
  const int64_t* f = host.data_ptr<int64_t>();
  for (size_t i = 0; i < checks.size(); ++i) {
    if (f[i] != 0) checks[i].fail(first_set(checks[i].rows));
  }
  rows.count = f[checks.size()];
  // A stable sort of the "ignored" flags lists the supervised rows first and in order; unlike
  // nonzero it needs no device-to-host sync, since the count is already known.
  if (rows.count != o.N) {
    rows.index = at::argsort(supervised.logical_not().to(at::kInt), /*stable=*/true, 0, false)
                     .narrow(0, 0, rows.count);
  }
  return rows;
}

// The op's outputs from the per-supervised-row results: `loss` (scalar), `grad_h_sup`
// ([count, d], undefined unless need_grad_input), `stats_sup` ([count, 6] f32, undefined unless
// compute_stats) and the grad_W accumulator (empty unless need_grad_weight). Absent outputs are
// empty tensors, as the schema's callers expect.
inline Outputs assemble_outputs(const Call& c, const LossOptions& o, const SupervisedRows& rows,
                                at::Tensor loss, const at::Tensor& grad_h_sup,
                                const at::Tensor& stats_sup,
                                const std::optional<chunks::GradWeightAccumulator>& grad_w) {
  const at::TensorOptions f32 = c.hidden.options().dtype(at::kFloat);
  at::Tensor stats = c.compute_stats ? rows.scatter(stats_sup, o.N)
                                     : at::empty({0, kStatColumns}, f32);
  at::Tensor grad_hidden = grad_h_sup.defined() ? rows.scatter(grad_h_sup, o.N)
                                                : at::empty({0}, c.hidden.options());
  at::Tensor grad_weight = at::empty({0}, c.weight.options());
  at::Tensor grad_bias = at::empty({0}, c.weight.options());
  if (grad_w) {
    grad_weight = grad_w->grad_weight();
    if (c.bias.has_value()) grad_bias = grad_w->grad_bias(o.dtype);
  }
  if (o.reduction == kMean && o.num_items <= 0 && rows.count == 0) {
    // PyTorch's mean over no elements (F.cross_entropy with every label ignored, or N = 0) is
    // 0 / 0 = NaN with zero gradients; the gradients above are already zero.
    loss = at::full({}, std::numeric_limits<double>::quiet_NaN(), loss.options());
  }
  return {std::move(loss), grad_hidden, grad_weight, grad_bias, stats};
}

}  // namespace pangu_fastkd::sparse_kd
