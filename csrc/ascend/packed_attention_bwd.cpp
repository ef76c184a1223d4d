// Kernel entry points of the packed causal attention backward (packed_attention_bwd.h): the dQ
// pass and the dK/dV pass, one per input dtype each. ascendc_library (cmake/ascend.cmake)
// compiles this file for the NPU and generates the host launchers
// aclrtlaunch_packed_attention_bwd_{dq,dkv}_{fp32,bf16,fp16}; built against the CPU twin of the
// Ascend C API (tests/ascend_twin/include) the same source runs on CPU
// (tests/ascend_twin/host/twin_launchers.cpp launches it there).
//
// The tiling arrives as a GM address (kernel_entry.h says why), with its three TCubeTilings; it
// is copied to device memory once and both launches read it back. The two passes share one
// workspace: the dQ pass writes delta there, the dK/dV pass (launched after it on the same
// stream) reads it.
#include "kernel_operator.h"
#include "kernel_entry.h"
#include "packed_attention_bwd.h"

#include <type_traits>

namespace {

static_assert(std::is_trivially_copyable_v<PackedAttentionBwdTiling>,
              "the host memcpy's the tiling");

template <class TIn>
__aicore__ inline void RunPackedAttentionBwdDq(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                               GM_ADDR out, GM_ADDR lse, GM_ADDR cuSeqlens,
                                               GM_ADDR gradQ, GM_ADDR workspace,
                                               GM_ADDR tilingGm) {
  const PackedAttentionBwdTiling tiling =
      pangu_fastkd_ascend::LoadTiling<PackedAttentionBwdTiling>(tilingGm);
  pangu_fastkd_ascend::packed_attention_bwd_dq<TIn>(gradOut, q, k, v, out, lse, cuSeqlens, gradQ,
                                                     workspace, tiling);
}

template <class TIn>
__aicore__ inline void RunPackedAttentionBwdDkv(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                                GM_ADDR lse, GM_ADDR cuSeqlens, GM_ADDR gradK,
                                                GM_ADDR gradV, GM_ADDR workspace,
                                                GM_ADDR tilingGm) {
  const PackedAttentionBwdTiling tiling =
      pangu_fastkd_ascend::LoadTiling<PackedAttentionBwdTiling>(tilingGm);
  pangu_fastkd_ascend::packed_attention_bwd_dkv<TIn>(gradOut, q, k, v, lse, cuSeqlens, gradK,
                                                      gradV, workspace, tiling);
}

}  // namespace

// dQ pass: gradOut, q, out [T, Hq, D] and k, v [T, Hkv, D] in the input dtype, lse [Hq, T] f32
// (the forward's), cuSeqlens [B + 1] int32 (validated by the host) -> gradQ [T, Hq, D] in the
// input dtype and delta in the workspace (PackedAttentionBwdWorkspaceBytes(tiling) bytes).
// Launch with tiling.dqBlockDim blocks.
#define PANGU_FASTKD_BWD_DQ_ENTRY(name, type)                                                   \
  extern "C" __global__ __aicore__ void name(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,  \
                                             GM_ADDR out, GM_ADDR lse, GM_ADDR cuSeqlens,       \
                                             GM_ADDR gradQ, GM_ADDR workspace,                  \
                                             GM_ADDR tiling) {                                  \
    RunPackedAttentionBwdDq<type>(gradOut, q, k, v, out, lse, cuSeqlens, gradQ, workspace,      \
                                  tiling);                                                      \
  }

// dK/dV pass, after the dQ pass on the same workspace: -> gradK, gradV [T, Hkv, D] in the input
// dtype. Launch with tiling.dkvBlockDim blocks.
#define PANGU_FASTKD_BWD_DKV_ENTRY(name, type)                                                  \
  extern "C" __global__ __aicore__ void name(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v,  \
                                             GM_ADDR lse, GM_ADDR cuSeqlens, GM_ADDR gradK,     \
                                             GM_ADDR gradV, GM_ADDR workspace,                  \
                                             GM_ADDR tiling) {                                  \
    RunPackedAttentionBwdDkv<type>(gradOut, q, k, v, lse, cuSeqlens, gradK, gradV, workspace,   \
                                   tiling);                                                     \
  }

#if PANGU_FASTKD_ENTRY_FP32
PANGU_FASTKD_BWD_DQ_ENTRY(packed_attention_bwd_dq_fp32, float)
PANGU_FASTKD_BWD_DKV_ENTRY(packed_attention_bwd_dkv_fp32, float)
#endif
#if PANGU_FASTKD_ENTRY_BF16
PANGU_FASTKD_BWD_DQ_ENTRY(packed_attention_bwd_dq_bf16, bfloat16_t)
PANGU_FASTKD_BWD_DKV_ENTRY(packed_attention_bwd_dkv_bf16, bfloat16_t)
#endif
#if PANGU_FASTKD_ENTRY_FP16
PANGU_FASTKD_BWD_DQ_ENTRY(packed_attention_bwd_dq_fp16, half)
PANGU_FASTKD_BWD_DKV_ENTRY(packed_attention_bwd_dkv_fp16, half)
#endif
