// Packed-sequence (varlen) attention with GQA: CPU kernel, forward and backward.
//
// A work item is (document, kv head, block of query rows). It stacks the query rows of every
// query head that reads this kv head (GQA group) into one [G * rows, D] matrix, so each key tile
// is loaded once per group and the GEMMs are tall enough to run near the machine's GEMM rate.
// Keys are visited in tiles of kKeyTile: only the keys the block may see (its document, up to
// the diagonal when causal, inside the left window), so blocks above the diagonal and outside the
// document are never touched and the largest temporary is one [G * rows, kKeyTile] tile.
//   forward (online softmax, flash-style): per tile S = Q K^T * scale, running row max m and sum
//     l, O = O * exp(m_old - m_new) + exp(S - m_new) V; at the end O /= l, lse = m + log(l).
//   backward (recomputes P from the saved lse, no T x T storage): per tile P = exp(S - lse),
//     dV += P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO O)), dQ += dS K * scale,
//     dK += dS^T Q * scale.
// Items are pulled from a shared counter, longest first, so one long document among many short
// ones still keeps every core busy. dQ rows belong to one item; dK/dV are accumulated into
// per-thread fp32 buffers that are summed at the end, so there are no races. Softmax math is
// fp32 (fp64 for fp64 inputs); bf16/fp16 products run through the half-precision GEMM.
#include "vec.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace pangu_fastkd {
namespace {

// Query rows per head in one item: the group's heads are stacked, so a group of G heads gives
// G * rows GEMM rows. 256 stacked rows x kKeyTile fp32 scores stay within a core's L2.
constexpr int64_t kStackedRows = 256;
constexpr int64_t kMaxRowsPerHead = 128;
constexpr int64_t kKeyTile = 256;
constexpr int64_t kShortDocument = 256;
constexpr int64_t kShortDocumentRows = 64;

struct WorkItem {
  int64_t kv_head, q_begin, q_end, k_begin, k_end;
};

struct Geometry {
  int64_t T, Hq, Hkv, D, group;
  double scale;
  bool causal;
  int64_t window;  // < 0: none
};

Geometry check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu,
                      double scale, bool causal, int64_t window) {
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == 3, "packed_attention: ", name, " must be [T, H, D], got shape ", t->sizes());
    TORCH_CHECK_VALUE(t->device().is_cpu(), "packed_attention: ", name, " must be on the CPU");
    TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "packed_attention: ", name,
                     " must be a floating tensor, got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                   "packed_attention: q, k and v must share a dtype");
  TORCH_CHECK_VALUE(k.sizes() == v.sizes(), "packed_attention: k and v must have the same shape, got ", k.sizes(),
                    " and ", v.sizes());
  Geometry g{q.size(0), q.size(1), k.size(1), q.size(2), 1, scale, causal, window};
  TORCH_CHECK_VALUE(k.size(0) == g.T, "packed_attention: k and v must have T = ", g.T, " tokens like q");
  TORCH_CHECK_VALUE(k.size(2) == g.D, "packed_attention: q and k must have the same head dim, got ", g.D, " and ",
                    k.size(2));
  // Zero query heads would make the GQA group 0 and every kv-head index a division by zero.
  TORCH_CHECK_VALUE(g.Hq > 0 && g.Hkv > 0 && g.Hq % g.Hkv == 0, "packed_attention: the number of query heads (",
                    g.Hq, ") must be a positive multiple of kv heads (", g.Hkv, ")");
  TORCH_CHECK_VALUE(g.D > 0, "packed_attention: the head dim must be >= 1, got ", g.D);
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "packed_attention: softmax_scale must be finite and > 0, got ",
                    scale);
  g.group = g.Hq / g.Hkv;
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "packed_attention: cu_seqlens must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.device().is_cpu(), "packed_attention: cu_seqlens must be on the CPU, got ", cu.device());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.size(0) >= 2, "packed_attention: cu_seqlens must be [B + 1] with B >= 1");
  const at::Tensor c = cu.contiguous();
  const int32_t* b = c.data_ptr<int32_t>();
  TORCH_CHECK_VALUE(b[0] == 0, "packed_attention: cu_seqlens must start at 0, got ", b[0]);
  for (int64_t i = 1; i < c.size(0); ++i) {
    TORCH_CHECK_VALUE(b[i] >= b[i - 1], "packed_attention: cu_seqlens must be non-decreasing (index ", i, ")");
  }
  TORCH_CHECK_VALUE(b[c.size(0) - 1] == g.T, "packed_attention: cu_seqlens must end at T = ", g.T, ", got ",
                    b[c.size(0) - 1]);
  TORCH_CHECK_VALUE(window < 0 || causal, "packed_attention: window (a left window size) needs causal=True");
  return g;
}

int64_t rows_per_head(const Geometry& g) {
  return std::clamp<int64_t>(kStackedRows / g.group, 1, kMaxRowsPerHead);
}

// Every (document, kv head, query block), with the key range the block may see, longest first.
std::vector<WorkItem> plan_items(const Geometry& g, const at::Tensor& cu) {
  const at::Tensor c = cu.contiguous();
  const int32_t* b = c.data_ptr<int32_t>();
  std::vector<WorkItem> items;
  for (int64_t doc = 0; doc + 1 < c.size(0); ++doc) {
    // A short causal document's work is mostly its diagonal block, whose upper half is masked:
    // smaller blocks waste less there (measured: 8% faster with 64 docs of 128 tokens).
    const bool short_doc = g.causal && b[doc + 1] - b[doc] <= kShortDocument;
    const int64_t block = short_doc ? std::min(kShortDocumentRows, rows_per_head(g)) : rows_per_head(g);
    for (int64_t qs = b[doc]; qs < b[doc + 1]; qs += block) {
      const int64_t qe = std::min<int64_t>(qs + block, b[doc + 1]);
      const int64_t ks = g.window >= 0 ? std::max<int64_t>(b[doc], qs - g.window) : b[doc];
      const int64_t ke = g.causal ? qe : b[doc + 1];
      for (int64_t h = 0; h < g.Hkv; ++h) items.push_back({h, qs, qe, ks, ke});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) {
    return (a.q_end - a.q_begin) * (a.k_end - a.k_begin) > (b.q_end - b.q_begin) * (b.k_end - b.k_begin);
  });
  return items;
}

// Runs fn(item, thread_index) over all items. Items are pulled dynamically by the available
// threads, except under torch.use_deterministic_algorithms(True): then thread t takes items
// t, t + n, t + 2n, ... so that each per-thread dK/dV buffer sums the same items in the same
// order on every run (bitwise-reproducible training and resume, at some cost in balance).
template <typename Fn>
void for_each_item(const std::vector<WorkItem>& items, int64_t n_threads, Fn&& fn) {
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: without this guard the ATen ops
    // below would record autograd history on inputs that require grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = begin; t < end; ++t) {
      if (deterministic) {
        for (int64_t i = t; i < int64_t(items.size()); i += n_threads) fn(items[i], t);
      } else {
        for (int64_t i = next++; i < int64_t(items.size()); i = next++) fn(items[i], t);
      }
    }
  });
}

// The key columns [lo, hi) of a tile (keys k0 .. k0 + n) that query i may see; empty if hi <= lo.
inline std::pair<int64_t, int64_t> visible_columns(const Geometry& g, int64_t i, int64_t k0, int64_t n) {
  const int64_t hi = g.causal ? std::min(n, i + 1 - k0) : n;
  const int64_t lo = g.window >= 0 ? std::clamp<int64_t>(i - g.window - k0, 0, n) : 0;
  return {lo, std::max(lo, hi)};
}

// Rows [q_begin, q_end) of the heads of one GQA group, as a [G, rows, D] view of x[T, Hq, D].
at::Tensor group_rows(const at::Tensor& x, const Geometry& g, const WorkItem& it) {
  return x.narrow(0, it.q_begin, it.q_end - it.q_begin).narrow(1, it.kv_head * g.group, g.group).transpose(0, 1);
}

// Keys or values of one tile of one kv head: [n, D] (rows strided by Hkv * D).
at::Tensor kv_tile(const at::Tensor& x, int64_t kv_head, int64_t k0, int64_t n) {
  return x.select(1, kv_head).narrow(0, k0, n);
}

template <typename T>
using Vec = at::vec::Vectorized<T>;

// x[c] *= scale over [0, n); returns the maximum of the scaled values.
template <typename T>
T scale_and_max(T* x, int64_t n, T scale) {
  const Vec<T> vscale(scale);
  Vec<T> vmax(-std::numeric_limits<T>::infinity());
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    const Vec<T> s = Vec<T>::loadu(x + c) * vscale;
    s.store(x + c);
    vmax = at::vec::maximum(vmax, s);
  }
  T mx = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return at::vec::maximum(a, b); }, vmax);
  for (; c < n; ++c) {
    x[c] *= scale;
    mx = std::max(mx, x[c]);
  }
  return mx;
}

// x[c] = exp(x[c] * scale - shift) over [0, n); returns the sum of the results.
template <typename T>
T exp_and_sum(T* x, int64_t n, T scale, T shift) {
  const Vec<T> vscale(scale), vshift(shift);
  Vec<T> vsum(T(0));
  int64_t c = 0;
  for (; c + Vec<T>::size() <= n; c += Vec<T>::size()) {
    const Vec<T> p = (Vec<T>::loadu(x + c) * vscale - vshift).exp();
    p.store(x + c);
    vsum = vsum + p;
  }
  T sum = at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, vsum);
  for (; c < n; ++c) {
    x[c] = std::exp(x[c] * scale - shift);
    sum += x[c];
  }
  return sum;
}

template <typename T>
void scale_row(T* x, int64_t n, T factor) {
  at::vec::map([factor](Vec<T> a) { return a * Vec<T>(factor); }, x, x, n);
}

template <typename T>
void fill_outside(T* x, int64_t n, int64_t lo, int64_t hi, T value) {
  std::fill(x, x + lo, value);
  std::fill(x + hi, x + n, value);
}

// Per-thread scratch of one item, in the accumulation dtype (acc). For bf16/fp16 inputs only the
// score GEMM S = Q K^T runs in the input dtype (at the half-precision GEMM rate, its output
// rounded as in PyTorch's math attention); every other product runs in fp32 on converted tiles:
// P V, dS K, dS^T Q and P^T dO accumulate over tiles, and rounding each partial product before
// summing would double the error, and dP - rowsum(dO O) cancels digits.
struct Scratch {
  at::Tensor q, dout;          // [G * rows, D] acc: the item's packed rows
  at::Tensor q_in;             // q in the input dtype (half inputs only)
  at::Tensor s, dp;            // [G * rows, kKeyTile] acc
  at::Tensor s_in;             // [G * rows, kKeyTile] input dtype (half inputs only)
  at::Tensor k_tile, v_tile;   // [kKeyTile, D] acc: converted K and V tiles (half inputs only)
  at::Tensor o;                // [G * rows, D] acc: O (forward) or dQ (backward)
  at::Tensor stat_m, stat_l;   // [G * rows] acc

  Scratch(const Geometry& g, const at::TensorOptions& in, const at::TensorOptions& acc, bool half, bool bwd) {
    const int64_t m = g.group * rows_per_head(g);
    q = at::empty({m, g.D}, acc);
    s = at::empty({m, kKeyTile}, acc);
    o = at::empty({m, g.D}, acc);
    stat_m = at::empty({m}, acc);
    stat_l = at::empty({m}, acc);
    if (half) {
      q_in = at::empty({m, g.D}, in);
      s_in = at::empty({m, kKeyTile}, in);
      k_tile = at::empty({kKeyTile, g.D}, acc);
      v_tile = at::empty({kKeyTile, g.D}, acc);
    }
    if (bwd) {
      dout = at::empty({m, g.D}, acc);
      dp = at::empty({m, kKeyTile}, acc);
    }
  }
};

// out = a @ b into an acc-dtype tensor; half inputs go through `staging` in their own dtype.
void mm_into(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& staging) {
  if (out.scalar_type() == a.scalar_type()) {
    at::mm_out(out, a, b);
  } else {
    at::Tensor st = staging.narrow(0, 0, out.size(0)).narrow(1, 0, out.size(1));
    at::mm_out(st, a, b);
    out.copy_(st);
  }
}

// Packs the item's rows of x[T, Hq, D] into `acc` [G * rows, D] and, for half inputs, `in`.
// Returns the matrix the score GEMM should use.
at::Tensor pack_rows(const at::Tensor& x, const Geometry& g, const WorkItem& it, const at::Tensor& acc,
                     const at::Tensor& in) {
  const int64_t rows = it.q_end - it.q_begin, m = g.group * rows;
  at::Tensor packed_acc = acc.narrow(0, 0, m);
  if (!in.defined()) {
    packed_acc.view({g.group, rows, g.D}).copy_(group_rows(x, g, it));
    return packed_acc;
  }
  at::Tensor packed_in = in.narrow(0, 0, m);
  packed_in.view({g.group, rows, g.D}).copy_(group_rows(x, g, it));
  packed_acc.copy_(packed_in);
  return packed_in;
}

// A K or V tile in the accumulation dtype (converted into scratch for half inputs).
at::Tensor tile_acc(const at::Tensor& tile, const at::Tensor& kv_scratch) {
  if (!kv_scratch.defined()) return tile;
  at::Tensor t = kv_scratch.narrow(0, 0, tile.size(0));
  t.copy_(tile);
  return t;
}

template <typename acc_t>
void forward_item(const Geometry& g, const WorkItem& it, const at::Tensor& q, const at::Tensor& k,
                  const at::Tensor& v, at::Tensor& out, acc_t* lse, Scratch& sc) {
  const int64_t rows = it.q_end - it.q_begin, m = g.group * rows;
  const at::Tensor qp = pack_rows(q, g, it, sc.q, sc.q_in);
  at::Tensor o = sc.o.narrow(0, 0, m).zero_();
  acc_t* row_max = sc.stat_m.data_ptr<acc_t>();
  acc_t* row_sum = sc.stat_l.data_ptr<acc_t>();
  std::fill(row_max, row_max + m, -std::numeric_limits<acc_t>::infinity());
  std::fill(row_sum, row_sum + m, acc_t(0));
  const acc_t scale = acc_t(g.scale);

  for (int64_t k0 = it.k_begin; k0 < it.k_end; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, it.k_end - k0);
    at::Tensor s = sc.s.narrow(0, 0, m).narrow(1, 0, n);
    mm_into(s, qp, kv_tile(k, it.kv_head, k0, n).t(), sc.s_in);
    acc_t* sp = s.data_ptr<acc_t>();
    acc_t* op = o.data_ptr<acc_t>();
    const int64_t ld = s.stride(0);
    for (int64_t r = 0; r < m; ++r) {
      acc_t* row = sp + r * ld;
      const auto [lo, hi] = visible_columns(g, it.q_begin + r % rows, k0, n);
      if (hi <= lo) {
        std::fill(row, row + n, acc_t(0));
        continue;
      }
      const acc_t tile_max = scale_and_max(row + lo, hi - lo, scale);
      const acc_t new_max = std::max(row_max[r], tile_max);
      const acc_t tile_sum = exp_and_sum(row + lo, hi - lo, acc_t(1), new_max);
      fill_outside(row, n, lo, hi, acc_t(0));
      const acc_t rescale = std::exp(row_max[r] - new_max);  // 0 on the first visible tile
      if (rescale != acc_t(1)) scale_row(op + r * g.D, g.D, rescale);
      row_sum[r] = row_sum[r] * rescale + tile_sum;
      row_max[r] = new_max;
    }
    o.addmm_(s, tile_acc(kv_tile(v, it.kv_head, k0, n), sc.v_tile));
  }
  acc_t* op = o.data_ptr<acc_t>();
  for (int64_t r = 0; r < m; ++r) {
    scale_row(op + r * g.D, g.D, acc_t(1) / row_sum[r]);
    const int64_t head = it.kv_head * g.group + r / rows;
    lse[head * g.T + it.q_begin + r % rows] = row_max[r] + std::log(row_sum[r]);
  }
  group_rows(out, g, it).copy_(o.view({g.group, rows, g.D}));
}

template <typename acc_t>
void backward_item(const Geometry& g, const WorkItem& it, const at::Tensor& q, const at::Tensor& k,
                   const at::Tensor& v, const at::Tensor& grad_out, const at::Tensor& out, const acc_t* lse,
                   at::Tensor& dq, at::Tensor& dk_acc, at::Tensor& dv_acc, Scratch& sc) {
  const int64_t rows = it.q_end - it.q_begin, m = g.group * rows;
  const at::Tensor qp = pack_rows(q, g, it, sc.q, sc.q_in);
  const at::Tensor dout_acc = pack_rows(grad_out, g, it, sc.dout, at::Tensor());
  const at::Tensor q_acc = sc.q.narrow(0, 0, m);
  at::Tensor dq_acc = sc.o.narrow(0, 0, m).zero_();
  // Per stacked row: its lse and delta = sum_d dO O.
  acc_t* row_lse = sc.stat_m.data_ptr<acc_t>();
  acc_t* row_delta = sc.stat_l.data_ptr<acc_t>();
  {
    const at::Tensor delta = (group_rows(grad_out, g, it).to(dq_acc.scalar_type()) *
                              group_rows(out, g, it).to(dq_acc.scalar_type()))
                                 .sum(2)
                                 .contiguous();
    const acc_t* dp = delta.data_ptr<acc_t>();
    for (int64_t r = 0; r < m; ++r) {
      row_delta[r] = dp[r];
      row_lse[r] = lse[(it.kv_head * g.group + r / rows) * g.T + it.q_begin + r % rows];
    }
  }
  const acc_t scale = acc_t(g.scale);

  for (int64_t k0 = it.k_begin; k0 < it.k_end; k0 += kKeyTile) {
    const int64_t n = std::min(kKeyTile, it.k_end - k0);
    const at::Tensor kt = kv_tile(k, it.kv_head, k0, n), vt = kv_tile(v, it.kv_head, k0, n);
    at::Tensor p = sc.s.narrow(0, 0, m).narrow(1, 0, n);
    at::Tensor dp = sc.dp.narrow(0, 0, m).narrow(1, 0, n);
    mm_into(p, qp, kt.t(), sc.s_in);
    // dP in the accumulation dtype: dP - delta cancels, so rounding dP to bf16 would cost digits.
    at::mm_out(dp, dout_acc, tile_acc(vt, sc.v_tile).t());
    acc_t* pp = p.data_ptr<acc_t>();
    acc_t* dpp = dp.data_ptr<acc_t>();
    const int64_t ld = p.stride(0);
    for (int64_t r = 0; r < m; ++r) {
      acc_t* prow = pp + r * ld;
      acc_t* dsrow = dpp + r * ld;
      const auto [lo, hi] = visible_columns(g, it.q_begin + r % rows, k0, n);
      if (hi > lo) exp_and_sum(prow + lo, hi - lo, scale, row_lse[r]);
      fill_outside(prow, n, lo, std::max(lo, hi), acc_t(0));
      // dS = P (dP - delta), written over dP.
      const acc_t delta = row_delta[r];
      at::vec::map2([delta](Vec<acc_t> pv, Vec<acc_t> dpv) { return pv * (dpv - Vec<acc_t>(delta)); }, dsrow, prow,
                    dsrow, n);
    }
    dv_acc.select(1, it.kv_head).narrow(0, k0, n).addmm_(p.t(), dout_acc);
    dk_acc.select(1, it.kv_head).narrow(0, k0, n).addmm_(dp.t(), q_acc, 1.0, g.scale);
    dq_acc.addmm_(dp, tile_acc(kt, sc.k_tile));
  }
  dq_acc.mul_(g.scale);
  group_rows(dq, g, it).copy_(dq_acc.view({g.group, rows, g.D}));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                            const at::Tensor& v_in, const at::Tensor& cu_seqlens,
                                                            double scale, bool causal, int64_t window) {
  const Geometry g = check_inputs(q_in, k_in, v_in, cu_seqlens, scale, causal, window);
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const auto items = plan_items(g, cu_seqlens);
  const bool is_double = q.scalar_type() == at::kDouble;
  const bool half = !is_double && q.scalar_type() != at::kFloat;
  const auto acc = q.options().dtype(is_double ? at::kDouble : at::kFloat);
  at::Tensor out = at::empty({g.T, g.Hq, g.D}, q.options());
  // lse is fp32 (fp64 for fp64 inputs, so that gradcheck sees an exact backward).
  at::Tensor lse = at::empty({g.Hq, g.T}, acc);
  const int64_t n_threads = at::get_num_threads();
  AT_DISPATCH_FLOATING_TYPES(acc.dtype().toScalarType(), "packed_attention_fwd", [&] {
    std::vector<std::optional<Scratch>> scratch(n_threads);
    scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    for_each_item(items, n_threads, [&](const WorkItem& it, int64_t t) {
      if (!scratch[t]) scratch[t].emplace(g, q.options(), acc, half, false);
      forward_item<scalar_t>(g, it, q, k, v, out, lse_ptr, *scratch[t]);
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& cu_seqlens, double scale, bool causal,
    int64_t window) {
  const Geometry g = check_inputs(q_in, k_in, v_in, cu_seqlens, scale, causal, window);
  TORCH_CHECK_VALUE(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(),
                    "packed_attention: grad_out and out must have q's shape");
  const at::Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  const at::Tensor grad_out = grad_out_in.to(q.scalar_type()).contiguous(), out = out_in.contiguous();
  const auto items = plan_items(g, cu_seqlens);
  const auto dtype = q.scalar_type();
  const bool is_double = dtype == at::kDouble;
  const bool half = !is_double && dtype != at::kFloat;
  const auto acc = q.options().dtype(is_double ? at::kDouble : at::kFloat);
  TORCH_CHECK_VALUE(lse_in.sizes() == at::IntArrayRef({g.Hq, g.T}), "packed_attention: lse must be [Hq, T]");
  const at::Tensor lse = lse_in.to(acc.dtype().toScalarType()).contiguous();
  const int64_t n_threads = at::get_num_threads();
  at::Tensor dq = at::empty_like(q);
  std::vector<at::Tensor> dk_part(n_threads), dv_part(n_threads);
  AT_DISPATCH_FLOATING_TYPES(acc.dtype().toScalarType(), "packed_attention_bwd", [&] {
    std::vector<std::optional<Scratch>> scratch(n_threads);
    const scalar_t* lse_ptr = lse.data_ptr<scalar_t>();
    for_each_item(items, n_threads, [&](const WorkItem& it, int64_t t) {
      if (!scratch[t]) {
        scratch[t].emplace(g, q.options(), acc, half, true);
        dk_part[t] = at::zeros({g.T, g.Hkv, g.D}, acc);
        dv_part[t] = at::zeros({g.T, g.Hkv, g.D}, acc);
      }
      backward_item<scalar_t>(g, it, q, k, v, grad_out, out, lse_ptr, dq, dk_part[t], dv_part[t], *scratch[t]);
    });
  });
  at::Tensor dk, dv;
  for (int64_t t = 0; t < n_threads; ++t) {
    if (!dk_part[t].defined()) continue;
    if (!dk.defined()) {
      dk = dk_part[t];
      dv = dv_part[t];
    } else {
      dk.add_(dk_part[t]);
      dv.add_(dv_part[t]);
    }
  }
  if (!dk.defined()) {  // no items: T == 0
    dk = at::zeros_like(k);
    dv = at::zeros_like(v);
  }
  return {dq, dk.to(dtype), dv.to(dtype)};
}

TORCH_LIBRARY_IMPL(pangu_fastkd, CPU, m) {
  m.impl("packed_attention_fwd", &packed_attention_fwd_cpu);
  m.impl("packed_attention_bwd", &packed_attention_bwd_cpu);
}

}  // namespace pangu_fastkd
