// Packed causal attention forward as an Ascend C vector kernel (issue 6).
//
// q [T, Hq, D], k/v [T, Hkv, D] (fp32 or bf16 in GM), documents laid end to end and delimited by
// cu_seqlens [B + 1] int32; query head h reads kv head h / (Hq / Hkv). Writes out [T, Hq, D] in
// the input dtype and lse [Hq, T] fp32, the semantics of packed_attention_reference (causal, no
// window). Built against csrc/ascend/twin it runs on CPU; it uses only the Ascend C API subset the
// twin emulates, so it is meant to compile unchanged with ascendc.
//
// Work split: every (document, head, query tile of `tile` rows) is one work item; items are dealt
// round-robin to the blocks. An item walks the key tiles of its document from the first key up
// to its last query row (only tiles at or below the diagonal), keeping flash-style online-softmax
// state per query row in fp32: running max m, running sum l, unnormalised output O [D].
// For a query row i at token qi and a key tile [k0, k0 + n):
//   keys k0 .. min(qi, k0 + n - 1) are visible (causal); rows with qi < k0 see none and skip it;
//   s_j = scale * (q_i . k_j), m' = max(m, max_j s_j), p_j = exp(s_j - m'), a = exp(m - m'),
//   l = a l + sum_j p_j, O = a O + sum_j p_j v_j, m = m'.
// At the end out_i = O / l and lse_i = m + ln(l). Every visible row has its diagonal key, so l > 0.
//
// Products go through the vector unit (the twin has no cube unit yet): q . k_j is a Mul and a
// ReduceSum over D, O += p_j v_j a Muls and an Add. bf16 tiles are cast to fp32 after the copy in,
// before any arithmetic (Exp/Ln take only half and float); out is cast back to bf16 on the way
// out. Tiles move GM <-> UB with one strided DataCopyPad each (rows of one head are Hq * D or
// Hkv * D elements apart in GM); the next K/V tile is copied while the current one is used.
#pragma once

#include <type_traits>

#include "kernel_operator.h"
#include "packed_attention_tiling.h"

namespace pangu_fastkd_ascend {

using namespace AscendC;

template <class TIn>
class PackedAttentionFwd {
 public:
  // q [T, Hq, D] TIn; k, v [T, Hkv, D] TIn; cuSeqlens [B + 1] int32 (validated by the host);
  // out [T, Hq, D] TIn; lse [Hq, T] f32.
  __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens, GM_ADDR out,
                              GM_ADDR lse, const PackedAttentionTiling& tiling) {
    tiling_ = tiling;
    const uint64_t T = tiling.tokens;
    const uint32_t D = tiling.headDim;
    qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(q), T * tiling.qHeads * D);
    kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(k), T * tiling.kvHeads * D);
    vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(v), T * tiling.kvHeads * D);
    outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(out), T * tiling.qHeads * D);
    lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), T * tiling.qHeads);
    cuGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuSeqlens), tiling.docs + 1u);
    // Exactly the buffers PackedAttentionUbBytes counts, so the host tiling bounds the UB use.
    const uint32_t tile = tiling.tile;
    const uint32_t tileElems = tile * D;
    pipe_.InitBuffer(qQueue_, 1, tileElems * sizeof(TIn));
    pipe_.InitBuffer(kQueue_, kBufferNum, tileElems * sizeof(TIn));
    pipe_.InitBuffer(vQueue_, kBufferNum, tileElems * sizeof(TIn));
    pipe_.InitBuffer(outQueue_, 1, tileElems * sizeof(TIn));
    if constexpr (!std::is_same_v<TIn, float>) {
      pipe_.InitBuffer(floatTiles_, 3u * tileElems * sizeof(float));
    }
    pipe_.InitBuffer(accBuf_, tileElems * sizeof(float));
    workLen_ = D > tile ? D : tile;
    pipe_.InitBuffer(scratchBuf_, (tile * 9u + D + workLen_) * sizeof(float));
    pipe_.InitBuffer(statsBuf_, (tile * 3u + kScalars) * sizeof(float));
  }

  __aicore__ inline void Process() {
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum());
    const uint32_t blockIdx = static_cast<uint32_t>(GetBlockIdx());
    const uint32_t tile = tiling_.tile;
    // Items in (document, head, query tile) order; this block takes every blockNum-th one.
    uint32_t item = 0;
    for (uint32_t b = 0; b < tiling_.docs; ++b) {
      const uint32_t start = static_cast<uint32_t>(cuGm_.GetValue(b));
      const uint32_t end = static_cast<uint32_t>(cuGm_.GetValue(b + 1u));
      for (uint32_t h = 0; h < tiling_.qHeads; ++h) {
        for (uint32_t q0 = start; q0 < end; q0 += tile, ++item) {
          if (item % blockNum != blockIdx) continue;
          const uint32_t rows = end - q0 < tile ? end - q0 : tile;
          ProcessItem(start, h, q0, rows);
        }
      }
    }
  }

 private:
  static constexpr int32_t kBufferNum = 2;
  static constexpr uint32_t kScalars = 16;  // alpha at 0, row sum at 8 (32-byte aligned slots)
  static constexpr uint32_t kDotStride = 8;  // dot products land 32 bytes apart (aligned dst)
  // Stands in for -inf as the initial running max: exp(kNegBig - m) is exactly 0.
  static constexpr float kNegBig = -1.0e30f;

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

  __aicore__ inline uint32_t KvHead(uint32_t h) const {
    return h / (tiling_.qHeads / tiling_.kvHeads);
  }

  // Strided GM -> UB copy of `rows` rows of head `head` starting at token `token`.
  __aicore__ inline void CopyRowsIn(LocalTensor<TIn>& dst, const GlobalTensor<TIn>& src,
                                    uint32_t heads, uint32_t head, uint32_t token, uint32_t rows) {
    const uint32_t D = tiling_.headDim;
    const uint32_t rowBytes = D * sizeof(TIn);
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes, (heads - 1u) * rowBytes, 0,
                             0};
    DataCopyPadExtParams<TIn> pad{false, 0, 0, TIn(0.0f)};
    DataCopyPad(dst, src[(uint64_t(token) * heads + head) * D], params, pad);
  }

  __aicore__ inline void CopyKvIn(uint32_t kvHead, uint32_t k0, uint32_t keys) {
    LocalTensor<TIn> kLocal = kQueue_.template AllocTensor<TIn>();
    CopyRowsIn(kLocal, kGm_, tiling_.kvHeads, kvHead, k0, keys);
    kQueue_.EnQue(kLocal);
    LocalTensor<TIn> vLocal = vQueue_.template AllocTensor<TIn>();
    CopyRowsIn(vLocal, vGm_, tiling_.kvHeads, kvHead, k0, keys);
    vQueue_.EnQue(vLocal);
  }

  // The tile as float in the UB: bf16 is cast into float slot `slot` of floatTiles_ first.
  __aicore__ inline LocalTensor<float> AsFloat(LocalTensor<TIn>& x, uint32_t slot, uint32_t rows) {
    if constexpr (std::is_same_v<TIn, float>) {
      return x;
    } else {
      const uint32_t tileElems = tiling_.tile * tiling_.headDim;
      LocalTensor<float> xf = floatTiles_.template Get<float>()[slot * tileElems];
      Cast(xf, x, RoundMode::CAST_NONE, rows * tiling_.headDim);
      return xf;
    }
  }

  __aicore__ inline void ProcessItem(uint32_t docStart, uint32_t h, uint32_t q0, uint32_t rows) {
    const uint32_t D = tiling_.headDim;
    const uint32_t tile = tiling_.tile;
    const uint32_t kvHead = KvHead(h);
    LocalTensor<TIn> qLocal = qQueue_.template AllocTensor<TIn>();
    CopyRowsIn(qLocal, qGm_, tiling_.qHeads, h, q0, rows);
    qQueue_.EnQue(qLocal);
    CopyKvIn(kvHead, docStart, q0 + rows - docStart < tile ? q0 + rows - docStart : tile);

    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> stats = statsBuf_.Get<float>();
    VectorToScalar();  // the previous item's vector ops on the statistics are done
    for (uint32_t i = 0; i < rows; ++i) {
      stats.SetValue(i, kNegBig);         // running max
      stats.SetValue(tile + i, 0.0f);     // running sum
    }
    Duplicate(acc, 0.0f, static_cast<int32_t>(rows * D));  // fresh UB is NaN; 0 * NaN is NaN

    qLocal = qQueue_.template DeQue<TIn>();
    LocalTensor<float> qf = AsFloat(qLocal, 0, rows);
    const uint32_t qEnd = q0 + rows;
    for (uint32_t k0 = docStart; k0 < qEnd; k0 += tile) {
      const uint32_t keys = qEnd - k0 < tile ? qEnd - k0 : tile;
      const uint32_t next = k0 + tile;
      if (next < qEnd) CopyKvIn(kvHead, next, qEnd - next < tile ? qEnd - next : tile);
      LocalTensor<TIn> kLocal = kQueue_.template DeQue<TIn>();
      LocalTensor<TIn> vLocal = vQueue_.template DeQue<TIn>();
      LocalTensor<float> kf = AsFloat(kLocal, 1, keys);
      LocalTensor<float> vf = AsFloat(vLocal, 2, keys);
      for (uint32_t i = 0; i < rows; ++i) {
        const uint32_t qi = q0 + i;
        if (qi < k0) continue;  // every key of this tile is after the query
        const uint32_t visible = qi - k0 + 1u < keys ? qi - k0 + 1u : keys;
        UpdateRow(qf[i * D], kf, vf, acc[i * D], i, visible);
      }
      kQueue_.FreeTensor(kLocal);
      vQueue_.FreeTensor(vLocal);
    }
    qQueue_.FreeTensor(qLocal);
    Finish(h, q0, rows);
  }

  // One online-softmax step of query row i over `visible` keys of the current tile.
  __aicore__ inline void UpdateRow(const LocalTensor<float>& qRow, const LocalTensor<float>& kf,
                                   const LocalTensor<float>& vf, const LocalTensor<float>& accRow,
                                   uint32_t i, uint32_t visible) {
    const uint32_t D = tiling_.headDim;
    const uint32_t tile = tiling_.tile;
    const int32_t d = static_cast<int32_t>(D);
    const int32_t n = static_cast<int32_t>(visible);
    LocalTensor<float> scratch = scratchBuf_.Get<float>();
    LocalTensor<float> scores = scratch;
    LocalTensor<float> dots = scratch[tile];
    LocalTensor<float> prod = scratch[tile * 9u];
    LocalTensor<float> work = scratch[tile * 9u + D];
    LocalTensor<float> stats = statsBuf_.Get<float>();
    LocalTensor<float> alpha = stats[tile * 3u];
    LocalTensor<float> rowSum = stats[tile * 3u + 8u];

    for (uint32_t j = 0; j < visible; ++j) {
      Mul(prod, qRow, kf[j * D], d);
      ReduceSum(dots[j * kDotStride], prod, work, d);
    }
    VectorToScalar();
    const float mOld = stats.GetValue(i);
    float mNew = mOld;
    for (uint32_t j = 0; j < visible; ++j) {
      const float s = dots.GetValue(j * kDotStride) * tiling_.scale;
      scores.SetValue(j, s);
      mNew = s > mNew ? s : mNew;
    }
    alpha.SetValue(0, mOld - mNew);
    ScalarToVector();
    Exp(alpha, alpha, 1);
    Adds(scores, scores, -mNew, n);
    Exp(scores, scores, n);
    ReduceSum(rowSum, scores, work, n);
    VectorToScalar();
    const float a = alpha.GetValue(0);
    stats.SetValue(i, mNew);
    stats.SetValue(tile + i, a * stats.GetValue(tile + i) + rowSum.GetValue(0));
    Muls(accRow, accRow, a, d);
    for (uint32_t j = 0; j < visible; ++j) {
      Muls(prod, vf[j * D], scores.GetValue(j), d);
      Add(accRow, accRow, prod, d);
    }
  }

  // out = O / l in the input dtype, lse = m + ln(l), both copied to GM.
  __aicore__ inline void Finish(uint32_t h, uint32_t q0, uint32_t rows) {
    const uint32_t D = tiling_.headDim;
    const uint32_t tile = tiling_.tile;
    const int32_t d = static_cast<int32_t>(D);
    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> stats = statsBuf_.Get<float>();
    LocalTensor<float> lse = stats[tile * 2u];
    VectorToScalar();
    for (uint32_t i = 0; i < rows; ++i) lse.SetValue(i, stats.GetValue(tile + i));
    ScalarToVector();
    Ln(lse, lse, static_cast<int32_t>(rows));
    VectorToScalar();
    for (uint32_t i = 0; i < rows; ++i) lse.SetValue(i, lse.GetValue(i) + stats.GetValue(i));

    LocalTensor<TIn> outLocal = outQueue_.template AllocTensor<TIn>();
    for (uint32_t i = 0; i < rows; ++i) {
      const float inv = 1.0f / stats.GetValue(tile + i);
      if constexpr (std::is_same_v<TIn, float>) {
        Muls(outLocal[i * D], acc[i * D], inv, d);
      } else {
        Muls(acc[i * D], acc[i * D], inv, d);
        Cast(outLocal[i * D], acc[i * D], RoundMode::CAST_RINT, D);
      }
    }
    outQueue_.EnQue(outLocal);
    outLocal = outQueue_.template DeQue<TIn>();
    const uint32_t rowBytes = D * sizeof(TIn);
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes, 0,
                             (tiling_.qHeads - 1u) * rowBytes, 0};
    DataCopyPad(outGm_[(uint64_t(q0) * tiling_.qHeads + h) * D], outLocal, params);
    outQueue_.FreeTensor(outLocal);

    // The lse row segment [h, q0 : q0 + rows) is contiguous in GM; byte-exact copy.
    SetFlag<HardEvent::S_MTE3>(EVENT_ID2);
    WaitFlag<HardEvent::S_MTE3>(EVENT_ID2);
    DataCopyExtParams lseParams{1, rows * static_cast<uint32_t>(sizeof(float)), 0, 0, 0};
    DataCopyPad(lseGm_[uint64_t(h) * tiling_.tokens + q0], lse, lseParams);
    // The next item's scalar writes into the statistics wait for this copy.
    SetFlag<HardEvent::MTE3_S>(EVENT_ID3);
    WaitFlag<HardEvent::MTE3_S>(EVENT_ID3);
  }

  PackedAttentionTiling tiling_{};
  uint32_t workLen_ = 0;
  TPipe pipe_;
  TQue<TPosition::VECIN, 1> qQueue_;
  TQue<TPosition::VECIN, kBufferNum> kQueue_;
  TQue<TPosition::VECIN, kBufferNum> vQueue_;
  TQue<TPosition::VECOUT, 1> outQueue_;
  TBuf<TPosition::VECCALC> floatTiles_;  // bf16 only: float Q, K, V tiles
  TBuf<TPosition::VECCALC> accBuf_;      // O [tile, D] f32
  TBuf<TPosition::VECCALC> scratchBuf_;  // scores [tile], dots [tile x 8], prod [D], work
  TBuf<TPosition::VECCALC> statsBuf_;    // max [tile], sum [tile], lse [tile], scalars [16]
  GlobalTensor<TIn> qGm_;
  GlobalTensor<TIn> kGm_;
  GlobalTensor<TIn> vGm_;
  GlobalTensor<TIn> outGm_;
  GlobalTensor<float> lseGm_;
  GlobalTensor<int32_t> cuGm_;
};

template <class TIn>
__global__ __aicore__ void packed_attention_fwd(GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                                GM_ADDR cuSeqlens, GM_ADDR out, GM_ADDR lse,
                                                PackedAttentionTiling tiling) {
  PackedAttentionFwd<TIn> op;
  op.Init(q, k, v, cuSeqlens, out, lse, tiling);
  op.Process();
}

}  // namespace pangu_fastkd_ascend
