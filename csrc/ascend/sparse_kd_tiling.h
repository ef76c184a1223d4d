// Tiling of the sparse-KD / cross-entropy epilogue (csrc/ascend/sparse_kd_epilogue.h): the struct
// the kernel reads, filled by the host (sparse_kd_tiling_host.h).
//
// The host picks how many vocabulary elements one UB chunk holds and how many blocks share the
// rows, from the chip's UB budget, and passes the result, with the loss options of
// /work/shared/kd-losses.md (docs/kd-losses.md), to the kernel by value (the usual Ascend C
// tiling-data pattern). `SparseKdUbBytes` is the exact sum of the kernel's InitBuffer calls, so a
// tiling this file accepts never trips the UB budget on the device (the CPU twin asserts it).
#pragma once

#include <cstdint>

// Option codes. They equal the indices of DIVERGENCES and MISSING_MASS_MODES in
// pangu_fastkd/ops/sparse_kd_targets.py (the C++ op schema uses the same), so the host launcher
// passes the Python codes through unchanged.
enum SparseKdDivergence : uint32_t {
  kSparseKdForwardKl = 0,
  kSparseKdReverseKl = 1,
  kSparseKdJsd = 2,
};
enum SparseKdMissingMass : uint32_t {
  kSparseKdTail = 0,
  kSparseKdRenorm = 1,
};
enum SparseKdTargetKind : uint32_t {
  kSparseKdTopK = 0,     // ids, teacher logits, teacher lse (Lambda), label logit
  kSparseKdSampled = 1,  // ids and importance weights (random-sampling KD)
};
// Element type of the logits (and of the gradient written over them). bf16 and fp16 are both
// 2 bytes, so the element size alone cannot tell which kernel instantiation a launch needs.
enum SparseKdDtype : uint32_t {
  kSparseKdFloat32 = 0,   // float
  kSparseKdBFloat16 = 1,  // bfloat16_t
  kSparseKdFloat16 = 2,   // half (IEEE binary16)
  // SparseKdProblem only: take the type from elemBytes as before fp16 existed (4: fp32, 2: bf16).
  kSparseKdDtypeFromElemBytes = 0xffffffffu,
};

// Enumerations are stored as uint32_t so the layout does not depend on the compiler's enum size.
struct SparseKdTiling {
  uint32_t rows;          // N: rows of the logits matrix
  uint32_t vocab;         // V: elements per row
  uint32_t chunk;         // elements per UB chunk: a multiple of 64 (one 256-byte fp32 repeat)
  uint32_t supportK;      // K: stored teacher ids per row (0 when kdWeight == 0)
  uint32_t supportSlots;  // K (+ 1 label slot for top-K with includeLabel) rounded up to 8
  uint32_t blockDim;      // blocks to launch; each takes one contiguous range of rows
  int32_t ignoreIndex;    // label value of unsupervised rows (-100)
  uint32_t targetKind;    // SparseKdTargetKind (meaningful only when kdWeight > 0)
  uint32_t divergence;    // SparseKdDivergence
  uint32_t missingMass;   // SparseKdMissingMass (top-K targets only)
  uint32_t includeLabel;  // 1: top-K support gets the label with its stored teacher logit
  float kdWeight;         // weight of the divergence; 0 = plain cross-entropy (+ z-loss)
  float temperature;      // T (== T_c of the top-K cache under missing_mass = tail)
  float beta;             // JSD mixing weight in [0, 1] (TRL convention)
  float softcap;          // c of z <- c tanh(z / c); 0 = no softcap
  float zLoss;            // coefficient of lse^2 (lse of the capped logits at T = 1)
  float scale;            // gradient multiplier (1 / num_items times the upstream gradient)
  uint32_t ubBytes;       // UB bytes the kernel's InitBuffer calls take with this tiling
  uint32_t dtype;         // SparseKdDtype of the logits: the launcher picks the kernel by it
};

// Support vectors of `supportSlots` floats the kernel keeps per row (ids, gathered student
// logits, teacher log-probs or weights, student log-probs and probabilities, teacher
// probabilities, two scratch vectors, a product scratch, the fixed gradient of the support).
inline constexpr uint32_t kSparseKdSupportVectors = 10;

// Per-row results (the loss and the six statistics) are staged in the UB for this many rows and
// written to GM with DataCopyPad, never with scalar GM writes: GlobalTensor::SetValue goes through
// the core's data cache, which writes back whole 64-byte lines, so two cores writing neighbouring
// rows would overwrite each other's values. Each block owns one contiguous range of rows.
inline constexpr uint32_t kSparseKdResultRows = 32;
inline constexpr uint32_t kSparseKdStatCount = 6;

// The kernel's UB footprint for a chunk of `chunk` elements of `elemBytes`-byte logits: two
// input and two output queue buffers (double buffering), a float row for the chunk when the
// logits are bf16 / fp16 or soft-capped (the capped values need a home of their own), two float
// scratch rows (exp at T = 1 and at T; also the tanh temporaries of the softcap), the reduction
// work row, 16 scalars, and the support vectors. Each buffer is rounded up to 32 bytes as
// InitBuffer does.
