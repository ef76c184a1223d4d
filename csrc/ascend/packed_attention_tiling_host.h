// Host-only half of the packed attention forward tiling (packed_attention_tiling.h holds what the
// kernel sees): the UB and workspace sizes, the chip budgets and MakePackedAttentionTiling, which
// plans the cube with CANN's host Matmul tiling API. Kept out of the kernel's include graph:
// ascendc_library also runs a host pass over kernel sources, and the host tiling API headers
// must not be visible there.
#pragma once

#include "packed_attention_tiling.h"

inline uint32_t PackedAttentionDtypeBytes(uint32_t dtype) {
  return dtype == kPackedAttentionFloat32 ? 4u : 2u;
}
// The kernel's UB footprint for `group` stacked heads of `tile` rows (M = group * tile rows) of
// `headDim` elements of `elemBytes` bytes. Buffers, in the kernel's InitBuffer order:
//   S in (fp32 [M, tile], VECIN queue), P out (input dtype [M, tile], VECOUT queue: the cube's A
//   operand goes back through GM), PV in (fp32 [M, D], VECIN queue), out (input dtype [M, D],
//   VECOUT queue), the Q staging tile (input dtype [M, D]: strided GM -> UB -> dense GM), the
//   fp32 O accumulator [M, D], the causal bit mask [tile, tile] bits, and the statistics
//   (running max, running sum, alpha, ln sum: 4 x M; lse slots: M; one 8-float-strided
//   reduction result per row: 8 x M; the reduction work row: tile).
// Each buffer is rounded up to 32 bytes as InitBuffer does.
inline uint64_t PackedAttentionUbBytes(uint32_t group, uint32_t tile, uint32_t headDim,
                                       uint32_t elemBytes) {
  auto align32 = [](uint64_t bytes) { return (bytes + 31u) / 32u * 32u; };
  const uint64_t m = uint64_t(group) * tile;
  uint64_t total = align32(m * tile * 4u);           // S in
  total += align32(m * tile * elemBytes);            // P out
  total += align32(m * headDim * 4u);                // PV in
  total += align32(m * headDim * elemBytes);         // out
  total += align32(m * headDim * elemBytes);         // Q staging
  total += align32(m * headDim * 4u);                // O accumulator
  total += align32(uint64_t(tile) * tile / 8u);      // causal mask bits
  total += align32((m * 13u + tile) * 4u);           // statistics, reductions, work
  return total;
}

// Per-block GM scratch, each region 512-byte aligned (the GM burst the cube's MTE2 reads best):
// the dense stacked Q tile (input dtype [M, D], the cube's A for S), S (fp32 [M, tile], the cube's
// C), P (input dtype [M, tile], the cube's A for PV) and PV (fp32 [M, D], the cube's C).
struct PackedAttentionWorkspaceLayout {
  uint64_t q, s, p, o, bytes;  // byte offsets inside one block's scratch, and its size
};

inline PackedAttentionWorkspaceLayout PackedAttentionBlockWorkspace(uint32_t group, uint32_t tile,
                                                                    uint32_t headDim,
                                                                    uint32_t elemBytes) {
  auto align512 = [](uint64_t bytes) { return (bytes + 511u) / 512u * 512u; };
  const uint64_t m = uint64_t(group) * tile;
  PackedAttentionWorkspaceLayout w{};
  w.q = 0;
  w.s = w.q + align512(m * headDim * elemBytes);
  w.p = w.s + align512(m * tile * 4u);
  w.o = w.p + align512(m * tile * elemBytes);
  w.bytes = w.o + align512(m * headDim * 4u);
  return w;
}

// Bytes of the `workspace` GM argument: the system workspace the Matmul API needs (first), then
// one scratch area per vector core. The launch code must allocate at least this much.
inline uint64_t PackedAttentionWorkspaceBytes(const PackedAttentionTiling& t) {
  return uint64_t(t.sysWorkspaceBytes) + uint64_t(t.blockSlots) * t.blockWorkspaceBytes;
}

#include <cmath>
#include <stdexcept>
#include <string>

#include "tiling/platform/platform_ascendc.h"
#include "tiling/tiling_api.h"

// UB bytes usable by vector code and cores per chip (the figures; twin::GetChipInfo holds
// the same numbers and the driver test asserts they agree).
struct PackedAttentionChipBudget {
  uint32_t ubBytes;
  uint32_t coreNum;
};

inline constexpr PackedAttentionChipBudget kPackedAttentionAscend910B{184u * 1024u, 48u};
inline constexpr PackedAttentionChipBudget kPackedAttentionAscend310B{248u * 1024u, 1u};

// What the forward is asked to do. cuSeqlens points at docs + 1 host int32 values.
struct PackedAttentionProblem {
  uint32_t tokens;
  uint32_t docs;
  uint32_t qHeads;
  uint32_t kvHeads;
  uint32_t headDim;
  uint32_t elemBytes;  // 4 (fp32) or 2 (bf16 / fp16)
  float scale;
  const int32_t* cuSeqlens;
  // PackedAttentionDtype. The default keeps callers that set only elemBytes working (2 means
  // bf16); fp16 inputs must say kPackedAttentionFloat16 here, with elemBytes = 2.
  uint32_t dtype = kPackedAttentionDtypeFromElemBytes;
};

// The problem's PackedAttentionDtype (resolving kPackedAttentionDtypeFromElemBytes); throws
// std::invalid_argument naming the bad field.
inline uint32_t PackedAttentionProblemDtype(const PackedAttentionProblem& p) {
  if (p.dtype == kPackedAttentionDtypeFromElemBytes) {
    if (p.elemBytes != 2u && p.elemBytes != 4u) {
      throw std::invalid_argument("elemBytes must be 2 (bf16) or 4 (fp32), got " +
                                  std::to_string(p.elemBytes));
    }
    return p.elemBytes == 4u ? kPackedAttentionFloat32 : kPackedAttentionBFloat16;
  }
  if (p.dtype > kPackedAttentionFloat16) {
    throw std::invalid_argument("dtype must be 0 (fp32), 1 (bf16) or 2 (fp16), got " +
                                std::to_string(p.dtype));
  }
  if (p.elemBytes != PackedAttentionDtypeBytes(p.dtype)) {
    throw std::invalid_argument("elemBytes must be " +
                                std::to_string(PackedAttentionDtypeBytes(p.dtype)) +
                                " for dtype " + std::to_string(p.dtype) + ", got " +
                                std::to_string(p.elemBytes));
  }
  return p.dtype;
}

// The two cube tilings for `tile`; false when the Matmul tiling API finds none. Every operand is
// in GM (the only position both chips accept): A is the dense stacked Q / P workspace, B the
// strided K rows (transposed: stored [keys, D] with row stride Hkv * D) / V rows (row stride
// Hkv * D), C fp32. P is cast to the input dtype, because A and B of one Matmul must share it
// (for fp16 that is safe: P lies in [0, 1]); the products accumulate in fp32 on the cube either
// way, so S never exists in half and cannot overflow it.
inline bool MakePackedAttentionCubeTilings(const PackedAttentionProblem& p, uint32_t tile,
                                           const platform_ascendc::PlatformAscendC& platform,
                                           TCubeTiling& qk,
                                           TCubeTiling& pv) {
  namespace mt = matmul_tiling;
  const uint32_t dtype = PackedAttentionProblemDtype(p);
  const mt::DataType in = dtype == kPackedAttentionFloat32   ? mt::DataType::DT_FLOAT
                          : dtype == kPackedAttentionFloat16 ? mt::DataType::DT_FLOAT16
                                                             : mt::DataType::DT_BF16;
  const int32_t m = int32_t(p.qHeads / p.kvHeads * tile);
  const int32_t d = int32_t(p.headDim), n = int32_t(tile);
  const int32_t kvRow = int32_t(p.kvHeads * p.headDim);
  auto make = [&](bool transB, int32_t sn, int32_t sk, int32_t orgN, int32_t orgKa,
                  int32_t orgKb, TCubeTiling& out) {
    mt::MatmulApiTiling api(platform);
    api.SetAType(mt::TPosition::GM, mt::CubeFormat::ND, in);
    api.SetBType(mt::TPosition::GM, mt::CubeFormat::ND, in, transB);
    api.SetCType(mt::TPosition::GM, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
    api.SetBiasType(mt::TPosition::GM, mt::CubeFormat::ND, mt::DataType::DT_FLOAT);
    api.SetShape(m, sn, sk);
    api.SetOrgShape(m, orgN, orgKa, orgKb);
    api.SetBias(false);
    api.SetBufferSpace(-1, -1, -1);
    return api.GetTiling(out) != -1;
  };
  // S: M x tile x D; A dense (Ka = D), B = K transposed with row stride Kb = Hkv * D.
  // PV: M x D x tile; A = P dense (Ka = tile), B = V with row stride N = Hkv * D.
  return make(true, n, d, n, d, kvRow, qk) && make(false, d, n, kvRow, n, n, pv);
}

// The longest document of cu_seqlens (host memory, docs + 1 values), which must run from 0 to
// tokens without decreasing. Shared by the forward and backward tilings.
inline uint32_t PackedAttentionLongestDocument(const PackedAttentionProblem& p) {
  if (p.cuSeqlens == nullptr) throw std::invalid_argument("cuSeqlens must not be null");
  if (p.cuSeqlens[0] != 0) {
    throw std::invalid_argument("cu_seqlens[0] must be 0, got " + std::to_string(p.cuSeqlens[0]));
  }
  uint32_t maxLen = 0;
  for (uint32_t b = 0; b < p.docs; ++b) {
    if (p.cuSeqlens[b + 1] < p.cuSeqlens[b]) {
      throw std::invalid_argument("cu_seqlens must be non-decreasing, but cu_seqlens[" +
                                  std::to_string(b + 1) + "] = " +
                                  std::to_string(p.cuSeqlens[b + 1]) + " < cu_seqlens[" +
                                  std::to_string(b) + "] = " + std::to_string(p.cuSeqlens[b]));
    }
    const uint32_t len = uint32_t(p.cuSeqlens[b + 1] - p.cuSeqlens[b]);
    maxLen = len > maxLen ? len : maxLen;
  }
  if (uint32_t(p.cuSeqlens[p.docs]) != p.tokens) {
    throw std::invalid_argument("cu_seqlens[-1] must equal tokens = " + std::to_string(p.tokens) +
                                ", got " + std::to_string(p.cuSeqlens[p.docs]));
  }
  return maxLen;
}

// Chooses the largest tile (a multiple of 8 rows, at most the longest document rounded up to 8
// and at most `maxTile` when it is not 0) whose UB footprint fits `budget.ubBytes` and for which
// the Matmul tiling API finds both cube tilings, and min(work items, cube cores, budget cores,
// maxBlocks) blocks: each block drives its own pair of Matmul objects, so a block needs a cube
// core. Throws std::invalid_argument naming the bad field.
inline PackedAttentionTiling MakePackedAttentionTiling(
    const PackedAttentionProblem& p, PackedAttentionChipBudget budget,
    const platform_ascendc::PlatformAscendC& platform, uint32_t maxTile = 0,
    uint32_t maxBlocks = 0) {
  constexpr uint32_t kRowAlign = 8;
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
  // K and V rows are the cube's B with row stride Hkv * D; an ND inner axis above 65535 needs
  // MatmulConfig intrinsicsCheck, which this kernel does not use.
  if (uint64_t(p.kvHeads) * p.headDim > 65535u) {
    throw std::invalid_argument("kvHeads * headDim must be <= 65535 (the cube's B row stride), "
                                "got " + std::to_string(uint64_t(p.kvHeads) * p.headDim));
  }
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) {
    throw std::invalid_argument("scale must be finite and > 0, got " + std::to_string(p.scale));
  }
  if (maxTile != 0 && (maxTile < kRowAlign || maxTile % kRowAlign != 0)) {
    throw std::invalid_argument("maxTile must be 0 (no cap) or a positive multiple of 8, got " +
                                std::to_string(maxTile));
  }
  const uint32_t maxLen = PackedAttentionLongestDocument(p);
  const uint32_t group = p.qHeads / p.kvHeads;
  if (PackedAttentionUbBytes(group, kRowAlign, p.headDim, p.elemBytes) > budget.ubBytes) {
    throw std::invalid_argument("headDim = " + std::to_string(p.headDim) + " with a group of " +
                                std::to_string(group) + " query heads per kv head leaves no "
                                "room for an 8-row tile in the " +
                                std::to_string(budget.ubBytes) + "-byte UB budget");
  }
  uint32_t tile = (maxLen + kRowAlign - 1) / kRowAlign * kRowAlign;
  if (tile < kRowAlign) tile = kRowAlign;
  if (maxTile != 0 && maxTile < tile) tile = maxTile;
  // The footprint grows with the tile: step down until it fits and the cube tilings exist.
  PackedAttentionTiling t{};
  while (true) {
    if (PackedAttentionUbBytes(group, tile, p.headDim, p.elemBytes) <= budget.ubBytes &&
        MakePackedAttentionCubeTilings(p, tile, platform, t.qk, t.pv)) {
      break;
    }
    if (tile == kRowAlign) {
      throw std::invalid_argument("headDim = " + std::to_string(p.headDim) +
                                  ": the Matmul tiling API found no cube tiling for an 8-row tile");
    }
    tile -= kRowAlign;
  }
  uint64_t items = 0;
  for (uint32_t b = 0; b < p.docs; ++b) {
    const uint32_t len = uint32_t(p.cuSeqlens[b + 1] - p.cuSeqlens[b]);
    items += uint64_t(p.kvHeads) * ((len + tile - 1) / tile);
  }
  if (items > 0xffffffffull) throw std::invalid_argument("too many work items for uint32");
  uint32_t blocks = platform.GetCoreNumAic();
  if (budget.coreNum < blocks) blocks = budget.coreNum;
  if (maxBlocks != 0 && maxBlocks < blocks) blocks = maxBlocks;
  // Each block brings GetCoreNumAiv / GetCoreNumAic vector cores (2 on the 910B), which take
  // the items: launch no more blocks than that many items need.
  const uint32_t aic = platform.GetCoreNumAic();
  const uint32_t vectorPerCube =
      aic == 0 || platform.GetCoreNumAiv() < aic ? 1u : platform.GetCoreNumAiv() / aic;
  const uint64_t needed = (items + vectorPerCube - 1) / vectorPerCube;
  if (needed < blocks) blocks = uint32_t(needed);
  if (blocks == 0) blocks = 1;  // an empty batch still launches one block, which does nothing
  const PackedAttentionWorkspaceLayout ws =
      PackedAttentionBlockWorkspace(group, tile, p.headDim, p.elemBytes);
  if (ws.bytes > 0xffffffffull) throw std::invalid_argument("per-block workspace above 4 GB");
  t.tokens = p.tokens;
  t.docs = p.docs;
  t.qHeads = p.qHeads;
  t.kvHeads = p.kvHeads;
  t.group = group;
  t.headDim = p.headDim;
  t.tile = tile;
  t.workItems = uint32_t(items);
  t.blockDim = blocks;
  // MIX mode: the work is split over the vector cores, each with its own scratch area.
  t.blockSlots = blocks * vectorPerCube;
  t.scale = p.scale;
  t.ubBytes = uint32_t(PackedAttentionUbBytes(group, tile, p.headDim, p.elemBytes));
  t.sysWorkspaceBytes = platform.GetLibApiWorkSpaceSize();
  t.blockWorkspaceBytes = uint32_t(ws.bytes);
  t.wsQOffset = uint32_t(ws.q);
  t.wsSOffset = uint32_t(ws.s);
  t.wsPOffset = uint32_t(ws.p);
  t.wsOOffset = uint32_t(ws.o);
  t.dtype = dtype;
  return t;
}
