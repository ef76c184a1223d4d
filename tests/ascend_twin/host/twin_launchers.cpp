// The twin's stand-in for the launchers ascendc_library generates: each aclrtlaunch_<kernel>
// runs the kernel entry point (compiled from csrc/ascend/*.cpp against the CPU twin of
// kernel_operator.h) through twin::Launch on the chip PANGU_FASTKD_SOC_VERSION names, so the
// host code (csrc/ascend/host/*.cpp) launches exactly as in the real build.
//
// This file is the only place where the twin's kernel_operator.h and the host code meet, and it
// includes no torch header: the twin defines __global__, __aicore__ and GM_ADDR as macros, which
// have no business in a translation unit that also parses ATen.
//
// Before running a kernel, a launcher checks what the real runtime would get wrong silently
// (twin_npu_runtime.h): a stream handle the twin did not hand out, a stream taken while ATen work
// was still queued (the kernel would overtake the ops that produce its inputs), and the stream of
// a device other than the tensors' one (a missing device guard).
//
// To add a kernel: a header aclrtlaunch_<kernel>.h next to this file (copy one), the kernel's
// declaration below, and a four-line launcher calling RunOnTwin.
#include "kernel_operator.h"

#include <stdexcept>
#include <string>
#include <string_view>

#include "twin_npu_runtime.h"

#include "aclrtlaunch_packed_attention_bwd_dkv_bf16.h"
#include "aclrtlaunch_packed_attention_bwd_dkv_fp16.h"
#include "aclrtlaunch_packed_attention_bwd_dkv_fp32.h"
#include "aclrtlaunch_packed_attention_bwd_dq_bf16.h"
#include "aclrtlaunch_packed_attention_bwd_dq_fp16.h"
#include "aclrtlaunch_packed_attention_bwd_dq_fp32.h"
#include "aclrtlaunch_packed_attention_fwd_bf16.h"
#include "aclrtlaunch_packed_attention_fwd_fp16.h"
#include "aclrtlaunch_packed_attention_fwd_fp32.h"
#include "aclrtlaunch_sparse_kd_epilogue_bf16.h"
#include "aclrtlaunch_sparse_kd_epilogue_fp16.h"
#include "aclrtlaunch_sparse_kd_epilogue_fp32.h"

#ifndef PANGU_FASTKD_SOC_VERSION
#error "PANGU_FASTKD_SOC_VERSION (e.g. \"Ascend910B1\") picks the chip the twin emulates"
#endif

// Kernel entry points (csrc/ascend/sparse_kd_epilogue.cpp).
extern "C" void sparse_kd_epilogue_fp32(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                        GM_ADDR teacherValues, GM_ADDR teacherLse,
                                        GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                                        GM_ADDR tiling);
extern "C" void sparse_kd_epilogue_bf16(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                        GM_ADDR teacherValues, GM_ADDR teacherLse,
                                        GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                                        GM_ADDR tiling);
extern "C" void sparse_kd_epilogue_fp16(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                        GM_ADDR teacherValues, GM_ADDR teacherLse,
                                        GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                                        GM_ADDR tiling);

// Kernel entry points (csrc/ascend/packed_attention_fwd.cpp).
extern "C" void packed_attention_fwd_fp32(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens,
                                          GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                          GM_ADDR tiling);
extern "C" void packed_attention_fwd_bf16(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens,
                                          GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                          GM_ADDR tiling);
extern "C" void packed_attention_fwd_fp16(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens,
                                          GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                          GM_ADDR tiling);

// Kernel entry points (csrc/ascend/packed_attention_bwd.cpp): the dQ and the dK/dV pass.
extern "C" void packed_attention_bwd_dq_fp32(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                             GM_ADDR out, GM_ADDR lse, GM_ADDR cuSeqlens,
                                             GM_ADDR gradQ, GM_ADDR workspace, GM_ADDR tiling);
extern "C" void packed_attention_bwd_dkv_fp32(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                              GM_ADDR lse, GM_ADDR cuSeqlens, GM_ADDR gradK,
                                              GM_ADDR gradV, GM_ADDR workspace, GM_ADDR tiling);
extern "C" void packed_attention_bwd_dq_bf16(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                             GM_ADDR out, GM_ADDR lse, GM_ADDR cuSeqlens,
                                             GM_ADDR gradQ, GM_ADDR workspace, GM_ADDR tiling);
extern "C" void packed_attention_bwd_dkv_bf16(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                              GM_ADDR lse, GM_ADDR cuSeqlens, GM_ADDR gradK,
                                              GM_ADDR gradV, GM_ADDR workspace, GM_ADDR tiling);
extern "C" void packed_attention_bwd_dq_fp16(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                             GM_ADDR out, GM_ADDR lse, GM_ADDR cuSeqlens,
                                             GM_ADDR gradQ, GM_ADDR workspace, GM_ADDR tiling);
extern "C" void packed_attention_bwd_dkv_fp16(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                              GM_ADDR lse, GM_ADDR cuSeqlens, GM_ADDR gradK,
                                              GM_ADDR gradV, GM_ADDR workspace, GM_ADDR tiling);

namespace {

constexpr std::string_view kSoc = PANGU_FASTKD_SOC_VERSION;
constexpr bool kIs910B = kSoc.substr(0, 10) == "Ascend910B";
constexpr bool kIs310B = kSoc.substr(0, 10) == "Ascend310B";
static_assert(kIs910B || kIs310B,
              "PANGU_FASTKD_SOC_VERSION must name an Ascend910B* or Ascend310B* chip");
// The same chip the host's tiling budget comes from (npu_launch.h reads the same definition).
constexpr twin::Chip kChip = kIs910B ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;

// Runs kernel(args...) on blockDim twin blocks and returns 0, as a successful launch does. The
// real launch is asynchronous; this one returns when every block is done, and rethrows what a
// block threw (a twin::HardwareRuleViolation names the broken rule), so a test sees the failure
// at the launch that caused it.
// How cmake/ascend.cmake builds each kernel library, as the generated wrapper then launches it:
// sparse-KD is a vector-only kernel; the attention kernels are MIX (cube + vector) kernels in a
// library compiled with HAVE_WORKSPACE HAVE_TILING, whose wrapper sets the system workspace and
// hands the kernel the user part of the workspace argument.
// Both launch on the part PANGU_FASTKD_SOC_VERSION names (its core counts).
constexpr twin::LaunchOptions kVectorKernel{.type = twin::KernelType::AivOnly,
                                            .wrapper_user_workspace = false,
                                            .soc = kSoc};
constexpr twin::LaunchOptions kMatmulKernel{.type = twin::KernelType::Mix,
                                            .have_workspace_and_tiling = true,
                                            .wrapper_user_workspace = true,
                                            .soc = kSoc};

template <class... Params, class... Args>
uint32_t RunOnTwin(void (*kernel)(Params...), const char* name, twin::LaunchOptions options,
                   uint32_t blockDim, aclrtStream stream, Args... args) {
  static_assert(sizeof...(Params) == sizeof...(Args),
                "a launcher must pass every kernel argument");
  if (stream == nullptr) {
    throw std::invalid_argument(std::string(name) + ": launched on a null stream");
  }
  const twin_npu::Stream* s = twin_npu::stream_of(stream);
  if (s == nullptr) {
    throw std::invalid_argument(std::string(name) +
                                ": launched on a stream handle that c10_npu::getCurrentNPUStream() "
                                "did not hand out");
  }
  // The device first: a launch on another device's stream is wrong however the stream was taken,
  // and a test can then tell the two mistakes apart in a build that has both.
  if (s->device != twin_npu::kTensorDevice) {
    throw std::runtime_error(std::string(name) + ": launch on the stream of device " +
                             std::to_string(s->device) +
                             ", but the kernel's tensors are on device " +
                             std::to_string(twin_npu::kTensorDevice) +
                             ": hold a c10_npu::NPUGuard for the inputs' device before taking the "
                             "stream");
  }
  const uint64_t queued = twin_npu::this_thread().queued_aten_ops;
  if (queued != 0) {
    throw std::runtime_error(std::string(name) +
                             ": launch on a stream whose torch_npu task queue was not flushed (" +
                             std::to_string(queued) +
                             " ATen ops ran since the last flush): take the stream with "
                             "stream(true) right before the launch");
  }
  twin::Launch(blockDim, kChip, options, kernel, static_cast<Params>(args)...);
  return 0;
}

}  // namespace

extern "C" uint32_t aclrtlaunch_sparse_kd_epilogue_fp32(uint32_t blockDim, aclrtStream stream,
                                                      void* logits, void* labels, void* ids,
                                                      void* teacherValues, void* teacherLse,
                                                      void* labelLogit, void* loss, void* stats,
                                                      void* tiling) {
  return RunOnTwin(sparse_kd_epilogue_fp32, "sparse_kd_epilogue_fp32", kVectorKernel, blockDim,
                   stream, logits, labels, ids, teacherValues, teacherLse, labelLogit, loss, stats,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_sparse_kd_epilogue_bf16(uint32_t blockDim, aclrtStream stream,
                                                      void* logits, void* labels, void* ids,
                                                      void* teacherValues, void* teacherLse,
                                                      void* labelLogit, void* loss, void* stats,
                                                      void* tiling) {
  return RunOnTwin(sparse_kd_epilogue_bf16, "sparse_kd_epilogue_bf16", kVectorKernel, blockDim,
                   stream, logits, labels, ids, teacherValues, teacherLse, labelLogit, loss, stats,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_fwd_fp32(uint32_t blockDim, aclrtStream stream,
                                                       void* q, void* k, void* v, void* cuSeqlens,
                                                       void* out, void* lse, void* workspace,
                                                       void* tiling) {
  return RunOnTwin(packed_attention_fwd_fp32, "packed_attention_fwd_fp32", kMatmulKernel, blockDim,
                   stream, q, k, v, cuSeqlens, out, lse, workspace, tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_fwd_bf16(uint32_t blockDim, aclrtStream stream,
                                                       void* q, void* k, void* v, void* cuSeqlens,
                                                       void* out, void* lse, void* workspace,
                                                       void* tiling) {
  return RunOnTwin(packed_attention_fwd_bf16, "packed_attention_fwd_bf16", kMatmulKernel, blockDim,
                   stream, q, k, v, cuSeqlens, out, lse, workspace, tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_fwd_fp16(uint32_t blockDim, aclrtStream stream,
                                                          void* q, void* k, void* v,
                                                          void* cuSeqlens, void* out, void* lse,
                                                          void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_fwd_fp16, "packed_attention_fwd_fp16", kMatmulKernel, blockDim,
                   stream, q, k, v, cuSeqlens, out, lse, workspace, tiling);
}

extern "C" uint32_t aclrtlaunch_sparse_kd_epilogue_fp16(uint32_t blockDim, aclrtStream stream,
                                                        void* logits, void* labels, void* ids,
                                                        void* teacherValues, void* teacherLse,
                                                        void* labelLogit, void* loss, void* stats,
                                                        void* tiling) {
  return RunOnTwin(sparse_kd_epilogue_fp16, "sparse_kd_epilogue_fp16", kVectorKernel, blockDim,
                   stream, logits, labels, ids, teacherValues, teacherLse, labelLogit, loss, stats,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dq_fp32(uint32_t blockDim, aclrtStream stream,
                                                             void* gradOut, void* q, void* k,
                                                             void* v, void* out, void* lse,
                                                             void* cuSeqlens, void* gradQ,
                                                             void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_bwd_dq_fp32, "packed_attention_bwd_dq_fp32", kMatmulKernel,
                   blockDim, stream, gradOut, q, k, v, out, lse, cuSeqlens, gradQ, workspace,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dkv_fp32(uint32_t blockDim, aclrtStream stream,
                                                              void* gradOut, void* q, void* k,
                                                              void* v, void* lse, void* cuSeqlens,
                                                              void* gradK, void* gradV,
                                                              void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_bwd_dkv_fp32, "packed_attention_bwd_dkv_fp32", kMatmulKernel,
                   blockDim, stream, gradOut, q, k, v, lse, cuSeqlens, gradK, gradV, workspace,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dq_bf16(uint32_t blockDim, aclrtStream stream,
                                                             void* gradOut, void* q, void* k,
                                                             void* v, void* out, void* lse,
                                                             void* cuSeqlens, void* gradQ,
                                                             void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_bwd_dq_bf16, "packed_attention_bwd_dq_bf16", kMatmulKernel,
                   blockDim, stream, gradOut, q, k, v, out, lse, cuSeqlens, gradQ, workspace,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dkv_bf16(uint32_t blockDim, aclrtStream stream,
                                                              void* gradOut, void* q, void* k,
                                                              void* v, void* lse, void* cuSeqlens,
                                                              void* gradK, void* gradV,
                                                              void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_bwd_dkv_bf16, "packed_attention_bwd_dkv_bf16", kMatmulKernel,
                   blockDim, stream, gradOut, q, k, v, lse, cuSeqlens, gradK, gradV, workspace,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dq_fp16(uint32_t blockDim, aclrtStream stream,
                                                             void* gradOut, void* q, void* k,
                                                             void* v, void* out, void* lse,
                                                             void* cuSeqlens, void* gradQ,
                                                             void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_bwd_dq_fp16, "packed_attention_bwd_dq_fp16", kMatmulKernel,
                   blockDim, stream, gradOut, q, k, v, out, lse, cuSeqlens, gradQ, workspace,
                   tiling);
}

extern "C" uint32_t aclrtlaunch_packed_attention_bwd_dkv_fp16(uint32_t blockDim, aclrtStream stream,
                                                              void* gradOut, void* q, void* k,
                                                              void* v, void* lse, void* cuSeqlens,
                                                              void* gradK, void* gradV,
                                                              void* workspace, void* tiling) {
  return RunOnTwin(packed_attention_bwd_dkv_fp16, "packed_attention_bwd_dkv_fp16", kMatmulKernel,
                   blockDim, stream, gradOut, q, k, v, lse, cuSeqlens, gradK, gradV, workspace,
                   tiling);
}
