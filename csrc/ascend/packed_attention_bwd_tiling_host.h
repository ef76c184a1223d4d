// Host-only half of the packed attention backward tiling (packed_attention_bwd_tiling.h holds what
// the kernels see): UB and workspace sizes and MakePackedAttentionBwdTiling, which plans the cube
// with CANN's host Matmul tiling API. Kept out of the kernels' include graph (see
// packed_attention_tiling_host.h).
#pragma once

#include "packed_attention_bwd_tiling.h"

namespace packed_attention_bwd_detail {
inline uint64_t Align32(uint64_t bytes) { return (bytes + 31u) / 32u * 32u; }
// GM regions start on 512-byte boundaries, the granule the MTE moves GM data most efficiently in.
inline uint64_t Align512(uint64_t bytes) { return (bytes + 511u) / 512u * 512u; }

// UB shared by both kernels: S and dP tiles in (VECIN queues, f32), the causal mask of the
// diagonal tile (f32), per-row lse and delta (f32), and `outTiles` tiles out in the input dtype
// (VECOUT queue: dS, and P in the dK/dV pass). For bf16, the f32 accumulator of one gradient tile
// in (VECIN) and its bf16 cast out (VECOUT).
inline uint64_t CommonUbBytes(uint32_t tile, uint32_t headDim, uint32_t elemBytes,
                              uint32_t outTiles) {
  const uint64_t square = uint64_t(tile) * tile;
  uint64_t total = 2u * Align32(square * 4u);                 // S, dP
  total += uint64_t(outTiles) * Align32(square * elemBytes);  // dS (+ P)
  total += Align32(square * 4u);                              // causal mask
  total += Align32(uint64_t(tile) * 2u * 4u);                 // lse, delta rows
  if (elemBytes != 4u) {
    total += Align32(uint64_t(tile) * headDim * 4u);        // f32 accumulator in
    total += Align32(uint64_t(tile) * headDim * elemBytes); // gradient out
  }
  return total;
}
}  // namespace packed_attention_bwd_detail

// dQ kernel: the common buffers with one output tile (dS), plus the dO and O tiles in (VECIN)
// and the delta scratch: the f32 product dO * O (for bf16 also the f32 copy of O), one reduction
// result per row 32 bytes apart, and the ReduceSum work row.
inline uint64_t PackedAttentionBwdDqUbBytes(uint32_t tile, uint32_t headDim, uint32_t elemBytes) {
  using namespace packed_attention_bwd_detail;
  const uint64_t rowTile = uint64_t(tile) * headDim;
  uint64_t total = CommonUbBytes(tile, headDim, elemBytes, 1u);
  total += 2u * Align32(rowTile * elemBytes);  // dO, O
  const uint64_t products = elemBytes == 4u ? 1u : 2u;
  total += Align32((products * rowTile + uint64_t(tile) * 8u + headDim) * 4u);
  return total;
}

// dK/dV kernel: the common buffers with two output tiles (P and dS).
inline uint64_t PackedAttentionBwdDkvUbBytes(uint32_t tile, uint32_t headDim, uint32_t elemBytes) {
  return packed_attention_bwd_detail::CommonUbBytes(tile, headDim, elemBytes, 2u);
}

// Bytes of GM workspace both launches need (the same buffer for both: the dK/dV pass reads the
// delta the dQ pass wrote).
inline uint64_t PackedAttentionBwdWorkspaceBytes(const PackedAttentionBwdTiling& t) {
  return t.sysWorkspaceBytes + t.slotOffset + uint64_t(t.slotCount) * t.slotBytes;
}

#include <cmath>
#include <stdexcept>
#include <string>

#include "packed_attention_tiling_host.h"
#include "tiling/platform/platform_ascendc.h"
#include "tiling/tiling_api.h"

namespace packed_attention_bwd_detail {

// One Matmul's tiling: A [m, k] (stored transposed when transA), B [k, n] (stored [n, k] when
// transB), C f32 in GM; org shape (orgM, orgN, orgKa, orgKb) as the kernel sets it at most.
inline bool CubeTiling(const platform_ascendc::PlatformAscendC& platform, uint32_t dtype,
                       bool transA, bool transB, int32_t m, int32_t n, int32_t k, int32_t orgM,
                       int32_t orgN, int32_t orgKa, int32_t orgKb,
                       TCubeTiling& out) {
  namespace mt = matmul_tiling;
  const mt::DataType in = dtype == kPackedAttentionFloat32   ? mt::DataType::DT_FLOAT
                          : dtype == kPackedAttentionFloat16 ? mt::DataType::DT_FLOAT16
                                                             : mt::DataType::DT_BF16;
  mt::MatmulApiTiling tiling(platform);
  tiling.SetAType(mt::TPosition::GM, mt::CubeFormat::ND, in, transA);
  tiling.SetBType(mt::TPosition::GM, mt::CubeFormat::ND, in, transB);
  tiling.SetCType(mt::TPosition::GM, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
  tiling.SetBiasType(mt::TPosition::GM, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
  tiling.SetShape(m, n, k);
  tiling.SetOrgShape(orgM, orgN, orgKa, orgKb);
  tiling.SetBias(false);
  tiling.SetBufferSpace(-1, -1, -1);
  return tiling.GetTiling(out) != -1;
}

}  // namespace packed_attention_bwd_detail

// Chooses the largest tile (a multiple of 16, at most 128, at most the longest document rounded
// up to 16, at most `maxTile` when not 0) whose UB footprint fits `budget.ubBytes` in both
// kernels, the cube tilings for it on `platform`, min(items, cube cores, maxBlocks) blocks per
// pass and the workspace layout. Throws std::invalid_argument naming the bad field.
//
// Blocks are capped at the cube cores (GetCoreNumAic): every block drives Matmul objects, and on
// the separated 910B one cube core serves the vector core(s) of its group.
inline PackedAttentionBwdTiling MakePackedAttentionBwdTiling(
    const PackedAttentionProblem& p, PackedAttentionChipBudget budget,
    const platform_ascendc::PlatformAscendC& platform, uint32_t maxTile = 0,
    uint32_t maxBlocks = 0) {
  using namespace packed_attention_bwd_detail;
  constexpr uint32_t kRowAlign = 16;  // the cube's fractal rows; bf16 tile rows fill 32 bytes
  constexpr uint32_t kMaxTile = 128;  // one baseM block of the score product
  // dtype and elemBytes agree (fp16 callers set dtype = kPackedAttentionFloat16, elemBytes = 2).
  const uint32_t dtype = PackedAttentionProblemDtype(p);
  if (p.headDim == 0 || p.headDim % 16u != 0 || p.headDim > 512u) {
    throw std::invalid_argument("headDim must be a multiple of 16 in [16, 512], got " +
                                std::to_string(p.headDim));
  }
  if (p.qHeads == 0 || p.kvHeads == 0 || p.qHeads % p.kvHeads != 0) {
    throw std::invalid_argument("qHeads must be a positive multiple of kvHeads, got qHeads = " +
                                std::to_string(p.qHeads) + ", kvHeads = " +
                                std::to_string(p.kvHeads));
  }
  // q and dO rows are Hq * D elements apart: that is the ND inner axis of the Matmul operands,
  // which the Matmul API takes up to 65535 without intrinsicsCheck.
  if (uint64_t(p.qHeads) * p.headDim > 65535u) {
    throw std::invalid_argument("qHeads * headDim must be at most 65535 (the Matmul ND row "
                                "stride limit), got " +
                                std::to_string(uint64_t(p.qHeads) * p.headDim));
  }
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) {
    throw std::invalid_argument("scale must be finite and > 0, got " + std::to_string(p.scale));
  }
  if (maxTile != 0 && (maxTile < kRowAlign || maxTile % kRowAlign != 0)) {
    throw std::invalid_argument("maxTile must be 0 (no cap) or a positive multiple of 16, got " +
                                std::to_string(maxTile));
  }
  const uint32_t maxLen = PackedAttentionLongestDocument(p);
  auto ubBytes = [&](uint32_t tile) {
    const uint64_t dq = PackedAttentionBwdDqUbBytes(tile, p.headDim, p.elemBytes);
    const uint64_t dkv = PackedAttentionBwdDkvUbBytes(tile, p.headDim, p.elemBytes);
    return dq > dkv ? dq : dkv;
  };
  if (ubBytes(kRowAlign) > budget.ubBytes) {
    throw std::invalid_argument("headDim = " + std::to_string(p.headDim) +
                                " leaves no room for a 16-row tile in the " +
                                std::to_string(budget.ubBytes) + "-byte UB budget");
  }
  uint32_t tile = (maxLen + kRowAlign - 1) / kRowAlign * kRowAlign;
  if (tile < kRowAlign) tile = kRowAlign;
  if (tile > kMaxTile) tile = kMaxTile;
  if (maxTile != 0 && maxTile < tile) tile = maxTile;
  while (ubBytes(tile) > budget.ubBytes) tile -= kRowAlign;  // the footprint grows with the tile

  PackedAttentionBwdTiling t{};
  t.tokens = p.tokens;
  t.docs = p.docs;
  t.qHeads = p.qHeads;
  t.kvHeads = p.kvHeads;
  t.headDim = p.headDim;
  t.elemBytes = p.elemBytes;
  t.dtype = dtype;
  t.tile = tile;
  t.scale = p.scale;
  t.dqUbBytes = uint32_t(PackedAttentionBwdDqUbBytes(tile, p.headDim, p.elemBytes));
  t.dkvUbBytes = uint32_t(PackedAttentionBwdDkvUbBytes(tile, p.headDim, p.elemBytes));

  const int32_t tl = int32_t(tile), d = int32_t(p.headDim);
  const int32_t qStride = int32_t(p.qHeads * p.headDim), kvStride = int32_t(p.kvHeads * p.headDim);
  // S / dP: q or dO rows (stride Hq * D) times k or v rows stored [keys, D] (stride Hkv * D).
  const bool scoreOk = CubeTiling(platform, dtype, false, true, tl, tl, d, tl, tl, qStride,
                                  kvStride, t.scoreMm);
  // dQ: dS [rows, keys] (pitch tile) times k rows [keys, D] (stride Hkv * D).
  const bool dqOk =
      CubeTiling(platform, dtype, false, false, tl, d, tl, tl, kvStride, tl, tl, t.dqMm);
  // dV / dK: P or dS stored [rows, keys] read transposed (pitch tile), times dO or q rows.
  const bool dkvOk =
      CubeTiling(platform, dtype, true, false, tl, d, tl, tl, qStride, tl, tl, t.dkvMm);
  if (!scoreOk || !dqOk || !dkvOk) {
    throw std::invalid_argument("headDim = " + std::to_string(p.headDim) + " with tile " +
                                std::to_string(tile) +
                                " has no Matmul tiling on this chip (GetTiling returned -1 for " +
                                (!scoreOk ? "scoreMm" : !dqOk ? "dqMm" : "dkvMm") + ")");
  }

  uint64_t tiles = 0;
  for (uint32_t b = 0; b < p.docs; ++b) {
    const uint32_t len = uint32_t(p.cuSeqlens[b + 1] - p.cuSeqlens[b]);
    tiles += (len + tile - 1) / tile;
  }
  if (tiles * p.qHeads > 0xffffffffull) {
    throw std::invalid_argument("too many work items for uint32");
  }
  t.dqItems = uint32_t(tiles * p.qHeads);
  t.dkvItems = uint32_t(tiles * p.kvHeads);
  uint32_t blocks = platform.GetCoreNumAic();
  if (budget.coreNum < blocks) blocks = budget.coreNum;
  if (maxBlocks != 0 && maxBlocks < blocks) blocks = maxBlocks;
  // Each block brings GetCoreNumAiv / GetCoreNumAic vector cores (2 on the 910B), which take
  // the items: launch no more blocks than that many items need.
  const uint32_t aic = platform.GetCoreNumAic();
  const uint32_t vectorPerCube =
      aic == 0 || platform.GetCoreNumAiv() < aic ? 1u : platform.GetCoreNumAiv() / aic;
  auto blocksFor = [blocks, vectorPerCube](uint32_t items) {
    const uint32_t needed = (items + vectorPerCube - 1u) / vectorPerCube;
    const uint32_t n = needed < blocks ? needed : blocks;
    return n == 0 ? 1u : n;  // an empty batch still launches one block, which does nothing
  };
  t.dqBlockDim = blocksFor(t.dqItems);
  t.dkvBlockDim = blocksFor(t.dkvItems);

  const uint64_t square = uint64_t(tile) * tile;
  const uint64_t accBytes = p.elemBytes == 4u ? 0u : Align512(uint64_t(tile) * p.headDim * 4u);
  // Exactly what the wrapper reserves: the kernels find their part GetLibApiWorkSpaceSize() bytes
  // after the buffer's start, so this must not be rounded.
  t.sysWorkspaceBytes = platform.GetLibApiWorkSpaceSize();
  t.deltaOffset = 0;
  t.slotOffset = t.deltaOffset + Align512(uint64_t(p.qHeads) * p.tokens * 4u);
  t.sOffset = 0;
  t.dpOffset = t.sOffset + Align512(square * 4u);
  t.pOffset = t.dpOffset + Align512(square * 4u);
  t.dsOffset = t.pOffset + Align512(square * p.elemBytes);
  t.accOffset = t.dsOffset + Align512(square * p.elemBytes);
  t.acc2Offset = t.accOffset + accBytes;
  t.slotBytes = t.acc2Offset + accBytes;
  // In CANN's MIX mode a launch index is one cube core with its vector cores (two on the 910B),
  // and each vector core is a block with its own GetBlockIdx: give every one a slot.
  const uint32_t launched = t.dqBlockDim > t.dkvBlockDim ? t.dqBlockDim : t.dkvBlockDim;
  t.slotCount = launched * vectorPerCube;
  return t;
}
