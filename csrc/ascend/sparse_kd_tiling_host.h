// Host-only half of the sparse-KD epilogue tiling (sparse_kd_tiling.h holds what the kernel sees):
// the UB size, the chip budgets and MakeSparseKdTiling. Kept out of the kernel's include graph
// (see packed_attention_tiling_host.h).
#pragma once

#include "common/sparse_kd_rules.h"
#include "sparse_kd_tiling.h"

inline uint32_t SparseKdDtypeBytes(uint32_t dtype) {
  return dtype == kSparseKdFloat32 ? 4u : 2u;
}

// The struct is all the kernel sees: plain 32-bit fields, no pointers, trivially copyable.
inline uint64_t SparseKdUbBytes(uint32_t chunk, uint32_t elemBytes, uint32_t supportSlots,
                                bool softcap) {
  auto align32 = [](uint64_t bytes) { return (bytes + 31u) / 32u * 32u; };
  const uint64_t in = align32(uint64_t(chunk) * elemBytes);
  const uint64_t row = align32(uint64_t(chunk) * 4u);
  uint64_t total = 4u * in + 3u * row;           // in/out queues x2, exp, expT, work
  if (elemBytes != 4u || softcap) total += row;  // float (capped) copy of the chunk
  // (bf16 and fp16 take the same bytes: the footprint depends on the element size only.)
  total += 64u;                                  // scalars
  total += align32(uint64_t(supportSlots) * kSparseKdSupportVectors * 4u);
  total += align32(uint64_t(kSparseKdResultRows) * (1u + kSparseKdStatCount) * 4u);  // results
  return total;
}

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

// What the epilogue is asked to do: the shape and the options of kd-losses.md. Defaults are the
// reference's (forward KL, tail, label included, beta 0.5, no softcap, no z-loss).
struct SparseKdProblem {
  uint32_t rows = 0;
  uint32_t vocab = 0;
  uint32_t supportK = 0;   // 0 allowed only when kdWeight == 0
  uint32_t elemBytes = 4;  // 4 (fp32 logits) or 2 (bf16 / fp16 logits)
  // SparseKdDtype. The default keeps callers that set only elemBytes working (2 means bf16);
  // fp16 logits must say kSparseKdFloat16 here, with elemBytes = 2.
  uint32_t dtype = kSparseKdDtypeFromElemBytes;
  float kdWeight = 1.0f;
  float temperature = 1.0f;
  float scale = 1.0f;
  int32_t ignoreIndex = -100;
  uint32_t targetKind = kSparseKdTopK;
  float cacheTemperature = 1.0f;  // T_c of a top-K cache; tail needs T == T_c
  uint32_t divergence = kSparseKdForwardKl;
  uint32_t missingMass = kSparseKdTail;
  bool includeLabel = true;  // top-K only; must be false for sampled targets
  float beta = 0.5f;
  bool useSoftcap = false;
  float softcap = 0.0f;  // must be finite and > 0 when useSoftcap
  float zLoss = 0.0f;
};

// Chooses the largest chunk (a multiple of 64 elements, at most the vocabulary rounded up to 64
// and at most `maxChunk` when it is not 0) whose UB footprint fits `budget.ubBytes`, and
// min(rows, cores, maxBlocks) blocks. Throws std::invalid_argument naming the bad field.
inline SparseKdTiling MakeSparseKdTiling(const SparseKdProblem& p, SparseKdChipBudget budget,
                                         uint32_t maxChunk = 0, uint32_t maxBlocks = 0) {
  constexpr uint32_t kRepeat = 64;  // floats per 256-byte vector repeat
  auto bad = [](const std::string& message) { throw std::invalid_argument(message); };
  uint32_t dtype = p.dtype;
  if (dtype == kSparseKdDtypeFromElemBytes) {
    if (p.elemBytes != 2u && p.elemBytes != 4u) {
      bad("elemBytes must be 2 (bf16) or 4 (fp32), got " + std::to_string(p.elemBytes));
    }
    dtype = p.elemBytes == 4u ? kSparseKdFloat32 : kSparseKdBFloat16;
  } else if (dtype > kSparseKdFloat16) {
    bad("dtype must be 0 (fp32), 1 (bf16) or 2 (fp16), got " + std::to_string(dtype));
  } else if (p.elemBytes != SparseKdDtypeBytes(dtype)) {
    bad("elemBytes must be " + std::to_string(SparseKdDtypeBytes(dtype)) + " for dtype " +
        std::to_string(dtype) + ", got " + std::to_string(p.elemBytes));
  }
  if (p.vocab == 0) bad("vocab must be >= 1, got 0");
  if (!(p.kdWeight >= 0.0f && p.kdWeight <= 1.0f)) {
    bad("kdWeight must be in [0, 1], got " + std::to_string(p.kdWeight));
  }
  if (!(p.temperature > 0.0f) || !std::isfinite(p.temperature)) {
    bad("temperature must be finite and > 0, got " + std::to_string(p.temperature));
  }
  if (!std::isfinite(p.scale)) bad("scale must be finite");
  if (p.targetKind != kSparseKdTopK && p.targetKind != kSparseKdSampled) {
    bad("targetKind must be 0 (top-K) or 1 (sampled), got " + std::to_string(p.targetKind));
  }
  if (p.divergence > kSparseKdJsd) {
    bad("divergence must be 0 (forward_kl), 1 (reverse_kl) or 2 (jsd), got " +
        std::to_string(p.divergence));
  }
  if (p.missingMass > kSparseKdRenorm) {
    bad("missingMass must be 0 (tail) or 1 (renorm), got " + std::to_string(p.missingMass));
  }
  if (!(p.beta >= 0.0f && p.beta <= 1.0f)) {
    bad("beta must be in [0, 1], got " + std::to_string(p.beta));
  }
  if (p.useSoftcap && !(p.softcap > 0.0f && std::isfinite(p.softcap))) {
    bad("softcap must be finite and > 0 when useSoftcap is set, got " +
        std::to_string(p.softcap));
  }
  if (!(p.zLoss >= 0.0f) || !std::isfinite(p.zLoss)) {
    bad("zLoss must be finite and >= 0, got " + std::to_string(p.zLoss));
  }
  const bool sampled = p.targetKind == kSparseKdSampled;
  // The same option checks as the reference's check_options, whatever kdWeight is.
  if (!pangu_fastkd::sparse_kd_rules::sampled_divergence_allowed(sampled, p.divergence)) {
    bad("divergence must be 0 (forward_kl) for sampled targets, got " +
        std::to_string(p.divergence));
  }
  if (!pangu_fastkd::sparse_kd_rules::sampled_label_allowed(sampled, p.includeLabel)) {
    bad("includeLabel must be false for sampled targets (they carry no label logit)");
  }
  const bool kd = p.kdWeight > 0.0f;
  if (kd && p.supportK == 0) bad("kdWeight > 0 needs supportK >= 1 teacher ids per row, got 0");
  if (!pangu_fastkd::sparse_kd_rules::tail_rule_holds(kd && !sampled, p.missingMass,
                                                       p.temperature, p.cacheTemperature)) {
    bad("missingMass = tail needs temperature == cacheTemperature, got " +
        std::to_string(p.temperature) + " != " + std::to_string(p.cacheTemperature) +
        "; use renorm");
  }
  if (maxChunk != 0 && maxChunk < kRepeat) {
    bad("maxChunk must be 0 (no cap) or >= 64, got " + std::to_string(maxChunk));
  }
  const uint32_t supportK = kd ? p.supportK : 0u;
  const bool labelSlot = kd && !sampled && p.includeLabel;
  const uint64_t slots = (uint64_t(supportK) + (labelSlot ? 1u : 0u) + 7u) / 8u * 8u;
  uint64_t cap = (uint64_t(p.vocab) + kRepeat - 1) / kRepeat * kRepeat;
  if (maxChunk != 0 && maxChunk < cap) cap = maxChunk / kRepeat * kRepeat;
  if (slots > 0xffffffu ||
      SparseKdUbBytes(kRepeat, p.elemBytes, uint32_t(slots), p.useSoftcap) > budget.ubBytes) {
    bad("supportK = " + std::to_string(supportK) +
        " teacher ids leave no room for a 64-element chunk in the " +
        std::to_string(budget.ubBytes) + "-byte UB budget");
  }
  const uint32_t supportSlots = uint32_t(slots);
  // The footprint is linear in the chunk: step down from the cap until it fits.
  uint64_t chunk = cap;
  while (SparseKdUbBytes(uint32_t(chunk), p.elemBytes, supportSlots, p.useSoftcap) >
         budget.ubBytes) {
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
  t.targetKind = p.targetKind;
  t.divergence = p.divergence;
  t.missingMass = p.missingMass;
  t.includeLabel = labelSlot ? 1u : 0u;
  t.kdWeight = p.kdWeight;
  t.temperature = p.temperature;
  t.beta = p.beta;
  t.softcap = p.useSoftcap ? p.softcap : 0.0f;
  t.zLoss = p.zLoss;
  t.scale = p.scale;
  t.ubBytes = uint32_t(SparseKdUbBytes(t.chunk, p.elemBytes, supportSlots, p.useSoftcap));
  t.dtype = dtype;
  return t;
}
