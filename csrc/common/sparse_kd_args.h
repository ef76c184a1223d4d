// The host prologue of torch.ops.pangu_fastkd.sparse_kd_fused, shared by every device's
// implementation (csrc/cpu/sparse_kd.cpp, csrc/ascend/host/sparse_kd_npu.cpp): the op's arguments
// as one struct, the checks of everything that needs no tensor data (shapes, dtypes, devices,
// options), the options as the epilogues read them, and the sparse target in the dtypes they
// read. Each check and its message are written here once; the per-row checks of the data are in
// sparse_kd_rows.h. Plain ATen on whatever device the tensors are on.
#pragma once

#include <torch/extension.h>

#include <cmath>
#include <functional>
#include <optional>
#include <tuple>
#include <utility>

#include "common/sparse_kd_rules.h"

namespace pangu_fastkd::sparse_kd {

// Option codes of the schema (csrc/ops.cpp).
enum Divergence : int64_t { kForwardKL = 0, kReverseKL = 1, kJSD = 2 };
enum MissingMass : int64_t { kTail = 0, kRenorm = 1 };
enum Reduction : int64_t { kSum = 0, kMean = 1 };
enum TargetKind { kNoTeacher, kTopK, kSampled };

// loss, grad_hidden, grad_weight, grad_bias, stats: the op's results, as the schema names them.
using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The op's arguments, named and ordered as in the schema (csrc/ops.cpp).
struct Call {
  const at::Tensor& hidden;                           // [N, d]
  const at::Tensor& weight;                           // [V, d]
  const std::optional<at::Tensor>& bias;              // [V]
  const at::Tensor& labels;                           // [N]
  const std::optional<at::Tensor>& ids;               // [N, K]
  const std::optional<at::Tensor>& teacher_logits;    // [N, K] (top-K)
  const std::optional<at::Tensor>& teacher_lse;       // [N] (top-K)
  const std::optional<at::Tensor>& label_logit;       // [N] (top-K)
  const std::optional<at::Tensor>& sample_weights;    // [N, K] (sampled)
  double kd_weight;
  int64_t divergence;
  double beta, temperature, cache_temperature;
  int64_t missing_mass;
  bool include_label;
  int64_t ignore_index;
  double softcap, z_loss;
  int64_t reduction;
  double num_items;
  int64_t chunk_rows;
  bool need_grad_input, need_grad_weight, compute_stats;
};

// The schema's signature around a device's implementation `Impl`: what each device registers
// (m.impl("sparse_kd_fused", &op_entry<impl>)), so the 25 parameters are spelled once.
template <Outputs (*Impl)(const Call&)>
Outputs op_entry(const at::Tensor& hidden, const at::Tensor& weight,
                 const std::optional<at::Tensor>& bias, const at::Tensor& labels,
                 const std::optional<at::Tensor>& ids,
                 const std::optional<at::Tensor>& teacher_logits,
                 const std::optional<at::Tensor>& teacher_lse,
                 const std::optional<at::Tensor>& label_logit,
                 const std::optional<at::Tensor>& sample_weights, double kd_weight,
                 int64_t divergence, double beta, double temperature, double cache_temperature,
                 int64_t missing_mass, bool include_label, int64_t ignore_index, double softcap,
                 double z_loss, int64_t reduction, double num_items, int64_t chunk_rows,
                 bool need_grad_input, bool need_grad_weight, bool compute_stats) {
  return Impl(Call{hidden, weight, bias, labels, ids, teacher_logits, teacher_lse, label_logit,
                   sample_weights, kd_weight, divergence, beta, temperature, cache_temperature,
                   missing_mass, include_label, ignore_index, softcap, z_loss, reduction,
                   num_items, chunk_rows, need_grad_input, need_grad_weight, compute_stats});
}

// The loss options after the checks, as the epilogues read them.
struct LossOptions {
  TargetKind kind = kNoTeacher;  // kNoTeacher exactly when kd_weight == 0
  double kd_weight = 0, beta = 0.5, temperature = 1;
  double cache_temperature = 1;  // the temperature itself for sampled targets
  double softcap = 0;            // 0: none
  double z_loss = 0;
  int64_t divergence = kForwardKL, missing_mass = kTail, reduction = kMean;
  bool include_label = false;  // the label joins the support: top-K targets only
  double num_items = 0;        // <= 0: not set
  int64_t N = 0, d = 0, V = 0, K = 0;  // K = 0 without a teacher
  at::ScalarType dtype = at::kFloat;   // of hidden, weight and bias

  // The factor of the summed row losses: 1 / num_items, else 1 / rows for the mean, else 1.
  double loss_scale(int64_t supervised_rows) const {
    if (num_items > 0) return 1.0 / num_items;
    return reduction == kMean && supervised_rows > 0 ? 1.0 / double(supervised_rows) : 1.0;
  }
};

// A device's rule for where an input may live, given the input and its name in messages.
using DeviceCheck = std::function<void(const at::Tensor&, const char*)>;

namespace detail {

inline void check_rows_of(const at::Tensor& t, const char* name, int64_t N,
                          const DeviceCheck& check_device) {
  check_device(t, name);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == N, "sparse_kd: ", name, " must be [N] = [", N,
                    "], got shape ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "sparse_kd: ", name,
                   " must be a floating tensor, got ", t.scalar_type());
}

// The sparse target's shapes, dtypes and the options that depend on its kind (kd_weight > 0).
inline void check_target(const Call& c, LossOptions& o, const DeviceCheck& check_device) {
  TORCH_CHECK_VALUE(c.ids.has_value(), "sparse_kd: kd_weight > 0 needs a teacher target (ids)");
  const bool sampled = c.sample_weights.has_value();
  TORCH_CHECK_VALUE(sampled != c.teacher_logits.has_value(),
                    "sparse_kd: pass either teacher_logits (top-K) or sample_weights (sampled), "
                    "not both");
  o.kind = sampled ? kSampled : kTopK;
  const at::Tensor& ids = *c.ids;
  check_device(ids, "target ids");
  TORCH_CHECK_VALUE(ids.dim() == 2 && ids.size(0) == o.N,
                    "sparse_kd: target ids must be [N, K] with N = ", o.N, ", got shape ",
                    ids.sizes());
  TORCH_CHECK_VALUE(ids.size(1) > 0, "sparse_kd: target ids must have K >= 1 columns, got K = 0");
  TORCH_CHECK_TYPE(at::isIntegralType(ids.scalar_type(), false),
                   "sparse_kd: target ids must be an integer tensor, got ", ids.scalar_type());
  o.K = ids.size(1);
  const at::Tensor& vals = sampled ? *c.sample_weights : *c.teacher_logits;
  const char* vname = sampled ? "sample_weights" : "teacher logits";
  check_device(vals, vname);
  TORCH_CHECK_VALUE(vals.sizes() == ids.sizes(), "sparse_kd: ", vname, " must match ids' shape ",
                    ids.sizes(), ", got ", vals.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(vals.scalar_type()), "sparse_kd: ", vname,
                   " must be a floating tensor, got ", vals.scalar_type());
  if (!sampled) {
    TORCH_CHECK_VALUE(c.teacher_lse.has_value() && c.label_logit.has_value(),
                      "sparse_kd: a top-K target needs teacher lse and label_logit");
    check_rows_of(*c.teacher_lse, "teacher lse", o.N, check_device);
    check_rows_of(*c.label_logit, "label_logit", o.N, check_device);
  }
  TORCH_CHECK_VALUE(sparse_kd_rules::tail_rule_holds(!sampled, c.missing_mass, c.temperature,
                                                     c.cache_temperature),
                    "sparse_kd: missing_mass='tail' needs temperature == cache temperature (",
                    c.temperature, " != ", c.cache_temperature, "); use missing_mass='renorm'");
  TORCH_CHECK_VALUE(sparse_kd_rules::sampled_divergence_allowed(sampled, c.divergence),
                    "sparse_kd: sampled targets support only divergence='forward_kl'");
  TORCH_CHECK_VALUE(sparse_kd_rules::sampled_label_allowed(sampled, c.include_label),
                    "sparse_kd: include_label applies to top-K targets only");
  o.include_label = !sampled && c.include_label;
  o.cache_temperature = sampled ? c.temperature : c.cache_temperature;
}

}  // namespace detail

// Checks every argument that can be checked without reading tensor data and returns the
// options. `check_device` is called on each input tensor, hidden first.
inline LossOptions check_arguments(const Call& c, const DeviceCheck& check_device) {
  const at::Tensor &hidden = c.hidden, &weight = c.weight, &labels = c.labels;
  TORCH_CHECK_VALUE(hidden.dim() == 2, "sparse_kd: hidden must be [N, d], got shape ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "sparse_kd: weight must be [V, d], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "sparse_kd: weight is [V, d] with d = ",
                    weight.size(1), " but hidden has d = ", hidden.size(1));
  LossOptions o;
  o.dtype = hidden.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(o.dtype),
                   "sparse_kd: hidden must be a floating tensor, got ", o.dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == o.dtype, "sparse_kd: weight dtype ",
                   weight.scalar_type(), " differs from hidden dtype ", o.dtype);
  o.N = hidden.size(0);
  o.d = hidden.size(1);
  o.V = weight.size(0);
  TORCH_CHECK_VALUE(o.V > 0 && o.d > 0, "sparse_kd: empty vocabulary or hidden size");
  check_device(hidden, "hidden");
  check_device(weight, "weight");
  check_device(labels, "labels");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == o.N,
                    "sparse_kd: labels must be [N] = [", o.N, "], got shape ", labels.sizes());
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
                   "sparse_kd: labels must be int64 or int32, got ", labels.scalar_type());
  if (c.bias.has_value()) {
    const at::Tensor& bias = *c.bias;
    check_device(bias, "bias");
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == o.V, "sparse_kd: bias must be [V] = [",
                      o.V, "], got shape ", bias.sizes());
    TORCH_CHECK_TYPE(bias.scalar_type() == o.dtype, "sparse_kd: bias dtype ", bias.scalar_type(),
                     " differs from hidden dtype ", o.dtype);
  }
  TORCH_CHECK_VALUE(c.kd_weight >= 0 && c.kd_weight <= 1,
                    "sparse_kd: kd_weight must be in [0, 1], got ", c.kd_weight);
  TORCH_CHECK_VALUE(c.divergence >= kForwardKL && c.divergence <= kJSD,
                    "sparse_kd: unknown divergence code ", c.divergence);
  TORCH_CHECK_VALUE(c.missing_mass == kTail || c.missing_mass == kRenorm,
                    "sparse_kd: unknown missing_mass code ", c.missing_mass);
  TORCH_CHECK_VALUE(c.beta >= 0 && c.beta <= 1, "sparse_kd: beta must be in [0, 1], got ", c.beta);
  TORCH_CHECK_VALUE(c.temperature > 0 && std::isfinite(c.temperature),
                    "sparse_kd: temperature must be > 0, got ", c.temperature);
  TORCH_CHECK_VALUE(c.cache_temperature > 0 && std::isfinite(c.cache_temperature),
                    "sparse_kd: the cache temperature must be > 0, got ", c.cache_temperature);
  TORCH_CHECK_VALUE(c.z_loss >= 0 && std::isfinite(c.z_loss),
                    "sparse_kd: z_loss must be finite and >= 0, got ", c.z_loss);
  // The schema's "not set" values are 0 (softcap <= 0: none; num_items 0; chunk_rows 0); NaN
  // and infinities would pass a "> 0" test as "not set" or poison every row.
  TORCH_CHECK_VALUE(std::isfinite(c.softcap), "sparse_kd: softcap must be finite, got ",
                    c.softcap);
  TORCH_CHECK_VALUE(c.num_items >= 0 && std::isfinite(c.num_items),
                    "sparse_kd: num_items must be finite and > 0 (0: not set), got ", c.num_items);
  TORCH_CHECK_VALUE(c.chunk_rows >= 0, "sparse_kd: chunk_rows must be >= 1 (0: default), got ",
                    c.chunk_rows);
  TORCH_CHECK_VALUE(c.reduction == kSum || c.reduction == kMean,
                    "sparse_kd: unknown reduction code ", c.reduction);
  o.kd_weight = c.kd_weight;
  o.divergence = c.divergence;
  o.beta = c.beta;
  o.temperature = c.temperature;
  o.cache_temperature = c.cache_temperature;
  o.missing_mass = c.missing_mass;
  o.softcap = c.softcap > 0 ? c.softcap : 0;  // the schema's "softcap <= 0 means none"
  o.z_loss = c.z_loss;
  o.reduction = c.reduction;
  o.num_items = c.num_items;
  if (c.kd_weight > 0) detail::check_target(c, o, check_device);
  return o;
}

// The sparse target in the dtypes the epilogues read; undefined tensors without a teacher.
struct Target {
  at::Tensor ids;          // [N, K] int64 (a wider id is not wrapped around before its check)
  at::Tensor values;       // [N, K] f32: teacher logits (top-K) or sample weights (sampled)
  at::Tensor teacher_lse;  // [N] f32, top-K only
  at::Tensor label_logit;  // [N] f32, top-K only

  bool defined() const { return ids.defined(); }
};

// Converts the target that check_arguments accepted (a no-op for int64 ids and f32 values).
inline Target convert_target(const Call& c, const LossOptions& o) {
  Target tg;
  if (o.kind == kNoTeacher) return tg;
  tg.ids = c.ids->to(at::kLong).contiguous();
  const at::Tensor& vals = o.kind == kSampled ? *c.sample_weights : *c.teacher_logits;
  tg.values = vals.to(at::kFloat).contiguous();
  if (o.kind == kTopK) {
    tg.teacher_lse = c.teacher_lse->to(at::kFloat).contiguous();
    tg.label_logit = c.label_logit->to(at::kFloat).contiguous();
  }
  return tg;
}

}  // namespace pangu_fastkd::sparse_kd
