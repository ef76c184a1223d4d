// Packed causal attention backward as two Ascend C kernels, products on the cube unit through
// the Matmul high-level API.
//
// Inputs in GM: grad_out dO and out O [T, Hq, D], q [T, Hq, D], k/v [T, Hkv, D] (fp32, bf16 or
// fp16: TIn float, bfloat16_t or half; the host picks by PackedAttentionBwdTiling::dtype),
// lse [Hq, T] f32 (the forward's), cu_seqlens [B + 1] int32. Outputs grad_q [T, Hq, D] and
// grad_k/grad_v [T, Hkv, D] in the input dtype: the gradients of packed_attention_reference
// (causal, no window). Query head h reads kv head g = h / (Hq / Hkv); dK and dV of g sum over the
// Hq / Hkv query heads of its group.
//
// Math (flash-attention 2 backward), per document, head h, for query row i and key j <= i:
//   P_ij  = exp(scale * q_i . k_j - lse_i)          (the forward's softmax, recomputed)
//   dP_ij = dO_i . v_j
//   delta_i = sum_j P_ij dP_ij = dO_i . O_i          (since O_i = sum_j P_ij v_j)
//   dS_ij = P_ij (dP_ij - delta_i)
//   dQ_i = scale sum_j dS_ij k_j,  dK_j = scale sum_i dS_ij q_i,  dV_j = sum_i P_ij dO_i.
// The kernels fold `scale` into dS once (dS here means scale * P * (dP - delta)).
//
// Two kernels, launched one after the other with the same GM workspace (layout and sizes in
// packed_attention_bwd_tiling.h); no atomics across blocks, so the result is deterministic and
// independent of the block count:
// 1. dQ pass, items (document, query head, query tile): delta_i on the vector unit (written to
//    the workspace for pass 2), then for each key tile at or below the diagonal S = Q K^T and
//    dP = dO V^T on the cube, P and dS on the vector unit, dQ += dS K on the cube.
// 2. dK/dV pass, items (document, kv head, key tile): for each query head of the group and each
//    query tile at or after the key tile, S, dP, P and dS as above, then dV += P^T dO and
//    dK += dS^T Q on the cube (P^T, dS^T through the Matmul transpose flag of A).
// Query and key tiles share the grid docStart + n * tile, so a tile pair is either fully below
// the diagonal (every key visible) or on it (same rows and keys, visible j <= i): only the
// diagonal needs the causal mask, a constant [tile, tile] tile added to the scores.
//
// Cube products read q, k, v, dO in place in GM (one head is a strided matrix: row stride Hq * D
// or Hkv * D given through the Matmul org shape) and write f32 results to the block's workspace
// slot; the vector unit reads S and dP from there and writes P and dS back in the input dtype,
// which the cube then reads. Going through GM is what the Atlas 200I/500 A2 (310B) allows (its
// Matmul takes GM operands only); the 910B could keep P/dS in UB (VECOUT), not done here.
// For bf16 inputs P and dS are rounded to bf16 before the second products (the Matmul needs A and
// B of one type; flash-attention does the same), and each gradient is accumulated in f32 in the
// workspace (IterateAll with enAtomic = 1 after the first product) and cast to bf16 once at the
// end. fp16 takes the bf16 path (half operands on the cube, f32 C and f32 vector math); its casts
// of dS and of the gradients clamp to +-65504 first, which is what the hardware's saturating
// float -> half Cast does and keeps the twin (whose Cast rounds to inf) in step; P lies in [0, 1].
// For fp32 the products accumulate straight into grad_q / grad_k / grad_v. enAtomic is used
// only on a block's own rows: no two blocks ever add into the same element.
//
// Not confirmed without a CANN install (the twin cannot tell):
// - that the synchronous IterateAll returns only once C is visible in GM to the vector core's
//   MTE2, and that MTE3 -> S (SetFlag/WaitFlag) before the next Matmul call is enough for the
//   cube to read P/dS the vector core just wrote (the cross-core order of GM writes);
// - the system workspace on the 310B: the CANN 9.0 SetSysWorkspace page lists Atlas 200I/500 A2
//   as not supporting it, while the generated wrapper calls SetSysWorkspaceForce on every chip
//   and the Matmul pages pass a workspace to REGIST_MATMUL_OBJ there too.
//
// Workspace: the kernels are built with HAVE_WORKSPACE HAVE_TILING (cmake/ascend.cmake), so the
// launch wrapper CANN generates has set the system workspace (SetSysWorkspaceForce on the buffer
// the host passed) and hands the kernel the user part after it (GetUserWorkspace): `workspace`
// here is that user part, and the tiling's offsets are relative to it.
#pragma once

#include <type_traits>

#include "kernel_operator.h"
#include "kernel_copy.h"
#include "lib/matmul/matmul_intf.h"
#include "packed_attention_bwd_tiling.h"

namespace pangu_fastkd_ascend {

using namespace AscendC;

// What both passes share: the GM tensors, the UB buffers of the P / dS step, the score Matmul.
template <class TIn>
class PackedAttentionBwdBase {
 public:
  // Row-major A, transposed B ([keys, D] in memory), f32 C: S = Q K^T and dP = dO V^T.
  using InA = MatmulType<TPosition::GM, CubeFormat::ND, TIn>;
  using InBT = MatmulType<TPosition::GM, CubeFormat::ND, TIn, true>;
  using InAT = MatmulType<TPosition::GM, CubeFormat::ND, TIn, true>;
  using InB = MatmulType<TPosition::GM, CubeFormat::ND, TIn>;
  using OutF = MatmulType<TPosition::GM, CubeFormat::ND, float>;
  static constexpr bool kIsF32 = std::is_same_v<TIn, float>;
  static_assert(std::is_same_v<TIn, float> || std::is_same_v<TIn, bfloat16_t> ||
                    std::is_same_v<TIn, half>,
                "q, k, v, grad_out, out are float, bfloat16_t or half (PackedAttentionDtype)");

 protected:
  // Stands in for -inf in the causal mask: scale * s - 1e30 - lse is -1e30 in f32, exp gives 0.
  static constexpr float kNegBig = -1.0e30f;
  // The largest finite half.
  static constexpr float kHalfMax = 65504.0f;

  // f32 -> TIn (bf16 or half) of n elements; half saturates at +-65504 instead of rounding to inf.
  __aicore__ inline void CastDown(LocalTensor<TIn>& dst, LocalTensor<float>& src, int32_t n) {
    if constexpr (std::is_same_v<TIn, half>) {
      Mins(src, src, kHalfMax, n);
      Maxs(src, src, -kHalfMax, n);
    }
    Cast(dst, src, RoundMode::CAST_RINT, n);
  }

  __aicore__ inline void InitCommon(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR lse,
                                    GM_ADDR cuSeqlens, GM_ADDR workspace,
                                    const PackedAttentionBwdTiling& tiling, TPipe* pipe) {
    t_ = tiling;
    pipe_ = pipe;
    const uint64_t T = t_.tokens;
    const uint32_t D = t_.headDim;
    doGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(gradOut), T * t_.qHeads * D);
    qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(q), T * t_.qHeads * D);
    kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(k), T * t_.kvHeads * D);
    vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(v), T * t_.kvHeads * D);
    lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), T * t_.qHeads);
    cuGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuSeqlens), t_.docs + 1u);
    deltaGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(workspace + t_.deltaOffset),
                             T * t_.qHeads);
    // This vector core's slot: sized exactly, so a stray access trips the twin's gm-bounds rule.
    GM_ADDR slot = workspace + t_.slotOffset + uint64_t(GetBlockIdx()) * t_.slotBytes;
    const uint64_t square = uint64_t(t_.tile) * t_.tile;
    const uint64_t rowTile = uint64_t(t_.tile) * D;
    sWs_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(slot + t_.sOffset), square);
    dpWs_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(slot + t_.dpOffset), square);
    pWs_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(slot + t_.pOffset), square);
    dsWs_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(slot + t_.dsOffset), square);
    if constexpr (!kIsF32) {
      accWs_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(slot + t_.accOffset), rowTile);
      acc2Ws_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(slot + t_.acc2Offset), rowTile);
    }
  }

  // The buffers CommonUbBytes counts, `outTiles` of them in the output queue.
  __aicore__ inline void InitCommonBuffers(uint32_t outTiles) {
    const uint32_t tile = t_.tile;
    const uint32_t square = tile * tile;
    pipe_->InitBuffer(sQue_, 1, square * sizeof(float));
    pipe_->InitBuffer(dpQue_, 1, square * sizeof(float));
    pipe_->InitBuffer(outQue_, outTiles, square * sizeof(TIn));
    pipe_->InitBuffer(maskBuf_, square * sizeof(float));
    pipe_->InitBuffer(statsBuf_, tile * 2u * sizeof(float));
    if constexpr (!kIsF32) {
      pipe_->InitBuffer(accQue_, 1, tile * t_.headDim * sizeof(float));
      pipe_->InitBuffer(gradQue_, 1, tile * t_.headDim * sizeof(TIn));
    }
    // Additive causal mask of a diagonal tile: 0 where key j <= query i, kNegBig after. Built
    // once by the scalar unit; the vector unit adds it to the scores.
    LocalTensor<float> mask = maskBuf_.Get<float>();
    for (uint32_t i = 0; i < tile; ++i) {
      for (uint32_t j = 0; j < tile; ++j) mask.SetValue(i * tile + j, j <= i ? 0.0f : kNegBig);
    }
    ScalarToVector();
  }

  __aicore__ inline void VectorToScalar() {
    SetFlag<HardEvent::V_S>(EVENT_ID0);
    WaitFlag<HardEvent::V_S>(EVENT_ID0);
  }
  __aicore__ inline void ScalarToVector() {
    SetFlag<HardEvent::S_V>(EVENT_ID1);
    WaitFlag<HardEvent::S_V>(EVENT_ID1);
  }
  // GM written by MTE3 (P, dS, delta) is complete before the scalar unit sends the next Matmul
  // message (the cube reads that GM) or rewrites the UB MTE3 was reading.
  __aicore__ inline void Mte3ToScalar() {
    SetFlag<HardEvent::MTE3_S>(EVENT_ID3);
    WaitFlag<HardEvent::MTE3_S>(EVENT_ID3);
  }
  // Row statistics copied in by MTE2 before the scalar unit reads them.
  __aicore__ inline void Mte2ToScalar() {
    SetFlag<HardEvent::MTE2_S>(EVENT_ID4);
    WaitFlag<HardEvent::MTE2_S>(EVENT_ID4);
  }

  // rows x keys block of `heads`-strided rows: operand offset of (token, head) in q/dO or k/v.
  __aicore__ inline uint64_t Row(uint32_t token, uint32_t heads, uint32_t head) const {
    return (uint64_t(token) * heads + head) * t_.headDim;
  }

  // dst [rows, keys] f32 (pitch tile) = a_rows . b_rows^T, a from q or dO (query head h at token
  // q0), b from k or v (kv head g at token k0): S or dP on the cube.
  template <class MM>
  __aicore__ inline void ScoreProduct(MM& mm, const GlobalTensor<TIn>& a, uint32_t h, uint32_t q0,
                                      uint32_t rows, const GlobalTensor<TIn>& b, uint32_t g,
                                      uint32_t k0, uint32_t keys,
                                      const GlobalTensor<float>& dst) {
    const int32_t D = static_cast<int32_t>(t_.headDim);
    mm.SetOrgShape(static_cast<int32_t>(rows), static_cast<int32_t>(keys),
                   static_cast<int32_t>(t_.qHeads) * D, static_cast<int32_t>(t_.kvHeads) * D,
                   static_cast<int32_t>(t_.tile));
    mm.SetSingleShape(static_cast<int32_t>(rows), static_cast<int32_t>(keys), D);
    mm.SetTensorA(a[Row(q0, t_.qHeads, h)]);
    mm.SetTensorB(b[Row(k0, t_.kvHeads, g)], true);
    mm.IterateAll(dst);
    mm.End();  // the next product may use another Matmul object
  }

  // Loads lse (and, when `loadDelta`, delta) of query head h, rows q0 .. q0 + rows into the
  // statistics buffer: lse at 0, delta at tile.
  __aicore__ inline void LoadRowStats(uint32_t h, uint32_t q0, uint32_t rows, bool loadDelta) {
    LocalTensor<float> stats = statsBuf_.Get<float>();
    DataCopyExtParams params{1, rows * static_cast<uint32_t>(sizeof(float)), 0, 0, 0};
    DataCopyPadExtParams<float> pad{false, 0, 0, 0.0f};
    const uint64_t at = uint64_t(h) * t_.tokens + q0;
    DataCopyPad(stats, lseGm_[at], params, pad);
    if (loadDelta) DataCopyPad(stats[t_.tile], deltaGm_[at], params, pad);
    Mte2ToScalar();
  }

  // From S and dP [rows, keys] f32 in the workspace and the row statistics: dS (and P when
  // `writeP`) [rows, keys] in the input dtype, back to the workspace for the cube.
  __aicore__ inline void SoftmaxGrad(bool diagonal, uint32_t rows, uint32_t keys, bool writeP) {
    const uint32_t tile = t_.tile;
    const int32_t n = static_cast<int32_t>(rows * tile);  // whole rows; pad columns are unused
    const int32_t nk = static_cast<int32_t>(keys);
    LocalTensor<float> s = sQue_.template AllocTensor<float>();
    CopyScoresIn(s, sWs_, rows, keys);
    sQue_.EnQue(s);
    LocalTensor<float> dp = dpQue_.template AllocTensor<float>();
    CopyScoresIn(dp, dpWs_, rows, keys);
    dpQue_.EnQue(dp);
    LocalTensor<float> stats = statsBuf_.Get<float>();

    s = sQue_.template DeQue<float>();
    Muls(s, s, t_.scale, n);
    if (diagonal) Add(s, s, maskBuf_.Get<float>(), n);
    for (uint32_t i = 0; i < rows; ++i) Adds(s[i * tile], s[i * tile], -stats.GetValue(i), nk);
    Exp(s, s, n);  // P in f32: dS below uses it unrounded
    if (writeP) {
      // Two output buffers: P's copy out overlaps the dS arithmetic.
      LocalTensor<TIn> pOut = outQue_.template AllocTensor<TIn>();
      if constexpr (kIsF32) {
        DataCopy(pOut, s, static_cast<uint32_t>(n));
      } else {
        Cast(pOut, s, RoundMode::CAST_RINT, n);
      }
      outQue_.EnQue(pOut);
      pOut = outQue_.template DeQue<TIn>();
      CopyTileOut(pWs_, pOut, rows, keys);
      outQue_.FreeTensor(pOut);
    }

    dp = dpQue_.template DeQue<float>();
    for (uint32_t i = 0; i < rows; ++i) {
      Adds(dp[i * tile], dp[i * tile], -stats.GetValue(tile + i), nk);
    }
    Mul(dp, s, dp, n);  // P (f32) * (dP - delta)
    LocalTensor<TIn> dsOut = outQue_.template AllocTensor<TIn>();
    if constexpr (kIsF32) {
      Muls(dsOut, dp, t_.scale, n);
    } else {
      Muls(dp, dp, t_.scale, n);
      CastDown(dsOut, dp, n);
    }
    sQue_.FreeTensor(s);
    dpQue_.FreeTensor(dp);
    outQue_.EnQue(dsOut);
    dsOut = outQue_.template DeQue<TIn>();
    CopyTileOut(dsWs_, dsOut, rows, keys);
    outQue_.FreeTensor(dsOut);
    Mte3ToScalar();
  }

  // [rows, keys] f32 with GM pitch tile -> UB with pitch tile (rows 32-byte aligned).
  __aicore__ inline void CopyScoresIn(LocalTensor<float>& dst, const GlobalTensor<float>& src,
                                      uint32_t rows, uint32_t keys) {
    const uint32_t tile = t_.tile;
    const uint32_t rowBytes = keys * static_cast<uint32_t>(sizeof(float));
    const uint32_t ubRow = (rowBytes + 31u) / 32u * 32u;
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes,
                             (tile - keys) * static_cast<uint32_t>(sizeof(float)),
                             (tile * static_cast<uint32_t>(sizeof(float)) - ubRow) / 32u, 0};
    DataCopyPad(dst, src, params, DataCopyPadExtParams<float>{false, 0, 0, 0.0f});
  }

  // UB [rows, keys] with pitch tile -> GM with pitch tile.
  __aicore__ inline void CopyTileOut(const GlobalTensor<TIn>& dst, const LocalTensor<TIn>& src,
                                     uint32_t rows, uint32_t keys) {
    const uint32_t tile = t_.tile;
    const uint32_t rowBytes = keys * static_cast<uint32_t>(sizeof(TIn));
    const uint32_t ubRow = (rowBytes + 31u) / 32u * 32u;
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes,
                             (tile * static_cast<uint32_t>(sizeof(TIn)) - ubRow) / 32u,
                             (tile - keys) * static_cast<uint32_t>(sizeof(TIn)), 0};
    DataCopyPadBits(dst, src, params);
  }

  // bf16 / fp16 only: the f32 accumulator [rows, D] in the workspace, cast once, to `rows` rows of
  // head `head` of a [T, heads, D] gradient.
  __aicore__ inline void AccumulatorOut(const GlobalTensor<float>& acc,
                                        const GlobalTensor<TIn>& grad, uint32_t heads,
                                        uint32_t head, uint32_t token, uint32_t rows) {
    const uint32_t D = t_.headDim;
    LocalTensor<float> a = accQue_.template AllocTensor<float>();
    DataCopy(a, acc, rows * D);  // D is a multiple of 16: whole 32-byte blocks
    accQue_.EnQue(a);
    a = accQue_.template DeQue<float>();
    LocalTensor<TIn> g = gradQue_.template AllocTensor<TIn>();
    CastDown(g, a, static_cast<int32_t>(rows * D));
    accQue_.FreeTensor(a);
    gradQue_.EnQue(g);
    g = gradQue_.template DeQue<TIn>();
    const uint32_t rowBytes = D * static_cast<uint32_t>(sizeof(TIn));
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes, 0, (heads - 1u) * rowBytes,
                             0};
    DataCopyPadBits(grad[Row(token, heads, head)], g, params);
    gradQue_.FreeTensor(g);
  }

  PackedAttentionBwdTiling t_{};
  TPipe* pipe_ = nullptr;  // the kernel's, declared beside the op (and REGIST) by the entry
  TQue<TPosition::VECIN, 1> sQue_;
  TQue<TPosition::VECIN, 1> dpQue_;
  TQue<TPosition::VECOUT, 2> outQue_;     // dS (and P): input dtype, pitch tile
  TQue<TPosition::VECIN, 1> accQue_;      // bf16 / fp16: f32 gradient accumulator rows
  TQue<TPosition::VECOUT, 1> gradQue_;    // bf16 / fp16: the same rows cast
  TBuf<TPosition::VECCALC> maskBuf_;      // causal mask [tile, tile] f32
  TBuf<TPosition::VECCALC> statsBuf_;     // lse [tile], delta [tile]
  GlobalTensor<TIn> doGm_, qGm_, kGm_, vGm_;
  GlobalTensor<float> lseGm_, deltaGm_;
  GlobalTensor<int32_t> cuGm_;
  GlobalTensor<float> sWs_, dpWs_, accWs_, acc2Ws_;
  GlobalTensor<TIn> pWs_, dsWs_;
};

// Pass 1: delta and dQ. Items (document, query head, query tile), dealt round-robin to blocks.
template <class TIn>
class PackedAttentionBwdDq : public PackedAttentionBwdBase<TIn> {
  using Base = PackedAttentionBwdBase<TIn>;
  using typename Base::InA;
  using typename Base::InB;
  using typename Base::InBT;
  using typename Base::OutF;
  using Base::kIsF32;
  using Base::t_;

 public:
  // Public because REGIST_MATMUL_OBJ names them in the kernel's own scope, before Init
  // (packed_attention_bwd_dq below).
  Matmul<InA, InBT, OutF> scoreMm_;
  Matmul<InA, InB, OutF> dqMm_;

  __aicore__ inline void Init(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR out,
                              GM_ADDR lse, GM_ADDR cuSeqlens, GM_ADDR gradQ, GM_ADDR workspace,
                              const PackedAttentionBwdTiling& tiling, TPipe* pipe) {
    this->InitCommon(gradOut, q, k, v, lse, cuSeqlens, workspace, tiling, pipe);
    const uint64_t qElems = uint64_t(t_.tokens) * t_.qHeads * t_.headDim;
    oGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(out), qElems);
    gradQGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(gradQ), qElems);
    // Exactly what PackedAttentionBwdDqUbBytes counts.
    this->InitCommonBuffers(1u);
    const uint32_t rowTile = t_.tile * t_.headDim;
    this->pipe_->InitBuffer(doQue_, 1, rowTile * sizeof(TIn));
    this->pipe_->InitBuffer(oQue_, 1, rowTile * sizeof(TIn));
    const uint32_t products = kIsF32 ? 1u : 2u;
    this->pipe_->InitBuffer(deltaBuf_, (products * rowTile + t_.tile * 8u + t_.headDim) *
                                          static_cast<uint32_t>(sizeof(float)));
  }

  __aicore__ inline void Process() {
    // Items go to the vector cores: GetBlockNum() counts cube cores in MIX mode (see the fwd).
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum() * GetTaskRation());
    const uint32_t blockIdx = static_cast<uint32_t>(GetBlockIdx());
    const uint32_t tile = t_.tile;
    uint32_t item = 0;
    for (uint32_t b = 0; b < t_.docs; ++b) {
      const uint32_t start = static_cast<uint32_t>(this->cuGm_.GetValue(b));
      const uint32_t end = static_cast<uint32_t>(this->cuGm_.GetValue(b + 1u));
      for (uint32_t h = 0; h < t_.qHeads; ++h) {
        for (uint32_t q0 = start; q0 < end; q0 += tile, ++item) {
          if (item % blockNum != blockIdx) continue;
          ProcessItem(start, h, q0, end - q0 < tile ? end - q0 : tile);
        }
      }
    }
  }

 private:
  __aicore__ inline void ProcessItem(uint32_t docStart, uint32_t h, uint32_t q0, uint32_t rows) {
    const uint32_t tile = t_.tile;
    const uint32_t g = h / (t_.qHeads / t_.kvHeads);
    this->LoadRowStats(h, q0, rows, false);
    Delta(h, q0, rows);
    // fp32 accumulates into grad_q itself (row stride Hq * D); bf16 into the f32 workspace.
    const int32_t D = static_cast<int32_t>(t_.headDim);
    GlobalTensor<float> acc;
    int32_t accPitch = D;
    if constexpr (kIsF32) {
      acc = gradQGm_[this->Row(q0, t_.qHeads, h)];
      accPitch = static_cast<int32_t>(t_.qHeads) * D;
    } else {
      acc = this->accWs_;
    }
    for (uint32_t k0 = docStart; k0 <= q0; k0 += tile) {
      const bool diagonal = k0 == q0;
      const uint32_t keys = diagonal ? rows : tile;
      this->ScoreProduct(scoreMm_, this->qGm_, h, q0, rows, this->kGm_, g, k0, keys, this->sWs_);
      this->ScoreProduct(scoreMm_, this->doGm_, h, q0, rows, this->vGm_, g, k0, keys,
                         this->dpWs_);
      this->SoftmaxGrad(diagonal, rows, keys, false);
      // dQ (+)= dS [rows, keys] (pitch tile) x K [keys, D] (row stride Hkv * D).
      dqMm_.SetOrgShape(static_cast<int32_t>(rows), static_cast<int32_t>(t_.kvHeads) * D,
                        static_cast<int32_t>(tile), static_cast<int32_t>(tile), accPitch);
      dqMm_.SetSingleShape(static_cast<int32_t>(rows), D, static_cast<int32_t>(keys));
      dqMm_.SetTensorA(this->dsWs_);
      dqMm_.SetTensorB(this->kGm_[this->Row(k0, t_.kvHeads, g)]);
      dqMm_.IterateAll(acc, k0 == docStart ? 0 : 1);  // the first key tile writes, later ones add
      dqMm_.End();
    }
    if constexpr (!kIsF32) this->AccumulatorOut(this->accWs_, gradQGm_, t_.qHeads, h, q0, rows);
  }

  // delta_i = dO_i . O_i (f32) into the statistics (at tile) and to the workspace [h, q0 ..].
  __aicore__ inline void Delta(uint32_t h, uint32_t q0, uint32_t rows) {
    const uint32_t D = t_.headDim;
    const uint32_t tile = t_.tile;
    const uint32_t rowTile = tile * D;
    const uint32_t rowBytes = D * static_cast<uint32_t>(sizeof(TIn));
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes, (t_.qHeads - 1u) * rowBytes,
                             0, 0};
    LocalTensor<TIn> dO = doQue_.template AllocTensor<TIn>();
    DataCopyPadBits(dO, this->doGm_[this->Row(q0, t_.qHeads, h)], params);
    doQue_.EnQue(dO);
    LocalTensor<TIn> o = oQue_.template AllocTensor<TIn>();
    DataCopyPadBits(o, oGm_[this->Row(q0, t_.qHeads, h)], params);
    oQue_.EnQue(o);
    dO = doQue_.template DeQue<TIn>();
    o = oQue_.template DeQue<TIn>();

    LocalTensor<float> scratch = deltaBuf_.Get<float>();
    const uint32_t products = kIsF32 ? 1u : 2u;
    LocalTensor<float> prod = scratch;
    LocalTensor<float> sums = scratch[products * rowTile];  // one sum every 8 floats (32 bytes)
    LocalTensor<float> work = scratch[products * rowTile + tile * 8u];
    const int32_t n = static_cast<int32_t>(rows * D);
    if constexpr (kIsF32) {
      Mul(prod, dO, o, n);
    } else {
      LocalTensor<float> of = scratch[rowTile];
      Cast(prod, dO, RoundMode::CAST_NONE, n);
      Cast(of, o, RoundMode::CAST_NONE, n);
      Mul(prod, prod, of, n);
    }
    doQue_.FreeTensor(dO);
    oQue_.FreeTensor(o);
    for (uint32_t i = 0; i < rows; ++i) {
      ReduceSum(sums[i * 8u], prod[i * D], work, static_cast<int32_t>(D));
    }
    this->VectorToScalar();
    LocalTensor<float> stats = this->statsBuf_.template Get<float>();
    for (uint32_t i = 0; i < rows; ++i) stats.SetValue(tile + i, sums.GetValue(i * 8u));
    SetFlag<HardEvent::S_MTE3>(EVENT_ID2);
    WaitFlag<HardEvent::S_MTE3>(EVENT_ID2);
    DataCopyExtParams out{1, rows * static_cast<uint32_t>(sizeof(float)), 0, 0, 0};
    DataCopyPad(this->deltaGm_[uint64_t(h) * t_.tokens + q0], stats[tile], out);
    this->Mte3ToScalar();  // the next item rewrites the statistics
  }

  TQue<TPosition::VECIN, 1> doQue_;
  TQue<TPosition::VECIN, 1> oQue_;
  TBuf<TPosition::VECCALC> deltaBuf_;  // products [tile * D] (x2 for bf16), sums, work [D]
  GlobalTensor<TIn> oGm_, gradQGm_;
};

// Pass 2: dK and dV. Items (document, kv head, key tile), dealt round-robin to blocks.
template <class TIn>
class PackedAttentionBwdDkv : public PackedAttentionBwdBase<TIn> {
  using Base = PackedAttentionBwdBase<TIn>;
  using typename Base::InA;
  using typename Base::InAT;
  using typename Base::InB;
  using typename Base::InBT;
  using typename Base::OutF;
  using Base::kIsF32;
  using Base::t_;

 public:
  // Public because REGIST_MATMUL_OBJ names them in the kernel's own scope, before Init
  // (packed_attention_bwd_dkv below).
  Matmul<InA, InBT, OutF> scoreMm_;
  Matmul<InAT, InB, OutF> dkvMm_;

  __aicore__ inline void Init(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR lse,
                              GM_ADDR cuSeqlens, GM_ADDR gradK, GM_ADDR gradV, GM_ADDR workspace,
                              const PackedAttentionBwdTiling& tiling, TPipe* pipe) {
    this->InitCommon(gradOut, q, k, v, lse, cuSeqlens, workspace, tiling, pipe);
    const uint64_t kvElems = uint64_t(t_.tokens) * t_.kvHeads * t_.headDim;
    gradKGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(gradK), kvElems);
    gradVGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(gradV), kvElems);
    this->InitCommonBuffers(2u);  // exactly what PackedAttentionBwdDkvUbBytes counts
  }

  __aicore__ inline void Process() {
    // Items go to the vector cores: GetBlockNum() counts cube cores in MIX mode (see the fwd).
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum() * GetTaskRation());
    const uint32_t blockIdx = static_cast<uint32_t>(GetBlockIdx());
    const uint32_t tile = t_.tile;
    uint32_t item = 0;
    for (uint32_t b = 0; b < t_.docs; ++b) {
      const uint32_t start = static_cast<uint32_t>(this->cuGm_.GetValue(b));
      const uint32_t end = static_cast<uint32_t>(this->cuGm_.GetValue(b + 1u));
      for (uint32_t g = 0; g < t_.kvHeads; ++g) {
        for (uint32_t k0 = start; k0 < end; k0 += tile, ++item) {
          if (item % blockNum != blockIdx) continue;
          ProcessItem(end, g, k0, end - k0 < tile ? end - k0 : tile);
        }
      }
    }
  }

 private:
  __aicore__ inline void ProcessItem(uint32_t docEnd, uint32_t g, uint32_t k0, uint32_t keys) {
    const uint32_t tile = t_.tile;
    const uint32_t group = t_.qHeads / t_.kvHeads;
    const int32_t D = static_cast<int32_t>(t_.headDim);
    // fp32 accumulates into grad_k / grad_v (row stride Hkv * D); bf16 into f32 workspace.
    GlobalTensor<float> dkAcc, dvAcc;
    int32_t accPitch = D;
    if constexpr (kIsF32) {
      dkAcc = gradKGm_[this->Row(k0, t_.kvHeads, g)];
      dvAcc = gradVGm_[this->Row(k0, t_.kvHeads, g)];
      accPitch = static_cast<int32_t>(t_.kvHeads) * D;
    } else {
      dkAcc = this->accWs_;
      dvAcc = this->acc2Ws_;
    }
    bool first = true;
    for (uint32_t h = g * group; h < (g + 1u) * group; ++h) {
      for (uint32_t q0 = k0; q0 < docEnd; q0 += tile) {
        const uint32_t rows = docEnd - q0 < tile ? docEnd - q0 : tile;
        const bool diagonal = q0 == k0;
        this->LoadRowStats(h, q0, rows, true);
        this->ScoreProduct(scoreMm_, this->qGm_, h, q0, rows, this->kGm_, g, k0, keys,
                           this->sWs_);
        this->ScoreProduct(scoreMm_, this->doGm_, h, q0, rows, this->vGm_, g, k0, keys,
                           this->dpWs_);
        this->SoftmaxGrad(diagonal, rows, keys, true);
        const uint8_t atomic = first ? 0 : 1;  // the first product writes, later ones add
        // dV (+)= P^T dO and dK (+)= dS^T Q: A is P / dS stored [rows, keys] (pitch tile) read
        // transposed, B the dO / q rows of head h (row stride Hq * D).
        KeyProduct(this->pWs_, this->doGm_, h, q0, rows, keys, dvAcc, accPitch, atomic);
        KeyProduct(this->dsWs_, this->qGm_, h, q0, rows, keys, dkAcc, accPitch, atomic);
        first = false;
      }
    }
    if constexpr (!kIsF32) {
      this->AccumulatorOut(this->accWs_, gradKGm_, t_.kvHeads, g, k0, keys);
      this->AccumulatorOut(this->acc2Ws_, gradVGm_, t_.kvHeads, g, k0, keys);
    }
  }

  __aicore__ inline void KeyProduct(const GlobalTensor<TIn>& a, const GlobalTensor<TIn>& b,
                                    uint32_t h, uint32_t q0, uint32_t rows, uint32_t keys,
                                    const GlobalTensor<float>& acc, int32_t accPitch,
                                    uint8_t atomic) {
    const int32_t D = static_cast<int32_t>(t_.headDim);
    const int32_t tile = static_cast<int32_t>(t_.tile);
    // Transposed A is stored [K = rows, M = keys]: its row stride is orgM.
    dkvMm_.SetOrgShape(tile, static_cast<int32_t>(t_.qHeads) * D, tile, tile, accPitch);
    dkvMm_.SetSingleShape(static_cast<int32_t>(keys), D, static_cast<int32_t>(rows));
    dkvMm_.SetTensorA(a, true);
    dkvMm_.SetTensorB(b[this->Row(q0, t_.qHeads, h)]);
    dkvMm_.IterateAll(acc, atomic);
    dkvMm_.End();
  }

  GlobalTensor<TIn> gradKGm_, gradVGm_;
};

// grad_out, q, k, v, out [.., D] TIn; lse [Hq, T] f32; cu_seqlens [B + 1] int32 -> grad_q; the
// workspace's delta for the dK/dV pass. Launch with tiling.dqBlockDim blocks.
// A device function, not a kernel: the entry points in the .cpp beside this header are the
// `extern "C" __global__` kernels (one per dtype); the twin test drivers launch this directly.
template <class TIn>
__aicore__ inline void packed_attention_bwd_dq(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k,
                                                   GM_ADDR v, GM_ADDR out, GM_ADDR lse,
                                                   GM_ADDR cuSeqlens, GM_ADDR gradQ,
                                                   GM_ADDR workspace,
                                                   PackedAttentionBwdTiling tiling) {
  TPipe pipe;
  PackedAttentionBwdDq<TIn> op;
  // In the scope that owns the pipe and the op, as packed_attention_fwd explains.
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.scoreMm_, &tiling.scoreMm, op.dqMm_,
                    &tiling.dqMm);
  op.Init(gradOut, q, k, v, out, lse, cuSeqlens, gradQ, workspace, tiling, &pipe);
  op.Process();
}

// After packed_attention_bwd_dq on the same workspace: -> grad_k, grad_v. Launch with
// tiling.dkvBlockDim blocks.
// A device function, not a kernel: the entry points in the .cpp beside this header are the
// `extern "C" __global__` kernels (one per dtype); the twin test drivers launch this directly.
template <class TIn>
__aicore__ inline void packed_attention_bwd_dkv(GM_ADDR gradOut, GM_ADDR q, GM_ADDR k,
                                                    GM_ADDR v, GM_ADDR lse, GM_ADDR cuSeqlens,
                                                    GM_ADDR gradK, GM_ADDR gradV,
                                                    GM_ADDR workspace,
                                                    PackedAttentionBwdTiling tiling) {
  TPipe pipe;
  PackedAttentionBwdDkv<TIn> op;
  // In the scope that owns the pipe and the op, as packed_attention_fwd explains.
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.scoreMm_, &tiling.scoreMm, op.dkvMm_,
                    &tiling.dkvMm);
  op.Init(gradOut, q, k, v, lse, cuSeqlens, gradK, gradV, workspace, tiling, &pipe);
  op.Process();
}

}  // namespace pangu_fastkd_ascend
