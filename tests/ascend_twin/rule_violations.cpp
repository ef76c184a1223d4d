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

// 2 x 96 KB = 192 KB: over the 910B's 184 KB budget, inside the 310B's 248 KB.
__global__ __aicore__ void ub_budget(GM_ADDR) {
  TPipe pipe;
  TQue<TPosition::VECIN, 2> in;
  pipe.InitBuffer(in, 2, 96 * 1024);
}

// Two queues of 4 plus one TBuf on VECIN: 9 buffers on one position (8 allowed).
__global__ __aicore__ void buffers_per_position(GM_ADDR) {
  TPipe pipe;
  TQue<TPosition::VECIN, 1> q1, q2;
  TBuf<TPosition::VECIN> extra;
  TBuf<TPosition::VECCALC> calc;
  pipe.InitBuffer(q1, 4, 64);
  pipe.InitBuffer(q2, 4, 64);
  if (g_bad) {
    pipe.InitBuffer(extra, 64);
  } else {
    pipe.InitBuffer(calc, 64);
  }
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

struct Case {
  std::function<void(GM_ADDR)> kernel;
  twin::Chip bad_chip;
  twin::Chip good_chip;
  uint32_t block_dim;
};

const std::map<std::string, Case>& Cases() {
  using twin::Chip;
  static const std::map<std::string, Case> cases = {
      {"ub-alignment", {ub_alignment, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"datacopy-32b", {datacopy_32b, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"compare-256b", {compare_256b, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"exp-ln-dtype", {exp_ln_dtype, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"ub-budget", {ub_budget, Chip::Ascend910B, Chip::Ascend310B, 1}},
      {"buffers-per-position", {buffers_per_position, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"flag-set-without-wait", {flag_set_without_wait, Chip::Ascend910B, Chip::Ascend910B, 2}},
      {"flag-wait-without-set", {flag_wait_without_set, Chip::Ascend910B, Chip::Ascend910B, 2}},
      {"queue-read-before-deque",
       {queue_read_before_deque, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"queue-double-free", {queue_double_free, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"ub-bounds", {ub_bounds, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"gm-bounds", {gm_bounds, Chip::Ascend910B, Chip::Ascend910B, 1}},
      {"syncall-divergence", {syncall_divergence, Chip::Ascend910B, Chip::Ascend910B, 4}},
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
    twin::Launch(c.block_dim, g_bad ? c.bad_chip : c.good_chip, c.kernel, GmBase());
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::cout << "OK" << std::endl;
  return 0;
}
