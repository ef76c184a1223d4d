// Chip facts of the CPU twin, shared by the kernel side (kernel_operator.h, lib/matmul/matmul_intf.h)
// and the host side (tiling/platform/platform_ascendc.h, tiling/tiling_api.h), so that the
// tiling a host computes and the limits a kernel is checked against come from one table.
// Not part of the Ascend C API. Sources for each figure are in README.md ("Uncertainties").
#pragma once

#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>

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

// The chip of one part, by its SOC_VERSION name ("Ascend910B1".."Ascend910B4", "Ascend910B2C",
// "Ascend910B4-1", "Ascend310B1".."Ascend310B4"): the family's figures with the part's core
// counts, from CANN 8.1's data/platform_config/<part>.ini (cube_core_cnt / vector_core_cnt):
// 910B1, B2 and B2C have 24 AIC + 48 AIV, 910B3, B4 and B4-1 have 20 + 40.
inline ChipInfo GetSocInfo(std::string_view soc) {
  const auto is = [&](std::initializer_list<std::string_view> names) {
    for (std::string_view n : names) {
      if (soc == n) return true;
    }
    return false;
  };
  if (is({"Ascend910B1", "Ascend910B2", "Ascend910B2C"})) return GetChipInfo(Chip::Ascend910B);
  if (is({"Ascend910B3", "Ascend910B4", "Ascend910B4-1"})) {
    ChipInfo info = GetChipInfo(Chip::Ascend910B);
    info.cube_core_num = 20u;
    info.core_num = 40u;
    return info;
  }
  if (is({"Ascend310B1", "Ascend310B2", "Ascend310B3", "Ascend310B4"})) {
    return GetChipInfo(Chip::Ascend310B);
  }
  throw std::invalid_argument("twin::GetSocInfo: '" + std::string(soc) +
                              "' is not a part the twin knows (Ascend910B1-B4, Ascend910B2C, "
                              "Ascend910B4-1, Ascend310B1-B4)");
}

// The family of a part named as GetSocInfo takes it.
inline Chip SocChip(std::string_view soc) {
  return GetSocInfo(soc).separated ? Chip::Ascend910B : Chip::Ascend310B;
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

// Element types of the per-chip tables below. The table functions take the type's name, so that
// this header stays free of the kernel-side half/bfloat16_t types.
enum class ElemType { Int8, UInt8, Int16, UInt16, Half, BFloat16, Int32, UInt32, Float, Other };

inline const char* ElemTypeName(ElemType t) {
  switch (t) {
    case ElemType::Int8: return "int8_t";
    case ElemType::UInt8: return "uint8_t";
    case ElemType::Int16: return "int16_t";
    case ElemType::UInt16: return "uint16_t";
    case ElemType::Half: return "half";
    case ElemType::BFloat16: return "bfloat16_t";
    case ElemType::Int32: return "int32_t";
    case ElemType::UInt32: return "uint32_t";
    case ElemType::Float: return "float";
    case ElemType::Other: return "this element type";
  }
  return "?";
}

// DataCopyPad between GM and UB (CANN 8.1 basic_api/impl/dav_*/kernel_operator_data_copy_impl.h
// and the intrinsics of tikicpulib's stub_fun.h): dav_c220 (910B) picks the byte-width intrinsic
// copy_{gm_to_ubuf,ubuf_to_gm}_align_b8/_b16/_b32 by sizeof(T), so any 1-, 2- or 4-byte element
// copies; dav_m300 (310B) calls the typed copy_*_align overloads, which exist for int8, uint8,
// int16, uint16, half, int32, uint32 and float only: bfloat16_t has no intrinsic (a kernel copies
// bf16 bits as half, csrc/ascend/kernel_copy.h).
inline bool DataCopyPadSupported(Chip chip, ElemType t, uint32_t bytes) {
  if (chip == Chip::Ascend910B) return bytes == 1 || bytes == 2 || bytes == 4;
  return t != ElemType::BFloat16 && t != ElemType::Other;
}

// Rounding modes, in AscendC::RoundMode order.
enum class CastRound { None, Rint, Floor, Ceil, Round, Trunc, Odd };

// Cast between the float types (CastIntrinsicsImpl of dav_c220 and the REGISTER_CAST_* table of
// dav_m300, kernel_operator_vec_vconv_impl.h; both chips agree): widening half/bfloat16_t ->
// float takes CAST_NONE only; float -> half takes every mode; float -> bfloat16_t every mode but
// CAST_NONE and CAST_ODD (on hardware the unsupported case is an assertion compiled out: the
// destination is simply not written). Pairs outside the float types: true (not tabled here).
inline bool CastRoundSupported(ElemType dst, ElemType src, CastRound mode) {
  using T = ElemType;
  if (dst == T::Float && (src == T::Half || src == T::BFloat16)) return mode == CastRound::None;
  if (dst == T::BFloat16 && src == T::Float) {
    return mode != CastRound::None && mode != CastRound::Odd;
  }
  return true;
}

// The system workspace CANN reserves at the start of a kernel's workspace (RESERVED_WORKSPACE in
// kernel_utils_constants.h: 16 MB for __CCE_AICORE__ 220 and 300); GetUserWorkspace on the device
// returns the workspace plus this, and PlatformAscendC::GetLibApiWorkSpaceSize tells the host.
inline constexpr uint64_t kReservedWorkspaceBytes = 16ull * 1024ull * 1024ull;

}  // namespace twin
