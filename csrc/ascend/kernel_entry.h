// What the kernel entry files (csrc/ascend/*.cpp) share: reading the tiling struct back from GM,
// and the switch that compiles the entry points of one dtype only.
//
// Every argument of a direct launch is a GM address, the tiling included: a kernel-launch project
// has no tiling-data mechanism (GET_TILING_DATA and friends are documented as unsupported there),
// so the host copies the tiling struct into device memory and each block reads it back into a
// local struct before anything else.
//
// PANGU_FASTKD_ENTRY_DTYPE selects the entry points a compile emits: 0 or unset all of them, 1 the
// fp32 ones, 2 bf16, 3 fp16. The build compiles all; scripts/check_cann_compile.py compiles each
// dtype on its own against CANN's headers, so that a failure names the dtype it belongs to.
#pragma once

#include "kernel_operator.h"

#ifndef PANGU_FASTKD_ENTRY_DTYPE
#define PANGU_FASTKD_ENTRY_DTYPE 0
#endif
#define PANGU_FASTKD_ENTRY_FP32 (PANGU_FASTKD_ENTRY_DTYPE == 0 || PANGU_FASTKD_ENTRY_DTYPE == 1)
#define PANGU_FASTKD_ENTRY_BF16 (PANGU_FASTKD_ENTRY_DTYPE == 0 || PANGU_FASTKD_ENTRY_DTYPE == 2)
#define PANGU_FASTKD_ENTRY_FP16 (PANGU_FASTKD_ENTRY_DTYPE == 0 || PANGU_FASTKD_ENTRY_DTYPE == 3)

namespace pangu_fastkd_ascend {

// Scalar reads of the tiling's 32-bit words from GM into a local struct, once per block: a few
// hundred bytes at most, so the scalar unit is the simplest way (no UB buffer to budget for).
template <class Tiling>
__aicore__ inline Tiling LoadTiling(GM_ADDR tilingGm) {
  static_assert(sizeof(Tiling) % sizeof(uint32_t) == 0, "the tiling is read as 32-bit words");
  constexpr uint32_t kWords = sizeof(Tiling) / sizeof(uint32_t);
  AscendC::GlobalTensor<uint32_t> words;
  words.SetGlobalBuffer(reinterpret_cast<__gm__ uint32_t*>(tilingGm), kWords);
  Tiling tiling;
  uint32_t* out = reinterpret_cast<uint32_t*>(&tiling);
  for (uint32_t i = 0; i < kWords; ++i) out[i] = words.GetValue(i);
  return tiling;
}

}  // namespace pangu_fastkd_ascend
