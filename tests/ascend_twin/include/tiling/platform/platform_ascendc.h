// CPU twin of CANN's host-side platform query (tiling/platform/platform_ascendc.h): the
// PlatformAscendC object a Matmul tiling is made for, with the core counts and buffer sizes of
// the twin's chips (twin_chips.h). For a kernel launched directly, CANN hands it out through
// PlatformAscendCManager::GetInstance(socVersion); the twin does the same.
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>

#include "twin_chips.h"

namespace platform_ascendc {

enum class CoreMemType { L0_A = 0, L0_B = 1, L0_C = 2, L1 = 3, L2 = 4, UB = 5, HBM = 6, FB = 7,
                         BT = 8, RESERVED };

enum class SocVersion { ASCEND910B, ASCEND310B, RESERVED_VERSION };

class PlatformAscendC {
 public:
  // Twin extensions (not in CANN): the platform of one of the twin's chips (its first part,
  // e.g. 910B1), or of one part by its SOC_VERSION name (twin::GetSocInfo: core counts by part).
  explicit PlatformAscendC(twin::Chip chip) : chip_(chip), info_(twin::GetChipInfo(chip)) {}
  explicit PlatformAscendC(std::string_view soc)
      : chip_(twin::SocChip(soc)), info_(twin::GetSocInfo(soc)) {}

  // Vector cores on separated chips, AI cores on coupled ones.
  uint32_t GetCoreNum() const { return info_.core_num; }
  uint32_t GetCoreNumAic() const { return info_.cube_core_num; }
  uint32_t GetCoreNumAiv() const { return info_.core_num; }  // AI cores when coupled
  SocVersion GetSocVersion() const {
    return chip_ == twin::Chip::Ascend910B ? SocVersion::ASCEND910B : SocVersion::ASCEND310B;
  }
  void GetCoreMemSize(const CoreMemType& memType, uint64_t& size) const {
    switch (memType) {
      case CoreMemType::L0_A: size = info_.l0a_bytes; return;
      case CoreMemType::L0_B: size = info_.l0b_bytes; return;
      case CoreMemType::L0_C: size = info_.l0c_bytes; return;
      case CoreMemType::L1: size = info_.l1_bytes; return;
      case CoreMemType::UB: size = info_.ub_bytes; return;
      case CoreMemType::BT: size = info_.bt_bytes; return;
      default: size = 0; return;  // L2, HBM, FB: not modelled by the twin
    }
  }
  // Bytes of system workspace the high-level APIs need (the Matmul message area on 910B).
  uint32_t GetLibApiWorkSpaceSize() const { return uint32_t(twin::kReservedWorkspaceBytes); }

  // Twin internal.
  twin::Chip TwinChip() const { return chip_; }

 private:
  twin::Chip chip_;
  twin::ChipInfo info_;
};

class PlatformAscendCManager {
 public:
  // As in CANN a singleton: only the first call's customSocVersion takes effect. Accepts the
  // parts twin::GetSocInfo knows and throws std::invalid_argument for any other name.
  static PlatformAscendC* GetInstance(const char* customSocVersion) {
    static std::once_flag once;
    static std::unique_ptr<PlatformAscendC> instance;
    std::call_once(once, [&] {
      const std::string soc = customSocVersion == nullptr ? "" : customSocVersion;
      instance.reset(new PlatformAscendC(std::string_view(soc)));
    });
    return instance.get();
  }
};

}  // namespace platform_ascendc
