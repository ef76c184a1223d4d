// Tiling of the packed causal attention backward (csrc/ascend/packed_attention_bwd.h): the struct
// both kernels read, filled by the host (packed_attention_bwd_tiling_host.h).
//
// The backward is two kernels launched one after the other on the same GM workspace: the dQ pass
// (items: document, query head, query tile) and the dK/dV pass (items: document, kv head, key
// tile). Both use one square tile of `tile` query rows and `tile` keys, chosen here from the
// chip's UB budget, and three Matmul objects on the cube unit whose TCubeTilings come from the
// CANN host tiling API (matmul_tiling::MatmulApiTiling):
//   scoreMm  [rows, D] x [keys, D]^T -> [rows, keys] f32   S = Q K^T and dP = dO V^T (both passes)
//   dqMm     [rows, keys] x [keys, D] -> [rows, D] f32     dQ += dS K            (dQ pass)
//   dkvMm    [rows, keys]^T x [rows, D] -> [keys, D] f32   dV += P^T dO, dK += dS^T Q (dK/dV pass)
// `PackedAttentionBwdDqUbBytes` / `PackedAttentionBwdDkvUbBytes` are the exact sums of each
// kernel's InitBuffer calls (the CPU twin asserts the budget), and
// `PackedAttentionBwdWorkspaceBytes` the GM workspace the host must pass to both launches.
#pragma once

#include <cstdint>

#include "kernel_tiling/kernel_tiling.h"

// GM workspace layout. The host passes sysWorkspaceBytes of system workspace (the Matmul API's,
// set by the launch wrapper) followed by the user part, which is what both kernels receive as
// `workspace` (GetUserWorkspace); the offsets below are from the start of that user part:
//   [deltaOffset, + Hq * T * 4)            delta = rowsum(dO * O) [Hq, T] f32: the dQ pass
//                                          writes it, the dK/dV pass reads it
//   [slotOffset + b * slotBytes, ...)      block b's private scratch; inside a slot, at the
//                                          *Offset fields: S and dP [tile, tile] f32, P and dS
//                                          [tile, tile] in the input dtype (what the cube reads
//                                          back), and for bf16 / fp16 the f32 gradient accumulators
//                                          [tile, D] (dQ in the dQ pass; dK, dV in the other).
// Blocks never share a slot, so no block waits for another and nothing needs atomics across
// blocks; results do not depend on the block count.
struct PackedAttentionBwdTiling {
  uint32_t tokens;       // T
  uint32_t docs;         // B
  uint32_t qHeads;       // Hq
  uint32_t kvHeads;      // Hkv; query head h reads kv head h / (Hq / Hkv)
  uint32_t headDim;      // D: a multiple of 16
  uint32_t elemBytes;    // 4 (fp32) or 2 (bf16 / fp16)
  uint32_t dtype;        // PackedAttentionDtype of the inputs: the kernels' TIn, the launcher
                         // picks the instantiation by it
  uint32_t tile;         // query rows = keys per tile: a multiple of 16, at most 128
  uint32_t dqItems;      // (document, query head, query tile) items of the dQ pass
  uint32_t dkvItems;     // (document, kv head, key tile) items of the dK/dV pass
  uint32_t dqBlockDim;   // blocks to launch the dQ pass with
  uint32_t dkvBlockDim;  // blocks to launch the dK/dV pass with
  float scale;           // softmax scale
  uint32_t dqUbBytes;    // UB bytes of the dQ kernel's InitBuffer calls
  uint32_t dkvUbBytes;   // UB bytes of the dK/dV kernel's InitBuffer calls
  uint64_t sysWorkspaceBytes;
  uint64_t deltaOffset;
  uint64_t slotOffset;
  uint64_t slotBytes;
  uint32_t slotCount;    // slots in the workspace: one per vector block (GetBlockIdx) of a pass
  uint64_t sOffset;      // inside a slot
  uint64_t dpOffset;
  uint64_t pOffset;
  uint64_t dsOffset;
  uint64_t accOffset;    // dQ (dQ pass) or dK (dK/dV pass) f32 accumulator, bf16 / fp16 only
  uint64_t acc2Offset;   // dV f32 accumulator (dK/dV pass), bf16 / fp16 only
  TCubeTiling scoreMm;
  TCubeTiling dqMm;
  TCubeTiling dkvMm;
};
