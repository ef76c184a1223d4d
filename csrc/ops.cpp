// Op schemas of pangu_fastkd, declared once. Each device registers its kernels in its own source
// file (csrc/cpu/*.cpp now, csrc/ascend/*.cpp later), so leaving a backend out of a build means
// leaving out its files. Fake (meta) kernels and autograd live in pangu_fastkd/ops/*.py.
#include <torch/extension.h>

#include "cpu/vec.h"

TORCH_LIBRARY(pangu_fastkd, m) {
  // Fused LM head + sparse KD / cross-entropy loss (docs/kd-losses.md). Returns the reduced loss
  // and, computed in the same pass, the gradients of that loss; autograd only scales them.
  // Enum codes: divergence 0 forward_kl, 1 reverse_kl, 2 jsd; missing_mass 0 tail, 1 renorm;
  // reduction 0 sum, 1 mean. softcap <= 0 and num_items <= 0 mean "not set"; chunk_rows 0 means
  // "sized from the memory budget".
  m.def(
      "sparse_kd_fused(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? ids, "
      "Tensor? teacher_logits, Tensor? teacher_lse, Tensor? label_logit, Tensor? sample_weights, "
      "float kd_weight, int divergence, float beta, float temperature, float cache_temperature, "
      "int missing_mass, bool include_label, int ignore_index, float softcap, float z_loss, "
      "int reduction, float num_items, int chunk_rows, bool need_grad_input, bool need_grad_weight, "
      "bool compute_stats) -> (Tensor loss, Tensor grad_hidden, Tensor grad_weight, "
      "Tensor grad_bias, Tensor stats)");
  // Packed-sequence attention (flash-attn varlen layout): q [T, Hq, D], k/v [T, Hkv, D],
  // cu_seqlens [B + 1] int32; window < 0 means no window. lse is [Hq, T].
  m.def(
      "packed_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, float scale, bool causal, "
      "int window) -> (Tensor out, Tensor lse)");
  m.def(
      "packed_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor cu_seqlens, float scale, bool causal, int window) -> (Tensor grad_q, Tensor grad_k, "
      "Tensor grad_v)");
}

namespace pangu_fastkd {
int64_t default_chunk_budget_bytes();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "pangu_fastkd native kernels (ops are registered under torch.ops.pangu_fastkd)";
  module.def("build_info", [] {
    pybind11::dict info;
    info["vector_isa"] = pangu_fastkd::vector_isa();
    info["ascend"] = false;
    info["chunk_budget_bytes"] = pangu_fastkd::default_chunk_budget_bytes();
    return info;
  });
}
