// Tiling of the packed causal attention forward (csrc/ascend/packed_attention_fwd.h): the struct
// the kernel reads. The host fills it (packed_attention_tiling_host.h):
//
// The host picks the query/key tile (rows of one document processed at once) from the chip's UB
// budget, computes the two cube-unit tilings (S = Q K^T and O += P V) with CANN's host Matmul
// tiling API, and decides how many blocks share the (document, kv head, query tile) work items.
// The result goes to the kernel by value (the usual Ascend C tiling-data pattern).
// `PackedAttentionUbBytes` is the exact sum of the kernel's InitBuffer calls, so a tiling this
// file accepts never trips the UB budget on the device (the CPU twin asserts it), and
// `PackedAttentionWorkspaceBytes` is the GM workspace the launch must pass.
#pragma once

#include <cstdint>

#include "kernel_tiling/kernel_tiling.h"

// Element type of q, k, v and out. bf16 and fp16 are both 2 bytes, so the element size alone
// cannot tell which cube DataType the tilings need or which kernel instantiation to launch.
enum PackedAttentionDtype : uint32_t {
  kPackedAttentionFloat32 = 0,   // float
  kPackedAttentionBFloat16 = 1,  // bfloat16_t
  kPackedAttentionFloat16 = 2,   // half (IEEE binary16)
  // PackedAttentionProblem only: take the type from elemBytes as before fp16 existed (4: fp32,
  // 2: bf16).
  kPackedAttentionDtypeFromElemBytes = 0xffffffffu,
};


// The struct is all the kernel sees: plain fields and the two TCubeTilings, no pointers,
// trivially copyable.
struct PackedAttentionTiling {
  uint32_t tokens;     // T: packed tokens
  uint32_t docs;       // B: documents (cu_seqlens has B + 1 entries)
  uint32_t qHeads;     // Hq
  uint32_t kvHeads;    // Hkv; query head h reads kv head h / group
  uint32_t group;      // Hq / Hkv: query heads stacked into one A matrix per kv head
  uint32_t headDim;    // D: a multiple of 16, so a 2- or 4-byte row is whole 32-byte blocks
  uint32_t tile;       // query rows (per head) and key rows per tile: a multiple of 8
  uint32_t workItems;  // (document, kv head, query tile) triples; dealt round-robin to blocks
  uint32_t blockDim;   // blocks to launch
  float scale;         // softmax scale applied to q . k
  uint32_t ubBytes;    // UB bytes the kernel's InitBuffer calls take with this tiling
  uint32_t sysWorkspaceBytes;    // system workspace (Matmul messages) before the user part
  uint32_t blockWorkspaceBytes;  // per-core scratch in the user part, core b at b * this
  // Scratch areas: one per vector core, which in the 910B's MIX mode is blockDim * 2 (each cube
  // core drives two vector cores, each with its own GetBlockIdx), blockDim on the 310B.
  uint32_t blockSlots;
  // Byte offsets inside one block's scratch (PackedAttentionBlockWorkspace, computed on the host
  // so that the kernel calls no host helper): stacked Q, S, P and PV.
  uint32_t wsQOffset;
  uint32_t wsSOffset;
  uint32_t wsPOffset;
  uint32_t wsOOffset;
  uint32_t dtype;                // PackedAttentionDtype of q/k/v/out: the launcher picks by it
  TCubeTiling qk;  // S [G*rows, keys] = Qstack [G*rows, D] x K^T, fp32 C
  TCubeTiling pv;  // PV [G*rows, D] = P [G*rows, keys] x V [keys, D], fp32 C
};
