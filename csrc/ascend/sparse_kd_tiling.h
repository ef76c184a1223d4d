// Host-side tiling of the sparse-KD / cross-entropy epilogue (csrc/ascend/sparse_kd_epilogue.h).
//
// The host picks how many vocabulary elements one UB chunk holds and how many blocks share the
// rows, from the chip's UB budget, and passes the result to the kernel by value (the usual Ascend
// C tiling-data pattern). `SparseKdUbBytes` is the exact sum of the kernel's InitBuffer calls, so
// a tiling this file accepts never trips the UB budget on the device (the CPU twin asserts it).
#pragma once

#include <cstdint>

// The struct is all the kernel sees: plain 32-bit fields, no pointers, trivially copyable.
struct SparseKdTiling {
  uint32_t rows;          // N: rows of the logits matrix
  uint32_t vocab;         // V: elements per row
  uint32_t chunk;         // elements per UB chunk: a multiple of 64 (one 256-byte fp32 repeat)
  uint32_t supportK;      // K: stored teacher ids per row (0 when kdWeight == 0)
  uint32_t supportSlots;  // K + 1 (the label slot) rounded up to 8 floats (32 bytes)
  uint32_t blockDim;      // blocks to launch; rows are dealt round-robin to them
  int32_t ignoreIndex;    // label value of unsupervised rows (-100)
  float kdWeight;         // weight of the divergence; 0 = plain cross-entropy
  float temperature;      // T == T_c of the top-K cache (missing_mass="tail" needs it)
  float scale;            // gradient multiplier (1 / num_items times the upstream gradient)
  uint32_t ubBytes;       // UB bytes the kernel's InitBuffer calls take with this tiling
};

// The kernel's UB footprint for a chunk of `chunk` elements of `elemBytes`-byte logits: two
// input and two output queue buffers (double buffering), a float copy of the chunk for bf16, two
// float scratch rows (exp at T = 1 and at T), the reduction work row, 16 scalars, and 8 support
// vectors of `supportSlots` floats (ids, student and teacher log-probs, probabilities, the fixed
// gradient of the support). Each buffer is rounded up to 32 bytes as InitBuffer does.
inline uint64_t SparseKdUbBytes(uint32_t chunk, uint32_t elemBytes, uint32_t supportSlots) {
  auto align32 = [](uint64_t bytes) { return (bytes + 31u) / 32u * 32u; };
  const uint64_t in = align32(uint64_t(chunk) * elemBytes);
  const uint64_t row = align32(uint64_t(chunk) * 4u);
  uint64_t total = 4u * in + 3u * row;  // in/out queues x2, exp, expT, work
  if (elemBytes != 4u) total += row;    // float copy of a bf16 chunk
  total += 64u;                         // scalars
  total += align32(uint64_t(supportSlots) * 8u * 4u);
  return total;
}

#if !defined(__CCE_AICORE__)  // host only: the device compile sees just the struct
#include <cmath>
#include <stdexcept>
#include <string>

// UB bytes usable by vector code and vector cores per chip (the figures; the CPU twin's
// twin::GetChipInfo holds the same numbers and the driver test asserts they agree).
struct SparseKdChipBudget {
  uint32_t ubBytes;
  uint32_t coreNum;
};

inline constexpr SparseKdChipBudget kSparseKdAscend910B{184u * 1024u, 48u};  // of 192 KB UB
inline constexpr SparseKdChipBudget kSparseKdAscend310B{248u * 1024u, 1u};   // one AI core

// What the epilogue is asked to do; the scalar options of kd-losses.md.
struct SparseKdProblem {
  uint32_t rows;
  uint32_t vocab;
  uint32_t supportK;   // 0 allowed only when kdWeight == 0
  uint32_t elemBytes;  // 4 (fp32 logits) or 2 (bf16 logits)
  float kdWeight;
  float temperature;
  float scale;
  int32_t ignoreIndex;
};

// Chooses the largest chunk (a multiple of 64 elements, at most the vocabulary rounded up to 64
// and at most `maxChunk` when it is not 0) whose UB footprint fits `budget.ubBytes`, and
// min(rows, cores, maxBlocks) blocks. Throws std::invalid_argument naming the bad field.
inline SparseKdTiling MakeSparseKdTiling(const SparseKdProblem& p, SparseKdChipBudget budget,
                                         uint32_t maxChunk = 0, uint32_t maxBlocks = 0) {
  constexpr uint32_t kRepeat = 64;  // floats per 256-byte vector repeat
  if (p.elemBytes != 2u && p.elemBytes != 4u) {
    throw std::invalid_argument("elemBytes must be 2 (bf16) or 4 (fp32), got " +
                                std::to_string(p.elemBytes));
  }
  if (p.vocab == 0) throw std::invalid_argument("vocab must be >= 1, got 0");
  if (!(p.kdWeight >= 0.0f && p.kdWeight <= 1.0f)) {
    throw std::invalid_argument("kdWeight must be in [0, 1], got " + std::to_string(p.kdWeight));
  }
  if (!(p.temperature > 0.0f) || !std::isfinite(p.temperature)) {
    throw std::invalid_argument("temperature must be finite and > 0, got " +
                                std::to_string(p.temperature));
  }
  if (!std::isfinite(p.scale)) throw std::invalid_argument("scale must be finite");
  if (p.kdWeight > 0.0f && p.supportK == 0) {
    throw std::invalid_argument("kdWeight > 0 needs supportK >= 1 teacher ids per row, got 0");
  }
  if (maxChunk != 0 && maxChunk < kRepeat) {
    throw std::invalid_argument("maxChunk must be 0 (no cap) or >= 64, got " +
                                std::to_string(maxChunk));
  }
  const uint32_t supportK = p.kdWeight > 0.0f ? p.supportK : 0u;
  const uint32_t supportSlots = (supportK + 1u + 7u) / 8u * 8u;
  uint64_t cap = (uint64_t(p.vocab) + kRepeat - 1) / kRepeat * kRepeat;
  if (maxChunk != 0 && maxChunk < cap) cap = maxChunk / kRepeat * kRepeat;
  if (SparseKdUbBytes(kRepeat, p.elemBytes, supportSlots) > budget.ubBytes) {
    throw std::invalid_argument("supportK = " + std::to_string(supportK) +
                                " teacher ids leave no room for a 64-element chunk in the " +
                                std::to_string(budget.ubBytes) + "-byte UB budget");
  }
  // The footprint is linear in the chunk: step down from the cap until it fits.
  uint64_t chunk = cap;
  while (SparseKdUbBytes(uint32_t(chunk), p.elemBytes, supportSlots) > budget.ubBytes) {
    chunk -= kRepeat;
  }
  uint32_t blocks = budget.coreNum;
  if (maxBlocks != 0 && maxBlocks < blocks) blocks = maxBlocks;
  if (p.rows < blocks) blocks = p.rows;
  if (blocks == 0) blocks = 1;  // an empty batch still launches one block, which does nothing
  SparseKdTiling t{};
  t.rows = p.rows;
  t.vocab = p.vocab;
  t.chunk = uint32_t(chunk);
  t.supportK = supportK;
  t.supportSlots = supportSlots;
  t.blockDim = blocks;
  t.ignoreIndex = p.ignoreIndex;
  t.kdWeight = p.kdWeight;
  t.temperature = p.temperature;
  t.scale = p.scale;
  t.ubBytes = uint32_t(SparseKdUbBytes(t.chunk, p.elemBytes, supportSlots));
  return t;
}
#endif  // !defined(__CCE_AICORE__)
