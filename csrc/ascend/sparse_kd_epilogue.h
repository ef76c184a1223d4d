// Sparse-KD / cross-entropy epilogue as an Ascend C vector kernel.
//
// The LM-head GEMM stays a torch_npu matmul over row chunks; this kernel takes its logits
// z [N, V] (fp32, bf16 or fp16 in GM) and, per row, computes the loss of docs/kd-losses.md with
// every option of that page, writes d(loss)/d(z) * scale over z in place (in z's dtype), and
// writes the per-row loss and the six statistics of KDStats. Built against
// tests/ascend_twin/include it runs on CPU; it uses only the Ascend C API subset the twin
// emulates, so it is meant to compile unchanged with ascendc.
//
// Math: the loss of docs/kd-losses.md for one supervised row, and its gradient as derived in
// that page's 'Gradients' section (names here: s = softmax(z), q = softmax(z / T), u = z / T,
// kd = kdWeight, zl = zLoss, S the support: the valid stored ids plus, for top-K targets with
// the label included, y with its stored teacher logit when y is not among them). Specific to
// this kernel: the softcap z <- c tanh(z / c) is built from Exp as tanh(x) = (e - 1) / (e + 1),
// e = exp(2x), with x clamped to [-20, 20] (tanh(20) rounds to 1 in fp32, and e stays finite).
// The kernel writes "coefS s_v + coefQ q_v" for every element with vector ops, then overwrites
// the support elements (at most K + 1 per row) with their values computed as a vector beforehand,
// subtracts (1 - kd) at the label, and applies the softcap factor. kd == 0 has no support.
//
// Passes per row, each streaming the row through the UB in `chunk`-element pieces (ragged tail by
// DataCopyPad, 2-deep TQue so chunk c+1 is copied while chunk c is computed):
//   1. max of z, gather of z at the support ids and the label, and the max before the label
//      (argmax == label without relying on the tie order of ReduceMax's index);
//   2. sum of exp(z - max), and for kd > 0 sum of exp((z - max) / T) over all and (tail) over
//      the rest;
//   3. the gradient, scaled and cast to the input dtype, copied over z.
// Precision: whatever the logits' dtype, every value after the load is fp32 (bf16 and fp16 chunks
// are cast up first, Exp and Ln run on fp32, sums accumulate in fp32), so loss and statistics are
// as exact as for fp32 logits; only the gradient is rounded, once, to the logits' dtype. fp16
// holds at most 65504: the fp32 gradient is clamped to +-65504 before its cast, which is what the
// hardware's float -> half Cast does by default (documented as saturating) and keeps the twin,
// whose Cast rounds to inf, in step. For the usual scale (1 / num_items <= 1) a valid row's
// gradient is far below the bound, so the clamp only matters for a huge upstream gradient.
// Inputs are validated by the host (csrc/common/sparse_kd_rows.h: labels in [0, V) or
// ignoreIndex, ids in [-1, V) and distinct, teacher logits finite or -inf, Lambda finite, weights
// >= 0 summing to 1, a non-empty support, renorm: a finite teacher logit on the support), as the
// PyTorch path does before its kernel.
#pragma once

#include "kernel_operator.h"
#include "kernel_copy.h"
#include "sparse_kd_tiling.h"

namespace pangu_fastkd_ascend {

using namespace AscendC;

// Columns of the per-row statistics output, in the order of KDStats (sparse_kd_targets.py).
enum SparseKdStat : uint32_t {
  kStatDivergence = 0,
  kStatCrossEntropy,
  kStatStudentMass,
  kStatTeacherMass,
  kStatLse,
  kStatCorrect,
  kStatCount
};
static_assert(kStatCount == kSparseKdStatCount, "SparseKdUbBytes stages this many statistics");

template <class TIn>
class SparseKdEpilogue {
  static_assert(std::is_same_v<TIn, float> || std::is_same_v<TIn, bfloat16_t> ||
                    std::is_same_v<TIn, half>,
                "logits are float, bfloat16_t or half (SparseKdDtype)");

 public:
  // logits [N, V] TIn (read, then overwritten by the gradient; tiling.dtype names TIn);
  // labels [N] int32; ids [N, K] int32 (-1 = empty); teacherValues [N, K] f32: teacher logits
  // (top-K) or sample weights (sampled); teacherLse [N] f32 (Lambda, top-K tail only);
  // labelLogit [N] f32 (top-K with includeLabel only); the teacher pointers are unused when
  // kdWeight == 0.
  // loss [N] f32: unscaled per-row loss, 0 for ignored rows;
  // stats [N, 6] f32: D, CE, Q_S, P_S, lse, argmax == label (all 0 for ignored rows).
  __aicore__ inline void Init(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids, GM_ADDR teacherValues,
                              GM_ADDR teacherLse, GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                              const SparseKdTiling& tiling) {
    tiling_ = tiling;
    kd_ = tiling.kdWeight > 0.0f;
    sampled_ = kd_ && tiling.targetKind == kSparseKdSampled;
    tail_ = kd_ && !sampled_ && tiling.missingMass == kSparseKdTail;
    softcap_ = tiling.softcap > 0.0f;
    unitTemperature_ = tiling.temperature == 1.0f;
    invT_ = 1.0f / tiling.temperature;
    const uint64_t rows = tiling.rows;
    logitsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(logits), rows * tiling.vocab);
    labelsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(labels), rows);
    lossGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(loss), rows);
    statsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(stats), rows * kStatCount);
    if (kd_) {
      idsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(ids), rows * tiling.supportK);
      teacherGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(teacherValues),
                                 rows * tiling.supportK);
      if (tail_) teacherLseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(teacherLse), rows);
      if (tiling.includeLabel != 0u) {
        labelLogitGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(labelLogit), rows);
      }
    }
    // Exactly the buffers SparseKdUbBytes counts, so the host tiling bounds the UB use.
    const uint32_t chunk = tiling.chunk;
    pipe_.InitBuffer(inQueue_, kBufferNum, chunk * sizeof(TIn));
    pipe_.InitBuffer(outQueue_, kBufferNum, chunk * sizeof(TIn));
    if (!std::is_same_v<TIn, float> || softcap_) {
      pipe_.InitBuffer(floatBuf_, chunk * sizeof(float));
    }
    pipe_.InitBuffer(expBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(expTBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(workBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(scalarBuf_, kScalars * sizeof(float));
    if (tiling.supportSlots > 0u) {
      pipe_.InitBuffer(supportBuf_,
                       kSparseKdSupportVectors * tiling.supportSlots * sizeof(float));
    }
    pipe_.InitBuffer(resultBuf_, kSparseKdResultRows * (1u + kStatCount) * sizeof(float));
  }

  // Each block takes one contiguous range of rows (see kSparseKdResultRows for why not
  // round-robin), in groups of kSparseKdResultRows whose results leave the UB together.
  __aicore__ inline void Process() {
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum());
    const uint32_t blockIdx = static_cast<uint32_t>(GetBlockIdx());
    const uint32_t perBlock = (tiling_.rows + blockNum - 1u) / blockNum;
    const uint64_t begin64 = uint64_t(blockIdx) * perBlock;
    const uint32_t begin = begin64 < tiling_.rows ? static_cast<uint32_t>(begin64) : tiling_.rows;
    const uint32_t end = tiling_.rows - begin < perBlock ? tiling_.rows : begin + perBlock;
    for (uint32_t first = begin; first < end; first += kSparseKdResultRows) {
      const uint32_t count = end - first < kSparseKdResultRows ? end - first : kSparseKdResultRows;
      for (uint32_t i = 0; i < count; ++i) {
        ProcessRow(first + i);
        StageResult(i);
      }
      WriteResults(first, count);
    }
  }

 private:
  static constexpr int32_t kBufferNum = 2;
  static constexpr uint32_t kScalars = 16;
  // Support vectors, each `supportSlots` floats (kSparseKdSupportVectors of them): ids (int32),
  // student logit, teacher log-prob (or scaled logit), student log-prob at T, q, p (or weight),
  // two scratch vectors, a product scratch, the fixed gradient of the support element.
  enum Support : uint32_t { kIds = 0, kZ, kLogP, kLogQ, kQ, kP, kA, kB, kTmp, kFix };
  static_assert(kFix + 1 == kSparseKdSupportVectors, "SparseKdUbBytes counts these vectors");
  // Stands in for -inf where a finite value keeps 0 * x at 0 (empty slots, p = 0 terms).
  static constexpr float kNegBig = -1.0e30f;
  static constexpr float kEps = 1.0e-12f;         // floor of probabilities inside logarithms
  static constexpr float kLogEps = -27.6310211f;  // log(1e-12)
  static constexpr float kTanhClamp = 20.0f;      // |z / c| beyond this: tanh is +-1 in fp32
  static constexpr float kHalfMax = 65504.0f;     // largest finite fp16 value
  enum class Pass : uint32_t { MaxGather = 0, Sums, Gradient };
  static constexpr uint32_t kPassCount = 3;

  // What a divergence leaves for the gradient: D, and the coefficient of q_v for tokens outside
  // the support (before kd T); dD/du at the support slots is left in the kA vector.
  struct DivergenceTerms {
    float value;
    float restCoef;
  };

  __aicore__ inline uint32_t ChunkLen(uint32_t c) const {
    const uint32_t start = c * tiling_.chunk;
    return tiling_.vocab - start < tiling_.chunk ? tiling_.vocab - start : tiling_.chunk;
  }

  __aicore__ inline LocalTensor<float> SupportVec(Support which) {
    return supportBuf_.Get<float>()[which * tiling_.supportSlots];
  }
  __aicore__ inline LocalTensor<int32_t> SupportIds() {
    LocalTensor<float> ids = supportBuf_.Get<float>()[kIds * tiling_.supportSlots];
    return ids.template ReinterpretCast<int32_t>();
  }

  // The scalar unit must wait for the vector unit before reading its results, and the vector
  // unit for the scalar unit before consuming what the scalar unit wrote into the UB.
  __aicore__ inline void VectorToScalar() {
    SetFlag<HardEvent::V_S>(EVENT_ID0);
    WaitFlag<HardEvent::V_S>(EVENT_ID0);
  }
  __aicore__ inline void ScalarToVector() {
    SetFlag<HardEvent::S_V>(EVENT_ID1);
    WaitFlag<HardEvent::S_V>(EVENT_ID1);
  }
  __aicore__ inline float ReadScalar(const LocalTensor<float>& t) {
    VectorToScalar();
    return t.GetValue(0);
  }
  __aicore__ inline float SumSupport(const LocalTensor<float>& v) {
    ReduceSum(scalarBuf_.Get<float>(), v, workBuf_.Get<float>(),
              static_cast<int32_t>(tiling_.supportSlots));
    return ReadScalar(scalarBuf_.Get<float>());
  }
  __aicore__ inline float MaxSupport(const LocalTensor<float>& v) {
    ReduceMax(scalarBuf_.Get<float>(), v, workBuf_.Get<float>(),
              static_cast<int32_t>(tiling_.supportSlots));
    return ReadScalar(scalarBuf_.Get<float>());
  }
  __aicore__ inline float FloorLog(float logx) const { return logx > kLogEps ? logx : kLogEps; }

  __aicore__ inline void ProcessRow(uint32_t row) {
    const uint32_t chunks = (tiling_.vocab + tiling_.chunk - 1) / tiling_.chunk;
    label_ = labelsGm_.GetValue(row);
    ignored_ = label_ == tiling_.ignoreIndex;
    if (!ignored_) {
      if (kd_) LoadSupport(row);
      rowMax_ = -3.4e38f;
      maxBeforeLabel_ = -3.4e38f;
      sum1_ = 0.0f;
      sumT_ = 0.0f;
      sumRestT_ = 0.0f;
      zLabel_ = 0.0f;
    }
    // An ignored row gets a zero gradient: only the write pass runs. (A counted loop over the
    // enum, not a braced list: that needs <initializer_list>, which device code does not have.)
    for (uint32_t p = 0; p < kPassCount; ++p) {
      const Pass pass = static_cast<Pass>(p);
      if (ignored_ && pass != Pass::Gradient) continue;
      if (pass == Pass::Gradient && !ignored_) FinishStatistics();
      CopyIn(row, 0);
      for (uint32_t c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) CopyIn(row, c + 1);  // prefetch into the other buffer
        Compute(pass, row, c);
      }
    }
  }

  // Row `slot` of the current group: its loss and statistics into the UB result buffer (loss at
  // [slot], statistics at [kSparseKdResultRows + slot * kStatCount]).
  __aicore__ inline void StageResult(uint32_t slot) {
    LocalTensor<float> results = resultBuf_.Get<float>();
    results.SetValue(slot, ignored_ ? 0.0f : rowLoss_);
    const uint32_t base = kSparseKdResultRows + slot * kStatCount;
    for (uint32_t i = 0; i < kStatCount; ++i) {
      results.SetValue(base + i, ignored_ ? 0.0f : stats_[i]);
    }
  }

  // The staged results of rows [first, first + count) to GM (MTE3, byte-exact), then wait for
  // the copy before the scalar unit writes the next group into the same UB.
  __aicore__ inline void WriteResults(uint32_t first, uint32_t count) {
    LocalTensor<float> results = resultBuf_.Get<float>();
    SetFlag<HardEvent::S_MTE3>(EVENT_ID2);
    WaitFlag<HardEvent::S_MTE3>(EVENT_ID2);
    DataCopyExtParams lossParams{1, count * static_cast<uint32_t>(sizeof(float)), 0, 0, 0};
    DataCopyPad(lossGm_[first], results, lossParams);
    DataCopyExtParams statParams{1, count * kStatCount * static_cast<uint32_t>(sizeof(float)), 0,
                                 0, 0};
    DataCopyPad(statsGm_[uint64_t(first) * kStatCount], results[kSparseKdResultRows], statParams);
    SetFlag<HardEvent::MTE3_S>(EVENT_ID3);
    WaitFlag<HardEvent::MTE3_S>(EVENT_ID3);
  }

  // Scalar reads of the row's target into the support vectors. Top-K: kLogP gets t / T (minus
  // Lambda under tail), slot K the label when it is not among the stored ids and the label is
  // included. Sampled: kP gets the weights. Unused slots keep p = 0 and never match an id.
  __aicore__ inline void LoadSupport(uint32_t row) {
    VectorToScalar();  // the previous row's vector ops on these vectors are done
    LocalTensor<int32_t> ids = SupportIds();
    LocalTensor<float> z = SupportVec(kZ);
    LocalTensor<float> logp = SupportVec(kLogP);
    LocalTensor<float> p = SupportVec(kP);
    const float shift = tail_ ? teacherLseGm_.GetValue(row) : 0.0f;
    const uint32_t K = tiling_.supportK;
    for (uint32_t j = 0; j < tiling_.supportSlots; ++j) {
      ids.SetValue(j, -1);
      z.SetValue(j, kNegBig);
      logp.SetValue(j, kNegBig);
      p.SetValue(j, 0.0f);
    }
    uint32_t count = 0;
    bool labelSeen = false;
    for (uint32_t j = 0; j < K; ++j) {
      const int32_t id = idsGm_.GetValue(uint64_t(row) * K + j);
      if (id < 0) continue;
      ids.SetValue(j, id);
      const float value = teacherGm_.GetValue(uint64_t(row) * K + j);
      if (sampled_) {
        p.SetValue(j, value);
      } else {
        logp.SetValue(j, value * invT_ - shift);
      }
      ++count;
      labelSeen = labelSeen || id == label_;
    }
    if (tiling_.includeLabel != 0u && !labelSeen) {
      ids.SetValue(K, label_);
      logp.SetValue(K, labelLogitGm_.GetValue(row) * invT_ - shift);
      ++count;
    }
    restEmpty_ = count >= tiling_.vocab;
  }

  __aicore__ inline void CopyIn(uint32_t row, uint32_t c) {
    LocalTensor<TIn> xLocal = inQueue_.template AllocTensor<TIn>();
    DataCopyExtParams params{1, static_cast<uint32_t>(ChunkLen(c) * sizeof(TIn)), 0, 0, 0};
    DataCopyPadBits(xLocal, logitsGm_[uint64_t(row) * tiling_.vocab + uint64_t(c) * tiling_.chunk],
                    params);
    inQueue_.EnQue(xLocal);
  }

  // The chunk as (soft-capped) float logits in the UB: bf16 is cast first (Exp/Ln take only half
  // and float), and so is fp16, whose Exp would give 11-bit results and overflow above 11.09;
  // the softcap goes to floatBuf_ so the input buffer stays as the GM copy left it.
  __aicore__ inline LocalTensor<float> AsFloat(LocalTensor<TIn>& xLocal, uint32_t len) {
    LocalTensor<float> xf;
    if constexpr (std::is_same_v<TIn, float>) {
      if (!softcap_) return xLocal;
      xf = floatBuf_.template Get<float>();
      SoftCap(xf, xLocal, len);
    } else {
      xf = floatBuf_.template Get<float>();
      Cast(xf, xLocal, RoundMode::CAST_NONE, len);
      if (softcap_) SoftCap(xf, xf, len);
    }
    return xf;
  }

  // dst = c tanh(src / c) with tanh(x) = (e - 1) / (e + 1), e = exp(2x), x clamped to +-20: no
  // overflow, no inf / inf, and exact +-1 where fp32 tanh saturates. dst may alias src. The two
  // exp scratch rows are free here: every pass computes the capped chunk before using them.
  __aicore__ inline void SoftCap(const LocalTensor<float>& dst, const LocalTensor<float>& src,
                                 uint32_t len) {
    const int32_t n = static_cast<int32_t>(len);
    const float c = tiling_.softcap;
    LocalTensor<float> num = expBuf_.Get<float>();
    LocalTensor<float> den = expTBuf_.Get<float>();
    Muls(num, src, 1.0f / c, n);
    Mins(num, num, kTanhClamp, n);
    Maxs(num, num, -kTanhClamp, n);
    Muls(num, num, 2.0f, n);
    Exp(num, num, n);
    Adds(den, num, 1.0f, n);
    Adds(num, num, -1.0f, n);
    Div(dst, num, den, n);
    Muls(dst, dst, c, n);
  }

  __aicore__ inline bool InChunk(int32_t id, uint32_t start, uint32_t len) const {
    return id >= 0 && static_cast<uint32_t>(id) >= start && static_cast<uint32_t>(id) < start + len;
  }

  __aicore__ inline void Compute(Pass pass, uint32_t row, uint32_t c) {
    const uint32_t len = ChunkLen(c);
    const int32_t n = static_cast<int32_t>(len);
    const uint32_t start = c * tiling_.chunk;
    LocalTensor<TIn> xLocal = inQueue_.template DeQue<TIn>();
    LocalTensor<float> g = expBuf_.Get<float>();
    if (ignored_) {  // only the gradient pass runs: zeros, nothing to read
      Duplicate(g, 0.0f, n);
      EmitGradient(row, c, g, len);
      inQueue_.FreeTensor(xLocal);
      return;
    }
    LocalTensor<float> xf = AsFloat(xLocal, len);
    LocalTensor<float> work = workBuf_.Get<float>();
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    if (pass == Pass::MaxGather) {
      ReduceMax(scalar, xf, work, n);
      const float chunkMax = ReadScalar(scalar);  // also orders the gathers after the vector ops
      rowMax_ = chunkMax > rowMax_ ? chunkMax : rowMax_;
      if (static_cast<uint32_t>(label_) >= start + len) {
        maxBeforeLabel_ = chunkMax > maxBeforeLabel_ ? chunkMax : maxBeforeLabel_;
      } else if (InChunk(label_, start, len)) {
        zLabel_ = xf.GetValue(label_ - start);
        const int32_t before = label_ - static_cast<int32_t>(start);
        if (before > 0) {  // the elements of this chunk before the label
          ReduceMax(scalar, xf, work, before);
          const float m = ReadScalar(scalar);
          maxBeforeLabel_ = m > maxBeforeLabel_ ? m : maxBeforeLabel_;
        }
      }
      if (kd_) {
        LocalTensor<int32_t> ids = SupportIds();
        LocalTensor<float> z = SupportVec(kZ);
        for (uint32_t j = 0; j < tiling_.supportSlots; ++j) {
          const int32_t id = ids.GetValue(j);
          if (InChunk(id, start, len)) z.SetValue(j, xf.GetValue(id - start));
        }
      }
    } else if (pass == Pass::Sums) {
      Adds(g, xf, -rowMax_, n);
      Exp(g, g, n);
      ReduceSum(scalar, g, work, n);
      sum1_ += ReadScalar(scalar);
      if (kd_) SumsAtTemperature(xf, g, start, len);
    } else {
      GradientChunk(xf, g, start, len);
      EmitGradient(row, c, g, len);
    }
    inQueue_.FreeTensor(xLocal);
  }

  // sum exp((z - max) / T) over the chunk, and (tail) over the chunk minus the support elements
  // (set to 0 by the scalar unit between the two sums).
  __aicore__ inline void SumsAtTemperature(LocalTensor<float>& xf, LocalTensor<float>& e1,
                                           uint32_t start, uint32_t len) {
    const int32_t n = static_cast<int32_t>(len);
    LocalTensor<float> work = workBuf_.Get<float>();
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    LocalTensor<float> e = e1;  // exp(z - max) is already exp((z - max) / T) at T = 1
    if (!unitTemperature_) {
      e = expTBuf_.Get<float>();
      Adds(e, xf, -rowMax_, n);
      Muls(e, e, invT_, n);
      Exp(e, e, n);
    }
    ReduceSum(scalar, e, work, n);
    const float chunkSum = ReadScalar(scalar);
    sumT_ += chunkSum;
    if (!tail_) return;  // only the tail bucket needs the mass outside the support
    LocalTensor<int32_t> ids = SupportIds();
    bool touched = false;
    for (uint32_t j = 0; j < tiling_.supportSlots; ++j) {
      const int32_t id = ids.GetValue(j);
      if (InChunk(id, start, len)) {
        e.SetValue(id - start, 0.0f);
        touched = true;
      }
    }
    if (!touched) {
      sumRestT_ += chunkSum;
      return;
    }
    ScalarToVector();
    ReduceSum(scalar, e, work, n);
    sumRestT_ += ReadScalar(scalar);
  }

  // Ln of up to 8 positive scalars through the vector unit (the scalar unit has no Ln).
  __aicore__ inline void LnScalars(float* values, uint32_t count) {
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    VectorToScalar();
    for (uint32_t i = 0; i < 8; ++i) scalar.SetValue(i, i < count ? values[i] : 1.0f);
    ScalarToVector();
    Ln(scalar, scalar, 8);
    VectorToScalar();
    for (uint32_t i = 0; i < count; ++i) values[i] = scalar.GetValue(i);
  }

  // out = log_softmax of `logits` over the support slots (invalid slots hold kNegBig and come
  // out at about kNegBig); `exps` is scratch. Used for p~ (renorm) and q~ (renorm, reverse/JSD).
  __aicore__ inline void LogSoftmaxSupport(const LocalTensor<float>& out,
                                           const LocalTensor<float>& logits,
                                           const LocalTensor<float>& exps) {
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    const float mx = MaxSupport(logits);
    Adds(out, logits, -mx, k);
    Exp(exps, out, k);
    float lnSum[1] = {SumSupport(exps)};
    LnScalars(lnSum, 1);
    Adds(out, out, -lnSum[0], k);
  }

  // Forward KL sum_S p (log p - log q) over the support slots (p = 0 slots give 0 * finite).
  __aicore__ inline float ForwardKlSupport() {
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> tmp = SupportVec(kTmp);
    Sub(tmp, SupportVec(kLogP), SupportVec(kLogQ), k);
    Mul(tmp, SupportVec(kP), tmp, k);
    return SumSupport(tmp);
  }

  // Reverse KL or JSD over the support buckets (kLogP, kP, kLogQ, kQ) plus, when `rest`, one
  // more bucket (pR, logpR, qR, logqR). Leaves dD/du = q_j (g_j - gbar) in kA.
  __aicore__ inline DivergenceTerms ReverseOrJsd(bool rest, float pR, float logpR, float qR,
                                                 float logqR) {
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> logp = SupportVec(kLogP);
    LocalTensor<float> logq = SupportVec(kLogQ);
    LocalTensor<float> p = SupportVec(kP);
    LocalTensor<float> q = SupportVec(kQ);
    LocalTensor<float> a = SupportVec(kA);
    LocalTensor<float> b = SupportVec(kB);
    LocalTensor<float> tmp = SupportVec(kTmp);
    DivergenceTerms out{0.0f, 0.0f};
    if (tiling_.divergence == kSparseKdReverseKl) {
      // a = floor(log q) - floor(log p); D = sum q a; g - gbar = a - D.
      Maxs(a, logq, kLogEps, k);
      Maxs(b, logp, kLogEps, k);
      Sub(a, a, b, k);
      Mul(tmp, q, a, k);
      float d = SumSupport(tmp);
      const float aR = FloorLog(logqR) - FloorLog(logpR);
      if (rest) d += qR * aR;
      Adds(a, a, -d, k);
      Mul(a, q, a, k);
      out.value = d;
      out.restCoef = rest ? aR - d : 0.0f;
      return out;
    }
    // JSD: a = log max(m, eps); b = floor(log x) - a for x = p, then q.
    const float beta = tiling_.beta;
    Muls(tmp, q, 1.0f - beta, k);
    Muls(a, p, beta, k);
    Add(a, a, tmp, k);
    Maxs(a, a, kEps, k);
    Ln(a, a, k);
    Maxs(b, logp, kLogEps, k);
    Sub(b, b, a, k);
    Mul(tmp, p, b, k);
    float dp = SumSupport(tmp);  // sum p (log p - log m)
    Maxs(b, logq, kLogEps, k);
    Sub(b, b, a, k);
    Mul(tmp, q, b, k);
    float dq = SumSupport(tmp);  // sum q (log q - log m)
    float bR = 0.0f;
    if (rest) {
      const float mR = beta * pR + (1.0f - beta) * qR;
      float logmR[1] = {mR > kEps ? mR : kEps};
      LnScalars(logmR, 1);
      if (pR > 0.0f) dp += pR * (FloorLog(logpR) - logmR[0]);
      bR = FloorLog(logqR) - logmR[0];
      dq += qR * bR;
    }
    // g_b = (1 - beta) b_b and gbar = sum_b q_b g_b = (1 - beta) dq.
    const float gbar = (1.0f - beta) * dq;
    Muls(a, b, 1.0f - beta, k);
    Adds(a, a, -gbar, k);
    Mul(a, q, a, k);
    out.value = beta * dp + (1.0f - beta) * dq;
    out.restCoef = rest ? (1.0f - beta) * bR - gbar : 0.0f;
    return out;
  }

  // Top-K, missing_mass = tail: buckets S + {rest}.
  __aicore__ inline DivergenceTerms TailDivergence(float logQRest, float qRest) {
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> logp = SupportVec(kLogP);
    LocalTensor<float> p = SupportVec(kP);
    LocalTensor<float> q = SupportVec(kQ);
    LocalTensor<float> a = SupportVec(kA);
    Maxs(logp, logp, kNegBig, k);  // a -inf teacher logit: p = 0, and 0 * log-ratio stays 0
    Exp(p, logp, k);
    const float pS = SumSupport(p);
    stats_[kStatTeacherMass] = pS;
    const float pRest = restEmpty_ || pS >= 1.0f ? 0.0f : 1.0f - pS;
    float logPRest[1] = {pRest > 0.0f ? pRest : 1.0f};
    LnScalars(logPRest, 1);
    if (pRest <= 0.0f) logPRest[0] = kNegBig;
    if (tiling_.divergence != kSparseKdForwardKl) {
      return ReverseOrJsd(!restEmpty_, pRest, logPRest[0], qRest, logQRest);
    }
    DivergenceTerms out{ForwardKlSupport(), 0.0f};
    // dD/du_j = P q_j - p_j; a token outside S: (P - p_rest / q_rest) q_v.
    const float pTotal = pS + pRest;
    Muls(a, q, pTotal, k);
    Sub(a, a, p, k);
    out.restCoef = pTotal;
    if (pRest > 0.0f) {
      out.value += pRest * (logPRest[0] - logQRest);
      out.restCoef -= pRest / qRest;
    }
    return out;
  }

  // Top-K, missing_mass = renorm: the teacher renormalised over S, p~ = softmax_S(t / T).
  __aicore__ inline DivergenceTerms RenormDivergence() {
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> logp = SupportVec(kLogP);
    LocalTensor<float> logq = SupportVec(kLogQ);
    LocalTensor<float> p = SupportVec(kP);
    LocalTensor<float> q = SupportVec(kQ);
    LocalTensor<float> a = SupportVec(kA);
    Maxs(logp, logp, kNegBig, k);
    LogSoftmaxSupport(logp, logp, p);
    Exp(p, logp, k);
    stats_[kStatTeacherMass] = 1.0f;
    if (tiling_.divergence == kSparseKdForwardKl) {
      // Against the full-vocabulary q: dD/du_j = q_j - p~_j, and q_v outside S.
      DivergenceTerms out{ForwardKlSupport(), 1.0f};
      Sub(a, q, p, k);
      return out;
    }
    // The student renormalised over S as well: q~ = softmax_S(z / T), from the logits so that it
    // stays exact when Q_S is tiny. No rest bucket, so tokens outside S get no KD gradient.
    Muls(logq, SupportVec(kZ), invT_, k);
    LogSoftmaxSupport(logq, logq, q);
    Exp(q, logq, k);
    return ReverseOrJsd(false, 0.0f, 0.0f, 0.0f, 0.0f);
  }

  // Sampled target: D = -sum w_j log q_j, dD/du_j = W q_j - w_j, W q_v outside S.
  __aicore__ inline DivergenceTerms SampledDivergence() {
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> w = SupportVec(kP);
    LocalTensor<float> a = SupportVec(kA);
    LocalTensor<float> tmp = SupportVec(kTmp);
    Mul(tmp, w, SupportVec(kLogQ), k);
    const float d = -SumSupport(tmp);
    const float weightSum = SumSupport(w);
    stats_[kStatTeacherMass] = weightSum;
    Muls(a, SupportVec(kQ), weightSum, k);
    Sub(a, a, w, k);
    return DivergenceTerms{d, weightSum};
  }

  // After pass 2: lse, loss, statistics, and the coefficients and support gradient pass 3 needs.
  __aicore__ inline void FinishStatistics() {
    float logs[3] = {sum1_, sumT_, sumRestT_ > 0.0f ? sumRestT_ : 1.0f};
    LnScalars(logs, kd_ ? 3u : 1u);
    lse1_ = rowMax_ + logs[0];
    const float kd = tiling_.kdWeight;
    const float T = tiling_.temperature;
    const float ce = lse1_ - zLabel_;
    labelCoef_ = 1.0f - kd;
    coefS_ = labelCoef_ + 2.0f * tiling_.zLoss * lse1_;  // CE and z-loss both push softmax(z)
    coefQ_ = 0.0f;
    for (uint32_t i = 0; i < kStatCount; ++i) stats_[i] = 0.0f;
    stats_[kStatCrossEntropy] = ce;
    stats_[kStatLse] = lse1_;
    // argmax z == y (first maximum, like torch.argmax): z_y is the maximum, none before it.
    stats_[kStatCorrect] = zLabel_ >= rowMax_ && maxBeforeLabel_ < rowMax_ ? 1.0f : 0.0f;
    rowLoss_ = labelCoef_ * ce + tiling_.zLoss * lse1_ * lse1_;
    if (!kd_) return;
    lseT_ = rowMax_ * invT_ + logs[1];
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> z = SupportVec(kZ);
    LocalTensor<float> logq = SupportVec(kLogQ);
    LocalTensor<float> q = SupportVec(kQ);
    LocalTensor<float> a = SupportVec(kA);
    LocalTensor<float> tmp = SupportVec(kTmp);
    LocalTensor<float> fix = SupportVec(kFix);
    ScalarToVector();  // the gathered z values and the loaded target
    Muls(logq, z, invT_, k);
    Adds(logq, logq, -lseT_, k);
    Exp(q, logq, k);
    stats_[kStatStudentMass] = SumSupport(q);
    DivergenceTerms terms{0.0f, 0.0f};
    if (sampled_) {
      terms = SampledDivergence();
    } else if (tail_) {
      const float logQRest = sumRestT_ > 0.0f ? logs[2] - logs[1] : kNegBig;
      terms = TailDivergence(logQRest, sumRestT_ / sumT_);
    } else {
      terms = RenormDivergence();
    }
    stats_[kStatDivergence] = terms.value;
    // Support gradient: kd T dD/du + coefS s, s = exp(z - lse); the label's -(1 - kd) comes in
    // the gradient pass, whether or not the label is in the support.
    Muls(fix, a, kd * T, k);
    Adds(tmp, z, -lse1_, k);
    Exp(tmp, tmp, k);
    Muls(tmp, tmp, coefS_, k);
    Add(fix, fix, tmp, k);
    coefQ_ = restEmpty_ && tail_ ? 0.0f : kd * T * terms.restCoef;
    rowLoss_ += kd * T * T * terms.value;
  }

  // g = coefS exp(z - lse) + coefQ exp(z / T - L_T), the support overwrite, the label's
  // -(1 - kd), and the softcap's chain-rule factor 1 - (z / c)^2.
  __aicore__ inline void GradientChunk(LocalTensor<float>& xf, LocalTensor<float>& g,
                                       uint32_t start, uint32_t len) {
    const int32_t n = static_cast<int32_t>(len);
    LocalTensor<float> e = expTBuf_.Get<float>();
    Adds(g, xf, -lse1_, n);
    Exp(g, g, n);
    if (coefQ_ == 0.0f || unitTemperature_) {
      Muls(g, g, coefS_ + coefQ_, n);  // at T = 1, q = s
    } else {
      Muls(g, g, coefS_, n);
      Muls(e, xf, invT_, n);
      Adds(e, e, -lseT_, n);
      Exp(e, e, n);
      Muls(e, e, coefQ_, n);
      Add(g, g, e, n);
    }
    VectorToScalar();
    if (kd_) {
      LocalTensor<int32_t> ids = SupportIds();
      LocalTensor<float> fix = SupportVec(kFix);
      for (uint32_t j = 0; j < tiling_.supportSlots; ++j) {
        const int32_t id = ids.GetValue(j);
        if (InChunk(id, start, len)) g.SetValue(id - start, fix.GetValue(j));
      }
    }
    if (InChunk(label_, start, len)) {
      g.SetValue(label_ - start, g.GetValue(label_ - start) - labelCoef_);
    }
    ScalarToVector();
    if (softcap_) {
      const float invC = 1.0f / tiling_.softcap;
      Muls(e, xf, invC, n);
      Mul(e, e, e, n);
      Muls(e, e, -1.0f, n);
      Adds(e, e, 1.0f, n);
      Mul(g, g, e, n);
    }
  }

  // Scale, cast to the input dtype (fp16: saturated at its largest finite value first, see the top
  // of the file) and copy over the chunk of z in GM.
  __aicore__ inline void EmitGradient(uint32_t row, uint32_t c, LocalTensor<float>& g,
                                      uint32_t len) {
    const int32_t n = static_cast<int32_t>(len);
    LocalTensor<TIn> out = outQueue_.template AllocTensor<TIn>();
    if constexpr (std::is_same_v<TIn, float>) {
      Muls(out, g, tiling_.scale, n);
    } else {
      Muls(g, g, tiling_.scale, n);
      if constexpr (std::is_same_v<TIn, half>) {
        Mins(g, g, kHalfMax, n);
        Maxs(g, g, -kHalfMax, n);
      }
      Cast(out, g, RoundMode::CAST_RINT, n);
    }
    outQueue_.EnQue(out);
    LocalTensor<TIn> outLocal = outQueue_.template DeQue<TIn>();
    DataCopyExtParams params{1, static_cast<uint32_t>(len * sizeof(TIn)), 0, 0, 0};
    DataCopyPadBits(logitsGm_[uint64_t(row) * tiling_.vocab + uint64_t(c) * tiling_.chunk],
                    outLocal, params);
    outQueue_.FreeTensor(outLocal);
  }

  TPipe pipe_;
  TQue<TPosition::VECIN, kBufferNum> inQueue_;
  TQue<TPosition::VECOUT, kBufferNum> outQueue_;
  TBuf<TPosition::VECCALC> floatBuf_;
  TBuf<TPosition::VECCALC> expBuf_;
  TBuf<TPosition::VECCALC> expTBuf_;
  TBuf<TPosition::VECCALC> workBuf_;
  TBuf<TPosition::VECCALC> scalarBuf_;
  TBuf<TPosition::VECCALC> supportBuf_;
  TBuf<TPosition::VECCALC> resultBuf_;  // loss and statistics of up to kSparseKdResultRows rows
  GlobalTensor<TIn> logitsGm_;
  GlobalTensor<int32_t> labelsGm_;
  GlobalTensor<int32_t> idsGm_;
  GlobalTensor<float> teacherGm_;
  GlobalTensor<float> teacherLseGm_;
  GlobalTensor<float> labelLogitGm_;
  GlobalTensor<float> lossGm_;
  GlobalTensor<float> statsGm_;
  SparseKdTiling tiling_{};
  bool kd_ = false;
  bool sampled_ = false;
  bool tail_ = false;
  bool softcap_ = false;
  bool unitTemperature_ = true;
  bool ignored_ = false;
  bool restEmpty_ = false;
  float invT_ = 1.0f;
  int32_t label_ = 0;
  float rowMax_ = 0.0f;
  float maxBeforeLabel_ = 0.0f;
  float sum1_ = 0.0f;
  float sumT_ = 0.0f;
  float sumRestT_ = 0.0f;
  float zLabel_ = 0.0f;
  float lse1_ = 0.0f;
  float lseT_ = 0.0f;
  float labelCoef_ = 0.0f;
  float coefS_ = 0.0f;
  float coefQ_ = 0.0f;
  float rowLoss_ = 0.0f;
  float stats_[kStatCount] = {};
};

// A device function, not a kernel: the entry points in the .cpp beside this header are the
// `extern "C" __global__` kernels (one per dtype); the twin test drivers launch this directly.
template <class TIn>
__aicore__ inline void sparse_kd_epilogue(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                              GM_ADDR teacherValues, GM_ADDR teacherLse,
                                              GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR stats,
                                              SparseKdTiling tiling) {
  SparseKdEpilogue<TIn> op;
  op.Init(logits, labels, ids, teacherValues, teacherLse, labelLogit, loss, stats, tiling);
  op.Process();
}

}  // namespace pangu_fastkd_ascend
