// Host-side tiling of the packed causal attention forward (csrc/ascend/packed_attention_fwd.h).
//
// The host picks the query/key tile (rows of one document processed at once) from the chip's UB
// budget and how many blocks share the (document, head, query tile) work items, and passes the
// result to the kernel by value (the usual Ascend C tiling-data pattern). `PackedAttentionUbBytes`
// is the exact sum of the kernel's InitBuffer calls, so a tiling this file accepts never trips the
// UB budget on the device (the CPU twin asserts it).
#pragma once

#include <cstdint>

// The struct is all the kernel sees: plain 32-bit fields, no pointers, trivially copyable.
struct PackedAttentionTiling {
  uint32_t tokens;     // T: packed tokens
  uint32_t docs;       // B: documents (cu_seqlens has B + 1 entries)
  uint32_t qHeads;     // Hq
  uint32_t kvHeads;    // Hkv; query head h reads kv head h / (Hq / Hkv)
  uint32_t headDim;    // D: a multiple of 16, so a bf16 or fp32 row is whole 32-byte blocks
  uint32_t tile;       // query rows and key rows per tile: a multiple of 8
  uint32_t workItems;  // (document, head, query tile) triples; dealt round-robin to blocks
  uint32_t blockDim;   // blocks to launch
  float scale;         // softmax scale applied to q . k
  uint32_t ubBytes;    // UB bytes the kernel's InitBuffer calls take with this tiling
};

// The kernel's UB footprint for `tile` query/key rows of `headDim` elements of `elemBytes` bytes:
// queues for the Q tile (1), K and V tiles (2 each: the next key tile is copied while the current
// one is used) and the output tile (1); for bf16 a float copy of the Q, K and V tiles; the float
// output accumulator; scratch (one score row, 8-float-strided dot products, a product row and the
// reduction work row); per-row statistics (max, sum, lse) and 16 scalars. Each buffer is rounded
// up to 32 bytes as InitBuffer does.
inline uint64_t PackedAttentionUbBytes(uint32_t tile, uint32_t headDim, uint32_t elemBytes) {
  auto align32 = [](uint64_t bytes) { return (bytes + 31u) / 32u * 32u; };
  const uint64_t tileIn = align32(uint64_t(tile) * headDim * elemBytes);
  const uint64_t tileF32 = align32(uint64_t(tile) * headDim * 4u);
  const uint64_t workLen = headDim > tile ? headDim : tile;
  uint64_t total = 6u * tileIn;                   // Q, K x2, V x2, out
  if (elemBytes != 4u) total += 3u * tileF32;     // float Q, K, V
  total += tileF32;                               // output accumulator
  total += align32((uint64_t(tile) * 9u + headDim + workLen) * 4u);  // scratch
  total += align32((uint64_t(tile) * 3u + 16u) * 4u);                // statistics + scalars
  return total;
}

#if !defined(__CCE_AICORE__)  // host only: the device compile sees just the struct
#include <cmath>
#include <stdexcept>
#include <string>

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
  uint32_t elemBytes;  // 4 (fp32) or 2 (bf16)
  float scale;
  const int32_t* cuSeqlens;
};

// Chooses the largest tile (a multiple of 8 rows, at most the longest document rounded up to 8
// and at most `maxTile` when it is not 0) whose UB footprint fits `budget.ubBytes`, and
// min(work items, cores, maxBlocks) blocks. Throws std::invalid_argument naming the bad field.
inline PackedAttentionTiling MakePackedAttentionTiling(const PackedAttentionProblem& p,
                                                       PackedAttentionChipBudget budget,
                                                       uint32_t maxTile = 0,
                                                       uint32_t maxBlocks = 0) {
  constexpr uint32_t kRowAlign = 8;
  if (p.elemBytes != 2u && p.elemBytes != 4u) {
    throw std::invalid_argument("elemBytes must be 2 (bf16) or 4 (fp32), got " +
                                std::to_string(p.elemBytes));
  }
  if (p.headDim == 0 || p.headDim % 16u != 0 || p.headDim > 512u) {
    throw std::invalid_argument("headDim must be a multiple of 16 in [16, 512], got " +
                                std::to_string(p.headDim));
  }
  if (p.qHeads == 0 || p.kvHeads == 0 || p.qHeads % p.kvHeads != 0) {
    throw std::invalid_argument("qHeads must be a positive multiple of kvHeads, got qHeads = " +
                                std::to_string(p.qHeads) + ", kvHeads = " +
                                std::to_string(p.kvHeads));
  }
  if (!(p.scale > 0.0f) || !std::isfinite(p.scale)) {
    throw std::invalid_argument("scale must be finite and > 0, got " + std::to_string(p.scale));
  }
  if (maxTile != 0 && (maxTile < kRowAlign || maxTile % kRowAlign != 0)) {
    throw std::invalid_argument("maxTile must be 0 (no cap) or a positive multiple of 8, got " +
                                std::to_string(maxTile));
  }
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
  if (PackedAttentionUbBytes(kRowAlign, p.headDim, p.elemBytes) > budget.ubBytes) {
    throw std::invalid_argument("headDim = " + std::to_string(p.headDim) +
                                " leaves no room for an 8-row tile in the " +
                                std::to_string(budget.ubBytes) + "-byte UB budget");
  }
  uint32_t tile = (maxLen + kRowAlign - 1) / kRowAlign * kRowAlign;
  if (tile < kRowAlign) tile = kRowAlign;
  if (maxTile != 0 && maxTile < tile) tile = maxTile;
  // The footprint grows with the tile: step down until it fits.
  while (PackedAttentionUbBytes(tile, p.headDim, p.elemBytes) > budget.ubBytes) tile -= kRowAlign;
  uint64_t items = 0;
  for (uint32_t b = 0; b < p.docs; ++b) {
    const uint32_t len = uint32_t(p.cuSeqlens[b + 1] - p.cuSeqlens[b]);
    items += uint64_t(p.qHeads) * ((len + tile - 1) / tile);
  }
  if (items > 0xffffffffull) throw std::invalid_argument("too many work items for uint32");
  uint32_t blocks = budget.coreNum;
  if (maxBlocks != 0 && maxBlocks < blocks) blocks = maxBlocks;
  if (items < blocks) blocks = uint32_t(items);
  if (blocks == 0) blocks = 1;  // an empty batch still launches one block, which does nothing
  PackedAttentionTiling t{};
  t.tokens = p.tokens;
  t.docs = p.docs;
  t.qHeads = p.qHeads;
  t.kvHeads = p.kvHeads;
  t.headDim = p.headDim;
  t.tile = tile;
  t.workItems = uint32_t(items);
  t.blockDim = blocks;
  t.scale = p.scale;
  t.ubBytes = uint32_t(PackedAttentionUbBytes(tile, p.headDim, p.elemBytes));
  return t;
}
#endif  // !defined(__CCE_AICORE__)
