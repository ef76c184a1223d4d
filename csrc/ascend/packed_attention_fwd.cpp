// Kernel entry points of the packed causal attention forward (packed_attention_fwd.h), one per
// input dtype. ascendc_library (cmake/ascend.cmake) compiles this file for the NPU and generates
// the host launchers aclrtlaunch_packed_attention_fwd_{fp32,bf16,fp16}; built against
// csrc/ascend/twin the same source runs on CPU (csrc/ascend/host/twin/twin_launchers.cpp launches
// it there).
//
// Every argument is a GM address, the tiling included, as for the sparse-KD epilogue
// (sparse_kd_epilogue.cpp): a direct launch has no tiling-data mechanism, so the host copies the
// PackedAttentionTiling struct, with the two TCubeTilings inside it, into device memory and each
// block reads it back into a local struct before anything else. The kernel keeps that local copy
// (PackedAttentionFwd::tiling_) and registers its Matmul objects with the TCubeTilings in it.
#include "kernel_operator.h"
#include "packed_attention_fwd.h"

#include <type_traits>

namespace {

static_assert(std::is_trivially_copyable_v<PackedAttentionTiling>, "the host memcpy's the tiling");
static_assert(sizeof(PackedAttentionTiling) % sizeof(uint32_t) == 0,
              "the tiling is read back as 32-bit words");

// Scalar reads of the tiling words from GM into a local struct, once per block: a few hundred
// bytes, so the scalar unit is the simplest way (no UB buffer to budget for).
__aicore__ inline PackedAttentionTiling LoadPackedAttentionTiling(GM_ADDR tilingGm) {
  constexpr uint32_t kWords = sizeof(PackedAttentionTiling) / sizeof(uint32_t);
  AscendC::GlobalTensor<uint32_t> words;
  words.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(tilingGm), kWords);
  PackedAttentionTiling tiling;
  uint32_t* out = reinterpret_cast<uint32_t*>(&tiling);
  for (uint32_t i = 0; i < kWords; ++i) out[i] = words.GetValue(i);
  return tiling;
}

template <class TIn>
__aicore__ inline void RunPackedAttentionFwd(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens,
                                             GM_ADDR out, GM_ADDR lse, GM_ADDR workspace,
                                             GM_ADDR tilingGm) {
  const PackedAttentionTiling tiling = LoadPackedAttentionTiling(tilingGm);
  pangu_fastkd_ascend::packed_attention_fwd<TIn>(q, k, v, cuSeqlens, out, lse, workspace,
                                                  tiling);
}

}  // namespace

// q [T, Hq, D], k and v [T, Hkv, D] (fp32 / bf16 / fp16), cuSeqlens [B + 1] int32 (validated by the
// host), out [T, Hq, D] in the input dtype, lse [Hq, T] f32, workspace of
// PackedAttentionWorkspaceBytes(tiling) bytes, tiling: a PackedAttentionTiling in GM.
extern "C" __global__ __aicore__ void packed_attention_fwd_fp32(GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                                                GM_ADDR cuSeqlens, GM_ADDR out,
                                                                GM_ADDR lse, GM_ADDR workspace,
                                                                GM_ADDR tiling) {
  RunPackedAttentionFwd<float>(q, k, v, cuSeqlens, out, lse, workspace, tiling);
}

extern "C" __global__ __aicore__ void packed_attention_fwd_bf16(GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                                                GM_ADDR cuSeqlens, GM_ADDR out,
                                                                GM_ADDR lse, GM_ADDR workspace,
                                                                GM_ADDR tiling) {
  RunPackedAttentionFwd<bfloat16_t>(q, k, v, cuSeqlens, out, lse, workspace, tiling);
}

extern "C" __global__ __aicore__ void packed_attention_fwd_fp16(GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                                                GM_ADDR cuSeqlens, GM_ADDR out,
                                                                GM_ADDR lse, GM_ADDR workspace,
                                                                GM_ADDR tiling) {
  RunPackedAttentionFwd<half>(q, k, v, cuSeqlens, out, lse, workspace, tiling);
}
