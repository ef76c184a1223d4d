// CPU twin of the subset of the Ascend C API (CANN 8.x, namespace AscendC) that pangu_fastkd's
// vector-core kernels use. Header-only C++17. Kernels written against the real
// `kernel_operator.h` compile unchanged against this one and run on CPU threads, one thread per
// block, under twin::Launch.
//
// The twin is deliberately stricter than a plain emulation: wherever the hardware silently
// misbehaves (rounds a DataCopy length down, reads an unaligned address, hangs on an unmatched
// WaitFlag, overruns the Unified Buffer), the twin throws twin::HardwareRuleViolation naming the
// rule, the call and the values. See README.md next to this file for the rules and for what the
// twin does not prove.
#pragma once

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <chrono>
#include <exception>
#include <functional>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "twin_chips.h"

// Kernel qualifiers of the bisheng compiler: nothing to do on CPU.
#define __global__
#define __aicore__
#define __gm__
#define GM_ADDR uint8_t*

// ------------------------------------------------------------------------------------------
// 16-bit float storage types. Both convert from float with round-to-nearest-even, which is what
// the hardware's CAST_RINT / default conversion does.
// ------------------------------------------------------------------------------------------
namespace twin {
namespace detail {

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> IEEE binary16, round to nearest even (F. Giesen's float_to_half_fast3_rtne).
inline uint16_t FloatToHalfBits(float value) {
  uint32_t f = FloatBits(value);
  const uint32_t f32_infinity = 255u << 23;
  const uint32_t f16_max = (127u + 16u) << 23;  // first float that rounds to half infinity
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t out;
  if (f >= f16_max) {
    out = (f > f32_infinity) ? 0x7e00 : 0x7c00;  // NaN stays NaN, the rest overflows to inf
  } else if (f < (113u << 23)) {
    // Result is subnormal: let the FPU do the rounding by adding a magic number.
    float shifted = BitsFloat(f) + BitsFloat(denorm_magic);
    out = static_cast<uint16_t>(FloatBits(shifted) - denorm_magic);
  } else {
    const uint32_t mantissa_odd = (f >> 13) & 1u;
    f += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    f += mantissa_odd;
    out = static_cast<uint16_t>(f >> 13);
  }
  return static_cast<uint16_t>(out | (sign >> 16));
}

inline float HalfBitsToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return BitsFloat(sign | 0x7f800000u | (mantissa << 13));
  return BitsFloat(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t FloatToBf16Bits(float value) {
  const uint32_t u = FloatBits(value);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

inline float Bf16BitsToFloat(uint16_t b) { return BitsFloat(static_cast<uint32_t>(b) << 16); }

}  // namespace detail
}  // namespace twin

struct half {
  uint16_t bits = 0;
  half() = default;
  half(float f) : bits(twin::detail::FloatToHalfBits(f)) {}  // NOLINT: implicit like the builtin
  operator float() const { return twin::detail::HalfBitsToFloat(bits); }
};

struct bfloat16_t {
  uint16_t bits = 0;
  bfloat16_t() = default;
  bfloat16_t(float f) : bits(twin::detail::FloatToBf16Bits(f)) {}  // NOLINT
  operator float() const { return twin::detail::Bf16BitsToFloat(bits); }
};

// Hardware pipes, as the bisheng builtin enum.
enum pipe_t { PIPE_S = 0, PIPE_V, PIPE_M, PIPE_MTE1, PIPE_MTE2, PIPE_MTE3, PIPE_ALL, PIPE_FIX };

enum event_t {
  EVENT_ID0 = 0,
  EVENT_ID1,
  EVENT_ID2,
  EVENT_ID3,
  EVENT_ID4,
  EVENT_ID5,
  EVENT_ID6,
  EVENT_ID7
};

// ------------------------------------------------------------------------------------------
// Twin machinery: chips, the violation type, per-block state, the launcher's barrier.
// ------------------------------------------------------------------------------------------
namespace twin {

// Thrown by every asserted hardware rule. what() = "[rule] call: details".
class HardwareRuleViolation : public std::runtime_error {
 public:
  HardwareRuleViolation(std::string rule, const std::string& message)
      : std::runtime_error(message), rule_(std::move(rule)) {}
  const std::string& rule() const { return rule_; }

 private:
  std::string rule_;
};

namespace detail {

// Thrown in blocks woken from a barrier because another block failed; never reported.
struct BlockAborted {};

class Barrier {
 public:
  explicit Barrier(uint32_t count) : count_(count) {}
  void Wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    if (aborted_) throw BlockAborted{};
    if (exited_ > 0) {
      throw HardwareRuleViolation(
          "syncall-divergence",
          "[syncall-divergence] SyncAll: a block already finished without reaching this "
          "SyncAll; every block must call SyncAll the same number of times (the hardware would "
          "hang)");
    }
    const uint64_t generation = generation_;
    if (++arrived_ == count_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != generation || aborted_ || exited_ > 0; });
    if (generation_ != generation) return;
    if (aborted_) throw BlockAborted{};
    --arrived_;
    throw HardwareRuleViolation(
        "syncall-divergence",
        "[syncall-divergence] SyncAll: a block finished without reaching this SyncAll; every "
        "block must call SyncAll the same number of times (the hardware would hang)");
  }
  // A block returned from the kernel: SyncAlls still waiting for it can never complete.
  void Exit() {
    std::lock_guard<std::mutex> lock(mutex_);
    ++exited_;
    cv_.notify_all();
  }
  void Abort() {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  uint32_t count_;
  uint32_t arrived_ = 0;
  uint64_t generation_ = 0;
  uint32_t exited_ = 0;
  bool aborted_ = false;
};

// Which core a twin thread plays. On the 910B (dav_c220) cube (AIC) and vector (AIV) cores are
// separate: a MIX kernel runs its function on one AIC and two AIVs per block, an AIV-only kernel
// on one AIV per block. The 310B (dav_m300) has one coupled AI core per block.
enum class Core { AiCore, Aiv, Aic };

inline const char* CoreName(Core c) {
  switch (c) {
    case Core::AiCore: return "AI core";
    case Core::Aiv: return "vector core (AIV)";
    case Core::Aic: return "cube core (AIC)";
  }
  return "?";
}

struct BlockContext;

// One Matmul call a vector core's client posts to its cube core (lib/matmul/matmul_intf.h).
struct CubeRequest {
  std::function<void()> work;
  BlockContext* client = nullptr;
  bool taken = false;  // the cube core is executing it: the poster must wait for done
  bool done = false;
  std::exception_ptr error;
};

// The AIC and the two AIVs of one block of a 910B MIX kernel: the message channel the Matmul
// client/server use (CANN: KfcCommClient / KfcServer over the system workspace), the workspace
// event the generated launch wrapper sets, and who has quit.
struct MixPair {
  std::mutex mutex;
  std::condition_variable cv;
  bool workspace_event = false;  // WaitEvent(WORKSPACE_SYNC_ID) returns only when set
  bool client_seen[2] = {false, false};
  bool client_quit[2] = {false, false};
  bool aiv_ended[2] = {false, false};
  bool server_ended = false;  // the AIC thread returned from the kernel
  bool aborted = false;       // another block failed: everyone waiting here drops out
  std::deque<CubeRequest*> requests;
};

// One 64-byte line of a core's data cache, as GlobalTensor::SetValue leaves it: the bytes the core
// loaded at its first touch of each byte (stale by the time it is written back) and its own
// stores. Only bytes inside the GlobalTensor's buffer are ever loaded or written back, so the
// twin never touches memory outside a host allocation.
constexpr uintptr_t kDcacheLine = 64;
struct DcacheLine {
  uint8_t bytes[kDcacheLine] = {};
  bool valid[kDcacheLine] = {};
  bool dirty = false;
};
using Dcache = std::map<uintptr_t, DcacheLine>;  // line address -> line

struct BlockContext {
  Core core = Core::AiCore;
  bool model_dcache = false;  // LaunchOptions::model_data_cache
  Dcache dcache;
  MixPair* pair = nullptr;  // 910B MIX kernels only
  bool kfc_client_alive = false;  // an AIV's REGIST_MATMUL_OBJ client object is in scope
  int64_t block_idx = 0;    // what GetBlockIdx returns (on an AIV of a MIX kernel: block * 2 + sub)
  int64_t block_dim = 1;    // what GetBlockNum returns: the launch's blockDim
  int64_t task_ration = 1;  // GetTaskRation: 2 on the AIVs of a 910B MIX kernel, else 1
  int64_t subblock_idx = 0; // GetSubBlockIdx: 0/1 on the AIVs of a 910B MIX kernel, else 0
  int kernel_type = 0;      // twin::KernelType of the launch, as its integer value
  ChipInfo chip{};
  Barrier* barrier = nullptr;
  // (HardEvent, event id) -> SetFlag calls not yet consumed by a WaitFlag.
  std::map<std::pair<int, int>, int> pending_flags;
  // Matmul high-level API state (lib/matmul/matmul_intf.h): the system workspace set by
  // SetSysWorkspace, the Matmul objects registered so far, and the object that computed last
  // and has not been End()ed (switching objects requires End in between).
  uint8_t* sys_workspace = nullptr;
  int matmul_objects = 0;
  const void* active_matmul = nullptr;
  // GM byte ranges [begin, end) this core wrote with MTE3 copies and non-atomic Matmul output,
  // checked across cores at the end of the launch (LaunchOptions::check_gm_write_overlap).
  std::vector<std::pair<uintptr_t, uintptr_t>> gm_writes;
};

inline thread_local BlockContext* current_block = nullptr;

// Records a GM store of `bytes` bytes at `p` by the current core (no-op outside a launch).
inline void RecordGmWrite(const void* p, uint64_t bytes) {
  if (current_block == nullptr || bytes == 0) return;
  const auto begin = reinterpret_cast<uintptr_t>(p);
  current_block->gm_writes.emplace_back(begin, begin + bytes);
}

inline BlockContext& Block(const char* call) {
  if (current_block == nullptr) {
    throw std::logic_error(std::string(call) +
                           " called outside twin::Launch: kernels must run under the launcher");
  }
  return *current_block;
}

[[noreturn]] inline void Violate(const std::string& rule, const std::string& call,
                                 const std::string& detail) {
  throw HardwareRuleViolation(rule, "[" + rule + "] " + call + ": " + detail);
}

// The vector unit, the UB and MTE2/MTE3 belong to the AIV: a cube core has none of them (CANN's
// dav_c220 vector and UB copy implementations are compiled out on the AIC). Reached when the AIC
// runs kernel code past the point where REGIST_MATMUL_OBJ should have kept it serving.
inline void RequireVectorCore(const std::string& call) {
  if (current_block != nullptr && current_block->core == Core::Aic) {
    throw HardwareRuleViolation(
        "cube-core-vector",
        "[cube-core-vector] " + call + ": vector instruction on a cube core (block " +
            std::to_string(current_block->block_idx) +
            "): the AIC runs the kernel function too and must stay in REGIST_MATMUL_OBJ's "
            "server loop, which returns from the enclosing function; put REGIST_MATMUL_OBJ in "
            "the kernel's own scope, not in a member function such as Init()");
  }
}

template <class... Parts>
std::string Str(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

inline uint64_t AlignUp32(uint64_t bytes) { return (bytes + 31u) / 32u * 32u; }

// A scalar store to GM goes into the core's data cache: the whole 64-byte line is loaded (the
// part inside [lo, hi), the tensor's buffer) and later written back whole.
inline DcacheLine& DcacheLoad(BlockContext& block, const uint8_t* addr, size_t bytes,
                              const uint8_t* lo, const uint8_t* hi) {
  const uintptr_t line = reinterpret_cast<uintptr_t>(addr) & ~(kDcacheLine - 1);
  DcacheLine& entry = block.dcache[line];
  for (uintptr_t i = 0; i < kDcacheLine; ++i) {
    const auto* p = reinterpret_cast<const uint8_t*>(line + i);
    if (!entry.valid[i] && p >= lo && p < hi) {
      entry.bytes[i] = *p;
      entry.valid[i] = true;
    }
  }
  (void)bytes;
  return entry;
}

inline void DcacheWriteBack(uintptr_t line, const DcacheLine& entry) {
  if (!entry.dirty) return;
  for (uintptr_t i = 0; i < kDcacheLine; ++i) {
    if (entry.valid[i]) *reinterpret_cast<uint8_t*>(line + i) = entry.bytes[i];
  }
}

// Which unit touches a buffer; decides whether a queue tensor read is synchronised.
enum class Unit { None, MTE2, V, MTE3, S, Cube };

inline const char* UnitName(Unit u) {
  switch (u) {
    case Unit::None: return "nobody";
    case Unit::MTE2: return "MTE2 (DataCopy GM->UB)";
    case Unit::V: return "the vector unit";
    case Unit::MTE3: return "MTE3 (DataCopy UB->GM)";
    case Unit::S: return "the scalar unit";
    case Unit::Cube: return "the cube unit (Matmul)";
  }
  return "?";
}

enum class SlotState { Calc, Free, Allocated, Enqueued, Dequeued };

// One buffer carved out of the UB by TPipe::InitBuffer.
struct Slot {
  uint8_t* base = nullptr;
  uint32_t bytes = 0;
  SlotState state = SlotState::Calc;
  Unit last_writer = Unit::None;
  const void* owner = nullptr;  // the TQue / TBuf object
  uint8_t position = 0;         // AscendC::TPosition of the TQue / TBuf, as its integer value
  std::string name;             // e.g. "TQue<VECIN> buffer 1/2"
};

enum class Access { Read, Write };

}  // namespace detail
}  // namespace twin

// ------------------------------------------------------------------------------------------
// The AscendC API subset.
// ------------------------------------------------------------------------------------------
namespace AscendC {

enum class TPosition : uint8_t {
  GM, A1, A2, B1, B2, C1, C2, CO1, CO2, VECIN, VECOUT, VECCALC,
  LCM = VECCALC, SPM, SHM = SPM, TSCM, C2PIPE2GM, C2PIPE2LOCAL, MAX
};
using QuePosition = TPosition;

inline const char* PositionName(TPosition p) {
  switch (p) {
    case TPosition::VECIN: return "VECIN";
    case TPosition::VECOUT: return "VECOUT";
    case TPosition::VECCALC: return "VECCALC";
    case TPosition::GM: return "GM";
    case TPosition::TSCM: return "TSCM";
    case TPosition::CO1: return "CO1";
    default: return "cube position";
  }
}

enum class HardEvent : uint8_t {
  MTE2_MTE1, MTE1_MTE2, MTE1_M, M_MTE1, MTE2_V, V_MTE2, MTE3_V, V_MTE3, M_V, V_M, V_V,
  MTE3_MTE1, MTE1_MTE3, MTE1_V, MTE2_M, M_MTE2, V_MTE1, M_FIX, FIX_M, MTE3_MTE2, MTE2_MTE3,
  S_V, V_S, S_MTE2, MTE2_S, S_MTE3, MTE3_S, MTE2_FIX, FIX_MTE2, FIX_S, M_S, FIX_MTE3, MAX
};
using TEventID = int8_t;

inline const char* HardEventName(HardEvent event) {
  static const char* const names[] = {
      "MTE2_MTE1", "MTE1_MTE2", "MTE1_M",    "M_MTE1",    "MTE2_V",    "V_MTE2",   "MTE3_V",
      "V_MTE3",    "M_V",       "V_M",       "V_V",       "MTE3_MTE1", "MTE1_MTE3", "MTE1_V",
      "MTE2_M",    "M_MTE2",    "V_MTE1",    "M_FIX",     "FIX_M",     "MTE3_MTE2", "MTE2_MTE3",
      "S_V",       "V_S",       "S_MTE2",    "MTE2_S",    "S_MTE3",    "MTE3_S",    "MTE2_FIX",
      "FIX_MTE2",  "FIX_S",     "M_S",       "FIX_MTE3"};
  const auto i = static_cast<size_t>(event);
  return i < sizeof(names) / sizeof(names[0]) ? names[i] : "?";
}

enum class RoundMode { CAST_NONE = 0, CAST_RINT, CAST_FLOOR, CAST_CEIL, CAST_ROUND, CAST_TRUNC,
                       CAST_ODD };
enum class CMPMODE { LT = 0, GT, EQ, LE, GE, NE };
enum class SELMODE { VSEL_CMPMASK_SPR = 0, VSEL_TENSOR_SCALAR_MODE, VSEL_TENSOR_TENSOR_MODE };

// g_coreType of CANN's kernel_utils_macros.h: AIC/AIV on the 910B's cube/vector cores, MIX on
// the 310B's coupled core (where neither ASCEND_IS_AIC nor ASCEND_IS_AIV holds).
constexpr int32_t MIX = 0;
constexpr int32_t AIC = 1;
constexpr int32_t AIV = 2;
inline int32_t TwinCoreType() {
  const auto* block = twin::detail::current_block;
  if (block == nullptr || block->core == twin::detail::Core::AiCore) return MIX;
  return block->core == twin::detail::Core::Aic ? AIC : AIV;
}
#define ASCEND_IS_AIV (::AscendC::TwinCoreType() == ::AscendC::AIV)
#define ASCEND_IS_AIC (::AscendC::TwinCoreType() == ::AscendC::AIC)
#define ASCEND_IS_NOT_AIV (::AscendC::TwinCoreType() != ::AscendC::AIV)
#define ASCEND_IS_NOT_AIC (::AscendC::TwinCoreType() != ::AscendC::AIC)

inline int64_t GetBlockIdx() { return twin::detail::Block("GetBlockIdx").block_idx; }
inline int64_t GetBlockNum() { return twin::detail::Block("GetBlockNum").block_dim; }
inline int64_t GetSubBlockIdx() { return twin::detail::Block("GetSubBlockIdx").subblock_idx; }
inline int64_t GetTaskRation() { return twin::detail::Block("GetTaskRation").task_ration; }

// The system workspace (GM) the high-level APIs use; on separated chips the Matmul API keeps the
// messages between the vector and the cube core there. Host side: GetLibApiWorkSpaceSize().
inline void SetSysWorkspace(GM_ADDR workspace) {
  twin::detail::Block("SetSysWorkspace").sys_workspace = workspace;
}
inline GM_ADDR GetSysWorkSpacePtr() { return twin::detail::Block("GetSysWorkSpacePtr").sys_workspace; }

// The twin runs every instruction in program order, so a barrier has nothing left to order.
template <pipe_t pipe>
inline void PipeBarrier() {}

// Hard all-core barrier. On hardware the blocks beyond the core count are not resident yet,
// so a SyncAll in a launch wider than the chip never returns.
template <bool isAIVOnly = true>
inline void SyncAll() {
  auto& block = twin::detail::Block("SyncAll");
  static_assert(isAIVOnly, "the twin emulates SyncAll<true> (all vector cores) only");
  twin::detail::RequireVectorCore("SyncAll");
  // The barrier is over every vector core of the launch: 2 * blockDim in a 910B MIX kernel.
  const int64_t cores = block.block_dim * block.task_ration;
  if (cores > static_cast<int64_t>(block.chip.core_num)) {
    twin::detail::Violate(
        "syncall-block-dim", "SyncAll",
        twin::detail::Str("blockDim ", block.block_dim,
                          block.task_ration > 1
                              ? twin::detail::Str(" x ", block.task_ration,
                                                  " vector cores per block = ", cores)
                              : std::string(),
                          " exceeds the ", block.chip.core_num, " cores of ", block.chip.name,
                          "; blocks not resident at the same time never meet (deadlock)"));
  }
  block.barrier->Wait();
}

template <HardEvent event>
inline void SetFlag(int32_t eventID) {
  auto& block = twin::detail::Block("SetFlag");
  if (eventID < 0 || eventID > 7) {
    twin::detail::Violate("event-id", "SetFlag",
                          twin::detail::Str("event id ", eventID, " outside [0, 7]"));
  }
  ++block.pending_flags[{static_cast<int>(event), eventID}];
}

template <HardEvent event>
inline void WaitFlag(int32_t eventID) {
  auto& block = twin::detail::Block("WaitFlag");
  auto it = block.pending_flags.find({static_cast<int>(event), eventID});
  if (it == block.pending_flags.end() || it->second == 0) {
    twin::detail::Violate(
        "flag-pairing", "WaitFlag",
        twin::detail::Str("HardEvent::", HardEventName(event), " event id ", eventID,
                          " was never set by a matching SetFlag: the pipe would wait forever"));
  }
  if (--it->second == 0) block.pending_flags.erase(it);
}

template <class T>
class GlobalTensor {
 public:
  using PrimType = T;
  // bufferSize is in elements; the twin checks every GM access against it.
  void SetGlobalBuffer(__gm__ T* buffer, uint64_t bufferSize) {
    data_ = buffer;
    size_ = bufferSize;
    lo_ = reinterpret_cast<const uint8_t*>(buffer);
    hi_ = reinterpret_cast<const uint8_t*>(buffer + bufferSize);
  }
  void SetGlobalBuffer(__gm__ T* buffer) {
    data_ = buffer;
    size_ = std::numeric_limits<uint64_t>::max();
    lo_ = hi_ = nullptr;  // extent unknown: the data cache model covers only the element itself
  }
  // A scalar load sees the core's own cached stores (the data cache), else GM.
  T GetValue(uint64_t offset) const {
    CheckRange(offset, 1, "GlobalTensor::GetValue");
    auto* block = twin::detail::current_block;
    if (block != nullptr && block->model_dcache) {
      const auto* addr = reinterpret_cast<const uint8_t*>(data_ + offset);
      const uintptr_t line = reinterpret_cast<uintptr_t>(addr) & ~(twin::detail::kDcacheLine - 1);
      auto it = block->dcache.find(line);
      if (it != block->dcache.end() && it->second.valid[reinterpret_cast<uintptr_t>(addr) - line]) {
        T value;
        std::memcpy(&value, it->second.bytes + (reinterpret_cast<uintptr_t>(addr) - line),
                    sizeof(T));
        return value;
      }
    }
    return data_[offset];
  }
  // Non-const, as CANN declares it (GlobalTensor::SetValue(const uint64_t, PrimType)). A plain
  // scalar store: on the chip it goes through the core's data cache, whose 64-byte line is
  // written back whole at kernel end or DataCacheCleanAndInvalid (see README "data cache").
  void SetValue(uint64_t offset, T value) {
    CheckRange(offset, 1, "GlobalTensor::SetValue");
    auto* block = twin::detail::current_block;
    if (block == nullptr || !block->model_dcache) {
      data_[offset] = value;
      return;
    }
    auto* addr = reinterpret_cast<const uint8_t*>(data_ + offset);
    const uint8_t* lo = lo_ != nullptr ? lo_ : addr;
    const uint8_t* hi = hi_ != nullptr ? hi_ : addr + sizeof(T);
    auto& line = twin::detail::DcacheLoad(*block, addr, sizeof(T), lo, hi);
    std::memcpy(line.bytes + (reinterpret_cast<uintptr_t>(addr) % twin::detail::kDcacheLine),
                &value, sizeof(T));
    line.dirty = true;
  }
  GlobalTensor operator[](uint64_t offset) const {
    if (offset > size_) CheckRange(offset, 0, "GlobalTensor::operator[]");
    GlobalTensor sub;
    sub.lo_ = lo_;
    sub.hi_ = hi_;
    sub.data_ = data_ + offset;
    sub.size_ = size_ == std::numeric_limits<uint64_t>::max() ? size_ : size_ - offset;
    return sub;
  }
  uint64_t GetSize() const { return size_; }
  // CANN: the no-argument form returns a pointer to const, the offset form a writable one.
  const __gm__ T* GetPhyAddr() const { return data_; }
  __gm__ T* GetPhyAddr(uint64_t offset) const { return data_ + offset; }

  // Twin internal: throws unless [offset, offset + count) lies inside the buffer.
  void CheckRange(uint64_t offset, uint64_t count, const char* call) const {
    if (data_ == nullptr) {
      twin::detail::Violate("gm-bounds", call, "GlobalTensor used before SetGlobalBuffer");
    }
    if (offset > size_ || count > size_ - offset) {
      twin::detail::Violate("gm-bounds", call,
                            twin::detail::Str("elements [", offset, ", ", offset + count,
                                              ") outside the global buffer of ", size_,
                                              " elements"));
    }
  }

 private:
  T* data_ = nullptr;
  uint64_t size_ = 0;
  const uint8_t* lo_ = nullptr;  // bytes of the SetGlobalBuffer buffer (the data cache's bounds)
  const uint8_t* hi_ = nullptr;
};

enum class CacheLine : uint64_t { SINGLE_CACHE_LINE = 0, ENTIRE_DATA_CACHE };
enum class DcciDst : uint64_t { CACHELINE_ALL = 0, CACHELINE_UB, CACHELINE_OUT, CACHELINE_ATOMIC };

// Writes the data cache's dirty line holding the tensor's first element (or every line) back to
// GM and drops it, so other cores and MTE2 see the scalar stores.
template <class T, CacheLine entireType, DcciDst dcciDst = DcciDst::CACHELINE_OUT>
inline void DataCacheCleanAndInvalid(const GlobalTensor<T>& dstTensor) {
  auto& block = twin::detail::Block("DataCacheCleanAndInvalid");
  if (entireType == CacheLine::ENTIRE_DATA_CACHE) {
    for (const auto& [line, entry] : block.dcache) twin::detail::DcacheWriteBack(line, entry);
    block.dcache.clear();
    return;
  }
  const uintptr_t line =
      reinterpret_cast<uintptr_t>(dstTensor.GetPhyAddr()) & ~(twin::detail::kDcacheLine - 1);
  auto it = block.dcache.find(line);
  if (it == block.dcache.end()) return;
  twin::detail::DcacheWriteBack(line, it->second);
  block.dcache.erase(it);
}

template <class T>
class LocalTensor {
 public:
  using PrimType = T;
  LocalTensor() = default;

  T GetValue(uint32_t offset) const {
    Check(offset, 1, twin::detail::Access::Read, twin::detail::Unit::S,
          "LocalTensor::GetValue", false);
    return data_[offset];
  }
  void SetValue(uint32_t offset, T value) const {
    Check(offset, 1, twin::detail::Access::Write, twin::detail::Unit::S,
          "LocalTensor::SetValue", false);
    data_[offset] = value;
  }
  LocalTensor operator[](uint32_t offset) const {
    if (slot_ == nullptr) {
      twin::detail::Violate("ub-bounds", "LocalTensor::operator[]",
                            "tensor is not bound to a buffer (AllocTensor/Get not called)");
    }
    if (offset > size_) {
      twin::detail::Violate("ub-bounds", "LocalTensor::operator[]",
                            twin::detail::Str("offset ", offset, " past the end of a tensor of ",
                                              size_, " elements in ", slot_->name));
    }
    return LocalTensor(slot_, data_ + offset, size_ - offset);
  }
  uint32_t GetSize() const { return size_; }
  template <class U>
  LocalTensor<U> ReinterpretCast() const {
    return LocalTensor<U>(slot_, reinterpret_cast<U*>(data_),
                          static_cast<uint32_t>(uint64_t(size_) * sizeof(T) / sizeof(U)));
  }
  uint64_t GetPhyAddr() const {
    return slot_ == nullptr ? 0 : reinterpret_cast<uintptr_t>(data_);
  }

  // ---- twin internals (not part of the Ascend C API) ----
  LocalTensor(twin::detail::Slot* slot, T* data, uint32_t size)
      : slot_(slot), data_(data), size_(size) {}
  T* TwinData() const { return data_; }
  twin::detail::Slot* TwinSlot() const { return slot_; }

  // Asserts the UB rules for touching elements [offset, offset + count) from `unit`.
  void Check(uint64_t offset, uint64_t count, twin::detail::Access access, twin::detail::Unit unit,
             const std::string& call, bool vector_operand) const {
    using namespace twin::detail;
    RequireVectorCore(call);
    if (slot_ == nullptr) {
      Violate("ub-bounds", call, "tensor is not bound to a buffer (AllocTensor/Get not called)");
    }
    if (vector_operand && reinterpret_cast<uintptr_t>(data_) % 32u != 0) {
      Violate("ub-alignment", call,
              Str("operand in ", slot_->name, " starts ",
                  reinterpret_cast<uintptr_t>(data_) - reinterpret_cast<uintptr_t>(slot_->base),
                  " bytes into its buffer, not on a 32-byte boundary"));
    }
    if (offset + count > size_) {
      Violate("ub-bounds", call,
              Str("elements [", offset, ", ", offset + count, ") outside a tensor of ", size_,
                  " elements in ", slot_->name));
    }
    switch (slot_->state) {
      case SlotState::Free:
        Violate("queue-protocol", call,
                Str(slot_->name, " used after FreeTensor (or before AllocTensor)"));
      case SlotState::Enqueued:
        Violate("queue-protocol", call,
                Str(slot_->name, " used while EnQue'd: DeQue it before touching it"));
      case SlotState::Allocated:
        // Between AllocTensor and EnQue only the unit that wrote the data may read it: another
        // unit would read before the producer finished (EnQue/DeQue is the synchronisation).
        if (access == Access::Read && slot_->last_writer != unit) {
          Violate("queue-protocol", call,
                  Str("reads ", slot_->name, " as ", UnitName(unit),
                      " but it was last written by ", UnitName(slot_->last_writer),
                      " and never EnQue'd/DeQue'd"));
        }
        break;
      case SlotState::Calc:
      case SlotState::Dequeued:
        break;
    }
    if (access == Access::Write) slot_->last_writer = unit;
  }

 private:
  twin::detail::Slot* slot_ = nullptr;
  T* data_ = nullptr;
  uint32_t size_ = 0;
};

class TPipe;

template <TPosition pos, int32_t depth = 1>
class TQue {
 public:
  TQue() = default;
  TQue(const TQue&) = delete;
  TQue& operator=(const TQue&) = delete;

  template <class T>
  LocalTensor<T> AllocTensor() {
    const std::string call = Call("AllocTensor");
    if (slots_.empty()) {
      twin::detail::Violate("queue-protocol", call, "queue was never given buffers by InitBuffer");
    }
    for (auto* slot : slots_) {
      if (slot->state == twin::detail::SlotState::Free) {
        slot->state = twin::detail::SlotState::Allocated;
        slot->last_writer = twin::detail::Unit::None;
        return LocalTensor<T>(slot, reinterpret_cast<T*>(slot->base),
                              static_cast<uint32_t>(slot->bytes / sizeof(T)));
      }
    }
    twin::detail::Violate("queue-protocol", call,
                          twin::detail::Str("all ", slots_.size(),
                                            " buffers are in use (not freed): the hardware would "
                                            "block forever"));
  }

  template <class T>
  bool EnQue(const LocalTensor<T>& tensor) {
    const std::string call = Call("EnQue");
    twin::detail::Slot* slot = Owned(tensor, call);
    if (slot->state != twin::detail::SlotState::Allocated) {
      twin::detail::Violate("queue-protocol", call,
                            slot->name + " was not AllocTensor'd (or is already EnQue'd)");
    }
    slot->state = twin::detail::SlotState::Enqueued;
    fifo_.push_back(slot);
    return true;
  }

  template <class T>
  LocalTensor<T> DeQue() {
    const std::string call = Call("DeQue");
    if (fifo_.empty()) {
      twin::detail::Violate("queue-protocol", call,
                            "queue is empty (no EnQue before DeQue): the hardware would block "
                            "forever");
    }
    twin::detail::Slot* slot = fifo_.front();
    fifo_.pop_front();
    slot->state = twin::detail::SlotState::Dequeued;
    return LocalTensor<T>(slot, reinterpret_cast<T*>(slot->base),
                          static_cast<uint32_t>(slot->bytes / sizeof(T)));
  }

  template <class T>
  void FreeTensor(LocalTensor<T>& tensor) {
    const std::string call = Call("FreeTensor");
    twin::detail::Slot* slot = Owned(tensor, call);
    if (slot->state == twin::detail::SlotState::Free) {
      twin::detail::Violate("queue-protocol", call, "double FreeTensor of " + slot->name);
    }
    if (slot->state == twin::detail::SlotState::Enqueued) {
      twin::detail::Violate("queue-protocol", call, "FreeTensor of " + slot->name +
                                                        " while it is still EnQue'd");
    }
    slot->state = twin::detail::SlotState::Free;
    slot->last_writer = twin::detail::Unit::None;
  }

 private:
  friend class TPipe;
  std::string Call(const char* method) const {
    return twin::detail::Str("TQue<", PositionName(pos), ">::", method);
  }
  template <class T>
  twin::detail::Slot* Owned(const LocalTensor<T>& tensor, const std::string& call) const {
    twin::detail::Slot* slot = tensor.TwinSlot();
    if (slot == nullptr || slot->owner != this) {
      twin::detail::Violate("queue-protocol", call, "tensor does not belong to this queue");
    }
    if (reinterpret_cast<uint8_t*>(tensor.TwinData()) != slot->base) {
      twin::detail::Violate("queue-protocol", call,
                            "pass the tensor AllocTensor/DeQue returned, not a sub-tensor");
    }
    return slot;
  }
  std::vector<twin::detail::Slot*> slots_;
  std::deque<twin::detail::Slot*> fifo_;
};

template <TPosition pos>
class TBuf {
 public:
  TBuf() = default;
  TBuf(const TBuf&) = delete;
  TBuf& operator=(const TBuf&) = delete;

  template <class T>
  LocalTensor<T> Get() const {
    return Get<T>(static_cast<uint32_t>(Slot("TBuf::Get")->bytes / sizeof(T)));
  }
  // len is in elements of T.
  template <class T>
  LocalTensor<T> Get(uint32_t len) const {
    twin::detail::Slot* slot = Slot("TBuf::Get");
    if (uint64_t(len) * sizeof(T) > slot->bytes) {
      twin::detail::Violate("ub-bounds", "TBuf::Get",
                            twin::detail::Str(len, " elements of ", sizeof(T), " bytes exceed the ",
                                              slot->bytes, "-byte buffer"));
    }
    return LocalTensor<T>(slot, reinterpret_cast<T*>(slot->base), len);
  }

 private:
  friend class TPipe;
  twin::detail::Slot* Slot(const char* call) const {
    if (slot_ == nullptr) {
      twin::detail::Violate("queue-protocol", call, "TBuf was never given a buffer by InitBuffer");
    }
    return slot_;
  }
  twin::detail::Slot* slot_ = nullptr;
};

class TPipe {
 public:
  // CANN InitBuffer notes: at most 8 QUE buffers per TPosition on Atlas A2 (4 on Atlas training
  // products), and at most 64 buffers in a kernel in total.
  static constexpr uint32_t kMaxQueBuffersPerPosition = 8;
  static constexpr uint32_t kMaxBuffersTotal = 64;

  TPipe() : chip_(twin::detail::Block("TPipe::TPipe").chip) {
    // 256-byte aligned base so that offsets and addresses agree on every alignment rule.
    storage_.reset(new uint8_t[chip_.ub_bytes + 256u]);
    const uintptr_t raw = reinterpret_cast<uintptr_t>(storage_.get());
    ub_ = storage_.get() + ((256u - raw % 256u) % 256u);
    // Fresh UB holds garbage on hardware; NaN bytes make reads of unwritten data visible.
    std::memset(ub_, 0xff, chip_.ub_bytes);
  }
  TPipe(const TPipe&) = delete;
  TPipe& operator=(const TPipe&) = delete;

  // num buffers of len bytes each (len rounded up to 32 bytes, as the hardware allocator does).
  template <TPosition pos, int32_t depth>
  void InitBuffer(TQue<pos, depth>& que, uint8_t num, uint32_t len) {
    const std::string call = twin::detail::Str("TPipe::InitBuffer(TQue<", PositionName(pos),
                                               ">, num=", int(num), ", len=", len, ")");
    if (!que.slots_.empty()) twin::detail::Violate("init-buffer", call, "queue initialised twice");
    if (num == 0 || len == 0) {
      twin::detail::Violate("init-buffer", call, "num and len must both be positive");
    }
    Reserve(pos, num, len, /*is_queue=*/true, call);
    for (uint8_t i = 0; i < num; ++i) {
      auto* slot = Carve(pos, len, twin::detail::SlotState::Free, &que,
                         twin::detail::Str("TQue<", PositionName(pos), "> buffer ", int(i) + 1,
                                           "/", int(num)));
      que.slots_.push_back(slot);
    }
  }

  template <TPosition pos>
  void InitBuffer(TBuf<pos>& buf, uint32_t len) {
    const std::string call = twin::detail::Str("TPipe::InitBuffer(TBuf<", PositionName(pos),
                                               ">, len=", len, ")");
    if (buf.slot_ != nullptr) twin::detail::Violate("init-buffer", call, "TBuf initialised twice");
    if (len == 0) twin::detail::Violate("init-buffer", call, "len must be positive");
    Reserve(pos, 1, len, /*is_queue=*/false, call);
    buf.slot_ = Carve(pos, len, twin::detail::SlotState::Calc, &buf,
                      twin::detail::Str("TBuf<", PositionName(pos), ">"));
  }

  template <HardEvent event>
  TEventID FetchEventID() {
    return static_cast<TEventID>(next_event_[static_cast<int>(event)]++ % 8);
  }
  TEventID FetchEventID(HardEvent event) {
    return static_cast<TEventID>(next_event_[static_cast<int>(event)]++ % 8);
  }
  void Destroy() {}

  // Twin internal: bytes handed out so far.
  uint32_t TwinUsedBytes() const { return used_; }

 private:
  // TBufs do not count toward the per-position limit (it is a limit of the queue hardware);
  // every buffer counts toward the kernel's total.
  void Reserve(TPosition pos, uint32_t num, uint32_t len, bool is_queue, const std::string& call) {
    uint32_t& count = que_buffers_per_position_[pos];
    if (is_queue && count + num > kMaxQueBuffersPerPosition) {
      twin::detail::Violate(
          "buffers-per-position", call,
          twin::detail::Str(count, " QUE buffers already on ", PositionName(pos), " + ", num,
                            " requested > the limit of ", kMaxQueBuffersPerPosition,
                            " (TBufs are not counted)"));
    }
    if (buffers_total_ + num > kMaxBuffersTotal) {
      twin::detail::Violate(
          "buffers-total", call,
          twin::detail::Str(buffers_total_, " buffers already in this kernel + ", num,
                            " requested > the limit of ", kMaxBuffersTotal));
    }
    const uint64_t need = uint64_t(num) * twin::detail::AlignUp32(len);
    if (used_ + need > chip_.ub_bytes) {
      twin::detail::Violate(
          "ub-budget", call,
          twin::detail::Str(used_, " bytes already used + ", need, " requested = ", used_ + need,
                            " > the ", chip_.ub_bytes, "-byte UB budget of ", chip_.name));
    }
    if (is_queue) count += num;
    buffers_total_ += num;
  }
  twin::detail::Slot* Carve(TPosition pos, uint32_t len, twin::detail::SlotState state,
                            const void* owner, std::string name) {
    slots_.emplace_back();
    twin::detail::Slot& slot = slots_.back();
    slot.position = static_cast<uint8_t>(pos);
    slot.base = ub_ + used_;
    slot.bytes = static_cast<uint32_t>(twin::detail::AlignUp32(len));
    slot.state = state;
    slot.owner = owner;
    slot.name = std::move(name);
    used_ += slot.bytes;
    return &slot;
  }

  twin::ChipInfo chip_;
  std::unique_ptr<uint8_t[]> storage_;
  uint8_t* ub_ = nullptr;
  uint32_t used_ = 0;
  std::deque<twin::detail::Slot> slots_;  // deque: slot addresses stay valid as it grows
  std::map<TPosition, uint32_t> que_buffers_per_position_;
  uint32_t buffers_total_ = 0;
  std::map<int, uint32_t> next_event_;
};

// ---------------------------------- data movement ----------------------------------------

namespace detail_copy {
template <class T>
void Check32(uint64_t count, const char* call) {
  if (count * sizeof(T) % 32u != 0) {
    twin::detail::Violate(
        "datacopy-32b", call,
        twin::detail::Str(count, " elements x ", sizeof(T), " bytes = ", count * sizeof(T),
                          " bytes is not a multiple of 32 (the hardware would silently copy only ",
                          count * sizeof(T) / 32u * 32u, "); use DataCopyPad for ragged tails"));
  }
}
}  // namespace detail_copy

template <class T>
void DataCopy(const LocalTensor<T>& dst, const GlobalTensor<T>& src, const uint32_t count) {
  const char* call = "DataCopy(GM->UB)";
  detail_copy::Check32<T>(count, call);
  src.CheckRange(0, count, call);
  dst.Check(0, count, twin::detail::Access::Write, twin::detail::Unit::MTE2, call, true);
  std::memcpy(dst.TwinData(), src.GetPhyAddr(), size_t(count) * sizeof(T));
}

template <class T>
void DataCopy(const GlobalTensor<T>& dst, const LocalTensor<T>& src, const uint32_t count) {
  const char* call = "DataCopy(UB->GM)";
  detail_copy::Check32<T>(count, call);
  dst.CheckRange(0, count, call);
  src.Check(0, count, twin::detail::Access::Read, twin::detail::Unit::MTE3, call, true);
  std::memcpy(dst.GetPhyAddr(0), src.TwinData(), size_t(count) * sizeof(T));
  twin::detail::RecordGmWrite(dst.GetPhyAddr(0), uint64_t(count) * sizeof(T));
}

template <class T>
void DataCopy(const LocalTensor<T>& dst, const LocalTensor<T>& src, const uint32_t count) {
  const char* call = "DataCopy(UB->UB)";
  detail_copy::Check32<T>(count, call);
  src.Check(0, count, twin::detail::Access::Read, twin::detail::Unit::V, call, true);
  dst.Check(0, count, twin::detail::Access::Write, twin::detail::Unit::V, call, true);
  std::memmove(dst.TwinData(), src.TwinData(), size_t(count) * sizeof(T));
}

struct DataCopyExtParams {
  uint16_t blockCount = 1;  // rows
  uint32_t blockLen = 0;    // bytes per row (any multiple of sizeof(T))
  uint32_t srcStride = 0;   // gap after each row: bytes on GM, 32-byte blocks on UB
  uint32_t dstStride = 0;   // gap after each row: bytes on GM, 32-byte blocks on UB
  uint32_t rsv = 0;
  DataCopyExtParams() = default;
  DataCopyExtParams(uint16_t count, uint32_t len, uint32_t src_stride, uint32_t dst_stride,
                    uint32_t reserved)
      : blockCount(count), blockLen(len), srcStride(src_stride), dstStride(dst_stride),
        rsv(reserved) {}
};

template <class T>
struct DataCopyPadExtParams {
  bool isPad = false;
  uint8_t leftPadding = 0;   // elements; the twin supports 0 only
  uint8_t rightPadding = 0;  // elements after each row filled with paddingValue when isPad
  T paddingValue{};
  DataCopyPadExtParams() = default;
  DataCopyPadExtParams(bool pad, uint8_t left, uint8_t right, T value)
      : isPad(pad), leftPadding(left), rightPadding(right), paddingValue(value) {}
};

namespace detail_copy {
// The twin_chips.h name of an element type, for the per-chip copy and cast tables.
template <class T>
constexpr twin::ElemType ElemTypeOf() {
  using E = twin::ElemType;
  if constexpr (std::is_same_v<T, int8_t>) return E::Int8;
  else if constexpr (std::is_same_v<T, uint8_t>) return E::UInt8;
  else if constexpr (std::is_same_v<T, int16_t>) return E::Int16;
  else if constexpr (std::is_same_v<T, uint16_t>) return E::UInt16;
  else if constexpr (std::is_same_v<T, half>) return E::Half;
  else if constexpr (std::is_same_v<T, bfloat16_t>) return E::BFloat16;
  else if constexpr (std::is_same_v<T, int32_t>) return E::Int32;
  else if constexpr (std::is_same_v<T, uint32_t>) return E::UInt32;
  else if constexpr (std::is_same_v<T, float>) return E::Float;
  else return E::Other;
}

// A DataCopyPad the chip has no copy intrinsic for fails to compile for the device (dav_m300:
// no copy_gm_to_ubuf_align overload for bfloat16_t); the twin, which compiles every type, fails
// the call instead.
template <class T>
void CheckPadCopyType(const char* call) {
  const auto& block = twin::detail::Block(call);
  const twin::Chip chip =
      block.chip.separated ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;
  if (!twin::DataCopyPadSupported(chip, ElemTypeOf<T>(), sizeof(T))) {
    twin::detail::Violate(
        "copy-dtype", call,
        twin::detail::Str("no DataCopyPad intrinsic for ", twin::ElemTypeName(ElemTypeOf<T>()),
                          " on ", block.chip.name,
                          chip == twin::Chip::Ascend310B
                              ? " (dav_m300 copy_*_align: int8/uint8/int16/uint16/half/int32/"
                                "uint32/float); copy bfloat16_t bits as half"
                              : " (dav_c220 copy_*_align_b8/_b16/_b32: 1, 2 or 4-byte elements)"));
  }
}

inline void CheckPadParams(const DataCopyExtParams& p, size_t elem, const char* call) {
  if (p.blockCount == 0 || p.blockLen == 0) {
    twin::detail::Violate("datacopypad-params", call, "blockCount and blockLen must be positive");
  }
  if (p.blockLen % elem != 0) {
    twin::detail::Violate("datacopypad-params", call,
                          twin::detail::Str("blockLen ", p.blockLen,
                                            " bytes is not a whole number of ", elem,
                                            "-byte elements"));
  }
}
}  // namespace detail_copy

// GM -> UB, byte exact. Row r lands at a 32-byte aligned UB offset; the bytes between the end
// of the row and the next 32-byte boundary are rightPadding x paddingValue (isPad) and undefined
// after that: the twin fills them with 0xff bytes (NaN) so a kernel that reads them fails.
template <class T>
void DataCopyPad(const LocalTensor<T>& dst, const GlobalTensor<T>& src,
                 const DataCopyExtParams& p, const DataCopyPadExtParams<T>& pad) {
  const char* call = "DataCopyPad(GM->UB)";
  detail_copy::CheckPadParams(p, sizeof(T), call);
  detail_copy::CheckPadCopyType<T>(call);
  if (pad.leftPadding != 0) {
    throw std::logic_error("DataCopyPad: leftPadding is not emulated by the twin yet");
  }
  const uint64_t row_elems = p.blockLen / sizeof(T);
  const uint64_t row_ub_bytes = twin::detail::AlignUp32(p.blockLen);
  if (pad.isPad && p.blockLen + uint64_t(pad.rightPadding) * sizeof(T) > row_ub_bytes) {
    twin::detail::Violate("datacopypad-params", call,
                          twin::detail::Str("rightPadding ", int(pad.rightPadding),
                                            " runs past the 32-byte block of the row"));
  }
  const uint64_t ub_pitch = row_ub_bytes + uint64_t(p.dstStride) * 32u;
  const uint64_t gm_pitch = p.blockLen + uint64_t(p.srcStride);
  const uint64_t ub_span = (p.blockCount - 1) * ub_pitch + row_ub_bytes;
  src.CheckRange(0, ((p.blockCount - 1) * gm_pitch + p.blockLen) / sizeof(T), call);
  dst.Check(0, ub_span / sizeof(T), twin::detail::Access::Write, twin::detail::Unit::MTE2, call,
            true);
  auto* ub = reinterpret_cast<uint8_t*>(dst.TwinData());
  const auto* gm = reinterpret_cast<const uint8_t*>(src.GetPhyAddr());
  for (uint64_t r = 0; r < p.blockCount; ++r) {
    uint8_t* row = ub + r * ub_pitch;
    std::memcpy(row, gm + r * gm_pitch, p.blockLen);
    std::memset(row + p.blockLen, 0xff, row_ub_bytes - p.blockLen);
    if (pad.isPad) {
      T* tail = reinterpret_cast<T*>(row) + row_elems;
      for (uint32_t i = 0; i < pad.rightPadding; ++i) tail[i] = pad.paddingValue;
    }
  }
}

// UB -> GM, byte exact: writes exactly blockLen bytes per row, nothing beyond.
template <class T>
void DataCopyPad(const GlobalTensor<T>& dst, const LocalTensor<T>& src,
                 const DataCopyExtParams& p) {
  const char* call = "DataCopyPad(UB->GM)";
  detail_copy::CheckPadParams(p, sizeof(T), call);
  detail_copy::CheckPadCopyType<T>(call);
  const uint64_t row_ub_bytes = twin::detail::AlignUp32(p.blockLen);
  const uint64_t ub_pitch = row_ub_bytes + uint64_t(p.srcStride) * 32u;
  const uint64_t gm_pitch = p.blockLen + uint64_t(p.dstStride);
  dst.CheckRange(0, ((p.blockCount - 1) * gm_pitch + p.blockLen) / sizeof(T), call);
  src.Check(0, ((p.blockCount - 1) * ub_pitch + p.blockLen) / sizeof(T),
            twin::detail::Access::Read, twin::detail::Unit::MTE3, call, true);
  const auto* ub = reinterpret_cast<const uint8_t*>(src.TwinData());
  auto* gm = reinterpret_cast<uint8_t*>(dst.GetPhyAddr(0));
  for (uint64_t r = 0; r < p.blockCount; ++r) {
    std::memcpy(gm + r * gm_pitch, ub + r * ub_pitch, p.blockLen);
    twin::detail::RecordGmWrite(gm + r * gm_pitch, p.blockLen);
  }
}

// ---------------------------------- vector ops -------------------------------------------

namespace detail_vec {
template <class T>
constexpr bool kIsFloatForTranscendental = std::is_same_v<T, float> || std::is_same_v<T, half>;

template <class T>
double ToD(T v) {
  if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16_t>) {
    return static_cast<double>(static_cast<float>(v));
  } else {
    return static_cast<double>(v);
  }
}
// Each op rounds once to T (double -> float is exact-enough for +,-,*,/ of floats).
template <class T>
T FromD(double v) {
  if constexpr (std::is_same_v<T, half> || std::is_same_v<T, bfloat16_t>) {
    return T(static_cast<float>(v));
  } else {
    return static_cast<T>(v);
  }
}

template <class T>
void Read(const LocalTensor<T>& t, int64_t count, const char* call) {
  if (count < 0) twin::detail::Violate("vector-count", call, "negative element count");
  t.Check(0, uint64_t(count), twin::detail::Access::Read, twin::detail::Unit::V, call, true);
}
template <class T>
void Write(const LocalTensor<T>& t, int64_t count, const char* call) {
  if (count < 0) twin::detail::Violate("vector-count", call, "negative element count");
  t.Check(0, uint64_t(count), twin::detail::Access::Write, twin::detail::Unit::V, call, true);
}

template <class T, class F>
void Unary(const LocalTensor<T>& dst, const LocalTensor<T>& src, int32_t count, const char* call,
           F f) {
  Read(src, count, call);
  Write(dst, count, call);
  T* d = dst.TwinData();
  const T* s = src.TwinData();
  for (int32_t i = 0; i < count; ++i) d[i] = FromD<T>(f(ToD(s[i])));
}

template <class T, class F>
void Binary(const LocalTensor<T>& dst, const LocalTensor<T>& a, const LocalTensor<T>& b,
            int32_t count, const char* call, F f) {
  Read(a, count, call);
  Read(b, count, call);
  Write(dst, count, call);
  T* d = dst.TwinData();
  const T* x = a.TwinData();
  const T* y = b.TwinData();
  for (int32_t i = 0; i < count; ++i) d[i] = FromD<T>(f(ToD(x[i]), ToD(y[i])));
}

template <class T>
void RequireFloat(const char* call) {
  if constexpr (!kIsFloatForTranscendental<T>) {
    twin::detail::Violate("exp-ln-dtype", call,
                          twin::detail::Str("element type of ", sizeof(T),
                                            " bytes is not half or float; Cast bf16/integers to "
                                            "float first"));
  }
}
}  // namespace detail_vec

template <class T, bool isSetMask = true>
void Exp(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& calCount) {
  detail_vec::RequireFloat<T>("Exp");
  detail_vec::Unary(dst, src, calCount, "Exp", [](double x) { return std::exp(x); });
}
template <class T, bool isSetMask = true>
void Ln(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& calCount) {
  detail_vec::RequireFloat<T>("Ln");
  detail_vec::Unary(dst, src, calCount, "Ln", [](double x) { return std::log(x); });
}
template <class T, bool isSetMask = true>
void Abs(const LocalTensor<T>& dst, const LocalTensor<T>& src, const int32_t& calCount) {
  detail_vec::Unary(dst, src, calCount, "Abs", [](double x) { return std::fabs(x); });
}

#define TWIN_BINARY_OP(NAME, EXPR)                                                        \
  template <class T, bool isSetMask = true>                                               \
  void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src0,                        \
            const LocalTensor<T>& src1, const int32_t& calCount) {                        \
    detail_vec::Binary(dst, src0, src1, calCount, #NAME, [](double a, double b) { return EXPR; }); \
  }
TWIN_BINARY_OP(Add, a + b)
TWIN_BINARY_OP(Sub, a - b)
TWIN_BINARY_OP(Mul, a * b)
TWIN_BINARY_OP(Div, a / b)
TWIN_BINARY_OP(Max, std::isnan(a) || std::isnan(b) ? std::nan("") : std::max(a, b))
TWIN_BINARY_OP(Min, std::isnan(a) || std::isnan(b) ? std::nan("") : std::min(a, b))
#undef TWIN_BINARY_OP

#define TWIN_SCALAR_OP(NAME, EXPR)                                                        \
  template <class T, bool isSetMask = true>                                               \
  void NAME(const LocalTensor<T>& dst, const LocalTensor<T>& src, const T& scalarValue,   \
            const int32_t& calCount) {                                                    \
    const double b = detail_vec::ToD(scalarValue);                                        \
    detail_vec::Unary(dst, src, calCount, #NAME, [b](double a) { return EXPR; });        \
  }
TWIN_SCALAR_OP(Adds, a + b)
TWIN_SCALAR_OP(Muls, a * b)
TWIN_SCALAR_OP(Maxs, std::isnan(a) ? a : std::max(a, b))
TWIN_SCALAR_OP(Mins, std::isnan(a) ? a : std::min(a, b))
#undef TWIN_SCALAR_OP

template <class T, bool isSetMask = true>
void Duplicate(const LocalTensor<T>& dst, const T& scalarValue, const int32_t& calCount) {
  detail_vec::Write(dst, calCount, "Duplicate");
  T* d = dst.TwinData();
  for (int32_t i = 0; i < calCount; ++i) d[i] = scalarValue;
}

// Cast between element types, with the round modes CANN supports for each float pair
// (twin::CastRoundSupported). Emulated: narrowing to half CAST_NONE/CAST_RINT (nearest even), to
// bf16 CAST_RINT/CAST_TRUNC; integer targets every mode but CAST_ODD.
template <class D, class S>
void Cast(const LocalTensor<D>& dst, const LocalTensor<S>& src, const RoundMode& round_mode,
          const uint32_t calCount) {
  const char* call = "Cast";
  constexpr twin::ElemType kDst = detail_copy::ElemTypeOf<D>();
  constexpr twin::ElemType kSrc = detail_copy::ElemTypeOf<S>();
  if (!twin::CastRoundSupported(kDst, kSrc, static_cast<twin::CastRound>(round_mode))) {
    twin::detail::Violate("cast-mode", call,
                          twin::detail::Str("round mode ", static_cast<int>(round_mode),
                                            " is not supported from ", twin::ElemTypeName(kSrc),
                                            " to ", twin::ElemTypeName(kDst),
                                            " (CANN: half/bfloat16_t -> float take CAST_NONE "
                                            "only, float -> bfloat16_t neither CAST_NONE nor "
                                            "CAST_ODD); the hardware leaves dst unwritten"));
  }
  detail_vec::Read(src, calCount, call);
  detail_vec::Write(dst, calCount, call);
  D* d = dst.TwinData();
  const S* s = src.TwinData();
  for (uint32_t i = 0; i < calCount; ++i) {
    const double x = detail_vec::ToD(s[i]);
    if constexpr (std::is_integral_v<D>) {
      double r = x;
      switch (round_mode) {
        case RoundMode::CAST_NONE:
        case RoundMode::CAST_RINT: r = std::nearbyint(x); break;
        case RoundMode::CAST_FLOOR: r = std::floor(x); break;
        case RoundMode::CAST_CEIL: r = std::ceil(x); break;
        case RoundMode::CAST_ROUND: r = std::round(x); break;
        case RoundMode::CAST_TRUNC: r = std::trunc(x); break;
        case RoundMode::CAST_ODD:
          throw std::logic_error("Cast: CAST_ODD to an integer type is not emulated");
      }
      const double lo = static_cast<double>(std::numeric_limits<D>::min());
      const double hi = static_cast<double>(std::numeric_limits<D>::max());
      d[i] = static_cast<D>(std::isnan(r) ? 0.0 : std::min(std::max(r, lo), hi));  // saturate
    } else if constexpr (std::is_same_v<D, bfloat16_t>) {
      if (round_mode == RoundMode::CAST_TRUNC) {
        bfloat16_t t;
        t.bits = static_cast<uint16_t>(twin::detail::FloatBits(static_cast<float>(x)) >> 16);
        d[i] = t;
      } else if (round_mode == RoundMode::CAST_RINT ||
                 (round_mode == RoundMode::CAST_NONE && !std::is_same_v<S, float>)) {
        d[i] = bfloat16_t(static_cast<float>(x));
      } else {
        throw std::logic_error("Cast to bfloat16_t: only CAST_RINT/CAST_TRUNC emulated");
      }
    } else if constexpr (std::is_same_v<D, half>) {
      if (round_mode != RoundMode::CAST_NONE && round_mode != RoundMode::CAST_RINT) {
        throw std::logic_error("Cast to half: only CAST_NONE/CAST_RINT emulated");
      }
      d[i] = half(static_cast<float>(x));
    } else {
      d[i] = static_cast<D>(x);  // widening to float is exact
    }
  }
}

namespace detail_vec {
// The vector unit reduces 256-byte repeats and then the per-repeat results; summing in the same
// two levels keeps float rounding close to the hardware's order.
template <class T>
double ReduceSumTwoLevel(const T* s, int32_t count) {
  const int32_t per_repeat = static_cast<int32_t>(256 / sizeof(T));
  T total = FromD<T>(0.0);
  for (int32_t start = 0; start < count; start += per_repeat) {
    T partial = FromD<T>(0.0);
    const int32_t end = std::min(count, start + per_repeat);
    for (int32_t i = start; i < end; ++i) partial = FromD<T>(ToD(partial) + ToD(s[i]));
    total = FromD<T>(ToD(total) + ToD(partial));
  }
  return ToD(total);
}
}  // namespace detail_vec

// dst[0] = max(src[0:count]); with calIndex, dst[1] holds the index's bits (as on hardware).
template <class T>
void ReduceMax(const LocalTensor<T>& dst, const LocalTensor<T>& src,
               const LocalTensor<T>& workLocal, const int32_t count, bool calIndex = false) {
  const char* call = "ReduceMax";
  if (count <= 0) twin::detail::Violate("vector-count", call, "count must be positive");
  detail_vec::Read(src, count, call);
  detail_vec::Write(workLocal, 1, call);
  detail_vec::Write(dst, calIndex ? 2 : 1, call);
  const T* s = src.TwinData();
  int32_t best = 0;
  for (int32_t i = 1; i < count; ++i) {
    if (detail_vec::ToD(s[i]) > detail_vec::ToD(s[best])) best = i;
  }
  T value = s[best];
  dst.TwinData()[0] = value;
  if (calIndex) {
    T index_bits{};
    const uint32_t index = static_cast<uint32_t>(best);
    std::memcpy(&index_bits, &index, std::min(sizeof(T), sizeof(index)));
    dst.TwinData()[1] = index_bits;
  }
}

template <class T>
void ReduceSum(const LocalTensor<T>& dst, const LocalTensor<T>& src,
               const LocalTensor<T>& workLocal, const int32_t count) {
  const char* call = "ReduceSum";
  if (count <= 0) twin::detail::Violate("vector-count", call, "count must be positive");
  detail_vec::Read(src, count, call);
  detail_vec::Write(workLocal, 1, call);
  detail_vec::Write(dst, 1, call);
  dst.TwinData()[0] = detail_vec::FromD<T>(detail_vec::ReduceSumTwoLevel(src.TwinData(), count));
}

// dst holds one bit per element (bit i%8 of byte i/8). The hardware compares whole 256-byte
// repeats, so count * sizeof(T) must be a multiple of 256.
template <class T, class U>
void Compare(const LocalTensor<U>& dst, const LocalTensor<T>& src0, const LocalTensor<T>& src1,
             CMPMODE cmpMode, uint32_t calCount) {
  const char* call = "Compare";
  if (uint64_t(calCount) * sizeof(T) % 256u != 0) {
    twin::detail::Violate(
        "compare-256b", call,
        twin::detail::Str(calCount, " elements x ", sizeof(T), " bytes = ",
                          uint64_t(calCount) * sizeof(T),
                          " bytes is not a multiple of 256 (Compare works on whole repeats)"));
  }
  detail_vec::Read(src0, calCount, call);
  detail_vec::Read(src1, calCount, call);
  const uint32_t mask_bytes = calCount / 8u;
  const LocalTensor<uint8_t> mask = dst.template ReinterpretCast<uint8_t>();
  detail_vec::Write(mask, mask_bytes, call);
  uint8_t* m = mask.TwinData();
  std::memset(m, 0, mask_bytes);
  for (uint32_t i = 0; i < calCount; ++i) {
    const double a = detail_vec::ToD(src0.TwinData()[i]);
    const double b = detail_vec::ToD(src1.TwinData()[i]);
    bool r = false;
    switch (cmpMode) {
      case CMPMODE::LT: r = a < b; break;
      case CMPMODE::GT: r = a > b; break;
      case CMPMODE::EQ: r = a == b; break;
      case CMPMODE::LE: r = a <= b; break;
      case CMPMODE::GE: r = a >= b; break;
      case CMPMODE::NE: r = a != b; break;
    }
    if (r) m[i / 8u] = static_cast<uint8_t>(m[i / 8u] | (1u << (i % 8u)));
  }
}

namespace detail_vec {
template <class U>
bool MaskBit(const LocalTensor<U>& selMask, uint32_t i) {
  const uint8_t* m = reinterpret_cast<const uint8_t*>(selMask.TwinData());
  return (m[i / 8u] >> (i % 8u)) & 1u;
}
template <class U>
void ReadMask(const LocalTensor<U>& selMask, uint32_t calCount, const char* call) {
  const LocalTensor<uint8_t> bytes = selMask.template ReinterpretCast<uint8_t>();
  Read(bytes, (calCount + 7u) / 8u, call);
}
}  // namespace detail_vec

// dst[i] = mask bit i ? src0[i] : src1[i]   (VSEL_TENSOR_TENSOR_MODE)
template <class T, class U>
void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0,
            const LocalTensor<T>& src1, SELMODE selMode, uint32_t calCount) {
  const char* call = "Select";
  if (selMode != SELMODE::VSEL_TENSOR_TENSOR_MODE) {
    throw std::logic_error("Select(tensor, tensor): the twin emulates VSEL_TENSOR_TENSOR_MODE only");
  }
  detail_vec::ReadMask(selMask, calCount, call);
  detail_vec::Read(src0, calCount, call);
  detail_vec::Read(src1, calCount, call);
  detail_vec::Write(dst, calCount, call);
  for (uint32_t i = 0; i < calCount; ++i) {
    dst.TwinData()[i] = detail_vec::MaskBit(selMask, i) ? src0.TwinData()[i] : src1.TwinData()[i];
  }
}

// dst[i] = mask bit i ? src0[i] : scalar   (VSEL_TENSOR_SCALAR_MODE)
template <class T, class U>
void Select(const LocalTensor<T>& dst, const LocalTensor<U>& selMask, const LocalTensor<T>& src0,
            T src1, SELMODE selMode, uint32_t calCount) {
  const char* call = "Select";
  if (selMode != SELMODE::VSEL_TENSOR_SCALAR_MODE) {
    throw std::logic_error("Select(tensor, scalar): use SELMODE::VSEL_TENSOR_SCALAR_MODE");
  }
  detail_vec::ReadMask(selMask, calCount, call);
  detail_vec::Read(src0, calCount, call);
  detail_vec::Write(dst, calCount, call);
  for (uint32_t i = 0; i < calCount; ++i) {
    dst.TwinData()[i] = detail_vec::MaskBit(selMask, i) ? src0.TwinData()[i] : src1;
  }
}

}  // namespace AscendC

using AscendC::GetBlockIdx;
using AscendC::GetBlockNum;
using AscendC::GetSubBlockIdx;
using AscendC::GetTaskRation;
using AscendC::GetSysWorkSpacePtr;
using AscendC::SetSysWorkspace;

// ------------------------------------------------------------------------------------------
// Launcher.
// ------------------------------------------------------------------------------------------
namespace twin {

// How the kernel runs on a chip with separated cores (910B). CANN decides it at compile time
// (KERNEL_TASK_TYPE_DEFAULT, or the compiler seeing cube code); the twin is told at launch.
enum class KernelType {
  // The earlier block model, kept while launchers migrate: one thread per block that owns its Matmul
  // objects, GetTaskRation() == 1. Not faithful for Matmul kernels on the 910B.
  Unspecified,
  AivOnly,  // KERNEL_TYPE_AIV_ONLY: blockDim vector cores, GetBlockIdx 0..blockDim-1
  Mix,      // KERNEL_TYPE_MIX_AIC_1_2: blockDim cube cores + 2 * blockDim vector cores
};

struct LaunchOptions {
  KernelType type = KernelType::Unspecified;
  // The launch wrapper CANN generates (extract_host_stub.py) sets the system workspace and, in a
  // MIX kernel, clears it on the AIC and sets WORKSPACE_SYNC_ID only when the kernel library is
  // compiled with HAVE_WORKSPACE (and HAVE_TILING when the tiling is the last argument). The
  // vector side of REGIST_MATMUL_OBJ waits for that event. true = built with both defines.
  bool have_workspace_and_tiling = true;
  // What that wrapper then does to the arguments, for kernels shaped like ours, whose last two
  // arguments are (workspace, tiling): SetSysWorkspaceForce(workspace) on every core and the
  // kernel receives GetUserWorkspace(workspace) = workspace + RESERVED_WORKSPACE (16 MB on the
  // 910B and the 310B, kernel_utils_constants.h) in its place, with a MIX kernel returning at
  // once on a null workspace. The twin's own sample kernels pass their workspace elsewhere and
  // set it themselves, so this is off by default.
  bool wrapper_user_workspace = false;
  // GlobalTensor::SetValue through a per-core 64-byte-line data cache, written back whole at
  // kernel end in core order (so neighbouring values of two cores in one line clobber each other).
  bool model_data_cache = true;
  // Fail the launch when two cores wrote the same GM bytes (DataCopy/DataCopyPad to GM,
  // non-atomic Matmul output): with no atomics the result is whichever core's copy lands last,
  // and for kernels like ours it means a work split that hands an item to two cores.
  bool check_gm_write_overlap = true;
  // The part (SOC_VERSION name, twin::GetSocInfo) whose core counts the launch checks against,
  // e.g. SyncAll's residency limit: "Ascend910B4" has 40 vector cores, "Ascend910B1" 48. Empty:
  // the chip's first part. Must belong to the launch's chip.
  std::string_view soc{};
};

// What the last twin::Launch of the calling thread did with its vector cores: how many there
// were and how many wrote any GM (DataCopy/DataCopyPad to GM, Matmul output they asked for).
// A test can then tell a work split that leaves cores idle from one that uses them all.
struct LaunchActivity {
  uint32_t vector_cores = 0;
  uint32_t writing_vector_cores = 0;
};

namespace detail {
inline thread_local LaunchActivity last_launch_activity;
}  // namespace detail

inline LaunchActivity LastLaunchActivity() { return detail::last_launch_activity; }

namespace detail {

// Two cores' GM writes that share bytes: sweeps the ranges by start, against the range reaching
// furthest so far (any overlap between two cores meets it).
inline void CheckGmWriteOverlap(
    const std::vector<std::vector<std::pair<uintptr_t, uintptr_t>>>& writes,
    const std::vector<std::string>& core_names) {
  struct Range {
    uintptr_t begin, end;
    size_t core;
  };
  std::vector<Range> ranges;
  for (size_t c = 0; c < writes.size(); ++c) {
    for (const auto& [b, e] : writes[c]) ranges.push_back({b, e, c});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& x, const Range& y) { return x.begin < y.begin; });
  const Range* reach = nullptr;
  for (const Range& r : ranges) {
    if (reach != nullptr && r.begin < reach->end && r.core != reach->core) {
      Violate("gm-write-overlap", "kernel end",
              Str(core_names[reach->core], " and ", core_names[r.core], " both wrote the ",
                  std::min(reach->end, r.end) - r.begin, " GM bytes at offset ",
                  r.begin - reach->begin, " of a ", reach->end - reach->begin,
                  "-byte store: without atomics the last copy wins (a work split that gives an "
                  "item to two cores, or a race)"));
    }
    if (reach == nullptr || r.end > reach->end) reach = &r;
  }
}

inline void AbortPairs(std::vector<std::unique_ptr<MixPair>>& pairs) {
  for (auto& pair : pairs) {
    std::lock_guard<std::mutex> lock(pair->mutex);
    pair->aborted = true;
    pair->cv.notify_all();
  }
}

}  // namespace detail

// Runs kernel(args...) on every core of the launch, each on its own thread with its own UB and
// flag state: on a 910B MIX kernel one AIC and two AIV threads per block, otherwise one thread
// per block. Returns when every core has finished; rethrows the first failure (a
// HardwareRuleViolation, or whatever else a core threw) in the calling thread.
template <class Kernel, class... Args>
void Launch(uint32_t blockDim, Chip chip, LaunchOptions options, Kernel&& kernel, Args... args) {
  if (blockDim == 0 || blockDim > 65535u) {
    throw std::invalid_argument(detail::Str("twin::Launch: blockDim must be in [1, 65535], got ",
                                            blockDim));
  }
  // The wrapper's rewrite of the workspace argument (LaunchOptions::wrapper_user_workspace).
  constexpr size_t kArgs = sizeof...(Args);
  uint8_t* wrapper_workspace = nullptr;
  std::tuple<Args...> kernel_args(args...);
  if (options.wrapper_user_workspace) {
    if constexpr (kArgs >= 2) {
      using Workspace = std::tuple_element_t<kArgs - 2, std::tuple<Args...>>;
      if constexpr (std::is_same_v<Workspace, uint8_t*>) {
        wrapper_workspace = std::get<kArgs - 2>(kernel_args);
        if (wrapper_workspace == nullptr && options.type == KernelType::Mix) return;
        if (wrapper_workspace == nullptr) {
          throw std::invalid_argument("twin::Launch: workspace can not be nullptr");
        }
        std::get<kArgs - 2>(kernel_args) = wrapper_workspace + kReservedWorkspaceBytes;
      } else {
        throw std::invalid_argument(
            "twin::Launch: wrapper_user_workspace needs a GM_ADDR workspace as the kernel's "
            "second-to-last argument (the tiling last)");
      }
    } else {
      throw std::invalid_argument("twin::Launch: wrapper_user_workspace needs (workspace, tiling)");
    }
  }
  const ChipInfo info = options.soc.empty() ? GetChipInfo(chip) : GetSocInfo(options.soc);
  if (!options.soc.empty() && SocChip(options.soc) != chip) {
    throw std::invalid_argument(detail::Str("twin::Launch: part ", options.soc,
                                            " is not a ", GetChipInfo(chip).name));
  }
  const bool mix = info.separated && options.type == KernelType::Mix;
  const uint32_t ratio = mix ? 2u : 1u;  // vector cores per block (get_subblockdim on an AIV)
  detail::Barrier barrier(blockDim * ratio);
  std::vector<std::unique_ptr<detail::MixPair>> pairs;
  for (uint32_t b = 0; mix && b < blockDim; ++b) {
    pairs.push_back(std::make_unique<detail::MixPair>());
    pairs.back()->workspace_event = options.have_workspace_and_tiling;
  }
  std::mutex failure_mutex;
  std::exception_ptr first_failure;
  std::vector<std::thread> threads;
  threads.reserve(blockDim * (mix ? 3u : 1u));
  // Dirty data-cache lines of each core at its end, written back after all cores finished in
  // launch order (block 0 first): a later core's stale bytes win, deterministically.
  std::vector<detail::Dcache> writebacks(blockDim * (mix ? 3u : 1u));
  std::vector<std::vector<std::pair<uintptr_t, uintptr_t>>> gm_writes(writebacks.size());
  std::vector<std::string> core_names(writebacks.size());
  auto run = [&](detail::Core core, uint32_t b, uint32_t sub, size_t thread) {
    detail::BlockContext block;
    block.core = core;
    block.pair = mix ? pairs[b].get() : nullptr;
    // CANN dav_c220 GetBlockIdxImpl: block * GetTaskRation() + subblock on an AIV, the block on
    // the AIC; GetBlockNum is get_block_num(), the launch's blockDim, on both.
    block.block_idx = core == detail::Core::Aiv ? int64_t(b) * ratio + sub : b;
    block.block_dim = blockDim;
    block.task_ration = core == detail::Core::Aiv ? ratio : 1;
    block.subblock_idx = core == detail::Core::Aiv ? sub : 0;
    block.chip = info;
    block.kernel_type = static_cast<int>(options.type);
    block.model_dcache = options.model_data_cache;
    block.barrier = &barrier;
    if (wrapper_workspace != nullptr) block.sys_workspace = wrapper_workspace;
    detail::current_block = &block;
    core_names[thread] = detail::Str(detail::CoreName(core), " (GetBlockIdx ", block.block_idx,
                                     ") of block ", b);
    const bool vector = core != detail::Core::Aic;
    try {
      std::apply(kernel, kernel_args);
      if (!block.pending_flags.empty()) {
        const auto& [key, count] = *block.pending_flags.begin();
        detail::Violate("flag-pairing", "kernel end",
                        detail::Str(detail::CoreName(core), " of block ", b, ": ", count,
                                    " SetFlag of HardEvent::",
                                    AscendC::HardEventName(
                                        static_cast<AscendC::HardEvent>(key.first)),
                                    " event id ", key.second, " never consumed by a WaitFlag"));
      }
      // The lines stay dirty until the launch ends; written back below in core order.
      writebacks[thread] = std::move(block.dcache);
      gm_writes[thread] = std::move(block.gm_writes);
      if (vector) barrier.Exit();
    } catch (const detail::BlockAborted&) {
      // Another core failed first; its error is the one reported.
    } catch (...) {
      {
        std::lock_guard<std::mutex> lock(failure_mutex);
        if (!first_failure) first_failure = std::current_exception();
      }
      barrier.Abort();
      detail::AbortPairs(pairs);
    }
    if (block.pair != nullptr) {
      std::lock_guard<std::mutex> lock(block.pair->mutex);
      if (core == detail::Core::Aic) block.pair->server_ended = true;
      else block.pair->aiv_ended[sub] = true;
      block.pair->cv.notify_all();
    }
    detail::current_block = nullptr;
  };
  for (uint32_t b = 0; b < blockDim; ++b) {
    if (mix) {
      threads.emplace_back(run, detail::Core::Aic, b, 0u, size_t(b) * 3u);
      threads.emplace_back(run, detail::Core::Aiv, b, 0u, size_t(b) * 3u + 1u);
      threads.emplace_back(run, detail::Core::Aiv, b, 1u, size_t(b) * 3u + 2u);
    } else {
      threads.emplace_back(run, info.separated ? detail::Core::Aiv : detail::Core::AiCore, b, 0u,
                           size_t(b));
    }
  }
  for (auto& t : threads) t.join();
  if (!first_failure) {
    for (const auto& cache : writebacks) {
      for (const auto& [line, entry] : cache) detail::DcacheWriteBack(line, entry);
    }
  }
  if (first_failure) std::rethrow_exception(first_failure);
  LaunchActivity activity;
  for (size_t t = 0; t < gm_writes.size(); ++t) {
    if (mix && t % 3 == 0) continue;  // the cube core: its stores count for the AIV it served
    ++activity.vector_cores;
    if (!gm_writes[t].empty()) ++activity.writing_vector_cores;
  }
  detail::last_launch_activity = activity;
  if (options.check_gm_write_overlap) detail::CheckGmWriteOverlap(gm_writes, core_names);
}

template <class Kernel, class... Args,
          std::enable_if_t<!std::is_same_v<std::decay_t<Kernel>, LaunchOptions>, int> = 0>
void Launch(uint32_t blockDim, Chip chip, Kernel&& kernel, Args... args) {
  Launch(blockDim, chip, LaunchOptions{}, std::forward<Kernel>(kernel), args...);
}

}  // namespace twin
