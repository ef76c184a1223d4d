// Packed causal attention on the NPU: torch.ops.pangu_fastkd.packed_attention_fwd for
// PrivateUse1 tensors, through the Ascend C kernel csrc/ascend/packed_attention_fwd.h. Semantics,
// outputs and error messages for bad input are those of the CPU kernel
// (csrc/cpu/packed_attention.cpp); the kernel covers causal attention without a window only, and
// anything else is refused with an error naming the option (pangu_fastkd/ops/packed_attention.py
// routes such calls elsewhere before they get here).
//
// One call:
//   1. shapes, dtypes and devices checked as on CPU (no data read);
//   2. cu_seqlens to the host in one small device-to-host copy: the tiling needs the document
//      lengths (tile size, work items), and its values are validated there;
//   3. MakePackedAttentionTiling on the platform of the chip the module was built for;
//   4. the tiling struct (with its two TCubeTilings) and a workspace of
//      PackedAttentionWorkspaceBytes bytes in device memory, then one launch of
//      packed_attention_fwd_{fp32,bf16,fp16} on the current stream, with the device copy of
//      cu_seqlens.
// Only step 4 talks to the NPU runtime; steps 1-2 and the platform, budget and problem of step 3
// are shared with the backward (torch.ops.pangu_fastkd.packed_attention_bwd, the kernels of
// csrc/ascend/packed_attention_bwd.h), whose call differs only in its tiling
// (MakePackedAttentionBwdTiling) and its two launches: packed_attention_bwd_dq_<dtype>, which
// writes grad_q and the row sums delta into the workspace, then packed_attention_bwd_dkv_<dtype>
// on the same stream with the same workspace and tiling, which reads delta and writes grad_k and
// grad_v. The stream orders the two: the second launch starts after the first has finished.
#include <torch/extension.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <tuple>

#include "aclrtlaunch_packed_attention_bwd_dkv_bf16.h"
#include "aclrtlaunch_packed_attention_bwd_dkv_fp16.h"
#include "aclrtlaunch_packed_attention_bwd_dkv_fp32.h"
#include "aclrtlaunch_packed_attention_bwd_dq_bf16.h"
#include "aclrtlaunch_packed_attention_bwd_dq_fp16.h"
#include "aclrtlaunch_packed_attention_bwd_dq_fp32.h"
#include "aclrtlaunch_packed_attention_fwd_bf16.h"
#include "aclrtlaunch_packed_attention_fwd_fp16.h"
#include "aclrtlaunch_packed_attention_fwd_fp32.h"
#include "ascend/packed_attention_bwd_tiling_host.h"
#include "ascend/packed_attention_tiling_host.h"
#include "npu_launch.h"

namespace pangu_fastkd::ascend {
namespace {

// ---------------------------------------------------------------------------------------------
// Inputs: what the forward and backward kernels both read

struct AttentionInputs {
  at::Tensor q, k, v;     // contiguous, on the kernel device, fp32, bf16 or fp16
  at::Tensor cu_host;     // [B + 1] int32 on the CPU, validated: what the tiling reads
  at::Tensor cu_device;   // the same values on the kernel device: what the kernel reads
  int64_t T, Hq, Hkv, D;  // tokens, query heads, kv heads, head dim
};

// Every input on q's device (checked first, so a stray tensor is named with both devices), which
// is on the kernel device.
void check_device(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, "packed_attention: ", name, " is on ", t.device(),
                    " but q is on ", device, "; every input must be on one device");
  TORCH_CHECK_VALUE(t.device().type() == kKernelDevice, "packed_attention: ", name,
                    " must be on the ", c10::DeviceTypeName(kKernelDevice, /*lower_case=*/true),
                    " device for the Ascend C kernel, got ", t.device());
}

// q's device checked, for the device guard each op holds before it allocates or launches: the
// launches take the current device's stream, and tensors on npu:1 launched while npu:0 is
// current would run on npu:0's stream. The other inputs are checked against it afterwards.
at::Device guarded_device(const at::Tensor& q) {
  check_device(q, "q", q.device());
  return q.device();
}

// The CPU kernel's checks (check_inputs in csrc/cpu/packed_attention.cpp), in its order and with
// its messages, plus what only the Ascend C kernels lack: dtypes other than fp32/bf16/fp16,
// causal=False
// and a window. cu_seqlens may come on the kernel device (the usual case) or on the CPU.
AttentionInputs check_attention_inputs(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& cu, bool causal,
                                       int64_t window) {
  const at::Device device = q.device();
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 3, "packed_attention: ", name, " must be [T, H, D], got shape ",
                      t->sizes());
    check_device(*t, name, device);
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "packed_attention: ", name,
                     " must be a floating tensor, got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "packed_attention: q, k and v must share a dtype");
  TORCH_CHECK_TYPE(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 ||
                       q.scalar_type() == at::kHalf,
                   "packed_attention: the Ascend C kernel takes float32, bfloat16 or float16 q, k "
                   "and v, got ", q.scalar_type());
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(),
                    "packed_attention: k and v must have the same shape, got ", k.sizes(), " and ",
                    v.sizes());
  const int64_t T = q.size(0), Hq = q.size(1), Hkv = k.size(1), D = q.size(2);
  TORCH_CHECK_VALUE(k.size(0) == T, "packed_attention: k and v must have T = ", T,
                    " tokens like q");
  TORCH_CHECK_VALUE(k.size(2) == D, "packed_attention: q and k must have the same head dim, got ",
                    D, " and ", k.size(2));
  TORCH_CHECK_VALUE(Hq > 0 && Hkv > 0 && Hq % Hkv == 0,
                    "packed_attention: the number of query heads (", Hq,
                    ") must be a positive multiple of kv heads (", Hkv, ")");
  TORCH_CHECK_VALUE(D > 0, "packed_attention: the head dim must be >= 1, got ", D);
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "packed_attention: cu_seqlens must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2,
                    "packed_attention: cu_seqlens must be [B + 1] with B >= 1");
  TORCH_CHECK_VALUE(cu.device() == device || cu.device().is_cpu(),
                    "packed_attention: cu_seqlens must be on q's device (", device,
                    ") or the CPU, got ", cu.device());
  TORCH_CHECK_VALUE(window < 0 || causal,
                    "packed_attention: window (a left window size) needs causal=True");
  // Refused before anything is copied: the router sends these calls elsewhere.
  TORCH_CHECK_NOT_IMPLEMENTED(causal,
                              "packed_attention: the Ascend C kernel supports causal=True only, "
                              "got causal=False (use npu_fusion_attention or the reference)");
  TORCH_CHECK_NOT_IMPLEMENTED(window < 0,
                              "packed_attention: the Ascend C kernel does not support a sliding "
                              "window, got window=", window, " (use the reference)");

  AttentionInputs in;
  in.T = T;
  in.Hq = Hq;
  in.Hkv = Hkv;
  in.D = D;
  // The one device-to-host copy of the call (B + 1 int32, synchronous): the host tiling needs
  // the document lengths. The kernel reads the device copy.
  in.cu_host = cu.to(at::kCPU).contiguous();
  in.cu_device = cu.device() == device ? cu.contiguous() : in.cu_host.to(device);
  const int32_t* b = in.cu_host.data_ptr<int32_t>();
  const int64_t n = in.cu_host.size(0);
  TORCH_CHECK_VALUE(b[0] == 0, "packed_attention: cu_seqlens must start at 0, got ", b[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(b[i] >= b[i - 1],
                      "packed_attention: cu_seqlens must be non-decreasing (index ", i, ")");
  }
  TORCH_CHECK_VALUE(b[n - 1] == T, "packed_attention: cu_seqlens must end at T = ", T, ", got ",
                    b[n - 1]);
  in.q = q.contiguous();
  in.k = k.contiguous();
  in.v = v.contiguous();
  return in;
}

// ---------------------------------------------------------------------------------------------
// Tiling

// The UB budget of the chip the module was built for and the vector cores of its part (the
// tilings also cap the blocks at the part's cube cores, soc_platform().GetCoreNumAic()).
PackedAttentionChipBudget attention_budget() {
  PackedAttentionChipBudget budget = soc_family() == SocFamily::kAscend910B
                                         ? kPackedAttentionAscend910B
                                         : kPackedAttentionAscend310B;
  budget.coreNum = soc_platform().GetCoreNumAiv();
  return budget;
}

// The kernel's problem for validated inputs; cuSeqlens points into in.cu_host, which must outlive
// the tiling call.
PackedAttentionProblem attention_problem(const AttentionInputs& in, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0,
                    "packed_attention: softmax_scale must be finite and > 0, got ", scale);
  PackedAttentionProblem p{};
  p.tokens = static_cast<uint32_t>(in.T);  // < 2^31: cu_seqlens (int32) ends at T
  p.docs = static_cast<uint32_t>(in.cu_host.size(0) - 1);
  TORCH_CHECK_VALUE(in.Hq <= int64_t(UINT32_MAX) && in.D <= int64_t(UINT32_MAX),
                    "packed_attention: Hq and D must fit in 32 bits for the Ascend C kernel");
  p.qHeads = static_cast<uint32_t>(in.Hq);
  p.kvHeads = static_cast<uint32_t>(in.Hkv);
  p.headDim = static_cast<uint32_t>(in.D);
  p.elemBytes = static_cast<uint32_t>(in.q.element_size());
  // bf16 and fp16 are both 2 bytes: the dtype code picks the cube's operand type and the kernel.
  const at::ScalarType dtype = in.q.scalar_type();
  p.dtype = dtype == at::kFloat  ? kPackedAttentionFloat32
            : dtype == at::kHalf ? kPackedAttentionFloat16
                                 : kPackedAttentionBFloat16;
  p.scale = static_cast<float>(scale);
  p.cuSeqlens = in.cu_host.data_ptr<int32_t>();
  return p;
}

// The forward's tiling; its std::invalid_argument (naming the field) becomes a ValueError.
PackedAttentionTiling attention_tiling(const AttentionInputs& in, double scale) {
  try {
    return MakePackedAttentionTiling(attention_problem(in, scale), attention_budget(),
                                     soc_platform());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "packed_attention: the Ascend C kernel cannot take this problem: ",
                      e.what());
  }
  return {};  // not reached
}

// ---------------------------------------------------------------------------------------------
// Launch: the only code that talks to the NPU runtime directly.

void launch_fwd(const AttentionInputs& in, const PackedAttentionTiling& tiling,
                const at::Tensor& out, const at::Tensor& lse) {
  const at::Device device = in.q.device();
  const at::Tensor tiling_gm = tiling_on_device(tiling, device);
  const at::Tensor workspace = workspace_on_device(PackedAttentionWorkspaceBytes(tiling), device);
  void* args[] = {gm_addr(in.q), gm_addr(in.k), gm_addr(in.v),         gm_addr(in.cu_device),
                  gm_addr(out),  gm_addr(lse), gm_addr(workspace), gm_addr(tiling_gm)};
  // The stream is taken in the launch (PANGU_FASTKD_LAUNCH_KERNEL), after the tiling copy and
  // the cu_seqlens / input conversions it reads have been queued.
  if (tiling.dtype == kPackedAttentionFloat32) {
    PANGU_FASTKD_LAUNCH_KERNEL(packed_attention_fwd_fp32, tiling.blockDim, args[0], args[1],
                               args[2], args[3], args[4], args[5], args[6], args[7]);
  } else if (tiling.dtype == kPackedAttentionFloat16) {
    PANGU_FASTKD_LAUNCH_KERNEL(packed_attention_fwd_fp16, tiling.blockDim, args[0], args[1],
                               args[2], args[3], args[4], args[5], args[6], args[7]);
  } else {
    PANGU_FASTKD_LAUNCH_KERNEL(packed_attention_fwd_bf16, tiling.blockDim, args[0], args[1],
                               args[2], args[3], args[4], args[5], args[6], args[7]);
  }
}

// The backward's tiling for the same problem; errors as for the forward.
PackedAttentionBwdTiling attention_bwd_tiling(const AttentionInputs& in, double scale) {
  try {
    return MakePackedAttentionBwdTiling(attention_problem(in, scale), attention_budget(),
                                        soc_platform());
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, "packed_attention: the Ascend C kernel cannot take this problem: ",
                      e.what());
  }
  return {};  // not reached
}

// What the backward reads besides q, k, v and cu_seqlens: grad_out and out in the input dtype and
// lse in f32, contiguous on the kernel device.
struct BackwardInputs {
  at::Tensor grad_out, out, lse;
};

// The CPU kernel's checks of grad_out, out and lse (packed_attention_bwd_cpu), with its messages,
// and its conversions: grad_out and out to q's dtype, lse to f32.
BackwardInputs check_backward_inputs(const AttentionInputs& in, const at::Tensor& grad_out,
                                     const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad_out.sizes() == in.q.sizes() && out.sizes() == in.q.sizes(),
                    "packed_attention: grad_out and out must have q's shape");
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef({in.Hq, in.T}),
                    "packed_attention: lse must be [Hq, T]");
  const at::Device device = in.q.device();
  check_device(grad_out, "grad_out", device);
  check_device(out, "out", device);
  check_device(lse, "lse", device);
  const at::ScalarType dtype = in.q.scalar_type();
  return {grad_out.to(dtype).contiguous(), out.to(dtype).contiguous(),
          lse.to(at::kFloat).contiguous()};
}

// The two launches of the backward, in order on the current stream, with one tiling copy and one
// workspace: the dK/dV pass reads the delta the dQ pass left in the workspace.
void launch_bwd(const AttentionInputs& in, const BackwardInputs& b,
                const PackedAttentionBwdTiling& tiling, const at::Tensor& grad_q,
                const at::Tensor& grad_k, const at::Tensor& grad_v) {
  const at::Device device = in.q.device();
  const at::Tensor tiling_gm = tiling_on_device(tiling, device);
  const at::Tensor workspace =
      workspace_on_device(PackedAttentionBwdWorkspaceBytes(tiling), device);
  void* dq[] = {gm_addr(b.grad_out),     gm_addr(in.q),   gm_addr(in.k),
                gm_addr(in.v),           gm_addr(b.out),  gm_addr(b.lse),
                gm_addr(in.cu_device),   gm_addr(grad_q), gm_addr(workspace),
                gm_addr(tiling_gm)};
  void* dkv[] = {gm_addr(b.grad_out),   gm_addr(in.q),     gm_addr(in.k),
                 gm_addr(in.v),         gm_addr(b.lse),    gm_addr(in.cu_device),
                 gm_addr(grad_k),       gm_addr(grad_v),   gm_addr(workspace),
                 gm_addr(tiling_gm)};
  // One macro per pass keeps the three dtypes' launches identical but for the kernel name. Each
  // launch takes the stream itself (PANGU_FASTKD_LAUNCH_KERNEL); the second flush finds the
  // queue empty, and the stream orders the dK/dV pass after the dQ pass.
#define PANGU_FASTKD_LAUNCH_BWD(kernel, blocks, a)                                              \
  PANGU_FASTKD_LAUNCH_KERNEL(kernel, blocks, a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], \
                             a[9])
  if (tiling.dtype == kPackedAttentionFloat32) {
    PANGU_FASTKD_LAUNCH_BWD(packed_attention_bwd_dq_fp32, tiling.dqBlockDim, dq);
    PANGU_FASTKD_LAUNCH_BWD(packed_attention_bwd_dkv_fp32, tiling.dkvBlockDim, dkv);
  } else if (tiling.dtype == kPackedAttentionFloat16) {
    PANGU_FASTKD_LAUNCH_BWD(packed_attention_bwd_dq_fp16, tiling.dqBlockDim, dq);
    PANGU_FASTKD_LAUNCH_BWD(packed_attention_bwd_dkv_fp16, tiling.dkvBlockDim, dkv);
  } else {
    PANGU_FASTKD_LAUNCH_BWD(packed_attention_bwd_dq_bf16, tiling.dqBlockDim, dq);
    PANGU_FASTKD_LAUNCH_BWD(packed_attention_bwd_dkv_bf16, tiling.dkvBlockDim, dkv);
  }
#undef PANGU_FASTKD_LAUNCH_BWD
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The ops

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_npu(const at::Tensor& q,
                                                             const at::Tensor& k,
                                                             const at::Tensor& v,
                                                             const at::Tensor& cu_seqlens,
                                                             double scale, bool causal,
                                                             int64_t window) {
  const c10_npu::NPUGuard device_guard(guarded_device(q));
  const AttentionInputs in = check_attention_inputs(q, k, v, cu_seqlens, causal, window);
  const PackedAttentionTiling tiling = attention_tiling(in, scale);
  at::Tensor out = at::empty({in.T, in.Hq, in.D}, in.q.options());
  at::Tensor lse = at::empty({in.Hq, in.T}, in.q.options().dtype(at::kFloat));
  // No tokens, nothing to compute (and no GM buffer to point the kernel at).
  if (in.T > 0) launch_fwd(in, tiling, out, lse);
  return {out, lse};
}

std::tuple<int64_t, int64_t, int64_t, int64_t> packed_attention_fwd_plan_npu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    double scale) {
  const c10_npu::NPUGuard device_guard(guarded_device(q));  // cu_seqlens may go to q's device
  const AttentionInputs in = check_attention_inputs(q, k, v, cu_seqlens, true, -1);
  const PackedAttentionTiling tiling = attention_tiling(in, scale);
  return {tiling.tile, tiling.blockDim, tiling.workItems,
          int64_t(PackedAttentionWorkspaceBytes(tiling))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_npu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, double scale,
    bool causal, int64_t window) {
  const c10_npu::NPUGuard device_guard(guarded_device(q));
  const AttentionInputs in = check_attention_inputs(q, k, v, cu_seqlens, causal, window);
  const BackwardInputs b = check_backward_inputs(in, grad_out, out, lse);
  const PackedAttentionBwdTiling tiling = attention_bwd_tiling(in, scale);
  // Every element is written by the kernels (each token belongs to one document).
  at::Tensor grad_q = at::empty({in.T, in.Hq, in.D}, in.q.options());
  at::Tensor grad_k = at::empty({in.T, in.Hkv, in.D}, in.q.options());
  at::Tensor grad_v = at::empty({in.T, in.Hkv, in.D}, in.q.options());
  if (in.T > 0) launch_bwd(in, b, tiling, grad_q, grad_k, grad_v);
  return {grad_q, grad_k, grad_v};
}

std::tuple<int64_t, int64_t, int64_t, int64_t> packed_attention_bwd_plan_npu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
    double scale) {
  const c10_npu::NPUGuard device_guard(guarded_device(q));  // cu_seqlens may go to q's device
  const AttentionInputs in = check_attention_inputs(q, k, v, cu_seqlens, true, -1);
  const PackedAttentionBwdTiling tiling = attention_bwd_tiling(in, scale);
  return {tiling.tile, tiling.dqBlockDim, tiling.dkvBlockDim,
          int64_t(PackedAttentionBwdWorkspaceBytes(tiling))};
}

// The twin build registers nothing (see sparse_kd_npu.cpp for why); its module.cpp binds
// packed_attention_fwd_npu and packed_attention_bwd_npu directly.
#ifndef PANGU_FASTKD_ASCEND_TWIN
TORCH_LIBRARY_IMPL(pangu_fastkd, PrivateUse1, m) {
  m.impl("packed_attention_fwd", &packed_attention_fwd_npu);
  m.impl("packed_attention_bwd", &packed_attention_bwd_npu);
}
#endif

}  // namespace pangu_fastkd::ascend
