// CPU twin of the Ascend C Matmul high-level API (CANN "lib/matmul/matmul_intf.h"): C = A * B (+ bias)
// on the cube unit, driven from a kernel through a Matmul object. Kernels include it exactly as
// in CANN, `#include "lib/matmul/matmul_intf.h"`, after kernel_operator.h.
//
// What is emulated (see README.md for the full list and the rules):
// - MatmulType<POSITION, CubeFormat::ND, T, ISTRANS> for A/B/C/bias with T in float, half,
//   bfloat16_t; positions GM, VECOUT (A/B/bias in UB) and VECIN (C in UB); the type combinations
//   and positions each chip accepts.
// - REGIST_MATMUL_OBJ (one to four objects), Init, SetOrgShape (3 and 5 arguments),
//   SetSingleShape, SetTail, SetTensorA/B (GlobalTensor or LocalTensor, transpose flag), SetBias,
//   DisableBias/ClearBias, IterateAll(GlobalTensor, enAtomic), Iterate + GetTensorC(LocalTensor or
//   GlobalTensor, enAtomic), End.
// - Numerics as the cube unit computes them: inputs as stored, each product formed in fp32 and
//   summed in fp32 over one baseK-sized step (one Mmad), the steps accumulated in fp32 in L0C,
//   C rounded once to its type.
// - Addressing by the org shape: a non-transposed ND A is read with row stride Ka, a transposed
//   one ([K, M] in memory) with row stride M; B non-transposed with row stride N, transposed
//   ([N, K]) with row stride Kb; C written with row stride N (or orgKc when given). This is how
//   CANN expresses a matrix whose rows are strided in GM (e.g. one head of q[T, H, D]:
//   orgKa = H * D, singleK = D).
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "kernel_operator.h"
#include "kernel_tiling/kernel_tiling.h"

enum class CubeFormat { ND = 0, NZ, ZN, ZZ, NN, ND_ALIGN, SCALAR, VECTOR };
enum class LayoutMode { NONE = 0, BSNGD, SBNGD, BNGS1S2, NORMAL };

namespace matmul {

template <AscendC::TPosition POSITION, CubeFormat FORMAT, typename TYPE, bool ISTRANS = false,
          LayoutMode LAYOUT = LayoutMode::NONE, bool IBSHARE = false>
struct MatmulType {
  constexpr static AscendC::TPosition pos = POSITION;
  constexpr static CubeFormat format = FORMAT;
  using T = TYPE;
  constexpr static bool isTrans = ISTRANS;
  constexpr static LayoutMode layout = LAYOUT;
  constexpr static bool ibShare = IBSHARE;
};

// Only the default (Norm) template is emulated; the struct exists so that kernels naming a
// config compile.
struct MatmulConfig {
  bool doNorm = true;
};
inline constexpr MatmulConfig CFG_NORM{};

namespace detail {

template <class T>
constexpr twin::CubeDType CubeTypeOf() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, half> ||
                    std::is_same_v<T, bfloat16_t>,
                "the twin emulates Matmul for float, half and bfloat16_t only");
  if constexpr (std::is_same_v<T, float>) return twin::CubeDType::Float;
  if constexpr (std::is_same_v<T, half>) return twin::CubeDType::Half;
  return twin::CubeDType::BFloat16;
}

template <class T>
float ToF(T v) {
  return static_cast<float>(v);
}

template <class T>
T FromF(float v) {
  return T(v);  // half/bfloat16_t round to nearest even; float is exact
}

// Atomic GM writes of different blocks (threads) must not race, as on hardware.
inline std::mutex& AtomicMutex() {
  static std::mutex mutex;
  return mutex;
}

// True on a cube thread while it executes a call one of its vector cores posted.
inline thread_local bool tl_serving = false;

// A Matmul call on a vector core of a 910B MIX kernel is a message to the paired cube core
// (CANN: MatmulClient -> KfcCommClient -> KfcServer): decides whether this call must be posted.
inline bool MustForward(bool registered, const char* call) {
  auto* block = twin::detail::current_block;
  if (block == nullptr || tl_serving || block->core != twin::detail::Core::Aiv ||
      block->pair == nullptr || !registered) {
    return false;
  }
  if (!block->kfc_client_alive) {
    twin::detail::Violate(
        "regist-scope", call,
        "Matmul call after the REGIST client went out of scope: REGIST_MATMUL_OBJ must be in the "
        "kernel's own scope (its client object tells the cube core to quit when destroyed, so a "
        "REGIST inside a member function such as Init() leaves later calls unserved)");
  }
  return true;
}

// Posts work to the block's cube core and waits until it ran there (calls are synchronous, as
// the twin's IterateAll/Iterate are). The cube's failure is rethrown in the calling vector core.
template <class F>
auto Forward(const char* call, F&& f) -> decltype(f()) {
  using R = decltype(f());
  auto* block = twin::detail::current_block;
  auto* pair = block->pair;
  std::conditional_t<std::is_void_v<R>, int, R> result{};
  twin::detail::CubeRequest request;
  request.client = block;
  request.work = [&] {
    if constexpr (std::is_void_v<R>) {
      f();
    } else {
      result = f();
    }
  };
  std::unique_lock<std::mutex> lock(pair->mutex);
  pair->requests.push_back(&request);
  pair->cv.notify_all();
  // A request the cube core already took lives on this stack until it is done.
  pair->cv.wait(lock, [&] {
    return request.done || (!request.taken && (pair->aborted || pair->server_ended));
  });
  if (!request.done) {
    pair->requests.erase(std::find(pair->requests.begin(), pair->requests.end(), &request));
    if (pair->aborted) throw twin::detail::BlockAborted{};
    twin::detail::Violate(
        "mix-deadlock", call,
        twin::detail::Str("the cube core of block ", block->block_idx / 2,
                          " ended without serving this call (it never reached "
                          "REGIST_MATMUL_OBJ's server loop); on hardware the vector core would "
                          "wait forever"));
  }
  if (request.error) std::rethrow_exception(request.error);
  if constexpr (!std::is_void_v<R>) return result;
}

}  // namespace detail

// First statement of every public Matmul call: on a MIX kernel's vector core, run the call on
// the cube core instead (the expression repeats the call with the same arguments).
#define TWIN_MATMUL_ON_CUBE(call, ...)                                 \
  if (::matmul::detail::MustForward(registered_, call)) {              \
    return ::matmul::detail::Forward(call, [&] { return __VA_ARGS__; }); \
  }

template <class A_TYPE, class B_TYPE, class C_TYPE, class BIAS_TYPE = C_TYPE,
          const MatmulConfig& MM_CFG = CFG_NORM>
class Matmul {
 public:
  using SrcAT = typename A_TYPE::T;
  using SrcBT = typename B_TYPE::T;
  using DstT = typename C_TYPE::T;
  using BiasT = typename BIAS_TYPE::T;

  Matmul() = default;
  Matmul(const Matmul&) = delete;
  Matmul& operator=(const Matmul&) = delete;

  // ---- initialisation ----
  void Init(const TCubeTiling* __restrict cubeTiling, AscendC::TPipe* tpipe = nullptr) {
    const char* call = "Matmul::Init";
    TWIN_MATMUL_ON_CUBE(call, Init(cubeTiling, tpipe));
    if (!registered_) Protocol(call, "called before REGIST_MATMUL_OBJ registered this object");
    if (cubeTiling == nullptr) Protocol(call, "tiling pointer is null");
    CheckTiling(*cubeTiling, call);
    tiling_ = *cubeTiling;
    inited_ = true;
    orgM_ = tiling_.M;
    orgN_ = tiling_.N;
    orgKa_ = tiling_.Ka;
    orgKb_ = tiling_.Kb;
    orgKc_ = 0;
    singleM_ = tiling_.singleCoreM;
    singleN_ = tiling_.singleCoreN;
    singleK_ = tiling_.singleCoreK;
    bias_enabled_ = tiling_.isBias == 1;
    ResetOperands("Init");
  }

  // ---- shapes ----
  void SetOrgShape(int orgM, int orgN, int orgK) { SetOrgShape(orgM, orgN, orgK, orgK, 0); }
  void SetOrgShape(int orgM, int orgN, int orgKa, int orgKb, int orgKc = 0) {
    const char* call = "Matmul::SetOrgShape";
    TWIN_MATMUL_ON_CUBE(call, SetOrgShape(orgM, orgN, orgKa, orgKb, orgKc));
    RequireInit(call);
    RequireIdle(call);
    if (orgM <= 0 || orgN <= 0 || orgKa <= 0 || orgKb <= 0 || orgKc < 0) {
      twin::detail::Violate("matmul-shape", call,
                            twin::detail::Str("org shape (M=", orgM, ", N=", orgN, ", Ka=", orgKa,
                                              ", Kb=", orgKb, ", Kc=", orgKc,
                                              ") must be positive (Kc may be 0)"));
    }
    orgM_ = orgM;
    orgN_ = orgN;
    orgKa_ = orgKa;
    orgKb_ = orgKb;
    orgKc_ = orgKc;
    // CANN: SetOrgShape must precede SetTensorA/B, SetBias and SetSingleShape; the operands
    // set before it were addressed with the old strides, so they must be set again.
    ResetOperands("SetOrgShape");
  }

  void SetSingleShape(int singleM, int singleN, int singleK) {
    const char* call = "Matmul::SetSingleShape";
    TWIN_MATMUL_ON_CUBE(call, SetSingleShape(singleM, singleN, singleK));
    RequireInit(call);
    RequireIdle(call);
    CheckSingle(singleM, singleN, singleK, call);
    singleM_ = singleM;
    singleN_ = singleN;
    singleK_ = singleK;
  }

  // -1 keeps the current value.
  void SetTail(int tailM = -1, int tailN = -1, int tailK = -1) {
    const char* call = "Matmul::SetTail";
    TWIN_MATMUL_ON_CUBE(call, SetTail(tailM, tailN, tailK));
    RequireInit(call);
    RequireIdle(call);
    const int m = tailM == -1 ? singleM_ : tailM;
    const int n = tailN == -1 ? singleN_ : tailN;
    const int k = tailK == -1 ? singleK_ : tailK;
    CheckSingle(m, n, k, call);
    singleM_ = m;
    singleN_ = n;
    singleK_ = k;
  }

  // ---- operands ----
  void SetTensorA(const AscendC::GlobalTensor<SrcAT>& gm, bool isTransposeA = false) {
    const char* call = "Matmul::SetTensorA(GlobalTensor)";
    TWIN_MATMUL_ON_CUBE(call, SetTensorA(gm, isTransposeA));
    RequireInit(call);
    RequireIdle(call);
    RequireGm(A_TYPE::pos, "A", call);
    CheckTranspose<A_TYPE, SrcAT>(isTransposeA, "A", call);
    a_ = Operand<SrcAT>{Source::Global, gm, {}};
    trans_a_ = isTransposeA;
  }
  void SetTensorA(const AscendC::LocalTensor<SrcAT>& leftMatrix, bool isTransposeA = false) {
    const char* call = "Matmul::SetTensorA(LocalTensor)";
    TWIN_MATMUL_ON_CUBE(call, SetTensorA(leftMatrix, isTransposeA));
    RequireInit(call);
    RequireIdle(call);
    RequireLocal(A_TYPE::pos, leftMatrix.TwinSlot(), "A", call);
    CheckTranspose<A_TYPE, SrcAT>(isTransposeA, "A", call);
    a_ = Operand<SrcAT>{Source::Local, {}, leftMatrix};
    trans_a_ = isTransposeA;
  }
  void SetTensorB(const AscendC::GlobalTensor<SrcBT>& gm, bool isTransposeB = false) {
    const char* call = "Matmul::SetTensorB(GlobalTensor)";
    TWIN_MATMUL_ON_CUBE(call, SetTensorB(gm, isTransposeB));
    RequireInit(call);
    RequireIdle(call);
    RequireGm(B_TYPE::pos, "B", call);
    CheckTranspose<B_TYPE, SrcBT>(isTransposeB, "B", call);
    b_ = Operand<SrcBT>{Source::Global, gm, {}};
    trans_b_ = isTransposeB;
  }
  void SetTensorB(const AscendC::LocalTensor<SrcBT>& rightMatrix, bool isTransposeB = false) {
    const char* call = "Matmul::SetTensorB(LocalTensor)";
    TWIN_MATMUL_ON_CUBE(call, SetTensorB(rightMatrix, isTransposeB));
    RequireInit(call);
    RequireIdle(call);
    RequireLocal(B_TYPE::pos, rightMatrix.TwinSlot(), "B", call);
    CheckTranspose<B_TYPE, SrcBT>(isTransposeB, "B", call);
    b_ = Operand<SrcBT>{Source::Local, {}, rightMatrix};
    trans_b_ = isTransposeB;
  }
  void SetBias(const AscendC::GlobalTensor<BiasT>& biasGlobal) {
    const char* call = "Matmul::SetBias(GlobalTensor)";
    TWIN_MATMUL_ON_CUBE(call, SetBias(biasGlobal));
    RequireBiasTiling(call);
    RequireGm(BIAS_TYPE::pos, "bias", call);
    bias_ = Operand<BiasT>{Source::Global, biasGlobal, {}};
    bias_enabled_ = true;
  }
  void SetBias(const AscendC::LocalTensor<BiasT>& inputBias) {
    const char* call = "Matmul::SetBias(LocalTensor)";
    TWIN_MATMUL_ON_CUBE(call, SetBias(inputBias));
    RequireBiasTiling(call);
    RequireLocal(BIAS_TYPE::pos, inputBias.TwinSlot(), "bias", call);
    bias_ = Operand<BiasT>{Source::Local, {}, inputBias};
    bias_enabled_ = true;
  }
  void DisableBias() {
    TWIN_MATMUL_ON_CUBE("Matmul::DisableBias", DisableBias());
    RequireInit("Matmul::DisableBias");
    bias_enabled_ = false;
  }
  void ClearBias() { DisableBias(); }

  // ---- computation ----
  // Computes the whole singleM x singleN C and writes it to gm (row stride orgKc or orgN).
  // enAtomic: 0 write, 1 add, 2 max, 3 min into what gm already holds.
  template <bool sync = true>
  void IterateAll(const AscendC::GlobalTensor<DstT>& gm, uint8_t enAtomic = 0,
                  bool enSequentialWrite = false, bool waitIterateAll = false,
                  bool fakeMsg = false) {
    const char* call = "Matmul::IterateAll(GlobalTensor)";
    static_assert(sync, "the twin emulates the synchronous IterateAll only");
    TWIN_MATMUL_ON_CUBE(call, IterateAll<sync>(gm, enAtomic, enSequentialWrite, waitIterateAll,
                                               fakeMsg));
    RequireGm(C_TYPE::pos, "C", call);
    if (enSequentialWrite || waitIterateAll || fakeMsg) {
      throw std::logic_error("IterateAll: enSequentialWrite/waitIterateAll/fakeMsg not emulated");
    }
    RequireInit(call);
    if (iterating_) {
      Protocol(call, "called while an Iterate sequence is in progress (finish it first)");
    }
    Prepare(call);
    CheckAtomic(enAtomic, call);
    gm.CheckRange(0, CExtent(), call);
    const int blocks = MIter() * NIter();
    for (int i = 0; i < blocks; ++i) {
      int mi = 0, ni = 0;
      BlockCoords(i, mi, ni);
      ComputeBlock(mi, ni);
      WriteBlockGm(gm, enAtomic);
    }
  }

  // One baseM x baseN block of C (ragged at the tails) per call, in the tiling's iterateOrder;
  // returns false once every block of the single shape was produced.
  template <bool sync = true>
  bool Iterate(bool enPartialSum = false) {
    const char* call = "Matmul::Iterate";
    static_assert(sync, "the twin emulates the synchronous Iterate only");
    TWIN_MATMUL_ON_CUBE(call, Iterate<sync>(enPartialSum));
    if (enPartialSum) throw std::logic_error("Iterate: enPartialSum is not emulated");
    RequireInit(call);
    if (pending_) {
      Protocol(call,
               "the previous block was never fetched by GetTensorC (L0C would be overwritten)");
    }
    if (!iterating_) {
      Prepare(call);
      iterating_ = true;
      next_block_ = 0;
    }
    if (next_block_ == MIter() * NIter()) {
      iterating_ = false;
      return false;
    }
    int mi = 0, ni = 0;
    BlockCoords(next_block_++, mi, ni);
    ComputeBlock(mi, ni);
    pending_ = true;
    return true;
  }

  // The block of the last Iterate into UB (VECIN): a dense baseM x baseN tile, row pitch baseN;
  // elements outside a ragged tail block are undefined (NaN bytes in the twin).
  template <bool sync = true>
  void GetTensorC(const AscendC::LocalTensor<DstT>& co2Local, uint8_t enAtomic = 0,
                  bool enSequentialWrite = false) {
    const char* call = "Matmul::GetTensorC(LocalTensor)";
    static_assert(sync, "the twin emulates the synchronous GetTensorC only");
    TWIN_MATMUL_ON_CUBE(call, GetTensorC<sync>(co2Local, enAtomic, enSequentialWrite));
    RequirePending(call);
    RequireLocal(C_TYPE::pos, co2Local.TwinSlot(), "C", call);
    if (enAtomic != 0 || enSequentialWrite) {
      throw std::logic_error("GetTensorC to UB: enAtomic/enSequentialWrite not emulated");
    }
    const uint64_t tile = uint64_t(tiling_.baseM) * uint64_t(tiling_.baseN);
    co2Local.Check(0, tile, twin::detail::Access::Write, twin::detail::Unit::Cube, call, true);
    DstT* dst = co2Local.TwinData();
    std::memset(static_cast<void*>(dst), 0xff, tile * sizeof(DstT));
    for (int i = 0; i < cur_m_; ++i) {
      for (int j = 0; j < cur_n_; ++j) {
        dst[size_t(i) * tiling_.baseN + j] = detail::FromF<DstT>(acc_[size_t(i) * cur_n_ + j]);
      }
    }
    pending_ = false;
  }

  // The block of the last Iterate into its place of C in GM (row stride orgKc or orgN).
  template <bool sync = true>
  void GetTensorC(const AscendC::GlobalTensor<DstT>& gm, uint8_t enAtomic = 0,
                  bool enSequentialWrite = false) {
    const char* call = "Matmul::GetTensorC(GlobalTensor)";
    static_assert(sync, "the twin emulates the synchronous GetTensorC only");
    TWIN_MATMUL_ON_CUBE(call, GetTensorC<sync>(gm, enAtomic, enSequentialWrite));
    RequirePending(call);
    RequireGm(C_TYPE::pos, "C", call);
    if (enSequentialWrite) {
      throw std::logic_error("GetTensorC: enSequentialWrite is not emulated");
    }
    CheckAtomic(enAtomic, call);
    gm.CheckRange(BlockOffsetC(), BlockExtentC(), call);
    WriteBlockGm(gm, enAtomic);
    pending_ = false;
  }

  // Releases the cube resources; required between computations of different Matmul objects.
  // Operands must be set again before the next computation.
  void End() {
    const char* call = "Matmul::End";
    TWIN_MATMUL_ON_CUBE(call, End());
    RequireInit(call);
    auto& block = twin::detail::Block(call);
    if (block.active_matmul == this) block.active_matmul = nullptr;
    iterating_ = false;
    pending_ = false;
    ResetOperands("End");
  }

  // ---- twin internals (REGIST_MATMUL_OBJ) ----
  void TwinRegister(AscendC::TPipe* pipe, GM_ADDR workspace) {
    const char* call = "REGIST_MATMUL_OBJ";
    auto& block = twin::detail::Block(call);
    chip_ = block.chip;
    chip_enum_ = std::string(chip_.name) == "Ascend910B" ? twin::Chip::Ascend910B
                                                          : twin::Chip::Ascend310B;
    if (pipe == nullptr) Protocol(call, "TPipe pointer is null");
    if (chip_.separated && workspace == nullptr) {
      Protocol(call, twin::detail::Str("system workspace is null on ", chip_.name,
                                       " (vector and cube cores talk through it): call "
                                       "SetSysWorkspace(workspace) and pass "
                                       "GetSysWorkSpacePtr()"));
    }
    if (chip_.separated &&
        block.kernel_type == static_cast<int>(twin::KernelType::AivOnly)) {
      twin::detail::Violate(
          "kernel-type", call,
          twin::detail::Str("Matmul objects in a kernel launched as KernelType::AivOnly on ",
                            chip_.name, ": with no cube core nothing serves them; a kernel "
                            "that uses Matmul is a MIX kernel (KERNEL_TYPE_MIX_AIC_1_2)"));
    }
    // CANN dav_c220 kfc_comm.h: MAX_MATMUL_OBJ = 8 message slots per vector core.
    if (++block.matmul_objects > 8) {
      Protocol(call, "more than 8 Matmul objects in one kernel (CANN's MAX_MATMUL_OBJ is 8)");
    }
    CheckTypes(call);
    registered_ = true;
  }

 private:
  enum class Source { None, Global, Local };
  template <class T>
  struct Operand {
    Source source = Source::None;
    AscendC::GlobalTensor<T> gm;
    AscendC::LocalTensor<T> local;
  };

  [[noreturn]] static void Protocol(const std::string& call, const std::string& what) {
    twin::detail::Violate("matmul-protocol", call, what);
  }

  // ---- static (type/position) checks, made once the chip is known ----
  void CheckTypes(const char* call) const {
    using AscendC::TPosition;
    if (A_TYPE::format != CubeFormat::ND || B_TYPE::format != CubeFormat::ND ||
        C_TYPE::format != CubeFormat::ND || BIAS_TYPE::format != CubeFormat::ND) {
      throw std::logic_error("Matmul: only CubeFormat::ND is emulated by the twin");
    }
    if (A_TYPE::layout != LayoutMode::NONE || A_TYPE::ibShare || B_TYPE::ibShare) {
      throw std::logic_error("Matmul: batch layouts and IBShare are not emulated by the twin");
    }
    const bool coupled_gm_only = !chip_.separated;  // Atlas 200I/500 A2: every operand in GM
    auto check_in = [&](TPosition pos, const char* what, bool vecout_allowed) {
      if (pos == TPosition::TSCM) {
        throw std::logic_error("Matmul: TSCM (L1) operands are not emulated by the twin");
      }
      const bool ok = pos == TPosition::GM || (pos == TPosition::VECOUT && vecout_allowed &&
                                               !coupled_gm_only);
      if (!ok) {
        twin::detail::Violate(
            "matmul-position", call,
            twin::detail::Str(what, " MatmulType position ", AscendC::PositionName(pos),
                              " is not accepted on ", chip_.name, " (allowed: ",
                              coupled_gm_only ? "GM" : "GM, VECOUT, TSCM", ")"));
      }
    };
    check_in(A_TYPE::pos, "A", true);
    check_in(B_TYPE::pos, "B", true);
    // BIAS_TYPE defaults to C_TYPE (so may say VECIN); its position matters only once SetBias
    // is called, where CheckBiasPosition asserts it.
    if (C_TYPE::pos == TPosition::CO1) {
      throw std::logic_error("Matmul: C in CO1 (user-managed L0C) is not emulated by the twin");
    }
    if (!(C_TYPE::pos == TPosition::GM || (C_TYPE::pos == TPosition::VECIN && !coupled_gm_only))) {
      twin::detail::Violate(
          "matmul-position", call,
          twin::detail::Str("C MatmulType position ", AscendC::PositionName(C_TYPE::pos),
                            " is not accepted on ", chip_.name, " (allowed: ",
                            coupled_gm_only ? "GM" : "GM, VECIN, CO1", ")"));
    }
    const auto a = detail::CubeTypeOf<SrcAT>(), b = detail::CubeTypeOf<SrcBT>();
    const auto c = detail::CubeTypeOf<DstT>(), bias = detail::CubeTypeOf<BiasT>();
    if (!twin::MatmulTypesSupported(chip_enum_, a, b, bias, c)) {
      twin::detail::Violate(
          "matmul-dtype", call,
          twin::detail::Str("A ", twin::CubeDTypeName(a), ", B ", twin::CubeDTypeName(b),
                            ", bias ", twin::CubeDTypeName(bias), ", C ", twin::CubeDTypeName(c),
                            " is not a supported Matmul type combination on ", chip_.name,
                            a != b ? " (A and B must have the same type)" : ""));
    }
  }

  // ---- tiling checks (CANN TCubeTiling constraint table) ----
  void CheckTiling(const TCubeTiling& t, const char* call) const {
    using twin::detail::Str;
    auto bad = [&](const std::string& what) { twin::detail::Violate("matmul-tiling", call, what); };
    const int32_t fields[] = {t.M,     t.N,       t.Ka,      t.Kb,    t.singleCoreM,
                              t.singleCoreN,      t.singleCoreK, t.baseM, t.baseN,
                              t.baseK, t.depthA1, t.depthB1, t.stepM, t.stepN,
                              t.stepKa, t.stepKb};
    for (int32_t f : fields) {
      if (f <= 0) {
        bad(Str("shape, base, depth and step fields must be positive (M=", t.M, " N=", t.N,
                " Ka=", t.Ka, " Kb=", t.Kb, " singleCore=", t.singleCoreM, "x", t.singleCoreN,
                "x", t.singleCoreK, " base=", t.baseM, "x", t.baseN, "x", t.baseK, " depth=",
                t.depthA1, "/", t.depthB1, " step=", t.stepM, "/", t.stepN, "/", t.stepKa, "/",
                t.stepKb, ")"));
      }
    }
    if (t.usedCoreNum < 1 || uint32_t(t.usedCoreNum) > chip_.cube_core_num) {
      bad(Str("usedCoreNum ", t.usedCoreNum, " outside [1, ", chip_.cube_core_num,
              "] (cube cores of ", chip_.name, ")"));
    }
    if (t.singleCoreM > t.M || t.singleCoreN > t.N || t.singleCoreK > t.Ka ||
        t.singleCoreK > t.Kb) {
      bad(Str("singleCore ", t.singleCoreM, "x", t.singleCoreN, "x", t.singleCoreK,
              " exceeds the original shape M=", t.M, " N=", t.N, " Ka=", t.Ka, " Kb=", t.Kb));
    }
    if (t.iterateOrder != 0 && t.iterateOrder != 1) bad(Str("iterateOrder ", t.iterateOrder));
    if (t.isBias != 0 && t.isBias != 1) bad(Str("isBias ", t.isBias, " is not 0 or 1"));
    for (int32_t db : {t.dbL0A, t.dbL0B, t.dbL0C}) {
      if (db != 1 && db != 2) {
        bad(Str("dbL0A/dbL0B/dbL0C must be 1 or 2 (got ", t.dbL0A, "/", t.dbL0B, "/", t.dbL0C,
                ")"));
      }
    }
    if (t.baseM % 16 != 0 || t.baseN % 16 != 0) {
      bad(Str("baseM ", t.baseM, " and baseN ", t.baseN,
              " must be multiples of 16 (the cube fractal is 16 rows)"));
    }
    const uint64_t sa = sizeof(SrcAT), sb = sizeof(SrcBT), sbias = sizeof(BiasT);
    const uint64_t l0a = uint64_t(t.baseM) * t.baseK * sa * t.dbL0A;
    const uint64_t l0b = uint64_t(t.baseN) * t.baseK * sb * t.dbL0B;
    const uint64_t l0c = uint64_t(t.baseM) * t.baseN * 4u * t.dbL0C;  // fp32 accumulators
    if (l0a > chip_.l0a_bytes) {
      bad(Str("baseM*baseK*sizeof(A)*dbL0A = ", l0a, " bytes > L0A ", chip_.l0a_bytes));
    }
    if (l0b > chip_.l0b_bytes) {
      bad(Str("baseN*baseK*sizeof(B)*dbL0B = ", l0b, " bytes > L0B ", chip_.l0b_bytes));
    }
    if (l0c > chip_.l0c_bytes) {
      bad(Str("baseM*baseN*4*dbL0C = ", l0c, " bytes > L0C ", chip_.l0c_bytes));
    }
    if (t.isBias == 1 && uint64_t(t.baseN) * sbias > chip_.bt_bytes) {
      bad(Str("baseN*sizeof(bias) = ", uint64_t(t.baseN) * sbias, " bytes > BiasTable ",
              chip_.bt_bytes));
    }
    auto depth_ok = [](int32_t depth, int32_t steps) {
      return depth == steps || depth == 2 * steps;  // L1 single or double buffered
    };
    if (!depth_ok(t.depthA1, t.stepM * t.stepKa) || !depth_ok(t.depthB1, t.stepN * t.stepKb)) {
      bad(Str("depthA1 ", t.depthA1, " must be stepM*stepKa (", t.stepM * t.stepKa,
              ") or twice that, depthB1 ", t.depthB1, " stepN*stepKb (", t.stepN * t.stepKb,
              ") or twice that"));
    }
    const uint64_t l1 = uint64_t(t.baseM) * t.baseK * t.depthA1 * sa +
                        uint64_t(t.baseN) * t.baseK * t.depthB1 * sb +
                        (t.isBias == 1 ? uint64_t(t.baseN) * sbias : 0u);
    if (l1 > chip_.l1_bytes) {
      bad(Str("A1 + B1 (+ bias) = ", l1, " bytes > L1 ", chip_.l1_bytes,
              " (baseM*baseK*depthA1*sizeof(A) + baseN*baseK*depthB1*sizeof(B))"));
    }
  }

  // baseK alignment depends on the transposition in use: A row-major with B transposed reads K
  // as the inner axis of both, so K only needs whole 32-byte C0 blocks; otherwise K is a
  // fractal row axis of one operand and must be a multiple of 16.
  void CheckBaseK(const char* call) const {
    const bool inner_k = !trans_a_ && trans_b_;
    const int32_t c0 = static_cast<int32_t>(32 / sizeof(SrcAT));
    const int32_t align = inner_k ? c0 : 16;
    if (tiling_.baseK % align != 0) {
      twin::detail::Violate(
          "matmul-tiling", call,
          twin::detail::Str("baseK ", tiling_.baseK, " is not a multiple of ", align,
                            inner_k ? " (C0: 32 bytes of K)" : " (16: K is a fractal row axis)",
                            " for A", trans_a_ ? " transposed" : "", ", B",
                            trans_b_ ? " transposed" : ""));
    }
  }

  template <class TYPE, class T>
  static void CheckTranspose(bool transpose, const char* which, const char* call) {
    if (transpose && !TYPE::isTrans) {
      twin::detail::Violate("matmul-transpose", call,
                            twin::detail::Str(which, " transposed but its MatmulType ISTRANS is "
                                                     "false (results would be wrong)"));
    }
    if (std::is_same_v<T, float> && transpose != TYPE::isTrans) {
      twin::detail::Violate("matmul-transpose", call,
                            twin::detail::Str("float ", which, ": the transpose flag must equal "
                                                                "MatmulType ISTRANS (L1 sizing "
                                                                "differs)"));
    }
  }

  void CheckSingle(int m, int n, int k, const char* call) const {
    if (m <= 0 || n <= 0 || k <= 0 || m > tiling_.singleCoreM || n > tiling_.singleCoreN ||
        k > tiling_.singleCoreK) {
      twin::detail::Violate(
          "matmul-shape", call,
          twin::detail::Str("single shape ", m, "x", n, "x", k, " outside [1, tiling singleCore ",
                            tiling_.singleCoreM, "x", tiling_.singleCoreN, "x",
                            tiling_.singleCoreK, "] (the tiling sized L1 and C for that)"));
    }
  }

  void CheckAtomic(uint8_t enAtomic, const char* call) const {
    if (enAtomic > 3) {
      twin::detail::Violate("matmul-protocol", call,
                            twin::detail::Str("enAtomic ", int(enAtomic), " is not 0..3"));
    }
  }

  // ---- protocol helpers ----
  void RequireInit(const char* call) const {
    if (!registered_) Protocol(call, "Matmul used before REGIST_MATMUL_OBJ");
    if (!inited_) Protocol(call, "Matmul used before it was given a tiling (REGIST/Init)");
  }
  void RequireIdle(const char* call) const {
    if (iterating_) {
      Protocol(call, "changes the Matmul while an Iterate sequence is in progress");
    }
  }
  void RequirePending(const char* call) const {
    RequireInit(call);
    if (!pending_) Protocol(call, "no pending Iterate: call Iterate() (and check it returned true)");
  }
  void RequireBiasTiling(const char* call) const {
    RequireInit(call);
    RequireIdle(call);
    const auto pos = BIAS_TYPE::pos;
    if (!(pos == AscendC::TPosition::GM || (pos == AscendC::TPosition::VECOUT && chip_.separated))) {
      twin::detail::Violate("matmul-position", call,
                            twin::detail::Str("bias MatmulType position ",
                                              AscendC::PositionName(pos), " is not accepted on ",
                                              chip_.name, " (allowed: ",
                                              chip_.separated ? "GM, VECOUT" : "GM", ")"));
    }
    if (tiling_.isBias != 1) {
      Protocol(call, "SetBias with a tiling whose isBias is 0 (GetTiling was not told SetBias)");
    }
  }
  void RequireGm(AscendC::TPosition pos, const char* which, const char* call) const {
    if (pos != AscendC::TPosition::GM) {
      twin::detail::Violate("matmul-position", call,
                            twin::detail::Str("GlobalTensor given for ", which,
                                              " whose MatmulType position is ",
                                              AscendC::PositionName(pos)));
    }
  }
  void RequireLocal(AscendC::TPosition pos, const twin::detail::Slot* slot, const char* which,
                    const char* call) const {
    if (pos == AscendC::TPosition::GM) {
      twin::detail::Violate("matmul-position", call,
                            twin::detail::Str("LocalTensor given for ", which,
                                              " whose MatmulType position is GM"));
    }
    if (slot == nullptr) {
      twin::detail::Violate("ub-bounds", call, "tensor is not bound to a buffer");
    }
    const auto actual = static_cast<AscendC::TPosition>(slot->position);
    if (actual != pos) {
      twin::detail::Violate(
          "matmul-position", call,
          twin::detail::Str(which, " LocalTensor lives in ", slot->name, " (",
                            AscendC::PositionName(actual), ") but its MatmulType position is ",
                            AscendC::PositionName(pos)));
    }
  }

  void ResetOperands(const char* why) {
    a_ = {};
    b_ = {};
    bias_ = {};
    unset_reason_ = why;
  }

  // Everything a computation needs, checked once at its start.
  void Prepare(const char* call) {
    using twin::detail::Str;
    if (a_.source == Source::None || b_.source == Source::None) {
      Protocol(call, Str(a_.source == Source::None ? "SetTensorA" : "SetTensorB",
                         " was not called since ", unset_reason_));
    }
    if (bias_enabled_ && bias_.source == Source::None) {
      Protocol(call, Str("the tiling enables a bias (isBias=1) but SetBias was not called since ",
                         unset_reason_, " (use DisableBias for none)"));
    }
    auto& block = twin::detail::Block(call);
    if (block.active_matmul != nullptr && block.active_matmul != this) {
      Protocol(call, "switching to another Matmul object without End() on the one that computed "
                     "last (their cube resources would collide)");
    }
    block.active_matmul = this;
    // Shapes against the org shape: the strides must cover the single shape.
    if (singleM_ > orgM_ || singleN_ > orgN_ || singleK_ > orgKa_ || singleK_ > orgKb_ ||
        (orgKc_ > 0 && singleN_ > orgKc_)) {
      twin::detail::Violate(
          "matmul-shape", call,
          Str("single shape ", singleM_, "x", singleN_, "x", singleK_,
              " exceeds the org shape M=", orgM_, " N=", orgN_, " Ka=", orgKa_, " Kb=", orgKb_,
              orgKc_ > 0 ? Str(" Kc=", orgKc_) : std::string()));
    }
    // ND inner axes above 65535 need MatmulConfig intrinsicsCheck, which is not emulated.
    const int a_inner = trans_a_ ? orgM_ : orgKa_;
    const int b_inner = trans_b_ ? orgKb_ : orgN_;
    if (a_inner > 65535 || b_inner > 65535) {
      twin::detail::Violate("matmul-shape", call,
                            Str("ND inner axis of A (", a_inner, ") or B (", b_inner,
                                ") above 65535 needs MatmulConfig intrinsicsCheck"));
    }
    CheckBaseK(call);
    const uint64_t a_extent = trans_a_ ? uint64_t(singleK_ - 1) * orgM_ + singleM_
                                       : uint64_t(singleM_ - 1) * orgKa_ + singleK_;
    const uint64_t b_extent = trans_b_ ? uint64_t(singleN_ - 1) * orgKb_ + singleK_
                                       : uint64_t(singleK_ - 1) * orgN_ + singleN_;
    a_ptr_ = Fetch(a_, a_extent, call);
    b_ptr_ = Fetch(b_, b_extent, call);
    bias_ptr_ = bias_enabled_ ? Fetch(bias_, uint64_t(singleN_), call) : nullptr;
  }

  template <class T>
  const T* Fetch(const Operand<T>& op, uint64_t extent, const char* call) const {
    if (op.source == Source::Global) {
      op.gm.CheckRange(0, extent, call);
      return op.gm.GetPhyAddr();
    }
    op.local.Check(0, extent, twin::detail::Access::Read, twin::detail::Unit::Cube, call, true);
    return op.local.TwinData();
  }

  int MIter() const { return (singleM_ + tiling_.baseM - 1) / tiling_.baseM; }
  int NIter() const { return (singleN_ + tiling_.baseN - 1) / tiling_.baseN; }
  void BlockCoords(int index, int& mi, int& ni) const {
    if (tiling_.iterateOrder == 0) {  // M first, then N
      mi = index % MIter();
      ni = index / MIter();
    } else {
      ni = index % NIter();
      mi = index / NIter();
    }
  }
  uint64_t Ldc() const { return uint64_t(orgKc_ > 0 ? orgKc_ : orgN_); }
  uint64_t CExtent() const { return uint64_t(singleM_ - 1) * Ldc() + singleN_; }
  uint64_t BlockOffsetC() const { return uint64_t(m0_) * Ldc() + n0_; }
  uint64_t BlockExtentC() const { return uint64_t(cur_m_ - 1) * Ldc() + cur_n_; }

  // One L0C block: acc[i][j] = bias[n] + sum over baseK steps of (fp32 sum of fp32 products).
  void ComputeBlock(int mi, int ni) {
    m0_ = mi * tiling_.baseM;
    n0_ = ni * tiling_.baseN;
    cur_m_ = std::min(tiling_.baseM, singleM_ - m0_);
    cur_n_ = std::min(tiling_.baseN, singleN_ - n0_);
    acc_.assign(size_t(cur_m_) * cur_n_, 0.0f);
    const uint64_t lda_m = trans_a_ ? 1u : uint64_t(orgKa_);  // A(m, k) = a[m*lda_m + k*lda_k]
    const uint64_t lda_k = trans_a_ ? uint64_t(orgM_) : 1u;
    const uint64_t ldb_k = trans_b_ ? 1u : uint64_t(orgN_);  // B(k, n) = b[k*ldb_k + n*ldb_n]
    const uint64_t ldb_n = trans_b_ ? uint64_t(orgKb_) : 1u;
    for (int i = 0; i < cur_m_; ++i) {
      for (int j = 0; j < cur_n_; ++j) {
        float acc = bias_ptr_ != nullptr ? detail::ToF(bias_ptr_[n0_ + j]) : 0.0f;
        const SrcAT* a_row = a_ptr_ + uint64_t(m0_ + i) * lda_m;
        const SrcBT* b_col = b_ptr_ + uint64_t(n0_ + j) * ldb_n;
        for (int k0 = 0; k0 < singleK_; k0 += tiling_.baseK) {
          const int k1 = std::min(singleK_, k0 + tiling_.baseK);
          float step = 0.0f;
          for (int k = k0; k < k1; ++k) {
            step += detail::ToF(a_row[uint64_t(k) * lda_k]) * detail::ToF(b_col[uint64_t(k) * ldb_k]);
          }
          acc += step;
        }
        acc_[size_t(i) * cur_n_ + j] = acc;
      }
    }
  }

  void WriteBlockGm(const AscendC::GlobalTensor<DstT>& gm, uint8_t enAtomic) {
    DstT* c = gm.GetPhyAddr(0) + BlockOffsetC();
    // A plain store; atomic accumulation into shared output is what enAtomic is for.
    if (enAtomic == 0) {
      for (int i = 0; i < cur_m_; ++i) {
        ::twin::detail::RecordGmWrite(c + uint64_t(i) * Ldc(),
                                             uint64_t(cur_n_) * sizeof(DstT));
      }
    }
    std::unique_lock<std::mutex> lock(detail::AtomicMutex(), std::defer_lock);
    if (enAtomic != 0) lock.lock();
    for (int i = 0; i < cur_m_; ++i) {
      for (int j = 0; j < cur_n_; ++j) {
        const DstT value = detail::FromF<DstT>(acc_[size_t(i) * cur_n_ + j]);
        DstT& out = c[uint64_t(i) * Ldc() + j];
        const float old = detail::ToF(out), v = detail::ToF(value);
        switch (enAtomic) {
          case 0: out = value; break;
          case 1: out = detail::FromF<DstT>(old + v); break;
          case 2: out = detail::FromF<DstT>(std::max(old, v)); break;
          default: out = detail::FromF<DstT>(std::min(old, v)); break;
        }
      }
    }
  }

  twin::ChipInfo chip_{};
  twin::Chip chip_enum_ = twin::Chip::Ascend910B;
  TCubeTiling tiling_{};
  bool registered_ = false;
  bool inited_ = false;
  int orgM_ = 0, orgN_ = 0, orgKa_ = 0, orgKb_ = 0, orgKc_ = 0;
  int singleM_ = 0, singleN_ = 0, singleK_ = 0;
  Operand<SrcAT> a_;
  Operand<SrcBT> b_;
  Operand<BiasT> bias_;
  bool trans_a_ = false, trans_b_ = false, bias_enabled_ = false;
  const char* unset_reason_ = "Init";
  const SrcAT* a_ptr_ = nullptr;
  const SrcBT* b_ptr_ = nullptr;
  const BiasT* bias_ptr_ = nullptr;
  bool iterating_ = false, pending_ = false;
  int next_block_ = 0;
  int m0_ = 0, n0_ = 0, cur_m_ = 0, cur_n_ = 0;
  std::vector<float> acc_;
};

namespace detail {

template <class MM>
void RegistOne(AscendC::TPipe* pipe, GM_ADDR workspace, MM& mm, const TCubeTiling* tiling) {
  mm.TwinRegister(pipe, workspace);
  if (tiling != nullptr) mm.Init(tiling, pipe);
}

inline void RegistPairs(AscendC::TPipe*, GM_ADDR) {}

template <class MM, class... Rest>
void RegistPairs(AscendC::TPipe* pipe, GM_ADDR workspace, MM& mm, const TCubeTiling* tiling,
                 Rest&&... rest) {
  RegistOne(pipe, workspace, mm, tiling);
  RegistPairs(pipe, workspace, std::forward<Rest>(rest)...);
}

// REGIST_MATMUL_OBJ(&pipe, workspace, mm): one object, tiling given later by Init.
template <class MM>
void RegistMatmulObj(AscendC::TPipe* pipe, GM_ADDR workspace, MM& mm) {
  RegistOne(pipe, workspace, mm, nullptr);
}

// REGIST_MATMUL_OBJ(&pipe, workspace, mm1, &tiling1[, mm2, &tiling2 ...]).
template <class MM, class... Rest>
void RegistMatmulObj(AscendC::TPipe* pipe, GM_ADDR workspace, MM& mm, const TCubeTiling* tiling,
                     Rest&&... rest) {
  RegistPairs(pipe, workspace, mm, tiling, std::forward<Rest>(rest)...);
}

// True on the cube core of a 910B MIX kernel, where REGIST_MATMUL_OBJ serves and returns.
inline bool IsMixCube() {
  auto* block = twin::detail::current_block;
  return block != nullptr && block->core == twin::detail::Core::Aic && block->pair != nullptr;
}

// The cube side of REGIST_MATMUL_OBJ (CANN: KfcServer Init/InitObj, then `while (isRun())
// Run(...)`, Quit): registers this core's objects, then executes the calls its two vector cores
// post until both have quit (their REGIST client objects were destroyed or their kernel ended).
template <class... Objs>
void ServeMatmulObj(AscendC::TPipe* pipe, GM_ADDR workspace, Objs&&... objs) {
  RegistMatmulObj(pipe, workspace, std::forward<Objs>(objs)...);
  auto* self = twin::detail::current_block;
  auto* pair = self->pair;
  std::unique_lock<std::mutex> lock(pair->mutex);
  for (;;) {
    pair->cv.wait(lock, [&] {
      return !pair->requests.empty() || pair->aborted ||
             ((pair->client_quit[0] || pair->aiv_ended[0]) &&
              (pair->client_quit[1] || pair->aiv_ended[1]));
    });
    if (pair->aborted) throw twin::detail::BlockAborted{};
    if (pair->requests.empty()) break;
    twin::detail::CubeRequest* request = pair->requests.front();
    pair->requests.pop_front();
    request->taken = true;
    lock.unlock();
    // The call runs here, on the cube thread, with the calling vector core's state (its UB
    // tensors, its End() bookkeeping), as the server addresses the client's objects by id.
    tl_serving = true;
    twin::detail::current_block = request->client;
    try {
      request->work();
    } catch (...) {
      request->error = std::current_exception();
    }
    twin::detail::current_block = self;
    tl_serving = false;
    lock.lock();
    request->done = true;
    pair->cv.notify_all();
  }
  for (int sub = 0; sub < 2; ++sub) {
    if (!pair->client_seen[sub]) {
      twin::detail::Violate(
          "mix-deadlock", "REGIST_MATMUL_OBJ",
          twin::detail::Str("vector core ", self->block_idx * 2 + sub, " (block ",
                            self->block_idx, ", sub-block ", sub,
                            ") ended without reaching REGIST_MATMUL_OBJ: the cube core's "
                            "server waits for its quit message forever; every vector core "
                            "must execute REGIST_MATMUL_OBJ (no early return before it)"));
    }
  }
}

}  // namespace detail
}  // namespace matmul

namespace twin {
namespace detail {

// The vector side's scoped client (CANN: `AscendC::KfcCommClient __kfcClient__`): created by
// REGIST_MATMUL_OBJ in the enclosing scope, it waits for the workspace event of the launch
// wrapper, and its destructor tells the cube core this vector core has quit.
class KfcClient {
 public:
  KfcClient() {
    auto* block = current_block;
    if (block == nullptr || block->core != Core::Aiv || block->pair == nullptr) return;
    auto* pair = block->pair;
    {
      std::unique_lock<std::mutex> lock(pair->mutex);
      pair->client_seen[block->subblock_idx] = true;
      // WaitEvent(WORKSPACE_SYNC_ID): set by the wrapper before the kernel starts, or never.
      pair->cv.wait_for(lock, std::chrono::milliseconds(200),
                        [&] { return pair->workspace_event || pair->aborted; });
      if (pair->aborted) throw BlockAborted{};
      if (!pair->workspace_event) {
        Violate("workspace-sync", "REGIST_MATMUL_OBJ",
                Str("vector core ", block->block_idx, " waits in WaitEvent(WORKSPACE_SYNC_ID) "
                    "forever (deadlock): only the generated launch wrapper sets that event, and "
                    "only when the kernel library is compiled with HAVE_WORKSPACE and "
                    "HAVE_TILING (ascendc_compile_definitions); twin: "
                    "LaunchOptions::have_workspace_and_tiling"));
      }
    }
    block_ = block;
    block->kfc_client_alive = true;
  }
  ~KfcClient() {
    if (block_ == nullptr) return;
    block_->kfc_client_alive = false;
    std::lock_guard<std::mutex> lock(block_->pair->mutex);
    block_->pair->client_quit[block_->subblock_idx] = true;
    block_->pair->cv.notify_all();
  }
  KfcClient(const KfcClient&) = delete;
  KfcClient& operator=(const KfcClient&) = delete;

 private:
  BlockContext* block_ = nullptr;
};

}  // namespace detail
}  // namespace twin

namespace AscendC {
using matmul::CFG_NORM;
using matmul::Matmul;
using matmul::MatmulConfig;
using matmul::MatmulType;
}  // namespace AscendC

// The structure of CANN's REGIST_CUBE_OBJ for dav_c220 (highlevel_api/impl/kfc/
// kfc_register_obj.h): on the cube core it serves the vector cores' Matmul calls and then
// returns from the enclosing (void) function; on a vector core it declares the scoped client
// __kfcClient__, so it must sit in the kernel's own scope. On the 310B (and in launches that
// are not twin::KernelType::Mix) it only initialises the objects, as the non-220 macro does.
#define REGIST_MATMUL_OBJ(tpipe, workspace, ...)                                 \
  if (::matmul::detail::IsMixCube()) {                                          \
    ::matmul::detail::ServeMatmulObj(tpipe, workspace, __VA_ARGS__);            \
    return;                                                                     \
  }                                                                             \
  ::twin::detail::KfcClient __kfcClient__;                                      \
  ::matmul::detail::RegistMatmulObj(tpipe, workspace, __VA_ARGS__)
