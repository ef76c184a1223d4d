// Small kernels for the twin's core model (tests/test_ascend_twin_mix.py):
//
//   core_model split blocknum|ration aiv|mix ROWS BLOCK_DIM 910b|310b
//     Rows dealt round-robin over the vector blocks, striding by GetBlockNum() alone (the bug on
//     a 910B MIX kernel: 2 * blockDim vector cores, so rows overlap and the tail is skipped) or
//     by GetBlockNum() * GetTaskRation(). Prints "hits h0 h1 ..." (times each row was processed)
//     and one "core kind block_idx block_num ration sub" line per vector core.
//   core_model dcache setvalue|datacopypad|separate-lines BLOCK_DIM
//     Each block writes its own value v[b] = b + 1 to its own row b of a float array: with
//     GlobalTensor::SetValue into neighbouring floats of one 64-byte line (the bug: each core's
//     data cache writes the whole line back, so a later block's stale bytes clobber an earlier
//     block's value), with DataCopyPad (MTE3 bypasses the data cache), or with SetValue on rows
//     16 floats (64 bytes) apart. Prints "values v0 v1 ...".
#include <atomic>
#include <cstdio>
#include <iostream>
#include <mutex>
#include <string>
#include <vector>

#include "kernel_operator.h"
#include "lib/matmul/matmul_intf.h"

using namespace AscendC;

namespace {

bool g_ration = false;
std::mutex g_print_mutex;
std::vector<std::string> g_cores;

__global__ __aicore__ void split_rows(GM_ADDR hits, uint32_t rows) {
  if ASCEND_IS_AIC {
    return;  // a MIX kernel's cube core has no rows to process here
  }
  {
    std::lock_guard<std::mutex> lock(g_print_mutex);
    g_cores.push_back(twin::detail::Str("core ", ASCEND_IS_AIV ? "aiv" : "aicore", " ",
                                        GetBlockIdx(), " ", GetBlockNum(), " ", GetTaskRation(),
                                        " ", GetSubBlockIdx()));
  }
  const uint32_t stride =
      static_cast<uint32_t>(g_ration ? GetBlockNum() * GetTaskRation() : GetBlockNum());
  auto* counts = reinterpret_cast<std::atomic<int32_t>*>(hits);
  for (uint32_t row = static_cast<uint32_t>(GetBlockIdx()); row < rows; row += stride) {
    counts[row].fetch_add(1);
  }
}

std::string g_write;

__global__ __aicore__ void write_rows(GM_ADDR out, uint32_t blocks) {
  GlobalTensor<float> gm;
  gm.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(out), blocks * 16u);
  const uint32_t b = static_cast<uint32_t>(GetBlockIdx());
  const float value = float(b + 1);
  if (g_write == "setvalue") {
    gm.SetValue(b, value);
  } else if (g_write == "separate-lines") {
    gm.SetValue(uint64_t(b) * 16u, value);
  } else {
    TPipe pipe;
    TBuf<TPosition::VECCALC> buf;
    pipe.InitBuffer(buf, 32);
    LocalTensor<float> v = buf.Get<float>();
    v.SetValue(0, value);
    SetFlag<HardEvent::S_MTE3>(EVENT_ID0);
    WaitFlag<HardEvent::S_MTE3>(EVENT_ID0);
    DataCopyPad(gm[b], v, DataCopyExtParams{1, sizeof(float), 0, 0, 0});
  }
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  try {
    if (mode == "split" && argc == 7) {
      g_ration = std::string(argv[2]) == "ration";
      twin::LaunchOptions options;
      options.type = std::string(argv[3]) == "mix" ? twin::KernelType::Mix
                                                    : twin::KernelType::AivOnly;
      const uint32_t rows = std::stoul(argv[4]), blockDim = std::stoul(argv[5]);
      const auto chip = std::string(argv[6]) == "310b" ? twin::Chip::Ascend310B
                                                        : twin::Chip::Ascend910B;
      std::vector<int32_t> hits(rows, 0);
      twin::Launch(blockDim, chip, options, split_rows, reinterpret_cast<GM_ADDR>(hits.data()),
                   rows);
      std::cout << "hits";
      for (int32_t h : hits) std::cout << " " << h;
      std::cout << "\n";
      for (const auto& line : g_cores) std::cout << line << "\n";
      return 0;
    }
    if (mode == "dcache" && argc == 4) {
      g_write = argv[2];
      const uint32_t blocks = std::stoul(argv[3]);
      // 64-byte aligned, so row 0 starts a cache line as a device allocation does.
      alignas(64) static float out[64 * 16];
      std::fill(out, out + 64 * 16, 0.0f);
      twin::LaunchOptions options;
      options.type = twin::KernelType::AivOnly;
      twin::Launch(blocks, twin::Chip::Ascend910B, options, write_rows,
                   reinterpret_cast<GM_ADDR>(out), blocks);
      const uint32_t pitch = g_write == "separate-lines" ? 16u : 1u;
      std::cout << "values";
      for (uint32_t b = 0; b < blocks; ++b) std::cout << " " << out[b * pitch];
      std::cout << "\n";
      return 0;
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::cerr << "usage: core_model split blocknum|ration aiv|mix ROWS BLOCK_DIM 910b|310b\n"
               "       core_model dcache setvalue|datacopypad|separate-lines BLOCK_DIM\n";
  return 2;
}
