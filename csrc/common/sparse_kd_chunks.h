// The row-chunk policy and the grad_W accumulation of the fused sparse-KD op, shared by every
// device's implementation (csrc/cpu/sparse_kd.cpp, csrc/ascend/host/sparse_kd_npu.cpp). Plain ATen
// on whatever device the tensors are on, so a device's kernel only supplies its epilogue.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

namespace pangu_fastkd::chunks {

// Bytes the logits buffer of one chunk may take: 128 MiB, or PANGU_FASTKD_CHUNK_MB.
inline int64_t chunk_budget_bytes() {
  if (const char* env = std::getenv("PANGU_FASTKD_CHUNK_MB")) {
    const long long mb = std::atoll(env);
    if (mb > 0) return int64_t(mb) << 20;
  }
  return int64_t(128) << 20;
}

// Rows per chunk. The logits buffer is the op's only large allocation besides, for bf16/fp16
// weights split over several chunks, the fp32 grad_W accumulator (4 V d bytes). So the buffer gets
// the memory budget, and a half-precision batch whose whole buffer costs no more than budget +
// accumulator runs as one chunk: less memory and no accumulation passes.
inline int64_t chunk_rows_for(int64_t V, int64_t d, int64_t elem_size, bool half_accumulator,
                              int64_t requested, int64_t n_rows) {
  const int64_t all_rows = std::max<int64_t>(1, n_rows);
  if (requested > 0) return std::min(requested, all_rows);
  const int64_t budget = chunk_budget_bytes();
  if (half_accumulator && n_rows * V * elem_size <= budget + 4 * V * d) return all_rows;
  int64_t rows = budget / std::max<int64_t>(1, V * elem_size);
  // Multiples of 16 keep the GEMM's row blocks full; fewer than 16 rows starve it.
  rows = std::max<int64_t>(16, rows / 16 * 16);
  return std::min(rows, all_rows);
}

// grad_W = sum over chunks of dlogits[c]^T H[c] (and grad_b = column sums of dlogits), accumulated
// in fp32 (fp64 for fp64 inputs) and returned in the weight's dtype.
class GradWeightAccumulator {
 public:
  GradWeightAccumulator(const at::Tensor& W, bool with_bias, int64_t n_chunks)
      : n_chunks_(n_chunks), V_(W.size(0)), d_(W.size(1)) {
    const auto dtype = W.scalar_type();
    half_ = dtype == at::kBFloat16 || dtype == at::kHalf;
    acc_dtype_ = dtype == at::kDouble ? at::kDouble : at::kFloat;
    // Chunks write (first) or add to the result; only an empty batch needs zeros.
    out_ = n_chunks > 0 ? at::empty({V_, d_}, W.options()) : at::zeros({V_, d_}, W.options());
    if (half_ && n_chunks > 1) {
      acc_ = at::empty({V_, d_}, W.options().dtype(acc_dtype_));
      // Half-precision partials go through a small staging slice (16 MiB) into the fp32
      // accumulator while the slice is hot in cache: no second V x d buffer.
      slice_ = std::min<int64_t>(V_, std::max<int64_t>(1024, (int64_t(16) << 20) / (2 * d_)));
      stage_ = at::empty({slice_, d_}, W.options());
    }
    if (with_bias) bias_acc_ = at::zeros({V_}, W.options().dtype(acc_dtype_));
  }

  void add_chunk(int64_t index, const at::Tensor& dlogits, const at::Tensor& Hc) {
    const bool first = index == 0, last = index == n_chunks_ - 1;
    if (bias_acc_.defined()) bias_acc_.add_(dlogits.sum(0, false, acc_dtype_));
    if (!half_) {  // the output is the accumulator
      if (first) {
        at::mm_out(out_, dlogits.t(), Hc);
      } else {
        out_.addmm_(dlogits.t(), Hc);
      }
      return;
    }
    if (n_chunks_ == 1) {  // one GEMM (fp32 inside) is the whole sum
      at::mm_out(out_, dlogits.t(), Hc);
      return;
    }
    for (int64_t v0 = 0; v0 < V_; v0 += slice_) {
      const int64_t vn = std::min(slice_, V_ - v0);
      at::Tensor part = stage_.narrow(0, 0, vn);
      at::mm_out(part, dlogits.narrow(1, v0, vn).t(), Hc);
      at::Tensor acc = acc_.narrow(0, v0, vn);
      if (first) {
        acc.copy_(part);
        continue;
      }
      acc.add_(part);
      // The last chunk rounds each slice to the output while it is still in cache.
      if (last) out_.narrow(0, v0, vn).copy_(acc);
    }
  }

  at::Tensor grad_weight() const { return out_; }
  at::Tensor grad_bias(at::ScalarType dtype) const { return bias_acc_.to(dtype); }

 private:
  int64_t n_chunks_, V_, d_;
  int64_t slice_ = 0;
  bool half_ = false;
  at::ScalarType acc_dtype_;
  at::Tensor out_, acc_, stage_, bias_acc_;
};

}  // namespace pangu_fastkd::chunks
