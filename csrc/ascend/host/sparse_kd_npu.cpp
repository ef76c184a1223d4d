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
// Everything but the launch in step 2 is device-agnostic ATen code, which is why the CPU twin
// build runs this file unchanged on CPU tensors. The argument and row checks, the target
// conversion and the output assembly are the CPU op's (csrc/common/sparse_kd_args.h,
// sparse_kd_rows.h): the same messages, one device-to-host copy for the row checks.
#include <torch/extension.h>

#include <algorithm>
#include <optional>
#include <stdexcept>

#include "aclrtlaunch_sparse_kd_epilogue_bf16.h"
#include "aclrtlaunch_sparse_kd_epilogue_fp16.h"
#include "aclrtlaunch_sparse_kd_epilogue_fp32.h"
#include "ascend/sparse_kd_tiling_host.h"
#include "common/sparse_kd_args.h"
#include "common/sparse_kd_chunks.h"
#include "common/sparse_kd_rows.h"
#include "npu_launch.h"

namespace pangu_fastkd::ascend {
namespace {

using sparse_kd::kStatColumns;

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
// Where the inputs may live

// Every input on hidden's device (checked first, so a stray tensor is named with both devices),
// which is on the kernel device.
void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "sparse_kd: ", name, " is on ", t.device(),
                    " but hidden is on ", device, "; every input must be on one device");
  TORCH_CHECK_VALUE(t.device().type() == kKernelDevice, "sparse_kd: ", name, " must be on the ",
                    c10::DeviceTypeName(kKernelDevice, /*lower_case=*/true),
                    " device for the Ascend C kernel, got ", t.device());
}

// The epilogue's problem for the checked options, before any data is touched.
SparseKdProblem problem_of(const sparse_kd::LossOptions& o) {
  TORCH_CHECK_VALUE(o.V <= int64_t(UINT32_MAX) && o.K <= int64_t(UINT32_MAX),
                    "sparse_kd: V and K must fit in 32 bits for the Ascend C epilogue");
  const bool sampled = o.kind == sparse_kd::kSampled;
  SparseKdProblem problem;
  problem.vocab = static_cast<uint32_t>(o.V);
  problem.supportK = static_cast<uint32_t>(o.K);
  problem.elemBytes = static_cast<uint32_t>(c10::elementSize(o.dtype));
  // bf16 and fp16 are both 2 bytes: the dtype code picks the kernel instantiation.
  problem.dtype = o.dtype == at::kFloat  ? kSparseKdFloat32
                  : o.dtype == at::kHalf ? kSparseKdFloat16
                                         : kSparseKdBFloat16;
  problem.kdWeight = static_cast<float>(o.kd_weight);
  problem.temperature = static_cast<float>(o.temperature);
  problem.cacheTemperature = static_cast<float>(o.cache_temperature);
  // The kernel sees supervised rows only, and their labels lie in [0, V): -1 matches none.
  problem.ignoreIndex = -1;
  problem.targetKind = sampled ? kSparseKdSampled : kSparseKdTopK;
  problem.divergence = static_cast<uint32_t>(o.divergence);
  problem.missingMass = static_cast<uint32_t>(o.missing_mass);
  problem.includeLabel = o.include_label;
  problem.beta = static_cast<float>(o.beta);
  problem.useSoftcap = o.softcap > 0;
  problem.softcap = static_cast<float>(o.softcap);
  problem.zLoss = static_cast<float>(o.z_loss);
  return problem;
}

// ---------------------------------------------------------------------------------------------
// The chunk loop: device-agnostic ATen code around launch_epilogue.

// Rows [c0, c0 + n) of a [rows, ...] tensor, or an undefined tensor for an absent input.
at::Tensor rows_of(const at::Tensor& t, int64_t c0, int64_t n) {
  return t.defined() ? t.narrow(0, c0, n) : t;
}

}  // namespace

// The op on kernel-device tensors: the shared prologue, the chunk loop, the shared epilogue.
sparse_kd::Outputs sparse_kd_fused_npu(const sparse_kd::Call& call) {
  const at::Device device = call.hidden.device();
  const sparse_kd::LossOptions o = sparse_kd::check_arguments(
      call, [&device](const at::Tensor& t, const char* name) { check_device(t, name, device); });
  TORCH_CHECK_TYPE(o.dtype == at::kFloat || o.dtype == at::kBFloat16 || o.dtype == at::kHalf,
                   "sparse_kd: the Ascend C epilogue takes float32, bfloat16 or float16 hidden "
                   "states, got ", o.dtype);
  // From here on hidden's device is the current one: the launches take the current device's
  // stream, and tensors on npu:1 launched while npu:0 is current would run on npu:0's stream.
  // Every input was checked to be on that device before anything reads it.
  const c10_npu::NPUGuard device_guard(device);
  const sparse_kd::Target target = sparse_kd::convert_target(call, o);
  SparseKdProblem problem = problem_of(o);
  make_tiling(problem, 1);  // option errors now, before the row checks and the GEMMs
  const sparse_kd::SupervisedRows sup = sparse_kd::check_rows(call, o, target);
  const int64_t d = o.d, V = o.V, n_sup = sup.count;
  problem.scale = static_cast<float>(o.loss_scale(n_sup));

  // Supervised rows only, as on CPU.
  const at::TensorOptions f32 = call.hidden.options().dtype(at::kFloat);
  const at::Tensor H = call.hidden.contiguous(), W = call.weight.contiguous();
  const at::Tensor H_sup = sup.pick(H);
  const at::Tensor labels_sup = sup.pick(sup.labels).to(at::kInt);
  const at::Tensor ids_sup = target.defined() ? sup.pick(target.ids).to(at::kInt) : at::Tensor();
  const at::Tensor values_sup = sup.pick(target.values);
  const at::Tensor lse_sup = sup.pick(target.teacher_lse);
  const at::Tensor label_logit_sup = sup.pick(target.label_logit);
  const at::Tensor loss_rows = at::empty({n_sup}, f32);
  const at::Tensor stats_sup = at::empty({n_sup, kStatColumns}, f32);
  at::Tensor grad_h_sup;
  if (call.need_grad_input) grad_h_sup = at::empty({n_sup, d}, H.options());

  const bool half = o.dtype != at::kFloat;
  const int64_t chunk = chunk_rows_for(V, d, H.element_size(), half && call.need_grad_weight,
                                       call.chunk_rows, n_sup);
  const int64_t n_chunks = (n_sup + chunk - 1) / chunk;
  const at::Tensor buffer = at::empty({n_sup > 0 ? chunk : 0, V}, H.options());
  std::optional<GradWeightAccumulator> grad_w;
  if (call.need_grad_weight) grad_w.emplace(W, call.bias.has_value(), n_chunks);
  const at::Tensor Wt = W.t();
  std::optional<SparseKdTiling> full_tiling;
  if (n_chunks > 0) full_tiling = make_tiling(problem, static_cast<uint32_t>(chunk));
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t c0 = ci * chunk, cn = std::min(chunk, n_sup - c0);
    const at::Tensor Hc = H_sup.narrow(0, c0, cn);
    at::Tensor buf = buffer.narrow(0, 0, cn);
    if (call.bias.has_value()) {
      at::addmm_out(buf, *call.bias, Hc, Wt);
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
    if (call.need_grad_input) {
      at::Tensor gh = grad_h_sup.narrow(0, c0, cn);
      at::mm_out(gh, buf, W);
    }
    if (grad_w) grad_w->add_chunk(ci, buf, Hc);
  }
  const at::Tensor loss = loss_rows.sum().mul(double(problem.scale));
  return sparse_kd::assemble_outputs(call, o, sup, loss, grad_h_sup, stats_sup, grad_w);
}

// The twin build registers nothing: its tensors are CPU tensors, which the dispatcher sends to
// the CPU kernel of _C (a CPU registration here would clash with it), and a PrivateUse1
// registration in a process without torch_npu would make npu_kernel_available() claim an NPU
// kernel that cannot run, changing the route pangu_fastkd picks for "npu" tensors (which
// tests/test_npu_path.py fakes). The twin module binds op_entry<sparse_kd_fused_npu> directly.
#ifndef PANGU_FASTKD_ASCEND_TWIN
TORCH_LIBRARY_IMPL(pangu_fastkd, PrivateUse1, m) {
  m.impl("sparse_kd_fused", &sparse_kd::op_entry<sparse_kd_fused_npu>);
}
#endif

}  // namespace pangu_fastkd::ascend
