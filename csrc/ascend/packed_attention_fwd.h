// Packed causal attention forward as an Ascend C MIX kernel: products on the cube unit through
// the Matmul high-level API, mask and online softmax on the vector unit.
//
// q [T, Hq, D], k/v [T, Hkv, D] (fp32, bf16 or fp16 in GM), documents laid end to end and
// delimited by cu_seqlens [B + 1] int32; query head h reads kv head h / G (G = Hq / Hkv). Writes
// out [T, Hq, D] in the input dtype and lse [Hq, T] fp32, the semantics of
// packed_attention_reference (causal, no window). Built against tests/ascend_twin/include it runs
// on CPU; it uses only the Ascend C API subset the twin emulates, so it is meant to compile
// unchanged with ascendc.
//
// Work split: every (document, kv head g, query tile of `tile` rows) is one work item; items are
// dealt round-robin to the blocks. The G query heads of the group are stacked head by head into
// one A matrix of M = G * rows rows (row r = j * rows + i is head g * G + j, token q0 + i), as
// the CPU kernel does: each K/V tile is read by the cube once per group, and M is G times taller.
// An item walks the key tiles of its document from the first key up to the diagonal tile
// (k0 = q0; tiles start at the document start, so every earlier tile is full and fully visible):
//   cube:   S = Qstack K^T                      (Matmul qk_, fp32 C in the GM workspace)
//   vector: S *= scale; on the diagonal tile keys after the query -> -1e30 (Select with a bit
//           mask built once); m' = max(m, rowmax S), P = exp(S - m'), a = exp(m - m'),
//           l = a l + rowsum P; P to the GM workspace in the input dtype
//   cube:   PV = P V                             (Matmul pv_, fp32 C in the GM workspace)
//   vector: O = a O + PV                         (fp32 accumulator in UB)
// At the end out = O / l and lse = m + ln(l). Every row has its diagonal key, so l > 0.
//
// Why GM for every cube operand: the Atlas 200I/500 A2 (310B) Matmul takes GM operands only, and
// the flash-attention operators of CANN pass S and P through a GM workspace in MIX mode too; one
// data path serves both chips. Q is staged once per item into a dense [M, D] workspace tile
// (the group's rows are not one uniform stride in q), K and V are read in place (row stride
// Hkv * D via the org shape). P is cast to the input dtype before the PV product, as flash
// attention does (A and B of one Matmul must share a type): for bf16 / fp16 this keeps V exact
// and costs one rounding of the probabilities, well inside twice the error of plain bf16 / fp16
// attention; the row sum l and the lse come from the fp32 P.
//
// fp16's range (largest finite value 65504) is safe at every step: the cube multiplies half
// operands into fp32 C, so S = Q K^T is never held in half; scale, mask, max, Exp and the sums run
// on fp32 (Exp on half would give 11-bit probabilities); P = exp(S - m) lies in [0, 1] (values
// below 2^-25 round to 0 in half, as in any fp16 flash attention, while l keeps their mass); O
// accumulates in fp32, and out = O / l is a convex combination of V rows, so |out| <= max |V|.
//
// Synchronisation: IterateAll is synchronous (it returns once C is in GM), so the vector unit
// reads S/PV after it returns; data the vector side writes to GM for the cube (stacked Q, P) is
// fenced with MTE3 -> S before the scalar unit issues the next Matmul call.
//
// Workspace: the host passes PackedAttentionWorkspaceBytes bytes, the system workspace the Matmul
// API uses (tiling.sysWorkspaceBytes, first), then the user part. The kernels are built with
// HAVE_WORKSPACE HAVE_TILING (cmake/ascend.cmake), so the launch wrapper CANN generates sets the
// system workspace (SetSysWorkspaceForce) and hands the kernel the user part (GetUserWorkspace:
// RESERVED_WORKSPACE, 16 MB, further on): `workspace` below is that user part. It holds one area of
// tiling.blockWorkspaceBytes per vector core (tiling.blockSlots), laid out by
// PackedAttentionBlockWorkspace (offsets in the tiling); no two vector cores share one.
#pragma once

#include <type_traits>

#include "kernel_operator.h"
#include "kernel_copy.h"
#include "lib/matmul/matmul_intf.h"
#include "packed_attention_tiling.h"

namespace pangu_fastkd_ascend {

using namespace AscendC;

template <class TIn>
class PackedAttentionFwd {
  static_assert(std::is_same_v<TIn, float> || std::is_same_v<TIn, bfloat16_t> ||
                    std::is_same_v<TIn, half>,
                "q, k, v are float, bfloat16_t or half (PackedAttentionDtype)");
  using AType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, TIn>;
  using KType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, TIn, /*ISTRANS=*/true>;
  using CType = matmul::MatmulType<TPosition::GM, CubeFormat::ND, float>;

 public:
  // q [T, Hq, D] TIn (tiling.dtype names TIn); k, v [T, Hkv, D] TIn; cuSeqlens [B + 1] int32
  // (validated by the host); out [T, Hq, D] TIn; lse [Hq, T] f32; workspace as described above.
  // The Matmul objects: public because REGIST_MATMUL_OBJ must name them in the kernel's own
  // scope (packed_attention_fwd below), before Init.
  matmul::Matmul<AType, KType, CType> qk_;  // S = Qstack K^T
  matmul::Matmul<AType, AType, CType> pv_;  // PV = P V

  // pipe: the kernel's TPipe, declared beside this object (and REGIST) in packed_attention_fwd.
  __aicore__ inline void Init(GM_ADDR q, GM_ADDR k, GM_ADDR v, GM_ADDR cuSeqlens, GM_ADDR out,
                              GM_ADDR lse, GM_ADDR workspace, const PackedAttentionTiling& tiling,
                              TPipe* pipe) {
    tiling_ = tiling;
    pipe_ = pipe;
    const uint64_t T = tiling.tokens;
    const uint32_t D = tiling.headDim;
    const uint32_t tile = tiling.tile;
    const uint32_t maxM = tiling.group * tile;
    qGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(q), T * tiling.qHeads * D);
    kGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(k), T * tiling.kvHeads * D);
    vGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(v), T * tiling.kvHeads * D);
    outGm_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(out), T * tiling.qHeads * D);
    lseGm_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(lse), T * tiling.qHeads);
    cuGm_.SetGlobalBuffer(reinterpret_cast<__gm__ int32_t*>(cuSeqlens), tiling.docs + 1u);

    // This block's scratch, after the system workspace.
    GM_ADDR mine = workspace + uint64_t(GetBlockIdx()) * tiling.blockWorkspaceBytes;
    wsQ_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(mine + tiling.wsQOffset), uint64_t(maxM) * D);
    wsS_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(mine + tiling.wsSOffset),
                         uint64_t(maxM) * tile);
    wsP_.SetGlobalBuffer(reinterpret_cast<__gm__ TIn*>(mine + tiling.wsPOffset),
                         uint64_t(maxM) * tile);
    wsO_.SetGlobalBuffer(reinterpret_cast<__gm__ float*>(mine + tiling.wsOOffset),
                         uint64_t(maxM) * D);

    // Exactly the buffers PackedAttentionUbBytes counts, in its order.
    pipe_->InitBuffer(sQueue_, 1, maxM * tile * sizeof(float));
    pipe_->InitBuffer(pQueue_, 1, maxM * tile * sizeof(TIn));
    pipe_->InitBuffer(pvQueue_, 1, maxM * D * sizeof(float));
    pipe_->InitBuffer(outQueue_, 1, maxM * D * sizeof(TIn));
    pipe_->InitBuffer(stageBuf_, maxM * D * sizeof(TIn));
    pipe_->InitBuffer(accBuf_, maxM * D * sizeof(float));
    pipe_->InitBuffer(maskBuf_, tile * tile / 8u);
    pipe_->InitBuffer(statsBuf_, (maxM * 13u + tile) * sizeof(float));
    BuildCausalMask();
  }

  __aicore__ inline void Process() {
    // Work goes to the vector cores: in MIX mode GetBlockNum() counts cube cores and each drives
    // GetTaskRation() vector cores, whose GetBlockIdx() runs over all of them.
    const uint32_t blockNum = static_cast<uint32_t>(GetBlockNum() * GetTaskRation());
    const uint32_t blockIdx = static_cast<uint32_t>(GetBlockIdx());
    const uint32_t tile = tiling_.tile;
    // Items in (document, kv head, query tile) order; this block takes every blockNum-th one.
    uint32_t item = 0;
    for (uint32_t b = 0; b < tiling_.docs; ++b) {
      const uint32_t start = static_cast<uint32_t>(cuGm_.GetValue(b));
      const uint32_t end = static_cast<uint32_t>(cuGm_.GetValue(b + 1u));
      for (uint32_t g = 0; g < tiling_.kvHeads; ++g) {
        for (uint32_t q0 = start; q0 < end; q0 += tile, ++item) {
          if (item % blockNum != blockIdx) continue;
          const uint32_t rows = end - q0 < tile ? end - q0 : tile;
          ProcessItem(start, g, q0, rows);
        }
      }
    }
  }

 private:
  static constexpr uint32_t kRed = 8;  // reduction results land 32 bytes apart (aligned dst)
  // Stands in for -inf: the initial running max and the masked scores; exp(kNegBig - m) is 0.
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
  // GM written by MTE3 (stacked Q, P) is complete before the scalar unit sends the cube the
  // Matmul call that reads it.
  __aicore__ inline void Mte3ToCube() {
    SetFlag<HardEvent::MTE3_S>(EVENT_ID2);
    WaitFlag<HardEvent::MTE3_S>(EVENT_ID2);
  }

  // Statistics layout (floats): running max [maxM], running sum [maxM], alpha [maxM],
  // ln(sum) [maxM], lse in head slots of `tile` [maxM], reductions [maxM x 8], work [tile].
  __aicore__ inline LocalTensor<float> Stat(uint32_t which) {
    return statsBuf_.Get<float>()[which * tiling_.group * tiling_.tile];
  }
  __aicore__ inline LocalTensor<float> Reductions() { return Stat(5); }
  __aicore__ inline LocalTensor<float> Work() {
    return statsBuf_.Get<float>()[13u * tiling_.group * tiling_.tile];
  }

  // Bit c of row i (bit i * tile + c) is set when key c may be seen by query i of a diagonal
  // tile (c <= i). Rows are tile / 8 whole bytes, so the mask of a head's [rows, tile] block of
  // S (row pitch tile) is its first rows * tile bits. Built once by the scalar unit.
  __aicore__ inline void BuildCausalMask() {
    const uint32_t tile = tiling_.tile;
    LocalTensor<uint8_t> mask = maskBuf_.Get<uint8_t>();
    for (uint32_t i = 0; i < tile; ++i) {
      for (uint32_t byte = 0; byte < tile / 8u; ++byte) {
        uint32_t bits = 0;
        for (uint32_t c = 0; c < 8u; ++c) {
          if (byte * 8u + c <= i) bits |= 1u << c;
        }
        mask.SetValue(i * (tile / 8u) + byte, static_cast<uint8_t>(bits));
      }
    }
    ScalarToVector();
  }

  // The group's query rows, head by head, from strided q into the dense [M, D] workspace tile
  // the cube reads as A (GM -> UB with one strided DataCopyPad per head, UB -> GM in one copy).
  __aicore__ inline void StageQ(uint32_t g, uint32_t q0, uint32_t rows) {
    const uint32_t D = tiling_.headDim;
    const uint32_t G = tiling_.group;
    const uint32_t rowBytes = D * sizeof(TIn);
    LocalTensor<TIn> stage = stageBuf_.Get<TIn>();
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes,
                             (tiling_.qHeads - 1u) * rowBytes, 0, 0};
    for (uint32_t j = 0; j < G; ++j) {
      DataCopyPadBits(stage[j * rows * D],
                      qGm_[(uint64_t(q0) * tiling_.qHeads + g * G + j) * D], params);
    }
    SetFlag<HardEvent::MTE2_MTE3>(EVENT_ID3);
    WaitFlag<HardEvent::MTE2_MTE3>(EVENT_ID3);
    DataCopy(wsQ_, stage, G * rows * D);  // D * sizeof(TIn) is whole 32-byte blocks
    // The next item's copy into the staging tile waits for this one to leave it.
    SetFlag<HardEvent::MTE3_MTE2>(EVENT_ID4);
    WaitFlag<HardEvent::MTE3_MTE2>(EVENT_ID4);
    Mte3ToCube();
  }

  __aicore__ inline void ProcessItem(uint32_t docStart, uint32_t g, uint32_t q0, uint32_t rows) {
    const uint32_t D = tiling_.headDim;
    const uint32_t tile = tiling_.tile;
    const uint32_t M = tiling_.group * rows;
    StageQ(g, q0, rows);

    LocalTensor<float> rowMax = Stat(0);
    LocalTensor<float> rowSum = Stat(1);
    VectorToScalar();  // the previous item's vector ops on the statistics are done
    for (uint32_t r = 0; r < M; ++r) {
      rowMax.SetValue(r, kNegBig);
      rowSum.SetValue(r, 0.0f);
    }
    Duplicate(accBuf_.Get<float>(), 0.0f, static_cast<int32_t>(M * D));  // fresh UB is NaN

    for (uint32_t k0 = docStart; k0 <= q0; k0 += tile) {
      const bool diagonal = k0 == q0;
      const uint32_t keys = diagonal ? rows : tile;  // every tile before the diagonal is full
      const uint64_t kvOffset = (uint64_t(k0) * tiling_.kvHeads + g) * D;

      // S [M, keys] = Qstack [M, D] x K[k0 : k0 + keys]^T, written with row pitch `tile`.
      qk_.SetOrgShape(M, keys, D, tiling_.kvHeads * D, tile);
      qk_.SetSingleShape(M, keys, D);
      qk_.SetTensorA(wsQ_);
      qk_.SetTensorB(kGm_[kvOffset], true);
      qk_.IterateAll(wsS_);
      qk_.End();

      Softmax(M, rows, keys, diagonal);

      // PV [M, D] = P [M, keys] x V[k0 : k0 + keys], written densely (row pitch D).
      pv_.SetOrgShape(M, tiling_.kvHeads * D, tile, keys, D);
      pv_.SetSingleShape(M, D, keys);
      pv_.SetTensorA(wsP_);
      pv_.SetTensorB(vGm_[kvOffset]);
      pv_.IterateAll(wsO_);
      pv_.End();

      Accumulate(M);
    }
    Finish(g, q0, rows);
  }

  // Online-softmax step over the S tile in the workspace; leaves P (input dtype) in the
  // workspace for the PV product and alpha = exp(m_old - m_new) per row in the statistics.
  __aicore__ inline void Softmax(uint32_t M, uint32_t rows, uint32_t keys, bool diagonal) {
    const uint32_t tile = tiling_.tile;
    const int32_t block = static_cast<int32_t>(M * tile);
    LocalTensor<float> s = sQueue_.template AllocTensor<float>();
    DataCopy(s, wsS_, M * tile);  // tile is a multiple of 8: whole 32-byte blocks
    sQueue_.EnQue(s);
    s = sQueue_.template DeQue<float>();
    Muls(s, s, tiling_.scale, block);
    if (diagonal) {
      // Keys after the query, and the columns [keys, tile) the cube did not write (stale
      // workspace, possibly NaN), are all above the diagonal: the mask replaces them.
      LocalTensor<uint8_t> mask = maskBuf_.Get<uint8_t>();
      for (uint32_t j = 0; j < tiling_.group; ++j) {
        Select(s[j * rows * tile], mask, s[j * rows * tile], kNegBig,
               SELMODE::VSEL_TENSOR_SCALAR_MODE, rows * tile);
      }
    }
    LocalTensor<float> rowMax = Stat(0);
    LocalTensor<float> rowSum = Stat(1);
    LocalTensor<float> alpha = Stat(2);
    LocalTensor<float> red = Reductions();
    LocalTensor<float> work = Work();
    for (uint32_t r = 0; r < M; ++r) {
      ReduceMax(red[r * kRed], s[r * tile], work, static_cast<int32_t>(keys));
    }
    VectorToScalar();
    for (uint32_t r = 0; r < M; ++r) {
      const float mOld = rowMax.GetValue(r);
      const float tileMax = red.GetValue(r * kRed);
      const float mNew = tileMax > mOld ? tileMax : mOld;
      rowMax.SetValue(r, mNew);
      alpha.SetValue(r, mOld - mNew);
      Adds(s[r * tile], s[r * tile], -mNew, static_cast<int32_t>(tile));
    }
    ScalarToVector();
    Exp(alpha, alpha, static_cast<int32_t>(M));
    LocalTensor<TIn> p = pQueue_.template AllocTensor<TIn>();
    LocalTensor<float> pf;
    if constexpr (std::is_same_v<TIn, float>) {
      Exp(p, s, block);
      pf = p;
    } else {
      Exp(s, s, block);  // fp32 before the cast: bf16 has no Exp, half's is 11 bits
      pf = s;
    }
    for (uint32_t r = 0; r < M; ++r) {
      ReduceSum(red[r * kRed], pf[r * tile], work, static_cast<int32_t>(keys));
    }
    if constexpr (!std::is_same_v<TIn, float>) Cast(p, s, RoundMode::CAST_RINT, M * tile);
    VectorToScalar();
    for (uint32_t r = 0; r < M; ++r) {
      rowSum.SetValue(r, alpha.GetValue(r) * rowSum.GetValue(r) + red.GetValue(r * kRed));
    }
    sQueue_.FreeTensor(s);
    pQueue_.EnQue(p);
    p = pQueue_.template DeQue<TIn>();
    // Byte exact: M * tile elements of 2 bytes need not be whole 32-byte blocks.
    DataCopyExtParams params{1, M * tile * static_cast<uint32_t>(sizeof(TIn)), 0, 0, 0};
    DataCopyPadBits(wsP_, p, params);
    pQueue_.FreeTensor(p);
    Mte3ToCube();
  }

  // O = alpha O + PV, per stacked row.
  __aicore__ inline void Accumulate(uint32_t M) {
    const uint32_t D = tiling_.headDim;
    LocalTensor<float> pv = pvQueue_.template AllocTensor<float>();
    DataCopy(pv, wsO_, M * D);
    pvQueue_.EnQue(pv);
    pv = pvQueue_.template DeQue<float>();
    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> alpha = Stat(2);
    for (uint32_t r = 0; r < M; ++r) {
      Muls(acc[r * D], acc[r * D], alpha.GetValue(r), static_cast<int32_t>(D));
    }
    Add(acc, acc, pv, static_cast<int32_t>(M * D));
    pvQueue_.FreeTensor(pv);
  }

  // out = O / l in the input dtype, lse = m + ln(l), both copied to GM head by head.
  __aicore__ inline void Finish(uint32_t g, uint32_t q0, uint32_t rows) {
    const uint32_t D = tiling_.headDim;
    const uint32_t G = tiling_.group;
    const uint32_t tile = tiling_.tile;
    const uint32_t M = G * rows;
    const int32_t d = static_cast<int32_t>(D);
    LocalTensor<float> acc = accBuf_.Get<float>();
    LocalTensor<float> rowMax = Stat(0);
    LocalTensor<float> rowSum = Stat(1);
    LocalTensor<float> lnSum = Stat(3);
    LocalTensor<float> lse = Stat(4);  // head j's rows at j * tile: 32-byte aligned copies
    ScalarToVector();  // the last running sums were written by the scalar unit
    Ln(lnSum, rowSum, static_cast<int32_t>(M));
    VectorToScalar();
    for (uint32_t j = 0; j < G; ++j) {
      for (uint32_t i = 0; i < rows; ++i) {
        const uint32_t r = j * rows + i;
        lse.SetValue(j * tile + i, lnSum.GetValue(r) + rowMax.GetValue(r));
      }
    }

    LocalTensor<TIn> outLocal = outQueue_.template AllocTensor<TIn>();
    for (uint32_t r = 0; r < M; ++r) {
      const float inv = 1.0f / rowSum.GetValue(r);
      if constexpr (std::is_same_v<TIn, float>) {
        Muls(outLocal[r * D], acc[r * D], inv, d);
      } else {
        Muls(acc[r * D], acc[r * D], inv, d);
      }
    }
    if constexpr (!std::is_same_v<TIn, float>) Cast(outLocal, acc, RoundMode::CAST_RINT, M * D);
    outQueue_.EnQue(outLocal);
    outLocal = outQueue_.template DeQue<TIn>();
    const uint32_t rowBytes = D * sizeof(TIn);
    DataCopyExtParams params{static_cast<uint16_t>(rows), rowBytes, 0,
                             (tiling_.qHeads - 1u) * rowBytes, 0};
    for (uint32_t j = 0; j < G; ++j) {
      DataCopyPadBits(outGm_[(uint64_t(q0) * tiling_.qHeads + g * G + j) * D], outLocal[j * rows * D],
                  params);
    }
    outQueue_.FreeTensor(outLocal);

    // The lse row segment [h, q0 : q0 + rows) is contiguous in GM; byte-exact copy per head.
    SetFlag<HardEvent::S_MTE3>(EVENT_ID5);
    WaitFlag<HardEvent::S_MTE3>(EVENT_ID5);
    DataCopyExtParams lseParams{1, rows * static_cast<uint32_t>(sizeof(float)), 0, 0, 0};
    for (uint32_t j = 0; j < G; ++j) {
      DataCopyPad(lseGm_[uint64_t(g * G + j) * tiling_.tokens + q0], lse[j * tile], lseParams);
    }
    // The next item's scalar writes into the statistics wait for these copies.
    SetFlag<HardEvent::MTE3_S>(EVENT_ID6);
    WaitFlag<HardEvent::MTE3_S>(EVENT_ID6);
  }

  PackedAttentionTiling tiling_{};
  TPipe* pipe_ = nullptr;
  TQue<TPosition::VECIN, 1> sQueue_;        // S [M, tile] f32 from the workspace
  TQue<TPosition::VECOUT, 1> pQueue_;       // P [M, tile] TIn to the workspace
  TQue<TPosition::VECIN, 1> pvQueue_;       // PV [M, D] f32 from the workspace
  TQue<TPosition::VECOUT, 1> outQueue_;     // out [M, D] TIn
  TBuf<TPosition::VECCALC> stageBuf_;       // stacked Q [M, D] TIn on its way to the workspace
  TBuf<TPosition::VECCALC> accBuf_;         // O [M, D] f32
  TBuf<TPosition::VECCALC> maskBuf_;        // causal bits [tile, tile]
  TBuf<TPosition::VECCALC> statsBuf_;       // see Stat()
  GlobalTensor<TIn> qGm_;
  GlobalTensor<TIn> kGm_;
  GlobalTensor<TIn> vGm_;
  GlobalTensor<TIn> outGm_;
  GlobalTensor<float> lseGm_;
  GlobalTensor<int32_t> cuGm_;
  GlobalTensor<TIn> wsQ_;    // stacked Q [M, D]
  GlobalTensor<float> wsS_;  // S [M, tile]
  GlobalTensor<TIn> wsP_;    // P [M, tile]
  GlobalTensor<float> wsO_;  // PV [M, D]
};

// A device function, not a kernel: the entry points in the .cpp beside this header are the
// `extern "C" __global__` kernels (one per dtype); the twin test drivers launch this directly.
template <class TIn>
__aicore__ inline void packed_attention_fwd(GM_ADDR q, GM_ADDR k, GM_ADDR v,
                                                GM_ADDR cuSeqlens, GM_ADDR out, GM_ADDR lse,
                                                GM_ADDR workspace, PackedAttentionTiling tiling) {
  TPipe pipe;
  PackedAttentionFwd<TIn> op;
  // Registered here, in the scope that owns the pipe and the op, as CANN's Matmul samples do: on
  // the 910B (MIX mode) the macro runs the cube core's server loop and returns from this function
  // there, and on each vector core it declares the client object every later Matmul call goes
  // through, so it must outlive Process(). The system workspace that carries their messages was
  // set by the launch wrapper (see the workspace note at the top).
  REGIST_MATMUL_OBJ(&pipe, GetSysWorkSpacePtr(), op.qk_, &tiling.qk, op.pv_, &tiling.pv);
  op.Init(q, k, v, cuSeqlens, out, lse, workspace, tiling, &pipe);
  op.Process();
}

}  // namespace pangu_fastkd_ascend
