// Chip facts of the CPU twin, shared by the kernel side (kernel_operator.h, lib/matmul/matmul_intf.h)
// and the host side (tiling/platform/platform_ascendc.h, tiling/tiling_api.h), so that the
// tiling a host computes and the limits a kernel is checked against come from one table.
// Not part of the Ascend C API. Sources for each figure are in README.md ("Uncertainties").
#pragma once

#include <cstdint>
#include <stdexcept>

namespace twin {

enum class Chip { Ascend910B, Ascend310B };

struct ChipInfo {
  const char* name;
  uint32_t ub_bytes;       // Unified Buffer bytes usable by vector code (the InitBuffer budget)
  uint32_t core_num;       // vector cores that can run blocks at the same time (GetCoreNum)
  uint32_t cube_core_num;  // cube cores (GetCoreNumAic); the Matmul tiling's usedCoreNum limit
  uint32_t l1_bytes;       // L1 Buffer (A1/B1) per cube core
  uint32_t l0a_bytes;      // L0A Buffer (A2)
  uint32_t l0b_bytes;      // L0B Buffer (B2)
  uint32_t l0c_bytes;      // L0C Buffer (CO1), fp32 accumulators
  uint32_t bt_bytes;       // BiasTable Buffer
  bool separated;          // cube and vector on separate cores (Matmul runs as a MIX kernel)
};

inline ChipInfo GetChipInfo(Chip chip) {
  switch (chip) {
    // Atlas A2 training (910B1/B2): 24 AIC + 48 AIV, separated. 192 KB UB per AIV of which the
    // runtime keeps 8 KB: 184 KB for InitBuffer. L1 512 KB, L0A/L0B 64 KB, L0C 128 KB, BT 1 KB.
    case Chip::Ascend910B:
      return {"Ascend910B", 184u * 1024u, 48u, 24u, 512u * 1024u, 64u * 1024u, 64u * 1024u,
              128u * 1024u, 1024u, true};
    // Ascend 310B (Atlas 200I/500 A2 inference): one AI Core, cube and vector coupled, 248 KB UB
    // usable. L1 1 MB, L0A/L0B 64 KB, L0C 128 KB, BT 1 KB.
    case Chip::Ascend310B:
      return {"Ascend310B", 248u * 1024u, 1u, 1u, 1024u * 1024u, 64u * 1024u, 64u * 1024u,
              128u * 1024u, 1024u, false};
  }
  throw std::invalid_argument("twin::GetChipInfo: unknown chip enum value");
}

// Element types the cube unit's Matmul API is emulated for.
enum class CubeDType { Float, Half, BFloat16 };

inline const char* CubeDTypeName(CubeDType t) {
  switch (t) {
    case CubeDType::Float: return "float";
    case CubeDType::Half: return "half";
    case CubeDType::BFloat16: return "bfloat16_t";
  }
  return "?";
}

inline uint32_t CubeDTypeBytes(CubeDType t) { return t == CubeDType::Float ? 4u : 2u; }

// The (A, B, Bias, C) combinations of the Matmul API's "input/output data type" table (CANN
// Matmul usage page, table 2) restricted to float types: Atlas A2 (910B) and Atlas 200I/500 A2
// (310B) rows. A and B must have the same type; int8/int4 rows are not emulated.
inline bool MatmulTypesSupported(Chip chip, CubeDType a, CubeDType b, CubeDType bias,
                                 CubeDType c) {
  using T = CubeDType;
  if (a != b) return false;
  switch (a) {
    case T::Float:  // float x float: bias float/half, C float/half/bf16 (both chips)
      return bias != T::BFloat16;
    case T::Half:  // half x half: bias float/half, C float/half/bf16 (both chips)
      return bias != T::BFloat16;
    case T::BFloat16:
      if (bias == T::Float) return true;  // C float/bf16/half (both chips)
      // bias half: C float/half on A2 only.
      return bias == T::Half && chip == Chip::Ascend910B && c != T::BFloat16;
  }
  return false;
}

// The system workspace CANN reserves at the start of a kernel's workspace (RESERVED_WORKSPACE in
// kernel_utils_constants.h: 16 MB for __CCE_AICORE__ 220 and 300); GetUserWorkspace on the device
// returns the workspace plus this, and PlatformAscendC::GetLibApiWorkSpaceSize tells the host.
inline constexpr uint64_t kReservedWorkspaceBytes = 16ull * 1024ull * 1024ull;

}  // namespace twin
