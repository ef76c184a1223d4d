// Sparse-KD / cross-entropy epilogue as an Ascend C vector kernel (issue 6).
//
// The LM-head GEMM stays a torch_npu matmul over row chunks; this kernel takes its logits
// z [N, V] (fp32 or bf16 in GM) and, per row, computes the loss of docs/kd-losses.md and writes
// d(loss)/d(z) * scale over z in place (in z's dtype). Built against csrc/ascend/twin it runs on
// CPU; it uses only the Ascend C API subset the twin emulates, so it is meant to compile unchanged
// with ascendc.
//
// Math (one row, label y, T == T_c, top-K target with missing_mass="tail" and the label included):
//   s = softmax(z), lse = logsumexp(z), CE = lse - z_y                       (temperature 1)
//   q = softmax(z / T), L_T = logsumexp(z / T)
//   support S = valid stored ids, plus y with its stored teacher logit when y is not among them
//   p_j = exp(t_j / T - Lambda) on S, P_S = sum p_j, p_rest = max(0, 1 - P_S) (0 if S covers V),
//   q_rest = sum_{v not in S} q_v  (summed directly over the rest: no 1 - Q_S cancellation)
//   D = sum_S p_j (log p_j - log q_j) + p_rest (log p_rest - log q_rest)     (p = 0 terms are 0)
//   loss = kd T^2 D + (1 - kd) CE
// Gradient: d log q_j / dz_v = (delta_{v s_j} - q_v) / T and d log q_rest / dz_v =
// (1[v not in S] q_v / q_rest - q_v) / T, so with P = P_S + p_rest and r = p_rest / q_rest:
//   v in S:      g_v = (1 - kd)(s_v - delta_vy) + kd T (P q_v - p_v)
//   v not in S:  g_v = (1 - kd) s_v + kd T (P - r) q_v
// The kernel writes the second formula for every element with vector ops, then overwrites the
// support elements (at most K + 1 per row) with the first, computed as a K-vector beforehand.
// With kd == 0 there is no support: only the label element gets its -1.
//
// Passes per row, each streaming the row through the UB in `chunk`-element pieces (ragged tail by
// DataCopyPad, 2-deep TQue so chunk c+1 is copied while chunk c is computed):
//   1. max of z, and gather of z at the support ids and at the label (scalar reads of the chunk);
//   2. sum of exp(z - max), and for kd > 0 sum of exp((z - max) / T) over all and over the rest;
//   3. the gradient, scaled and cast to the input dtype, copied over z.
// Inputs are validated by the host (labels in [0, V) or ignoreIndex, ids in [-1, V) and distinct,
// teacher logits finite or -inf, Lambda finite), as the PyTorch path does before its kernel.
#pragma once

#include "kernel_operator.h"
#include "sparse_kd_tiling.h"

namespace pangu_fastkd_ascend {

using namespace AscendC;

template <class TIn>
class SparseKdEpilogue {
 public:
  // logits [N, V] TIn (read, then overwritten by the gradient); labels [N] int32;
  // ids [N, K] int32 (-1 = empty), teacherLogits [N, K] f32, teacherLse [N] f32,
  // labelLogit [N] f32 (the teacher pointers are unused when kdWeight == 0);
  // loss [N] f32 (unscaled per-row loss, 0 for ignored rows), lse [N] f32 (logsumexp of z).
  __aicore__ inline void Init(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids, GM_ADDR teacherLogits,
                              GM_ADDR teacherLse, GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR lse,
                              const SparseKdTiling& tiling) {
    tiling_ = tiling;
    kd_ = tiling.kdWeight > 0.0f;
    unitTemperature_ = tiling.temperature == 1.0f;
    invT_ = 1.0f / tiling.temperature;
    const uint64_t rows = tiling.rows;
    logitsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(logits), rows * tiling.vocab);
    labelsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(labels), rows);
    lossGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(loss), rows);
    lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), rows);
    if (kd_) {
      idsGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(ids), rows * tiling.supportK);
      teacherGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(teacherLogits),
                                 rows * tiling.supportK);
      teacherLseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(teacherLse), rows);
      labelLogitGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(labelLogit), rows);
    }
    // Exactly the buffers SparseKdUbBytes counts, so the host tiling bounds the UB use.
    const uint32_t chunk = tiling.chunk;
    pipe_.InitBuffer(inQueue_, kBufferNum, chunk * sizeof(TIn));
    pipe_.InitBuffer(outQueue_, kBufferNum, chunk * sizeof(TIn));
    if constexpr (!std::is_same_v<TIn, float>) pipe_.InitBuffer(floatBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(expBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(expTBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(workBuf_, chunk * sizeof(float));
    pipe_.InitBuffer(scalarBuf_, kScalars * sizeof(float));
    pipe_.InitBuffer(supportBuf_, kSupportVectors * tiling.supportSlots * sizeof(float));
  }

  __aicore__ inline void Process() {
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum());
    for (uint32_t row = static_cast<uint32_t>(GetBlockIdx()); row < tiling_.rows;
         row += blockNum) {
      ProcessRow(row);
    }
  }

 private:
  static constexpr int32_t kBufferNum = 2;
  static constexpr uint32_t kScalars = 16;
  // Support vectors, each `supportSlots` floats: ids (int32), student logit, teacher log-prob,
  // student log-prob at T, q, p, scratch, the fixed gradient of the support element.
  static constexpr uint32_t kSupportVectors = 8;
  enum Support : uint32_t { kIds = 0, kZ, kLogP, kLogQ, kQ, kP, kTmp, kFix };
  // Stands in for -inf where a finite value keeps 0 * x at 0 (empty slots, p = 0 terms).
  static constexpr float kNegBig = -1.0e30f;
  enum class Pass { MaxGather, Sums, Gradient };

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

  __aicore__ inline void ProcessRow(uint32_t row) {
    const uint32_t chunks = (tiling_.vocab + tiling_.chunk - 1) / tiling_.chunk;
    label_ = labelsGm_.GetValue(row);
    ignored_ = label_ == tiling_.ignoreIndex;
    if (!ignored_) {
      if (kd_) LoadSupport(row);
      rowMax_ = -3.4e38f;
      sum1_ = 0.0f;
      sumT_ = 0.0f;
      sumRestT_ = 0.0f;
      zLabel_ = 0.0f;
    }
    // An ignored row gets a zero gradient: only the write pass runs.
    for (Pass pass : {Pass::MaxGather, Pass::Sums, Pass::Gradient}) {
      if (ignored_ && pass != Pass::Gradient) continue;
      if (pass == Pass::Gradient && !ignored_) FinishStatistics();
      CopyIn(row, 0);
      for (uint32_t c = 0; c < chunks; ++c) {
        if (c + 1 < chunks) CopyIn(row, c + 1);  // prefetch into the other buffer
        Compute(pass, row, c);
      }
    }
    lossGm_.SetValue(row, ignored_ ? 0.0f : rowLoss_);
    lseGm_.SetValue(row, ignored_ ? 0.0f : lse1_);
  }

  // Scalar reads of the row's target into the support vectors. Slot K is the label when it is
  // not among the stored ids (label conditioning); unused slots keep p = 0 and never match.
  __aicore__ inline void LoadSupport(uint32_t row) {
    VectorToScalar();  // the previous row's vector ops on these vectors are done
    LocalTensor<int32_t> ids = SupportIds();
    LocalTensor<float> z = SupportVec(kZ);
    LocalTensor<float> logp = SupportVec(kLogP);
    const float lambda = teacherLseGm_.GetValue(row);
    const float T = tiling_.temperature;
    const uint32_t K = tiling_.supportK;
    for (uint32_t j = 0; j < tiling_.supportSlots; ++j) {
      ids.SetValue(j, -1);
      z.SetValue(j, kNegBig);
      logp.SetValue(j, kNegBig);
    }
    uint32_t count = 0;
    labelSlot_ = -1;
    for (uint32_t j = 0; j < K; ++j) {
      const int32_t id = idsGm_.GetValue(uint64_t(row) * K + j);
      if (id < 0) continue;
      ids.SetValue(j, id);
      logp.SetValue(j, teacherGm_.GetValue(uint64_t(row) * K + j) / T - lambda);
      ++count;
      if (id == label_) labelSlot_ = static_cast<int32_t>(j);
    }
    if (labelSlot_ < 0) {
      labelSlot_ = static_cast<int32_t>(K);
      ids.SetValue(K, label_);
      logp.SetValue(K, labelLogitGm_.GetValue(row) / T - lambda);
      ++count;
    }
    restEmpty_ = count >= tiling_.vocab;
  }

  __aicore__ inline void CopyIn(uint32_t row, uint32_t c) {
    LocalTensor<TIn> xLocal = inQueue_.template AllocTensor<TIn>();
    DataCopyExtParams params{1, static_cast<uint32_t>(ChunkLen(c) * sizeof(TIn)), 0, 0, 0};
    DataCopyPadExtParams<TIn> pad{false, 0, 0, TIn(0.0f)};
    DataCopyPad(xLocal, logitsGm_[uint64_t(row) * tiling_.vocab + uint64_t(c) * tiling_.chunk],
                params, pad);
    inQueue_.EnQue(xLocal);
  }

  // Chunk as float in the UB: bf16 is cast first (Exp/Ln take only half and float).
  __aicore__ inline LocalTensor<float> AsFloat(LocalTensor<TIn>& xLocal, uint32_t len) {
    if constexpr (std::is_same_v<TIn, float>) {
      return xLocal;
    } else {
      LocalTensor<float> xf = floatBuf_.template Get<float>();
      Cast(xf, xLocal, RoundMode::CAST_NONE, len);
      return xf;
    }
  }

  __aicore__ inline bool InChunk(int32_t id, uint32_t start, uint32_t len) const {
    return id >= 0 && static_cast<uint32_t>(id) >= start && static_cast<uint32_t>(id) < start + len;
  }

  __aicore__ inline void Compute(Pass pass, uint32_t row, uint32_t c) {
    const uint32_t len = ChunkLen(c);
    const int32_t n = static_cast<int32_t>(len);
    const uint32_t start = c * tiling_.chunk;
    LocalTensor<TIn> xLocal = inQueue_.template DeQue<TIn>();
    LocalTensor<float> xf = AsFloat(xLocal, len);
    LocalTensor<float> work = workBuf_.Get<float>();
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    LocalTensor<float> g = expBuf_.Get<float>();
    if (pass == Pass::MaxGather) {
      ReduceMax(scalar, xf, work, n);
      const float chunkMax = ReadScalar(scalar);  // also orders the gather after the Cast
      rowMax_ = chunkMax > rowMax_ ? chunkMax : rowMax_;
      if (InChunk(label_, start, len)) zLabel_ = xf.GetValue(label_ - start);
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
      if (ignored_) {
        Duplicate(g, 0.0f, n);
      } else {
        GradientChunk(xf, g, start, len);
      }
      EmitGradient(row, c, g, len);
    }
    inQueue_.FreeTensor(xLocal);
  }

  // sum exp((z - max) / T) over the chunk, and over the chunk minus the support elements (set
  // to 0 by the scalar unit between the two sums).
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

  // After pass 2: lse, loss, and the coefficients and support gradient pass 3 needs.
  __aicore__ inline void FinishStatistics() {
    float logs[3] = {sum1_, sumT_, sumRestT_ > 0.0f ? sumRestT_ : 1.0f};
    LnScalars(logs, 3);
    lse1_ = rowMax_ + logs[0];
    const float ce = lse1_ - zLabel_;
    coefS_ = 1.0f - tiling_.kdWeight;
    coefQ_ = 0.0f;
    if (!kd_) {
      rowLoss_ = ce;
      return;
    }
    const float kd = tiling_.kdWeight;
    const float T = tiling_.temperature;
    lseT_ = rowMax_ * invT_ + logs[1];
    const float logQRest = sumRestT_ > 0.0f ? logs[2] - logs[1] : kNegBig;
    const float qRest = sumRestT_ / sumT_;
    const int32_t k = static_cast<int32_t>(tiling_.supportSlots);
    LocalTensor<float> z = SupportVec(kZ);
    LocalTensor<float> logp = SupportVec(kLogP);
    LocalTensor<float> logq = SupportVec(kLogQ);
    LocalTensor<float> q = SupportVec(kQ);
    LocalTensor<float> p = SupportVec(kP);
    LocalTensor<float> tmp = SupportVec(kTmp);
    LocalTensor<float> fix = SupportVec(kFix);
    LocalTensor<float> work = workBuf_.Get<float>();
    LocalTensor<float> scalar = scalarBuf_.Get<float>();
    ScalarToVector();  // the gathered z values
    Muls(logq, z, invT_, k);
    Adds(logq, logq, -lseT_, k);
    Exp(q, logq, k);
    Maxs(logp, logp, kNegBig, k);  // a -inf teacher logit: p = 0, and 0 * log-ratio stays 0
    Exp(p, logp, k);
    Sub(tmp, logp, logq, k);
    Mul(tmp, p, tmp, k);
    ReduceSum(scalar, tmp, work, k);
    float divergence = ReadScalar(scalar);
    ReduceSum(scalar, p, work, k);
    const float pS = ReadScalar(scalar);
    float pRest = restEmpty_ || pS >= 1.0f ? 0.0f : 1.0f - pS;
    float ratio = 0.0f;  // r = p_rest / q_rest
    if (pRest > 0.0f) {
      float lnPRest[1] = {pRest};
      LnScalars(lnPRest, 1);
      divergence += pRest * (lnPRest[0] - logQRest);
      ratio = pRest / qRest;
    }
    const float pTotal = pS + pRest;
    // Support gradient: (1 - kd) s + kd T (P q - p), s = exp(z - lse); the label's -1 below.
    Muls(fix, q, pTotal, k);
    Sub(fix, fix, p, k);
    Muls(fix, fix, kd * T, k);
    Adds(tmp, z, -lse1_, k);
    Exp(tmp, tmp, k);
    Muls(tmp, tmp, coefS_, k);
    Add(fix, fix, tmp, k);
    VectorToScalar();
    fix.SetValue(labelSlot_, fix.GetValue(labelSlot_) - coefS_);
    coefQ_ = kd * T * (pTotal - ratio);
    rowLoss_ = kd * T * T * divergence + coefS_ * ce;
  }

  // g = (1 - kd) exp(z - lse) + kd T (P - r) exp(z / T - L_T), then the support overwrite.
  __aicore__ inline void GradientChunk(LocalTensor<float>& xf, LocalTensor<float>& g,
                                       uint32_t start, uint32_t len) {
    const int32_t n = static_cast<int32_t>(len);
    Adds(g, xf, -lse1_, n);
    Exp(g, g, n);
    if (!kd_ || unitTemperature_) {
      Muls(g, g, coefS_ + coefQ_, n);  // at T = 1, q = s
    } else {
      LocalTensor<float> e = expTBuf_.Get<float>();
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
    } else if (InChunk(label_, start, len)) {
      g.SetValue(label_ - start, g.GetValue(label_ - start) - 1.0f);
    }
    ScalarToVector();
  }

  // Scale, cast to the input dtype and copy over the chunk of z in GM.
  __aicore__ inline void EmitGradient(uint32_t row, uint32_t c, LocalTensor<float>& g,
                                      uint32_t len) {
    const int32_t n = static_cast<int32_t>(len);
    LocalTensor<TIn> out = outQueue_.template AllocTensor<TIn>();
    if constexpr (std::is_same_v<TIn, float>) {
      Muls(out, g, tiling_.scale, n);
    } else {
      Muls(g, g, tiling_.scale, n);
      Cast(out, g, RoundMode::CAST_RINT, n);
    }
    outQueue_.EnQue(out);
    LocalTensor<TIn> outLocal = outQueue_.template DeQue<TIn>();
    DataCopyExtParams params{1, static_cast<uint32_t>(len * sizeof(TIn)), 0, 0, 0};
    DataCopyPad(logitsGm_[uint64_t(row) * tiling_.vocab + uint64_t(c) * tiling_.chunk], outLocal,
                params);
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
  GlobalTensor<TIn> logitsGm_;
  GlobalTensor<int32_t> labelsGm_;
  GlobalTensor<int32_t> idsGm_;
  GlobalTensor<float> teacherGm_;
  GlobalTensor<float> teacherLseGm_;
  GlobalTensor<float> labelLogitGm_;
  GlobalTensor<float> lossGm_;
  GlobalTensor<float> lseGm_;
  SparseKdTiling tiling_{};
  bool kd_ = false;
  bool unitTemperature_ = true;
  bool ignored_ = false;
  bool restEmpty_ = false;
  float invT_ = 1.0f;
  int32_t label_ = 0;
  int32_t labelSlot_ = -1;
  float rowMax_ = 0.0f;
  float sum1_ = 0.0f;
  float sumT_ = 0.0f;
  float sumRestT_ = 0.0f;
  float zLabel_ = 0.0f;
  float lse1_ = 0.0f;
  float lseT_ = 0.0f;
  float coefS_ = 0.0f;
  float coefQ_ = 0.0f;
  float rowLoss_ = 0.0f;
};

template <class TIn>
__global__ __aicore__ void sparse_kd_epilogue(GM_ADDR logits, GM_ADDR labels, GM_ADDR ids,
                                              GM_ADDR teacherLogits, GM_ADDR teacherLse,
                                              GM_ADDR labelLogit, GM_ADDR loss, GM_ADDR lse,
                                              SparseKdTiling tiling) {
  SparseKdEpilogue<TIn> op;
  op.Init(logits, labels, ids, teacherLogits, teacherLse, labelLogit, loss, lse, tiling);
  op.Process();
}

}  // namespace pangu_fastkd_ascend
