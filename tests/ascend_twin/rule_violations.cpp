// One deliberately wrong call per hardware rule of the CPU twin, plus its correct counterpart.
// tests/test_ascend_twin.py runs `rule_violations CASE bad` and expects exit code 3 with
// "VIOLATION rule=<rule>", and `rule_violations CASE good` and expects exit code 0 with "OK", so
// each check is shown both to fire and to stay quiet on the legal call next to it.
#include <cstring>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <vector>

#include "kernel_operator.h"
#include "lib/matmul/matmul_intf.h"

using namespace AscendC;

namespace {

bool g_bad = false;  // set from argv before launching; read-only inside the kernels

std::vector<float> g_gm(4096, 1.0f);
GM_ADDR GmBase() { return reinterpret_cast<GM_ADDR>(g_gm.data()); }

// DataCopy of 8 floats (32 bytes) into x[2] (8 bytes into its buffer) vs x[8] (32 bytes in).
__global__ __aicore__ void ub_alignment(GM_ADDR gm) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 256);
  GlobalTensor<float> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gm), 4096);
  LocalTensor<float> x = buf.Get<float>();
  DataCopy(x[g_bad ? 2 : 8], g, 8);
}

// 12 floats = 48 bytes: the hardware would copy 32 and drop the rest.
__global__ __aicore__ void datacopy_32b(GM_ADDR gm) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 256);
  GlobalTensor<float> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gm), 4096);
  DataCopy(buf.Get<float>(), g, g_bad ? 12 : 16);
}

// Compare of 48 floats = 192 bytes, not a whole 256-byte repeat; 64 floats is.
__global__ __aicore__ void compare_256b(GM_ADDR) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> a, b, mask;
  pipe.InitBuffer(a, 256);
  pipe.InitBuffer(b, 256);
  pipe.InitBuffer(mask, 32);
  LocalTensor<float> x = a.Get<float>(), y = b.Get<float>();
  Duplicate(x, 1.0f, 64);
  Duplicate(y, 2.0f, 64);
  LocalTensor<uint8_t> m = mask.Get<uint8_t>();
  Compare(m, x, y, CMPMODE::LT, g_bad ? 48u : 64u);
  Select(x, m, x, y, SELMODE::VSEL_TENSOR_TENSOR_MODE, 64);
}

// Exp straight on bf16 (must be cast to float first) vs on float.
__global__ __aicore__ void exp_ln_dtype(GM_ADDR) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 256);
  if (g_bad) {
    LocalTensor<bfloat16_t> x = buf.Get<bfloat16_t>();
    Duplicate(x, bfloat16_t(0.5f), 16);
    Exp(x, x, 16);
  } else {
    LocalTensor<float> x = buf.Get<float>();
    Duplicate(x, 0.5f, 8);
    Ln(x, x, 8);
  }
}

// Each of two blocks writes 8 floats of output: both to the same 8 (bad, as a work split that
// gives every block item 0 would) or each to its own (good).
__global__ __aicore__ void gm_write_overlap(GM_ADDR gm) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 32);
  LocalTensor<float> x = buf.Get<float>();
  Duplicate(x, float(GetBlockIdx()), 8);
  GlobalTensor<float> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gm), 4096);
  DataCopy(g[g_bad ? 0 : 8 * GetBlockIdx()], x, 8);
}

// DataCopyPad of bfloat16_t from GM: dav_m300 (310B) has no copy_gm_to_ubuf_align for it, the
// 910B copies any 2-byte element (the bad run is on the 310B, the good one on the 910B).
__global__ __aicore__ void copy_dtype(GM_ADDR gm) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 256);
  GlobalTensor<bfloat16_t> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ bfloat16_t*>(gm), 4096);
  DataCopyPad(buf.Get<bfloat16_t>(), g, DataCopyExtParams(1, 10 * sizeof(bfloat16_t), 0, 0, 0),
              DataCopyPadExtParams<bfloat16_t>(false, 0, 0, bfloat16_t(0.0f)));
}

// float -> bfloat16_t with CAST_NONE (no such conversion: the hardware writes nothing) vs
// CAST_RINT; and half -> float with CAST_RINT (widening takes CAST_NONE only) vs CAST_NONE.
__global__ __aicore__ void cast_mode_narrow(GM_ADDR) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> a, b;
  pipe.InitBuffer(a, 256);
  pipe.InitBuffer(b, 256);
  LocalTensor<float> x = a.Get<float>();
  Duplicate(x, 0.5f, 64);
  Cast(b.Get<bfloat16_t>(), x, g_bad ? RoundMode::CAST_NONE : RoundMode::CAST_RINT, 64);
}

__global__ __aicore__ void cast_mode_widen(GM_ADDR) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> a, b;
  pipe.InitBuffer(a, 256);
  pipe.InitBuffer(b, 256);
  LocalTensor<half> x = a.Get<half>();
  Duplicate(x, half(0.5f), 64);
  Cast(b.Get<float>(), x, g_bad ? RoundMode::CAST_RINT : RoundMode::CAST_NONE, 64);
}

// 2 x 96 KB = 192 KB: over the 910B's 184 KB budget, inside the 310B's 248 KB.
__global__ __aicore__ void ub_budget(GM_ADDR) {
  TPipe pipe;
  TQue<TPosition::VECIN, 2> in;
  pipe.InitBuffer(in, 2, 96 * 1024);
}

// Two queues of 4 on VECIN plus a third queue there: 9 QUE buffers on one position (8 allowed).
// TBufs do not count toward that limit: the good case adds a TBuf on VECIN instead.
__global__ __aicore__ void buffers_per_position(GM_ADDR) {
  TPipe pipe;
  TQue<TPosition::VECIN, 1> q1, q2, q3;
  TBuf<TPosition::VECIN> extra;
  pipe.InitBuffer(q1, 4, 64);
  pipe.InitBuffer(q2, 4, 64);
  if (g_bad) {
    pipe.InitBuffer(q3, 1, 64);
  } else {
    pipe.InitBuffer(extra, 64);
  }
}

// 65 buffers in one kernel (64 allowed), all TBufs so no per-position limit applies.
__global__ __aicore__ void buffers_total(GM_ADDR) {
  TPipe pipe;
  std::vector<TBuf<TPosition::VECCALC>> bufs(65);
  const size_t count = g_bad ? 65 : 64;
  for (size_t i = 0; i < count; ++i) pipe.InitBuffer(bufs[i], 32);
}

// SetFlag whose WaitFlag never comes (caught at kernel end).
__global__ __aicore__ void flag_set_without_wait(GM_ADDR) {
  SetFlag<HardEvent::MTE2_V>(EVENT_ID1);
  if (!g_bad) WaitFlag<HardEvent::MTE2_V>(EVENT_ID1);
}

// WaitFlag on an event nobody set: the pipe would wait forever.
__global__ __aicore__ void flag_wait_without_set(GM_ADDR) {
  if (!g_bad) SetFlag<HardEvent::V_MTE3>(EVENT_ID2);
  WaitFlag<HardEvent::V_MTE3>(EVENT_ID2);
}

// Exp reads a VECIN tensor that MTE2 filled but that was never EnQue'd/DeQue'd.
__global__ __aicore__ void queue_read_before_deque(GM_ADDR gm) {
  TPipe pipe;
  TQue<TPosition::VECIN, 1> in;
  pipe.InitBuffer(in, 1, 64);
  GlobalTensor<float> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gm), 4096);
  LocalTensor<float> x = in.AllocTensor<float>();
  DataCopy(x, g, 16);
  if (!g_bad) {
    in.EnQue(x);
    x = in.DeQue<float>();
  }
  Exp(x, x, 16);
  in.FreeTensor(x);
}

__global__ __aicore__ void queue_double_free(GM_ADDR) {
  TPipe pipe;
  TQue<TPosition::VECOUT, 1> out;
  pipe.InitBuffer(out, 1, 64);
  LocalTensor<float> y = out.AllocTensor<float>();
  out.FreeTensor(y);
  if (g_bad) out.FreeTensor(y);
}

// Add over 72 floats of a 64-float (256-byte) buffer.
__global__ __aicore__ void ub_bounds(GM_ADDR) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 256);
  LocalTensor<float> x = buf.Get<float>();
  Duplicate(x, 1.0f, 64);
  Add(x, x, x, g_bad ? 72 : 64);
}

// DataCopy of 16 floats from 8 before the end of a 4096-float global buffer.
__global__ __aicore__ void gm_bounds(GM_ADDR gm) {
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 64);
  GlobalTensor<float> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gm), 4096);
  DataCopy(buf.Get<float>(), g[g_bad ? 4088 : 4080], 16);
}

// Block 0 skips the SyncAll the other blocks wait in.
__global__ __aicore__ void syncall_divergence(GM_ADDR) {
  if (g_bad && GetBlockIdx() == 0) return;
  SyncAll();
}

// ------------------------------ Matmul high-level API ---------------------------------------
// A 32 x 32 x 32 problem with hand-made tiling: A at g_gm[0], B at g_gm[1024], C at g_gm[2048].

std::vector<uint8_t> g_workspace(1024);

TCubeTiling SmallTiling(int32_t base_m = 32, int32_t base_n = 32, int32_t base_k = 32) {
  TCubeTiling t{};
  t.usedCoreNum = 1;
  t.M = t.N = t.Ka = t.Kb = 32;
  t.singleCoreM = t.singleCoreN = t.singleCoreK = 32;
  t.baseM = base_m;
  t.baseN = base_n;
  t.baseK = base_k;
  t.stepM = t.stepN = 1;
  t.stepKa = t.stepKb = (32 + base_k - 1) / base_k;  // K fully loaded into L1
  t.depthA1 = t.stepM * t.stepKa;
  t.depthB1 = t.stepN * t.stepKb;
  t.dbL0A = t.dbL0B = t.dbL0C = 1;
  return t;
}

template <class T>
GlobalTensor<T> Gm(GM_ADDR gm, uint64_t float_offset, uint64_t elements) {
  GlobalTensor<T> g;
  g.SetGlobalBuffer(reinterpret_cast<__gm__ T*>(reinterpret_cast<float*>(gm) + float_offset),
                    elements);
  return g;
}

using GmF32 = MatmulType<TPosition::GM, CubeFormat::ND, float>;
using GmF16 = MatmulType<TPosition::GM, CubeFormat::ND, half>;
using GmBf16 = MatmulType<TPosition::GM, CubeFormat::ND, bfloat16_t>;
using MatmulF32 = Matmul<GmF32, GmF32, GmF32>;

// A half with B bfloat16_t: A and B must have the same type.
__global__ __aicore__ void matmul_dtype(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  if (g_bad) {
    Matmul<GmF16, GmBf16, GmF32> mm;
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  } else {
    Matmul<GmF16, GmF16, GmF32> mm;
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
    mm.SetTensorA(Gm<half>(gm, 0, 1024));
    mm.SetTensorB(Gm<half>(gm, 1024, 1024));
    mm.IterateAll(Gm<float>(gm, 2048, 1024));
    mm.End();
  }
}

// SetTensorA on an object REGIST_MATMUL_OBJ never saw.
__global__ __aicore__ void matmul_before_regist(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  if (g_bad) {
    mm.SetTensorA(Gm<float>(gm, 0, 1024));
    return;
  }
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
}

// IterateAll with only A set.
__global__ __aicore__ void matmul_iterate_before_set(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  if (!g_bad) mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
}

// GetTensorC with no Iterate before it.
__global__ __aicore__ void matmul_gettensorc_without_iterate(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  if (!g_bad) mm.Iterate();
  mm.GetTensorC(Gm<float>(gm, 2048, 1024));
  mm.End();
}

// After End() the operands are released: computing again needs SetTensorA/B again.
__global__ __aicore__ void matmul_use_after_end(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
  if (!g_bad) {
    mm.SetTensorA(Gm<float>(gm, 1024, 1024));
    mm.SetTensorB(Gm<float>(gm, 0, 1024));
  }
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
}

// Two objects: the second computes while the first was not End()ed.
__global__ __aicore__ void matmul_switch_without_end(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling t1 = SmallTiling(), t2 = SmallTiling();
  MatmulF32 mm1, mm2;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm1, &t1, mm2, &t2);
  mm1.SetTensorA(Gm<float>(gm, 0, 1024));
  mm1.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm1.IterateAll(Gm<float>(gm, 2048, 1024));
  if (!g_bad) mm1.End();
  mm2.SetTensorA(Gm<float>(gm, 2048, 1024));
  mm2.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm2.IterateAll(Gm<float>(gm, 3072, 1024));
  mm2.End();
}

// Legal either way (CANN's REGIST only binds the pipe; the kfc client/server do not look at
// the UB allocation): InitBuffer before REGIST_MATMUL_OBJ is accepted. Used with "good" only.
__global__ __aicore__ void matmul_initbuffer_then_regist(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TBuf<TPosition::VECCALC> buf;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  pipe.InitBuffer(buf, 256);
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048 + 1024 * GetSubBlockIdx(), 1024));
  mm.End();
}

// CANN's MAX_MATMUL_OBJ is 8: nine objects are one too many, eight are fine.
__global__ __aicore__ void matmul_objects(GM_ADDR) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling t = SmallTiling();
  MatmulF32 m0, m1, m2, m3, m4, m5, m6, m7, m8;
  if (g_bad) {
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), m0, &t, m1, &t, m2, &t, m3, &t, m4, &t, m5,
                      &t, m6, &t, m7, &t, m8, &t);
  } else {
    REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), m0, &t, m1, &t, m2, &t, m3, &t, m4, &t, m5,
                      &t, m6, &t, m7, &t);
  }
}

// ---- MIX kernels on the 910B: one AIC and two AIVs per block ----

// Computes one 32x32x32 product per vector core into its own part of gm (AIV k -> C slot k).
template <class MM>
void OneProduct(MM& mm, GM_ADDR gm) {
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048 + 1024 * uint64_t(GetBlockIdx() % 2), 1024));
  mm.End();
}

// REGIST in a helper: its client object dies when the helper returns, so the vector core's
// later Matmul calls reach no server (the cube core already quit and returned from the helper).
void RegistInHelper(TPipe* pipe, MatmulF32& mm, TCubeTiling* tiling) {
  REGIST_MATMUL_OBJ(pipe, GetSysWorkSpacePtr(), mm, tiling);
}
__global__ __aicore__ void regist_scope(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  if (g_bad) {
    RegistInHelper(&pipe, mm, &tiling);
    if (GetTaskRation() == 2 && GetSubBlockIdx() == 0) OneProduct(mm, gm);  // one AIV
    return;
  }
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  OneProduct(mm, gm);
}

// REGIST in Init(): the cube core returns from Init, not from the kernel, and then runs
// Process(), whose DataCopy is a vector instruction it does not have.
class RegistInInit {
 public:
  void Init(GM_ADDR gm, TCubeTiling* tiling) {
    gm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(gm), 4096);
    pipe_.InitBuffer(buf_, 256);
    REGIST_MATMUL_OBJ(&pipe_, GetSysWorkSpacePtr(), mm_, tiling);
  }
  void Process() {
    LocalTensor<float> x = buf_.Get<float>();
    DataCopy(x, gm_, 8);
  }
  MatmulF32 mm_;

 private:
  TPipe pipe_;
  TBuf<TPosition::VECCALC> buf_;
  GlobalTensor<float> gm_;
};
__global__ __aicore__ void cube_core_vector(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TCubeTiling tiling = SmallTiling();
  if (g_bad) {
    RegistInInit op;
    op.Init(gm, &tiling);
    op.Process();
    return;
  }
  TPipe pipe;
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);  // the AIC returns here
  TBuf<TPosition::VECCALC> buf;
  pipe.InitBuffer(buf, 256);
  GlobalTensor<float> g = Gm<float>(gm, 0, 1024);
  DataCopy(buf.Get<float>(), g, 8);
}

// Vector core 1 of the block leaves before REGIST: the cube core's server waits for its quit.
__global__ __aicore__ void mix_deadlock(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  if (g_bad && GetSubBlockIdx() == 1) return;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  OneProduct(mm, gm);
}

// Matmul with kernel type AivOnly (bad) or Mix (good); also launched without the
// HAVE_WORKSPACE/HAVE_TILING wrapper event (workspace-sync).
__global__ __aicore__ void mix_regist(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  OneProduct(mm, gm);
}

// No system workspace on 910B: the vector core has nowhere to post its requests to the cube.
__global__ __aicore__ void matmul_workspace(GM_ADDR) {
  if (!g_bad) SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
}

// Org shape with 16 rows for a single shape of 32 rows.
__global__ __aicore__ void matmul_org_shape(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetOrgShape(g_bad ? 16 : 32, 32, 32);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
}

// SetSingleShape above the tiling's singleCore shape (the tiling sized L1 and C for 32).
__global__ __aicore__ void matmul_single_shape(GM_ADDR) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetSingleShape(g_bad ? 48 : 16, 32, 32);
}

// A's global buffer holds 31 rows of the 32 the single shape reads.
__global__ __aicore__ void matmul_gm_bounds(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, g_bad ? 31 * 32 : 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
}

using UbCF32 = Matmul<GmF32, GmF32, MatmulType<TPosition::VECIN, CubeFormat::ND, float>>;

// GetTensorC into a VECIN tensor smaller than baseM * baseN (1024 floats).
__global__ __aicore__ void matmul_ub_c_size(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  UbCF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  TBuf<TPosition::VECIN> c;
  pipe.InitBuffer(c, (g_bad ? 512 : 1024) * sizeof(float));
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.Iterate();
  mm.GetTensorC(c.Get<float>());
  mm.End();
}

// GetTensorC into a VECIN tensor starting 16 bytes into its buffer.
__global__ __aicore__ void matmul_ub_c_alignment(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  UbCF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  TBuf<TPosition::VECIN> c;
  pipe.InitBuffer(c, 1040 * sizeof(float));
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.Iterate();
  mm.GetTensorC(c.Get<float>()[g_bad ? 4 : 8]);
  mm.End();
}

// Base blocks 256 x 256 in fp32 need 256 KB of L0C (128 KB on the chip).
__global__ __aicore__ void matmul_tiling_l0c(GM_ADDR) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling(g_bad ? 256 : 128, g_bad ? 256 : 128, 32);
  tiling.M = tiling.N = tiling.singleCoreM = tiling.singleCoreN = 256;
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
}

// depthA1 = 64 A blocks of 32 x 32 fp32 in L1 = 256 KB, plus B: over the 512 KB L1 with depthB1 64.
__global__ __aicore__ void matmul_tiling_l1(GM_ADDR) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  const int32_t steps = g_bad ? 72 : 32;
  tiling.stepKa = tiling.stepKb = steps;
  tiling.depthA1 = tiling.depthB1 = steps * 2;
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
}

// baseM 24 is not a whole number of 16-row fractals.
__global__ __aicore__ void matmul_tiling_fractal(GM_ADDR) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling(g_bad ? 24 : 16, 32, 32);
  MatmulF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
}

// baseK 8 (32 bytes of fp32) is enough when K is the inner axis of A and B (B transposed), not
// when B is row-major [K, N] (K then needs 16).
template <bool TRANS_B>
void RunBaseK8(GM_ADDR gm) {
  using BType = MatmulType<TPosition::GM, CubeFormat::ND, float, TRANS_B>;
  TPipe pipe;
  TCubeTiling tiling = SmallTiling(32, 32, 8);
  Matmul<GmF32, BType, GmF32> mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  mm.SetTensorA(Gm<float>(gm, 0, 1024));
  mm.SetTensorB(Gm<float>(gm, 1024, 1024), TRANS_B);
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
}
__global__ __aicore__ void matmul_tiling_basek(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  if (g_bad) {
    RunBaseK8<false>(gm);
  } else {
    RunBaseK8<true>(gm);
  }
}

using UbAF32 = Matmul<MatmulType<TPosition::VECOUT, CubeFormat::ND, float>, GmF32, GmF32>;

// A LocalTensor from a VECCALC buffer for a Matmul whose A position is VECOUT.
__global__ __aicore__ void matmul_position_local(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  UbAF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
  TBuf<TPosition::VECCALC> calc;
  TBuf<TPosition::VECOUT> out;
  pipe.InitBuffer(calc, 4096);
  pipe.InitBuffer(out, 4096);
  LocalTensor<float> a = g_bad ? calc.Get<float>() : out.Get<float>();
  Duplicate(a, 1.0f, 1024);
  mm.SetTensorA(a);
  mm.SetTensorB(Gm<float>(gm, 1024, 1024));
  mm.IterateAll(Gm<float>(gm, 2048, 1024));
  mm.End();
}

// A in UB (VECOUT): accepted on 910B, not on the 310B (every operand in GM there).
__global__ __aicore__ void matmul_position_chip(GM_ADDR) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  UbAF32 mm;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), mm, &tiling);
}

// B passed as transposed to a Matmul whose B MatmulType has ISTRANS = false.
__global__ __aicore__ void matmul_transpose(GM_ADDR gm) {
  SetSysWorkspace(g_workspace.data());
  TPipe pipe;
  TCubeTiling tiling = SmallTiling();
  Matmul<GmF16, GmF16, GmF32> plain;
  Matmul<GmF16, MatmulType<TPosition::GM, CubeFormat::ND, half, true>, GmF32> trans;
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), plain, &tiling, trans, &tiling);
  if (g_bad) {
    plain.SetTensorB(Gm<half>(gm, 1024, 1024), true);
  } else {
    trans.SetTensorB(Gm<half>(gm, 1024, 1024), true);
  }
}

struct Case {
  std::function<void(GM_ADDR)> kernel;
  twin::Chip bad_chip;
  twin::Chip good_chip;
  uint32_t block_dim;
  // Matmul cases run as 910B MIX kernels (one AIC + two AIVs per block), the rest as AIV-only.
  twin::KernelType bad_type = twin::KernelType::AivOnly;
  twin::KernelType good_type = twin::KernelType::AivOnly;
  bool bad_wrapper_event = true;  // LaunchOptions::have_workspace_and_tiling in the bad run
  // LaunchOptions::check_gm_write_overlap: off for the other cases, whose blocks all write the
  // same scratch GM because what they write does not matter.
  bool check_gm_write_overlap = false;
};

constexpr auto kMix = twin::KernelType::Mix;

const std::map<std::string, Case>& Cases() {
  using twin::Chip;
  static const std::map<std::string, Case> cases = {
      {"ub-alignment", {ub_alignment, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"datacopy-32b", {datacopy_32b, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"compare-256b", {compare_256b, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"exp-ln-dtype", {exp_ln_dtype, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"copy-dtype", {copy_dtype, Chip::Ascend310B, Chip::Ascend910B, 1}},
      {"gm-write-overlap",
       {gm_write_overlap, Chip::Ascend910B, Chip::Ascend910B, 2, twin::KernelType::AivOnly,
        twin::KernelType::AivOnly, true, true}},
      {"cast-mode-narrow", {cast_mode_narrow, Chip::Ascend310B, Chip::Ascend310B, 1}},
      {"cast-mode-widen", {cast_mode_widen, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"ub-budget", {ub_budget, Chip::Ascend910B, Chip::Ascend310B, 1}},
      {"buffers-per-position", {buffers_per_position, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"buffers-total", {buffers_total, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"flag-set-without-wait", {flag_set_without_wait, Chip::Ascend910B, Chip::Ascend910B, 2}},
      {"flag-wait-without-set", {flag_wait_without_set, Chip::Ascend910B, Chip::Ascend910B, 2}},
      {"queue-read-before-deque",
       {queue_read_before_deque, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"queue-double-free", {queue_double_free, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"ub-bounds", {ub_bounds, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"gm-bounds", {gm_bounds, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"syncall-divergence", {syncall_divergence, Chip::Ascend910B, Chip::Ascend910B, 4}},
      {"matmul-dtype", {matmul_dtype, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-before-regist",
       {matmul_before_regist, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-iterate-before-set",
       {matmul_iterate_before_set, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-gettensorc-without-iterate",
       {matmul_gettensorc_without_iterate, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-use-after-end",
       {matmul_use_after_end, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-switch-without-end",
       {matmul_switch_without_end, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-initbuffer-then-regist",
       {matmul_initbuffer_then_regist, Chip::Ascend910B, Chip::Ascend910B, 2, kMix, kMix}},
      {"matmul-objects", {matmul_objects, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"regist-scope", {regist_scope, Chip::Ascend910B, Chip::Ascend910B, 2, kMix, kMix}},
      {"cube-core-vector", {cube_core_vector, Chip::Ascend910B, Chip::Ascend910B, 2, kMix, kMix}},
      {"mix-deadlock", {mix_deadlock, Chip::Ascend910B, Chip::Ascend910B, 2, kMix, kMix}},
      {"kernel-type",
       {mix_regist, Chip::Ascend910B, Chip::Ascend910B, 2, twin::KernelType::AivOnly, kMix}},
      {"workspace-sync",
       {mix_regist, Chip::Ascend910B, Chip::Ascend910B, 2, kMix, kMix, /*event=*/false}},
      {"matmul-workspace", {matmul_workspace, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-org-shape", {matmul_org_shape, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-single-shape",
       {matmul_single_shape, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-gm-bounds", {matmul_gm_bounds, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-ub-c-size", {matmul_ub_c_size, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-ub-c-alignment",
       {matmul_ub_c_alignment, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-tiling-l0c", {matmul_tiling_l0c, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-tiling-l1", {matmul_tiling_l1, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-tiling-fractal",
       {matmul_tiling_fractal, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-tiling-basek",
       {matmul_tiling_basek, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-position-local",
       {matmul_position_local, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-position-chip",
       {matmul_position_chip, Chip::Ascend310B, Chip::Ascend910B, 1, kMix, kMix}},
      {"matmul-transpose", {matmul_transpose, Chip::Ascend910B, Chip::Ascend910B, 1, kMix, kMix}},
  };
  return cases;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3 || (std::string(argv[2]) != "bad" && std::string(argv[2]) != "good")) {
    std::cerr << "usage: rule_violations CASE bad|good\n";
    return 2;
  }
  const auto it = Cases().find(argv[1]);
  if (it == Cases().end()) {
    std::cerr << "unknown case " << argv[1] << "; cases:";
    for (const auto& [name, c] : Cases()) std::cerr << " " << name;
    std::cerr << "\n";
    return 2;
  }
  g_bad = std::string(argv[2]) == "bad";
  const Case& c = it->second;
  try {
    twin::LaunchOptions options;
    options.type = g_bad ? c.bad_type : c.good_type;
    options.have_workspace_and_tiling = !g_bad || c.bad_wrapper_event;
    options.check_gm_write_overlap = c.check_gm_write_overlap;
    twin::Launch(c.block_dim, g_bad ? c.bad_chip : c.good_chip, options, c.kernel, GmBase());
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::cout << "OK" << std::endl;
  return 0;
}
