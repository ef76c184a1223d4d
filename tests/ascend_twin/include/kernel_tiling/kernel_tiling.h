// CPU twin of CANN's kernel-side tiling structs (kernel_tiling/kernel_tiling.h): the plain
// TCubeTiling the Matmul API is initialised with. Trivially copyable, so a host can memcpy it
// into the kernel's tiling data. Field meanings: CANN "TCubeTiling结构体" page; fields marked
// "reserved" there are kept so the layout reads like CANN's, the twin ignores them.
#pragma once

#include <cstdint>
#include <type_traits>

// CANN 8.0-8.3 declare it at global scope; newer releases (asc-devkit) move it into
// AscendC::tiling with a global using. The twin follows the older form, so that code naming the
// namespace fails here as it would on 8.x, while `TCubeTiling` works on every release.
struct TCubeTiling {
  int32_t usedCoreNum = 0;  // cube cores the tiling was made for, in [1, GetCoreNumAic()]
  int32_t M = 0;            // original A rows
  int32_t N = 0;            // original B/C columns
  int32_t Ka = 0;           // original A columns (row stride of a non-transposed ND A)
  int32_t Kb = 0;           // original B rows (row stride of a transposed ND B)
  int32_t singleCoreM = 0;  // shape one core computes (SetSingleShape may shrink it)
  int32_t singleCoreN = 0;
  int32_t singleCoreK = 0;
  int32_t baseM = 0;  // one cube instruction: [baseM, baseK] x [baseK, baseN] -> L0C
  int32_t baseN = 0;
  int32_t baseK = 0;
  int32_t depthA1 = 0;  // base blocks of A held in L1 (= stepM * stepKa * L1 double buffer)
  int32_t depthB1 = 0;
  int32_t stepM = 0;  // A1 holds stepM x stepKa base blocks, B1 stepKb x stepN
  int32_t stepN = 0;
  int32_t isBias = 0;        // 1: a bias row is added (SetBias may then be called)
  int32_t transLength = 0;   // UB bytes the API borrows on coupled chips (not modelled)
  int32_t iterateOrder = 0;  // 0: Iterate walks M first, then N; 1: N first, then M
  int32_t shareMode = 0;     // reserved
  int32_t shareL1Size = 0;   // reserved
  int32_t shareL0CSize = 0;  // reserved
  int32_t shareUbSize = 0;   // reserved
  int32_t batchM = 0;        // reserved
  int32_t batchN = 0;        // reserved
  int32_t singleBatchM = 0;  // reserved
  int32_t singleBatchN = 0;  // reserved
  int32_t stepKa = 0;
  int32_t stepKb = 0;
  int32_t depthAL1CacheUB = 0;  // reserved
  int32_t depthBL1CacheUB = 0;  // reserved
  int32_t dbL0A = 0;  // 1 or 2: MTE1 double buffering of L0A / L0B, MMAD double buffering of L0C
  int32_t dbL0B = 0;
  int32_t dbL0C = 0;
  int32_t ALayoutInfoB = 0;  // reserved (batch layouts)
  int32_t ALayoutInfoS = 0;
  int32_t ALayoutInfoN = 0;
  int32_t ALayoutInfoG = 0;
  int32_t ALayoutInfoD = 0;
  int32_t BLayoutInfoB = 0;
  int32_t BLayoutInfoS = 0;
  int32_t BLayoutInfoN = 0;
  int32_t BLayoutInfoG = 0;
  int32_t BLayoutInfoD = 0;
  int32_t CLayoutInfoB = 0;
  int32_t CLayoutInfoS1 = 0;
  int32_t CLayoutInfoN = 0;
  int32_t CLayoutInfoG = 0;
  int32_t CLayoutInfoS2 = 0;
  int32_t BatchNum = 0;
};

static_assert(std::is_trivially_copyable_v<TCubeTiling>, "tiling data is memcpy'd to kernels");
