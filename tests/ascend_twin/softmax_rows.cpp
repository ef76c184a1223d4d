// Row-wise softmax and logsumexp over a [rows, V] float or bf16 matrix, written as an Ascend C
// vector kernel and run on the CPU twin. tests/test_ascend_twin.py compiles it and compares the
// output with torch.
//
// Shape of the kernel (the same one the sparse-KD epilogue uses): rows are dealt round-robin to
// blocks; each row is streamed through the UB in chunks of `chunk` elements with a ragged tail
// (DataCopyPad), double-buffered through a 2-deep TQue so the copy of chunk c+1 is issued before
// chunk c is computed. Three passes per row: max, sum of exp(x - max), then
// y = exp(x - lse) with lse = max + ln(sum). bf16 input is cast to float before Exp/Ln. After
// SyncAll, block 0 adds up every row's lse (written by all blocks) to prove the barrier.
//
// usage: softmax_rows f32|bf16 ROWS V CHUNK BLOCK_DIM 910b|310b INPUT_PATH OUTPUT_PATH
// output file: float32 [1 + ROWS + ROWS*V] = total lse, lse per row, softmax rows.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "kernel_operator.h"

using namespace AscendC;

struct SoftmaxTiling {
  uint32_t rows;
  uint32_t vocab;
  uint32_t chunk;  // elements per UB chunk; chunk * sizeof(TIn) is a multiple of 32
};

template <class TIn>
class KernelSoftmaxRows {
 public:
  __aicore__ inline void Init(GM_ADDR x, GM_ADDR y, GM_ADDR lse, GM_ADDR total,
                              const SoftmaxTiling& tiling) {
    tiling_ = tiling;
    const uint64_t n = uint64_t(tiling.rows) * tiling.vocab;
    xGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(x), n);
    yGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(y), n);
    lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), tiling.rows);
    totalGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(total), 1);
    pipe_.InitBuffer(inQueue_, kBufferNum, tiling.chunk * sizeof(TIn));
    pipe_.InitBuffer(outQueue_, kBufferNum, tiling.chunk * sizeof(float));
    pipe_.InitBuffer(floatBuf_, tiling.chunk * sizeof(float));
    pipe_.InitBuffer(workBuf_, tiling.chunk * sizeof(float));
    pipe_.InitBuffer(scalarBuf_, 32);
    pipe_.InitBuffer(lseBuf_, 32);
  }

  __aicore__ inline void Process() {
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum());
    for (uint32_t row = static_cast<uint32_t>(GetBlockIdx()); row < tiling_.rows;
         row += blockNum) {
      ProcessRow(row);
    }
    // Every block's lse rows are in GM after the barrier; block 0 reduces them.
    SyncAll();
    if (GetBlockIdx() == 0) {
      float sum = 0.0f;
      for (uint32_t r = 0; r < tiling_.rows; ++r) sum += lseGm_.GetValue(r);
      totalGm_.SetValue(0, sum);
    }
  }

 private:
  static constexpr int32_t kBufferNum = 2;
  enum class Pass { Max, SumExp, Write };

  __aicore__ inline uint32_t ChunkLen(uint32_t c) const {
    const uint32_t start = c * tiling_.chunk;
    return tiling_.vocab - start < tiling_.chunk ? tiling_.vocab - start : tiling_.chunk;
  }

  __aicore__ inline void ProcessRow(uint32_t row) {
    const uint32_t chunks = (tiling_.vocab + tiling_.chunk - 1) / tiling_.chunk;
    rowMax_ = -3.4e38f;
    rowSum_ = 0.0f;
    for (Pass pass : {Pass::Max, Pass::SumExp, Pass::Write}) {
      if (pass == Pass::Write) rowLse_ = Logsumexp();
      CopyIn(row, 0);
      for (uint32_t c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) CopyIn(row, c + 1);  // prefetch into the other buffer
        Compute(pass, row, c);
      }
    }
    // Not lseGm_.SetValue: a scalar GM store goes through this core's data cache and its whole
    // 64-byte line is written back later, clobbering the neighbouring rows of other blocks.
    // MTE3 writes exactly these 4 bytes.
    LocalTensor<float> lse = lseBuf_.Get<float>();
    lse.SetValue(0, rowLse_);
    SetFlag<HardEvent::S_MTE3>(EVENT_ID0);
    WaitFlag<HardEvent::S_MTE3>(EVENT_ID0);
    DataCopyPad(lseGm_[row], lse, DataCopyExtParams{1, sizeof(float), 0, 0, 0});
    SetFlag<HardEvent::MTE3_S>(EVENT_ID0);  // the next row's SetValue reuses the buffer
    WaitFlag<HardEvent::MTE3_S>(EVENT_ID0);
  }

  __aicore__ inline void CopyIn(uint32_t row, uint32_t c) {
    LocalTensor<TIn> xLocal = inQueue_.template AllocTensor<TIn>();
    const uint32_t len = ChunkLen(c);
    DataCopyExtParams params{1, static_cast<uint32_t>(len * sizeof(TIn)), 0, 0, 0};
    DataCopyPadExtParams<TIn> pad{false, 0, 0, TIn(0.0f)};
    DataCopyPad(xLocal, xGm_[uint64_t(row) * tiling_.vocab + uint64_t(c) * tiling_.chunk], params,
                pad);
    inQueue_.EnQue(xLocal);
  }

  // Chunk c as float in the UB: bf16 is cast (Exp/Ln and the sums need fp32).
  __aicore__ inline LocalTensor<float> AsFloat(LocalTensor<TIn>& xLocal, uint32_t len) {
    if constexpr (std::is_same_v<TIn, float>) {
      return xLocal;
    } else {
      LocalTensor<float> xf = floatBuf_.template Get<float>();
      Cast(xf, xLocal, RoundMode::CAST_NONE, len);
      return xf;
    }
  }

  __aicore__ inline float ReadScalar(const LocalTensor<float>& t) {
    // The scalar unit must wait for the vector unit before reading its result.
    SetFlag<HardEvent::V_S>(EVENT_ID0);
    WaitFlag<HardEvent::V_S>(EVENT_ID0);
    return t.GetValue(0);
  }

  __aicore__ inline void Compute(Pass pass, uint32_t row, uint32_t c) {
    const uint32_t len = ChunkLen(c);
    LocalTensor<TIn> xLocal = inQueue_.template DeQue<TIn>();
    LocalTensor<float> xf = AsFloat(xLocal, len);
    LocalTensor<float> work = workBuf_.Get<float>();
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    if (pass == Pass::Max) {
      ReduceMax(scalar, xf, work, static_cast<int32_t>(len));
      const float chunkMax = ReadScalar(scalar);
      rowMax_ = chunkMax > rowMax_ ? chunkMax : rowMax_;
    } else if (pass == Pass::SumExp) {
      Adds(xf, xf, -rowMax_, static_cast<int32_t>(len));
      Exp(xf, xf, static_cast<int32_t>(len));
      ReduceSum(scalar, xf, work, static_cast<int32_t>(len));
      rowSum_ += ReadScalar(scalar);
    } else {
      LocalTensor<float> yLocal = outQueue_.template AllocTensor<float>();
      Adds(yLocal, xf, -rowLse_, static_cast<int32_t>(len));
      Exp(yLocal, yLocal, static_cast<int32_t>(len));
      outQueue_.EnQue(yLocal);
      CopyOut(row, c);
    }
    inQueue_.FreeTensor(xLocal);
  }

  __aicore__ inline void CopyOut(uint32_t row, uint32_t c) {
    LocalTensor<float> yLocal = outQueue_.template DeQue<float>();
    DataCopyExtParams params{1, static_cast<uint32_t>(ChunkLen(c) * sizeof(float)), 0, 0, 0};
    DataCopyPad(yGm_[uint64_t(row) * tiling_.vocab + uint64_t(c) * tiling_.chunk], yLocal, params);
    outQueue_.FreeTensor(yLocal);
  }

  __aicore__ inline float Logsumexp() {
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    Duplicate(scalar, rowSum_, 8);
    Ln(scalar, scalar, 8);
    return rowMax_ + ReadScalar(scalar);
  }

  TPipe pipe_;
  TQue<TPosition::VECIN, kBufferNum> inQueue_;
  TQue<TPosition::VECOUT, kBufferNum> outQueue_;
  TBuf<TPosition::VECCALC> floatBuf_;
  TBuf<TPosition::VECCALC> workBuf_;
  TBuf<TPosition::VECCALC> scalarBuf_;
  TBuf<TPosition::VECCALC> lseBuf_;
  GlobalTensor<TIn> xGm_;
  GlobalTensor<float> yGm_;
  GlobalTensor<float> lseGm_;
  GlobalTensor<float> totalGm_;
  SoftmaxTiling tiling_{};
  float rowMax_ = 0.0f;
  float rowSum_ = 0.0f;
  float rowLse_ = 0.0f;
};

template <class TIn>
__global__ __aicore__ void softmax_rows(GM_ADDR x, GM_ADDR y, GM_ADDR lse, GM_ADDR total,
                                        SoftmaxTiling tiling) {
  KernelSoftmaxRows<TIn> op;
  op.Init(x, y, lse, total, tiling);
  op.Process();
}

int main(int argc, char** argv) {
  if (argc != 9) {
    std::cerr << "usage: softmax_rows f32|bf16 ROWS V CHUNK BLOCK_DIM 910b|310b IN OUT\n";
    return 2;
  }
  const std::string dtype = argv[1];
  const SoftmaxTiling tiling{static_cast<uint32_t>(std::stoul(argv[2])),
                             static_cast<uint32_t>(std::stoul(argv[3])),
                             static_cast<uint32_t>(std::stoul(argv[4]))};
  const uint32_t blockDim = static_cast<uint32_t>(std::stoul(argv[5]));
  const std::string chipName = argv[6];
  if ((dtype != "f32" && dtype != "bf16") || (chipName != "910b" && chipName != "310b")) {
    std::cerr << "dtype must be f32 or bf16 and chip 910b or 310b\n";
    return 2;
  }
  const twin::Chip chip = chipName == "910b" ? twin::Chip::Ascend910B : twin::Chip::Ascend310B;
  const size_t n = size_t(tiling.rows) * tiling.vocab;
  const size_t inBytes = n * (dtype == "f32" ? 4 : 2);
  std::vector<uint8_t> x(inBytes);
  std::ifstream in(argv[7], std::ios::binary);
  if (!in.read(reinterpret_cast<char*>(x.data()), std::streamsize(inBytes))) {
    std::cerr << "could not read " << inBytes << " bytes from " << argv[7] << "\n";
    return 2;
  }
  std::vector<float> out(1 + tiling.rows + n, 0.0f);
  GM_ADDR total = reinterpret_cast<GM_ADDR>(out.data());
  GM_ADDR lse = reinterpret_cast<GM_ADDR>(out.data() + 1);
  GM_ADDR y = reinterpret_cast<GM_ADDR>(out.data() + 1 + tiling.rows);
  try {
    if (dtype == "f32") {
      twin::Launch(blockDim, chip, softmax_rows<float>, x.data(), y, lse, total, tiling);
    } else {
      twin::Launch(blockDim, chip, softmax_rows<bfloat16_t>, x.data(), y, lse, total, tiling);
    }
  } catch (const twin::HardwareRuleViolation& e) {
    std::cout << "VIOLATION rule=" << e.rule() << " what=" << e.what() << std::endl;
    return 3;
  }
  std::ofstream outFile(argv[8], std::ios::binary);
  outFile.write(reinterpret_cast<const char*>(out.data()),
                std::streamsize(out.size() * sizeof(float)));
  return outFile ? 0 : 2;
}
