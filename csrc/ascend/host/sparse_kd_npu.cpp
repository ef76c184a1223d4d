// Fused linear sparse-KD / cross-entropy loss on the NPU: torch.ops.pangu_fastkd.sparse_kd_fused
// for PrivateUse1 tensors. Semantics, outputs and error messages are those of the CPU kernel
// (csrc/cpu/sparse_kd.cpp); the loss is defined in docs/kd-losses.md.
//
// The LM-head GEMMs stay torch_npu matmuls; only the epilogue is an Ascend C kernel
// (csrc/ascend/sparse_kd_epilogue.h). Supervised rows are processed in chunks, as on CPU:
//   1. logits[c, V] = H[c] W^T (+ b)          ATen GEMM into a reused buffer
//   2. sparse_kd_epilogue_{fp32,bf16,fp16}     per-row loss and statistics; the buffer is
//                                              overwritten with d(scale * loss)/d(logits)
//   3. grad_H[c] = dlogits W,  grad_W += dlogits^T H[c],  grad_b += colsum(dlogits)
// Everything but the launch in step 2 is device-agnostic ATen code (run_chunks), which is why the
// CPU twin build runs this file unchanged on CPU tensors.
//
// Input validation reads nothing back per row: every check is a tensor op producing a per-row
// flag, and the flags (with the supervised-row count that the mean reduction needs) come back in
// one device-to-host copy. Only when a check fails are the offending row and value read back, to
// name them in the same message the CPU kernel gives.
#include <torch/extension.h>

#include <algorithm>
#include <cstdlib>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "aclrtlaunch_sparse_kd_epilogue_bf16.h"
#include "aclrtlaunch_sparse_kd_epilogue_fp16.h"
#include "aclrtlaunch_sparse_kd_epilogue_fp32.h"
#include "ascend/sparse_kd_tiling_host.h"
#include "common/sparse_kd_chunks.h"
#include "npu_launch.h"

namespace pangu_fastkd::ascend {
namespace {

constexpr int64_t kStatColumns = 6;  // KDStats: D, CE, Q_S, P_S, lse, correct

// The rows one launch of the epilogue sees: views of contiguous tensors on the kernel device.
struct EpilogueChunk {
  at::Tensor logits;       // [n, V] fp32 / bf16 / fp16: read, then overwritten by the gradient
  at::Tensor labels;       // [n] int32, every one in [0, V)
  at::Tensor ids;          // [n, K] int32, -1 = empty slot (undefined when kd_weight == 0)
  at::Tensor values;       // [n, K] f32: teacher logits (top-K) or sample weights (sampled)
  at::Tensor teacher_lse;  // [n] f32 (top-K only)
  at::Tensor label_logit;  // [n] f32 (top-K only)
  at::Tensor loss;         // [n] f32: the unscaled per-row loss
  at::Tensor stats;        // [n, 6] f32
};

// Step 2 for one chunk: the only code that talks to the NPU runtime directly. The kernel
// instantiation follows the tiling's dtype code (bf16 and fp16 share an element size). Each
// launch takes the stream itself (PANGU_FASTKD_LAUNCH_KERNEL), after this chunk's GEMM and tiling
// copy have been queued: a stream taken once before the chunk loop would let the launch overtake
// them.
void launch_epilogue(const EpilogueChunk& c, const SparseKdTiling& tiling) {
  const at::Tensor tiling_gm = tiling_on_device(tiling, c.logits.device());
  void* args[] = {gm_addr(c.logits),      gm_addr(c.labels),      gm_addr(c.ids),
                  gm_addr(c.values),      gm_addr(c.teacher_lse), gm_addr(c.label_logit),
                  gm_addr(c.loss),        gm_addr(c.stats),       gm_addr(tiling_gm)};
  if (tiling.dtype == kSparseKdFloat32) {
    PANGU_FASTKD_LAUNCH_KERNEL(sparse_kd_epilogue_fp32, tiling.blockDim, args[0], args[1],
                               args[2], args[3], args[4], args[5], args[6], args[7], args[8]);
  } else if (tiling.dtype == kSparseKdFloat16) {
    PANGU_FASTKD_LAUNCH_KERNEL(sparse_kd_epilogue_fp16, tiling.blockDim, args[0], args[1],
                               args[2], args[3], args[4], args[5], args[6], args[7], args[8]);
  } else {
    PANGU_FASTKD_LAUNCH_KERNEL(sparse_kd_epilogue_bf16, tiling.blockDim, args[0], args[1],
                               args[2], args[3], args[4], args[5], args[6], args[7], args[8]);
  }
}

// The UB budget of the chip the module was built for, and the vector cores of its part (40 on a
// 910B4, 48 on a 910B1: more blocks than cores would run in a second, mostly idle wave).
SparseKdChipBudget chip_budget() {
  SparseKdChipBudget budget =
      soc_family() == SocFamily::kAscend910B ? kSparseKdAscend910B : kSparseKdAscend310B;
  budget.coreNum = soc_platform().GetCoreNumAiv();
  return budget;
}

// The host tiling for `rows` rows; its std::invalid_argument becomes a ValueError.
SparseKdTiling make_tiling(SparseKdProblem problem, uint32_t rows) {
  problem.rows = rows;
  try {
    return MakeSparseKdTiling(problem, chip_budget());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "sparse_kd: the Ascend C epilogue cannot take this problem: ",
                      e.what());
  }
  return {};  // not reached
}

// The row-chunk policy and grad_W accumulation are the CPU op's (csrc/common/sparse_kd_chunks.h).
using chunks::chunk_rows_for;
using chunks::GradWeightAccumulator;

// ---------------------------------------------------------------------------------------------
// Validation

std::string row_msg(int64_t row) { return " (row " + std::to_string(row) + ")"; }

// Every input on hidden's device (checked first, so a stray tensor is named with both devices),
// which is on the kernel device.
void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "sparse_kd: ", name, " is on ", t.device(),
                    " but hidden is on ", device, "; every input must be on one device");
  TORCH_CHECK_VALUE(t.device().type() == kKernelDevice, "sparse_kd: ", name, " must be on the ",
                    c10::DeviceTypeName(kKernelDevice, /*lower_case=*/true),
                    " device for the Ascend C kernel, got ", t.device());
}

// First index where a [n] bool mask is set (argmax returns the first maximum). Error path only.
int64_t first_set(const at::Tensor& mask) { return mask.to(at::kInt).argmax().item<int64_t>(); }

// The sparse target after validation: [N, K] / [N] tensors in the kernel's dtypes.
struct TargetTensors {
  at::Tensor ids, values, teacher_lse, label_logit;
};

struct RowCheck {
  at::Tensor rows;                    // [N] bool: the check fails on this row
  std::function<void(int64_t)> fail;  // throws the CPU kernel's message for that row
};

// Every per-row check of the CPU kernel (labels, check_target_rows, the empty-support and renorm
// checks of its epilogue), in its order, as [N] masks over the supervised rows. Returns the
// number of supervised rows; throws the first failing check's message.
int64_t validate_rows(const at::Tensor& labels, const at::Tensor& supervised, int64_t ignore_index,
                      int64_t V, bool sampled, bool include_label, int64_t missing_mass,
                      const TargetTensors* tg) {
  std::vector<RowCheck> checks;
  const at::Tensor bad_label = supervised & ((labels < 0) | (labels >= V));
  checks.push_back({bad_label, [&](int64_t r) {
                      TORCH_CHECK_VALUE(false, "sparse_kd: labels must lie in [0, ", V,
                                        ") or equal ignore_index=", ignore_index, ", got ",
                                        labels[r].item<int64_t>(), row_msg(r));
                    }});
  at::Tensor ids, valid, values, bad_id, bad_value;
  if (tg != nullptr) {
    ids = tg->ids;  // int64 here, so no id is wrapped around before it is checked
    values = tg->values;
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
                        TORCH_CHECK_VALUE(false, "sparse_kd: target ids must be distinct within a row",
                                          row_msg(r));
                      }});
    at::Tensor label_seen;
    if (!sampled) {
      const at::Tensor& lse = tg->teacher_lse;
      const at::Tensor& lab = tg->label_logit;
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
    const bool label_slot = !sampled && include_label;
    if (!label_slot) {
      checks.push_back({supervised & ~valid.any(1), [](int64_t r) {
                          TORCH_CHECK_VALUE(false, "sparse_kd: supervised row ", r,
                                            " has an empty teacher support (every id is -1) while "
                                            "kd_weight > 0");
                        }});
    }
    if (!sampled && missing_mass == 1) {
      at::Tensor finite = (valid & at::isfinite(values)).any(1);
      if (label_slot) finite = finite | (~label_seen & at::isfinite(tg->label_logit));
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
  for (const auto& c : checks) flags.push_back(c.rows.any().to(at::kLong).reshape({1}));
  flags.push_back(supervised.sum().to(at::kLong).reshape({1}));
  const at::Tensor host = at::cat(flags).cpu();
  const int64_t* f = host.data_ptr<int64_t>();
  for (size_t i = 0; i < checks.size(); ++i) {
    if (f[i] != 0) checks[i].fail(first_set(checks[i].rows));
  }
  return f[checks.size()];
}

// ---------------------------------------------------------------------------------------------
// The chunk loop: device-agnostic ATen code around launch_epilogue.

// Rows [c0, c0 + n) of a [rows, ...] tensor, or an undefined tensor for an absent input.
at::Tensor rows_of(const at::Tensor& t, int64_t c0, int64_t n) {
  return t.defined() ? t.narrow(0, c0, n) : t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> run_chunks(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels, const at::Tensor& supervised, int64_t n_sup, const TargetTensors* tg,
    const SparseKdProblem& problem, int64_t chunk_rows, bool need_grad_input,
    bool need_grad_weight, bool compute_stats) {
  const int64_t N = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  const auto dtype = hidden.scalar_type();
  const at::TensorOptions f32 = hidden.options().dtype(at::kFloat);
  const at::Tensor H = hidden.contiguous(), W = weight.contiguous();

  // Supervised rows only, as on CPU. A stable sort of the "ignored" flags lists them first and in
  // order; unlike nonzero it needs no device-to-host sync, since n_sup is already known.
  const bool all_rows = n_sup == N;
  at::Tensor row_index;
  if (!all_rows) {
    row_index = at::argsort(supervised.logical_not().to(at::kInt), /*stable=*/true, 0, false)
                    .narrow(0, 0, n_sup);
  }
  auto pick = [&](const at::Tensor& t) {
    if (!t.defined()) return t;
    return all_rows ? t.contiguous() : t.index_select(0, row_index).contiguous();
  };
  const at::Tensor H_sup = pick(H);
  const at::Tensor labels_sup = pick(labels).to(at::kInt);
  at::Tensor ids_sup, values_sup, lse_sup, label_logit_sup;
  if (tg != nullptr) {
    ids_sup = pick(tg->ids).to(at::kInt);  // validated: every id fits
    values_sup = pick(tg->values);
    lse_sup = pick(tg->teacher_lse);
    label_logit_sup = pick(tg->label_logit);
  }
  const at::Tensor loss_rows = at::empty({n_sup}, f32);
  const at::Tensor stats_sup = at::empty({n_sup, kStatColumns}, f32);
  at::Tensor grad_h_sup;
  if (need_grad_input) grad_h_sup = at::empty({n_sup, d}, H.options());

  const bool half = dtype != at::kFloat;
  const int64_t chunk = chunk_rows_for(V, d, H.element_size(), half && need_grad_weight,
                                       chunk_rows, n_sup);
  const int64_t n_chunks = (n_sup + chunk - 1) / chunk;
  const at::Tensor buffer = at::empty({n_sup > 0 ? chunk : 0, V}, H.options());
  std::optional<GradWeightAccumulator> grad_w;
  if (need_grad_weight) grad_w.emplace(W, bias.has_value(), n_chunks);
  const at::Tensor Wt = W.t();
  std::optional<SparseKdTiling> full_tiling;
  if (n_chunks > 0) full_tiling = make_tiling(problem, static_cast<uint32_t>(chunk));
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t c0 = ci * chunk, cn = std::min(chunk, n_sup - c0);
    const at::Tensor Hc = H_sup.narrow(0, c0, cn);
    at::Tensor buf = buffer.narrow(0, 0, cn);
    if (bias.has_value()) {
      at::addmm_out(buf, *bias, Hc, Wt);
    } else {
      at::mm_out(buf, Hc, Wt);
    }
    const EpilogueChunk rows{buf,
                             labels_sup.narrow(0, c0, cn),
                             rows_of(ids_sup, c0, cn),
                             rows_of(values_sup, c0, cn),
                             rows_of(lse_sup, c0, cn),
                             rows_of(label_logit_sup, c0, cn),
                             loss_rows.narrow(0, c0, cn),
                             stats_sup.narrow(0, c0, cn)};
    launch_epilogue(rows, cn == chunk ? *full_tiling
                                      : make_tiling(problem, static_cast<uint32_t>(cn)));
    if (need_grad_input) {
      at::Tensor gh = grad_h_sup.narrow(0, c0, cn);
      at::mm_out(gh, buf, W);
    }
    if (grad_w) grad_w->add_chunk(ci, buf, Hc);
  }

  // ---- reduction and outputs, shaped as the CPU kernel returns them
  const at::Tensor loss = loss_rows.sum().mul(double(problem.scale));
  at::Tensor stats = at::empty({0, kStatColumns}, f32);
  if (compute_stats) {
    if (all_rows) {
      stats = stats_sup;
    } else {
      stats = at::zeros({N, kStatColumns}, f32);
      stats.index_copy_(0, row_index, stats_sup);
    }
  }
  at::Tensor grad_hidden = at::empty({0}, H.options());
  if (need_grad_input) {
    if (all_rows) {
      grad_hidden = grad_h_sup;
    } else {
      grad_hidden = at::zeros({N, d}, H.options());
      grad_hidden.index_copy_(0, row_index, grad_h_sup);
    }
  }
  at::Tensor grad_weight = at::empty({0}, W.options());
  at::Tensor grad_bias = at::empty({0}, W.options());
  if (grad_w) {
    grad_weight = grad_w->grad_weight();
    if (bias.has_value()) grad_bias = grad_w->grad_bias(dtype);
  }
  return {loss, grad_hidden, grad_weight, grad_bias, stats};
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The op

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_kd_fused_npu(
    const at::Tensor& hidden, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& labels_in, const std::optional<at::Tensor>& ids_in,
    const std::optional<at::Tensor>& teacher_logits, const std::optional<at::Tensor>& teacher_lse,
    const std::optional<at::Tensor>& label_logit, const std::optional<at::Tensor>& sample_weights,
    double kd_weight, int64_t divergence, double beta, double temperature, double cache_temperature,
    int64_t missing_mass, bool include_label, int64_t ignore_index, double softcap, double z_loss,
    int64_t reduction, double num_items, int64_t chunk_rows, bool need_grad_input,
    bool need_grad_weight, bool compute_stats) {
  // ---- shapes, dtypes, devices, options (the CPU kernel's checks and messages)
  TORCH_CHECK_VALUE(hidden.dim() == 2, "sparse_kd: hidden must be [N, d], got shape ",
                    hidden.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 2, "sparse_kd: weight must be [V, d], got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(weight.size(1) == hidden.size(1), "sparse_kd: weight is [V, d] with d = ",
                    weight.size(1), " but hidden has d = ", hidden.size(1));
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "sparse_kd: hidden must be a floating tensor, got ",
                   dtype);
  TORCH_CHECK_TYPE(weight.scalar_type() == dtype, "sparse_kd: weight dtype ", weight.scalar_type(),
                   " differs from hidden dtype ", dtype);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "sparse_kd: the Ascend C epilogue takes float32, bfloat16 or float16 hidden "
                   "states, got ", dtype);
  const int64_t N = hidden.size(0), d = hidden.size(1), V = weight.size(0);
  TORCH_CHECK_VALUE(V > 0 && d > 0, "sparse_kd: empty vocabulary or hidden size");
  const at::Device device = hidden.device();
  check_device(hidden, "hidden", device);
  // From here on hidden's device is the current one: the launches take the current device's
  // stream, and tensors on npu:1 launched while npu:0 is current would run on npu:0's stream.
  // The other inputs are checked against that device before anything reads them.
  const c10_npu::NPUGuard device_guard(device);
  check_device(weight, "weight", device);
  check_device(labels_in, "labels", device);
  TORCH_CHECK_VALUE(labels_in.dim() == 1 && labels_in.size(0) == N,
                    "sparse_kd: labels must be [N] = [", N, "], got shape ", labels_in.sizes());
  TORCH_CHECK_TYPE(labels_in.scalar_type() == at::kLong || labels_in.scalar_type() == at::kInt,
                   "sparse_kd: labels must be int64 or int32, got ", labels_in.scalar_type());
  if (bias.has_value()) {
    check_device(*bias, "bias", device);
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == V, "sparse_kd: bias must be [V] = [", V,
                      "], got shape ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == dtype, "sparse_kd: bias dtype ", bias->scalar_type(),
                     " differs from hidden dtype ", dtype);
  }
  TORCH_CHECK_VALUE(kd_weight >= 0 && kd_weight <= 1, "sparse_kd: kd_weight must be in [0, 1], got ",
                    kd_weight);
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 2, "sparse_kd: unknown divergence code ",
                    divergence);
  TORCH_CHECK_VALUE(missing_mass == 0 || missing_mass == 1, "sparse_kd: unknown missing_mass code ",
                    missing_mass);
  TORCH_CHECK_VALUE(beta >= 0 && beta <= 1, "sparse_kd: beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(temperature > 0 && std::isfinite(temperature),
                    "sparse_kd: temperature must be > 0, got ", temperature);
  TORCH_CHECK_VALUE(z_loss >= 0, "sparse_kd: z_loss must be >= 0, got ", z_loss);
  TORCH_CHECK_VALUE(reduction == 0 || reduction == 1, "sparse_kd: unknown reduction code ",
                    reduction);

  // ---- sparse target: shapes and dtypes; its values are checked with the labels below
  const bool kd = kd_weight > 0;
  bool sampled = false;
  std::optional<TargetTensors> target;
  int64_t K = 0;
  if (kd) {
    TORCH_CHECK_VALUE(ids_in.has_value(), "sparse_kd: kd_weight > 0 needs a teacher target (ids)");
    sampled = sample_weights.has_value();
    TORCH_CHECK_VALUE(sampled != teacher_logits.has_value(),
                      "sparse_kd: pass either teacher_logits (top-K) or sample_weights (sampled), "
                      "not both");
    check_device(*ids_in, "target ids", device);
    TORCH_CHECK_VALUE(ids_in->dim() == 2 && ids_in->size(0) == N,
                      "sparse_kd: target ids must be [N, K] with N = ", N, ", got shape ",
                      ids_in->sizes());
    TORCH_CHECK_VALUE(ids_in->size(1) > 0,
                      "sparse_kd: target ids must have K >= 1 columns, got K = 0");
    TORCH_CHECK_TYPE(at::isIntegralType(ids_in->scalar_type(), false),
                     "sparse_kd: target ids must be an integer tensor, got ",
                     ids_in->scalar_type());
    K = ids_in->size(1);
    const auto& vals = sampled ? *sample_weights : *teacher_logits;
    const char* vname = sampled ? "sample_weights" : "teacher logits";
    check_device(vals, vname, device);
    TORCH_CHECK_VALUE(vals.sizes() == ids_in->sizes(), "sparse_kd: ", vname,
                      " must match ids' shape ", ids_in->sizes(), ", got ", vals.sizes());
    TORCH_CHECK_TYPE(at::isFloatingType(vals.scalar_type()), "sparse_kd: ", vname,
                     " must be a floating tensor, got ", vals.scalar_type());
    TargetTensors tg;
    tg.ids = ids_in->to(at::kLong);
    tg.values = vals.to(at::kFloat);
    if (!sampled) {
      TORCH_CHECK_VALUE(teacher_lse.has_value() && label_logit.has_value(),
                        "sparse_kd: a top-K target needs teacher lse and label_logit");
      for (auto [t, name] : {std::pair{&*teacher_lse, "teacher lse"},
                             std::pair{&*label_logit, "label_logit"}}) {
        check_device(*t, name, device);
        TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == N, "sparse_kd: ", name,
                          " must be [N] = [", N, "], got shape ", t->sizes());
        TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "sparse_kd: ", name,
                         " must be a floating tensor, got ", t->scalar_type());
      }
      tg.teacher_lse = teacher_lse->to(at::kFloat);
      tg.label_logit = label_logit->to(at::kFloat);
      TORCH_CHECK_VALUE(missing_mass != 0 || std::abs(temperature - cache_temperature) <= 1e-6,
                        "sparse_kd: missing_mass='tail' needs temperature == cache temperature (",
                        temperature, " != ", cache_temperature, "); use missing_mass='renorm'");
    } else {
      TORCH_CHECK_VALUE(divergence == 0,
                        "sparse_kd: sampled targets support only divergence='forward_kl'");
      TORCH_CHECK_VALUE(!include_label, "sparse_kd: include_label applies to top-K targets only");
    }
    target = std::move(tg);
  }

  // ---- the kernel's problem, before any data is touched: a bad option fails fast
  SparseKdProblem problem;
  problem.vocab = static_cast<uint32_t>(V);
  TORCH_CHECK_VALUE(V <= int64_t(UINT32_MAX) && K <= int64_t(UINT32_MAX),
                    "sparse_kd: V and K must fit in 32 bits for the Ascend C epilogue");
  problem.supportK = static_cast<uint32_t>(K);
  problem.elemBytes = static_cast<uint32_t>(hidden.element_size());
  // bf16 and fp16 are both 2 bytes: the dtype code picks the kernel instantiation.
  problem.dtype = dtype == at::kFloat  ? kSparseKdFloat32
                  : dtype == at::kHalf ? kSparseKdFloat16
                                       : kSparseKdBFloat16;
  problem.kdWeight = static_cast<float>(kd_weight);
  problem.temperature = static_cast<float>(temperature);
  problem.cacheTemperature = static_cast<float>(sampled ? temperature : cache_temperature);
  // The kernel sees supervised rows only, and their labels lie in [0, V): -1 matches none.
  problem.ignoreIndex = -1;
  problem.targetKind = sampled ? kSparseKdSampled : kSparseKdTopK;
  problem.divergence = static_cast<uint32_t>(divergence);
  problem.missingMass = static_cast<uint32_t>(missing_mass);
  problem.includeLabel = kd && !sampled && include_label;
  problem.beta = static_cast<float>(beta);
  problem.useSoftcap = softcap > 0;  // softcap <= 0 means none, as on CPU
  problem.softcap = problem.useSoftcap ? static_cast<float>(softcap) : 0.0f;
  problem.zLoss = static_cast<float>(z_loss);
  make_tiling(problem, 1);  // option errors now, before the validation pass and the GEMMs

  // ---- supervised rows and the target's data: one read-back
  const at::Tensor labels = labels_in.to(at::kLong);
  const at::Tensor supervised = labels != ignore_index;
  const int64_t n_sup = validate_rows(labels, supervised, ignore_index, V, sampled, include_label,
                                      missing_mass, target ? &*target : nullptr);
  const double scale = num_items > 0 ? 1.0 / num_items
                                     : (reduction == 1 && n_sup > 0 ? 1.0 / double(n_sup) : 1.0);
  problem.scale = static_cast<float>(scale);

  return run_chunks(hidden, weight, bias, labels, supervised, n_sup, target ? &*target : nullptr,
                    problem, chunk_rows, need_grad_input, need_grad_weight, compute_stats);
}

// The twin build registers nothing: its tensors are CPU tensors, which the dispatcher sends to
// the CPU kernel of _C (a CPU registration here would clash with it), and a PrivateUse1
// registration in a process without torch_npu would make npu_kernel_available() claim an NPU
// kernel that cannot run, changing the route pangu_fastkd picks for "npu" tensors (which
// tests/test_npu_path.py fakes). The twin module exposes sparse_kd_fused_npu directly instead.
#ifndef PANGU_FASTKD_ASCEND_TWIN
TORCH_LIBRARY_IMPL(pangu_fastkd, PrivateUse1, m) {
  m.impl("sparse_kd_fused", &sparse_kd_fused_npu);
}
#endif

}  // namespace pangu_fastkd::ascend
