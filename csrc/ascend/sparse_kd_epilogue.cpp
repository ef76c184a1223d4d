// Kernel entry points of the sparse-KD / cross-entropy epilogue (sparse_kd_epilogue.h), one per
// logits dtype. ascendc_library (cmake/ascend.cmake) compiles this file for the NPU and generates
// the host launchers aclrtlaunch_sparse_kd_epilogue_{fp32,bf16,fp16}; built against
// csrc/ascend/twin the same source runs on CPU (csrc/ascend/host/twin/twin_launchers.cpp launches
// it there).
//
// Every argument is a GM address, the tiling included: a direct launch has no tiling-data
// mechanism (GET_TILING_DATA and friends are documented as unsupported in kernel-launch
// projects), so the host copies the SparseKdTiling struct into device memory and each block
// reads it back into a local struct before anything else.
#include "kernel_operator.h"
#include "sparse_kd_epilogue.h"

#include <type_traits>

namespace {

static_assert(std::is_trivially_copyable_v<SparseKdTiling>, "the host memcpy's the tiling");
static_assert(sizeof(SparseKdTiling) % sizeof(uint32_t) == 0,
              "the tiling is read back as 32-bit words");

// Scalar reads of the tiling words from GM into a local struct: the struct is a few dozen bytes,
// read once per block, so the scalar unit is the simplest way (no UB buffer to budget for).
__aicore__ inline SparseKdTiling LoadSparseKdTiling(GM_ADDR tilingGm) {
  constexpr uint32_t kWords = sizeof(SparseKdTiling) / sizeof(uint32_t);
  AscendC::GlobalTensor<uint32_t> words;
  words.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(tilingGm), kWords);
  SparseKdTiling tiling;
  uint32_t* out = reinterpret_cast<uint32_t*>(&tiling);
  for (uint32_t i = 0; i < kWords; ++i) out[i] = words.GetValue(i);
  return tiling;
}

template <class TIn>
__aicore__ inline void RunSparseKdEpilogue(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                           GM_ADDR teacherValues, GM_ADDR teacherLse,
                                           GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                                           GM_ADDR tilingGm) {
  const SparseKdTiling tiling = LoadSparseKdTiling(tilingGm);
  pangu_fastkd_ascend::sparse_kd_epilogue<TIn>(logits, labels, ids, teacherValues, teacherLse,
                                                labelLogit, loss, stats, tiling);
}

}  // namespace

// logits [N, V] (fp32 / bf16 / fp16, overwritten by d(scale * loss)/d(logits)), labels [N] int32,
// ids [N, K] int32, teacherValues [N, K] f32, teacherLse [N] f32, labelLogit [N] f32,
// loss [N] f32, stats [N, 6] f32, tiling: a SparseKdTiling in GM. The teacher pointers may be
// null where the tiling says they are unused (see SparseKdEpilogue::Init).
extern "C" __global__ __aicore__ void sparse_kd_epilogue_fp32(
    GM_ADDR logits, GM_ADDR labels, GM_ADDR ids, GM_ADDR teacherValues, GM_ADDR teacherLse,
    GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats, GM_ADDR tiling) {
  RunSparseKdEpilogue<float>(logits, labels, ids, teacherValues, teacherLse, labelLogit, loss,
                             stats, tiling);
}

extern "C" __global__ __aicore__ void sparse_kd_epilogue_bf16(
    GM_ADDR logits, GM_ADDR labels, GM_ADDR ids, GM_ADDR teacherValues, GM_ADDR teacherLse,
    GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats, GM_ADDR tiling) {
  RunSparseKdEpilogue<bfloat16_t>(logits, labels, ids, teacherValues, teacherLse, labelLogit,
                                  loss, stats, tiling);
}

extern "C" __global__ __aicore__ void sparse_kd_epilogue_fp16(
    GM_ADDR logits, GM_ADDR labels, GM_ADDR ids, GM_ADDR teacherValues, GM_ADDR teacherLse,
    GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats, GM_ADDR tiling) {
  RunSparseKdEpilogue<half>(logits, labels, ids, teacherValues, teacherLse, labelLogit, loss,
                            stats, tiling);
}
