// Kernel entry points of the packed causal attention forward (packed_attention_fwd.h), one per
// input dtype. ascendc_library (cmake/ascend.cmake) compiles this file for the NPU and generates
// the host launchers aclrtlaunch_packed_attention_fwd_{fp32,bf16,fp16}; built against
// tests/ascend_twin/include the same source runs on CPU
// (tests/ascend_twin/host/twin_launchers.cpp launches it there).
//
// The tiling arrives as a GM address (kernel_entry.h says why), with the two TCubeTilings inside
// it; packed_attention_fwd registers its Matmul objects with the TCubeTilings of that local copy.
#include "kernel_operator.h"
#include "kernel_entry.h"
#include "packed_attention_fwd.h"

#include <type_traits>

namespace {

static_assert(std::is_trivially_copyable_v<PackedAttentionTiling>, "the host memcpy's the tiling");

template <class TIn>
__aicore__ inline void RunPackedAttentionFwd(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens,
                                             GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                             GM_ADDR tilingGm) {
  const PackedAttentionTiling tiling =
      pangu_fastkd_ascend::LoadTiling<PackedAttentionTiling>(tilingGm);
  pangu_fastkd_ascend::packed_attention_fwd<TIn>(q, k, v, cuSeqlens, out, lse, workspace,
                                                  tiling);
}

}  // namespace

// q [T, Hq, D], k and v [T, Hkv, D] (fp32 / bf16 / fp16), cuSeqlens [B + 1] int32 (validated by the
// host), out [T, Hq, D] in the input dtype, lse [Hq, T] f32, workspace of
// PackedAttentionWorkspaceBytes(tiling) bytes, tiling: a PackedAttentionTiling in GM.
#define PANGU_FASTKD_ATTENTION_FWD_ENTRY(name, type)                                          \
  extern "C" __global__ __aicore__ void name(GM_ADDR q, GM_ADDR k, GM_ADDR v,                 \
                                             GM_ADDR cuSeqlens, GM_ADDR out, GM_ADDR lse,     \
                                             GM_ADDR workspace, GM_ADDR tiling) {             \
    RunPackedAttentionFwd<type>(q, k, v, cuSeqlens, out, lse, workspace, tiling);             \
  }

#if PANGU_FASTKD_ENTRY_FP32
PANGU_FASTKD_ATTENTION_FWD_ENTRY(packed_attention_fwd_fp32, float)
#endif
#if PANGU_FASTKD_ENTRY_BF16
PANGU_FASTKD_ATTENTION_FWD_ENTRY(packed_attention_fwd_bf16, bfloat16_t)
#endif
#if PANGU_FASTKD_ENTRY_FP16
PANGU_FASTKD_ATTENTION_FWD_ENTRY(packed_attention_fwd_fp16, half)
#endif
