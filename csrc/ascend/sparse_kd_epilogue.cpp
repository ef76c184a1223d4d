// Kernel entry points of the sparse-KD / cross-entropy epilogue (sparse_kd_epilogue.h), one per
// logits dtype. ascendc_library (cmake/ascend.cmake) compiles this file for the NPU and generates
// the host launchers aclrtlaunch_sparse_kd_epilogue_{fp32,bf16,fp16}; built against
// tests/ascend_twin/include the same source runs on CPU
// (tests/ascend_twin/host/twin_launchers.cpp launches it there). The tiling arrives as a GM
// address (kernel_entry.h says why).
#include "kernel_operator.h"
#include "kernel_entry.h"
#include "sparse_kd_epilogue.h"

#include <type_traits>

namespace {

static_assert(std::is_trivially_copyable_v<SparseKdTiling>, "the host memcpy's the tiling");

template <class TIn>
__aicore__ inline void RunSparseKdEpilogue(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                           GM_ADDR teacherValues, GM_ADDR teacherLse,
                                           GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                                           GM_ADDR tilingGm) {
  const SparseKdTiling tiling = pangu_fastkd_ascend::LoadTiling<SparseKdTiling>(tilingGm);
  pangu_fastkd_ascend::sparse_kd_epilogue<TIn>(logits, labels, ids, teacherValues, teacherLse,
                                                labelLogit, loss, stats, tiling);
}

}  // namespace

// logits [N, V] (fp32 / bf16 / fp16, overwritten by d(scale * loss)/d(logits)), labels [N] int32,
// ids [N, K] int32, teacherValues [N, K] f32, teacherLse [N] f32, labelLogit [N] f32,
// loss [N] f32, stats [N, 6] f32, tiling: a SparseKdTiling in GM. The teacher pointers may be
// null where the tiling says they are unused (see SparseKdEpilogue::Init).
#define PANGU_FASTKD_SPARSE_KD_ENTRY(name, type)                                                 \
  extern "C" __global__ __aicore__ void name(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,        \
                                             GM_ADDR teacherValues, GM_ADDR teacherLse,          \
                                             GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,    \
                                             GM_ADDR tiling) {                                   \
    RunSparseKdEpilogue<type>(logits, labels, ids, teacherValues, teacherLse, labelLogit, loss, \
                              stats, tiling);                                                    \
  }

#if PANGU_FASTKD_ENTRY_FP32
PANGU_FASTKD_SPARSE_KD_ENTRY(sparse_kd_epilogue_fp32, float)
#endif
#if PANGU_FASTKD_ENTRY_BF16
PANGU_FASTKD_SPARSE_KD_ENTRY(sparse_kd_epilogue_bf16, bfloat16_t)
#endif
#if PANGU_FASTKD_ENTRY_FP16
PANGU_FASTKD_SPARSE_KD_ENTRY(sparse_kd_epilogue_fp16, half)
#endif
