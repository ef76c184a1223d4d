// CPU twin of CANN's host-side Matmul tiling API (tiling/tiling_api.h): MatmulApiTiling turns
// the operand types and the shape into a TCubeTiling for the kernel-side Matmul object.
//
// Host code written against it compiles with CANN too, as long as it uses the calls below and
// the GetTiling(TCubeTiling&) overload (CANN's optiling::TCubeTiling, the
// TilingData class with set_/get_ accessors, is not emulated).
//
// How base blocks are chosen (CANN's exact heuristic is not documented; this one stays inside
// every documented limit): baseM = min(align16(M), 128), baseN = min(align16(N), 256),
// baseK = min(align16(K), 64 for 16-bit types, 32 for float) -- the documented recommended
// (128, 256, 64) -- shrunk until L0A/L0B/L0C/BiasTable fit, with L0 double buffering where it
// fits; then L1 holds stepKa = stepKb = all K steps (K fully loaded, the documented first
// preference) double buffered, halved until A1 + B1 fit the L1 space. GetTiling returns -1, as
// CANN does, when the types, positions or shapes are unsupported or nothing fits.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernel_tiling/kernel_tiling.h"
#include "tiling/platform/platform_ascendc.h"
#include "twin_chips.h"

namespace matmul_tiling {

enum class TPosition {
  GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC,
  LCM = VECCALC, SPM, SHM = SPM, TSCM, MAX
};
enum class CubeFormat { ND = 0, NZ, ZN, ZZ, NN, ND_ALIGN, SCALAR, VECTOR };
enum class DataType {
  DT_FLOAT = 0,
  DT_FLOAT16 = 1,
  DT_INT8 = 2,
  DT_INT32 = 3,
  DT_BF16 = 27,
  DT_BFLOAT16 = 33,  // a second bf16 code, distinct from DT_BF16 as in CANN's enum; both are bf16
};

class MatmulApiTiling {
 public:
  explicit MatmulApiTiling(const platform_ascendc::PlatformAscendC& ascendcPlatform)
      : chip_(ascendcPlatform.TwinChip()), info_(twin::GetChipInfo(chip_)) {}

  int32_t SetAType(TPosition pos, CubeFormat type, DataType dataType, bool isTrans = false) {
    return SetOperand(a_, pos, type, dataType, isTrans);
  }
  int32_t SetBType(TPosition pos, CubeFormat type, DataType dataType, bool isTrans = false) {
    return SetOperand(b_, pos, type, dataType, isTrans);
  }
  int32_t SetCType(TPosition pos, CubeFormat type, DataType dataType) {
    return SetOperand(c_, pos, type, dataType, false);
  }
  int32_t SetBiasType(TPosition pos, CubeFormat type, DataType dataType) {
    return SetOperand(bias_, pos, type, dataType, false);
  }

  // -1 takes the value from SetOrgShape.
  int32_t SetShape(int32_t m, int32_t n, int32_t k) {
    m_ = m;
    n_ = n;
    k_ = k;
    return 0;
  }
  int32_t SetOrgShape(int32_t orgMIn, int32_t orgNIn, int32_t orgKIn) {
    return SetOrgShape(orgMIn, orgNIn, orgKIn, orgKIn);
  }
  int32_t SetOrgShape(int32_t orgMIn, int32_t orgNIn, int32_t orgKaIn, int32_t orgKbIn) {
    if (orgMIn <= 0 || orgNIn <= 0 || orgKaIn <= 0 || orgKbIn <= 0) return -1;
    org_m_ = orgMIn;
    org_n_ = orgNIn;
    org_ka_ = orgKaIn;
    org_kb_ = orgKbIn;
    return 0;
  }
  int32_t SetBias(bool isBiasIn = false) {
    is_bias_ = isBiasIn;
    return 0;
  }
  int32_t EnableBias(bool isBiasIn = false) { return SetBias(isBiasIn); }
  // -1 means the whole buffer of the chip.
  int32_t SetBufferSpace(int32_t l1Size = -1, int32_t l0CSize = -1, int32_t ubSize = -1,
                         int32_t btSize = -1) {
    auto pick = [](int32_t asked, uint32_t have, uint32_t& out) {
      if (asked == -1) {
        out = have;
        return true;
      }
      if (asked <= 0 || uint32_t(asked) > have) return false;
      out = uint32_t(asked);
      return true;
    };
    uint32_t l1 = 0, l0c = 0, ub = 0, bt = 0;
    if (!pick(l1Size, info_.l1_bytes, l1) || !pick(l0CSize, info_.l0c_bytes, l0c) ||
        !pick(ubSize, info_.ub_bytes, ub) || !pick(btSize, info_.bt_bytes, bt)) {
      return -1;
    }
    l1_ = l1;
    l0c_ = l0c;
    bt_ = bt;
    return 0;
  }
  // Forces base block sizes (-1 lets GetTiling choose that one).
  int32_t SetFixSplit(int32_t baseMIn = -1, int32_t baseNIn = -1, int32_t baseKIn = -1) {
    fix_m_ = baseMIn;
    fix_n_ = baseNIn;
    fix_k_ = baseKIn;
    return 0;
  }

  int64_t GetTiling(TCubeTiling& tiling) {
    if (!a_.set || !b_.set || !c_.set) return -1;
    const Operand bias = bias_.set ? bias_ : Operand{true, TPosition::GM, CubeFormat::ND,
                                                     c_.type, false};
    twin::CubeDType ta, tb, tc, tbias;
    if (!CubeType(a_.type, ta) || !CubeType(b_.type, tb) || !CubeType(c_.type, tc) ||
        !CubeType(bias.type, tbias)) {
      return -1;
    }
    if (!twin::MatmulTypesSupported(chip_, ta, tb, tbias, tc)) return -1;
    if (!PositionOk(a_.pos, true) || !PositionOk(b_.pos, true) ||
        !PositionOk(bias.pos, true) || !PositionOk(c_.pos, false)) {
      return -1;
    }
    const Operand* operands[] = {&a_, &b_, &c_, &bias};
    for (const Operand* op : operands) {
      if (op->format != CubeFormat::ND) return -1;  // NZ is not emulated by the twin
    }
    const int32_t m = m_ == -1 ? org_m_ : m_;
    const int32_t n = n_ == -1 ? org_n_ : n_;
    const int32_t k = k_ == -1 ? std::min(org_ka_, org_kb_) : k_;
    if (m <= 0 || n <= 0 || k <= 0) return -1;
    const int32_t org_m = org_m_ > 0 ? org_m_ : m, org_n = org_n_ > 0 ? org_n_ : n;
    const int32_t org_ka = org_ka_ > 0 ? org_ka_ : k, org_kb = org_kb_ > 0 ? org_kb_ : k;
    if (org_m < m || org_n < n || org_ka < k || org_kb < k) return -1;

    const uint64_t sa = twin::CubeDTypeBytes(ta), sb = twin::CubeDTypeBytes(tb);
    const uint64_t sbias = is_bias_ ? twin::CubeDTypeBytes(tbias) : 0u;
    const uint32_t l1 = l1_ ? l1_ : info_.l1_bytes, l0c = l0c_ ? l0c_ : info_.l0c_bytes;
    const uint32_t bt = bt_ ? bt_ : info_.bt_bytes;

    int32_t base_m = fix_m_ > 0 ? fix_m_ : std::min(Align16(m), 128);
    int32_t base_n = fix_n_ > 0 ? fix_n_ : std::min(Align16(n), 256);
    int32_t base_k = fix_k_ > 0 ? fix_k_ : std::min(Align16(k), sa == 4 ? 32 : 64);
    // 16 is a multiple of C0 for every emulated type, so it satisfies both baseK rules.
    if (base_m % 16 != 0 || base_n % 16 != 0 || base_k % 16 != 0) return -1;
    // L0C: shrink N, then M (only the sizes not fixed by SetFixSplit).
    while (uint64_t(base_m) * base_n * 4u > l0c) {
      if (fix_n_ <= 0 && base_n > 16) {
        base_n -= 16;
      } else if (fix_m_ <= 0 && base_m > 16) {
        base_m -= 16;
      } else {
        return -1;
      }
    }
    if (is_bias_ && uint64_t(base_n) * sbias > bt) return -1;
    while (uint64_t(base_m) * base_k * sa > info_.l0a_bytes ||
           uint64_t(base_n) * base_k * sb > info_.l0b_bytes) {
      if (fix_k_ > 0 || base_k <= 16) return -1;
      base_k -= 16;
    }
    const int32_t db_l0a = uint64_t(base_m) * base_k * sa * 2u <= info_.l0a_bytes ? 2 : 1;
    const int32_t db_l0b = uint64_t(base_n) * base_k * sb * 2u <= info_.l0b_bytes ? 2 : 1;
    const int32_t db_l0c = uint64_t(base_m) * base_n * 4u * 2u <= l0c ? 2 : 1;

    int32_t step_k = (k + base_k - 1) / base_k;
    int32_t db_l1 = 2;
    auto l1_need = [&] {
      return uint64_t(base_m) * base_k * step_k * db_l1 * sa +
             uint64_t(base_n) * base_k * step_k * db_l1 * sb + uint64_t(base_n) * sbias;
    };
    while (l1_need() > l1) {
      if (step_k > 1) {
        step_k = (step_k + 1) / 2;
      } else if (db_l1 == 2) {
        db_l1 = 1;
      } else {
        return -1;
      }
    }

    TCubeTiling t{};
    t.usedCoreNum = 1;
    t.M = org_m;
    t.N = org_n;
    t.Ka = org_ka;
    t.Kb = org_kb;
    t.singleCoreM = m;
    t.singleCoreN = n;
    t.singleCoreK = k;
    t.baseM = base_m;
    t.baseN = base_n;
    t.baseK = base_k;
    t.stepM = 1;
    t.stepN = 1;
    t.stepKa = step_k;
    t.stepKb = step_k;
    t.depthA1 = t.stepM * t.stepKa * db_l1;
    t.depthB1 = t.stepN * t.stepKb * db_l1;
    t.isBias = is_bias_ ? 1 : 0;
    t.iterateOrder = 0;
    t.dbL0A = db_l0a;
    t.dbL0B = db_l0b;
    t.dbL0C = db_l0c;
    tiling = t;
    base_m_ = base_m;
    base_n_ = base_n;
    base_k_ = base_k;
    return 0;
  }

  int32_t GetBaseM() const { return base_m_; }
  int32_t GetBaseN() const { return base_n_; }
  int32_t GetBaseK() const { return base_k_; }

 private:
  struct Operand {
    bool set = false;
    TPosition pos = TPosition::GM;
    CubeFormat format = CubeFormat::ND;
    DataType type = DataType::DT_FLOAT;
    bool trans = false;
  };

  static int32_t SetOperand(Operand& op, TPosition pos, CubeFormat format, DataType type,
                            bool trans) {
    op = Operand{true, pos, format, type, trans};
    return 0;
  }
  static bool CubeType(DataType d, twin::CubeDType& out) {
    switch (d) {
      case DataType::DT_FLOAT: out = twin::CubeDType::Float; return true;
      case DataType::DT_FLOAT16: out = twin::CubeDType::Half; return true;
      case DataType::DT_BF16:
      case DataType::DT_BFLOAT16: out = twin::CubeDType::BFloat16; return true;
      default: return false;  // integer Matmul is not emulated
    }
  }
  // Inputs: GM or VECOUT (UB); C: GM or VECIN. Atlas 200I/500 A2 (310B) accepts GM only.
  bool PositionOk(TPosition pos, bool input) const {
    if (pos == TPosition::GM) return true;
    if (!info_.separated) return false;
    return pos == (input ? TPosition::VECOUT : TPosition::VECIN);
  }
  static int32_t Align16(int32_t v) { return (v + 15) / 16 * 16; }

  twin::Chip chip_;
  twin::ChipInfo info_;
  Operand a_, b_, c_, bias_;
  int32_t m_ = -1, n_ = -1, k_ = -1;
  int32_t org_m_ = -1, org_n_ = -1, org_ka_ = -1, org_kb_ = -1;
  bool is_bias_ = false;
  uint32_t l1_ = 0, l0c_ = 0, bt_ = 0;
  int32_t fix_m_ = -1, fix_n_ = -1, fix_k_ = -1;
  int32_t base_m_ = 0, base_n_ = 0, base_k_ = 0;
};

}  // namespace matmul_tiling
