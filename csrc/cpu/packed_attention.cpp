// Packed-sequence (varlen) attention with GQA: CPU kernel, forward and backward.
//
// Work items are (document, query head, block of up to 64 query rows). An item computes its
// block's scores against the keys it may see (its document, up to the diagonal when causal,
// within the left window), so blocks above the diagonal and outside the document are never
// touched and no T x T buffer exists: the largest temporary is 64 x (document length).
//   forward:  S = Q_b K^T * scale, masked; lse = logsumexp(S); O_b = softmax(S) V
//   backward: P = exp(S - lse); dV += P^T dO_b; dP = dO_b V^T; dS = P (dP - rowsum(dO_b O_b));
//             dQ_b = dS K * scale; dK += dS^T Q_b * scale
// Items are pulled from a shared counter, longest first, so one long document among many short
// ones still keeps every core busy. dQ rows belong to one item; dK/dV are accumulated into
// per-thread fp32 buffers that are summed at the end, so there are no races. bf16/fp16 inputs use
// the half-precision GEMMs with fp32 softmax in between.
#include "vec.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace pangu_fastkd {
namespace {

constexpr int64_t kBlockRows = 64;

struct WorkItem {
  int64_t head, q_begin, q_end, k_begin, k_end;
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
  TORCH_CHECK_VALUE(g.Hkv > 0 && g.Hq % g.Hkv == 0, "packed_attention: the number of query heads (", g.Hq,
                    ") must be a multiple of kv heads (", g.Hkv, ")");
  g.group = g.Hq / g.Hkv;
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "packed_attention: cu_seqlens must be int32, got ",
                   cu.scalar_type());
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

// Every (document, query head, query block), with the key range the block may see, longest first.
std::vector<WorkItem> plan_items(const Geometry& g, const at::Tensor& cu) {
  const at::Tensor c = cu.contiguous();
  const int32_t* b = c.data_ptr<int32_t>();
  std::vector<WorkItem> items;
  for (int64_t doc = 0; doc + 1 < c.size(0); ++doc) {
    for (int64_t qs = b[doc]; qs < b[doc + 1]; qs += kBlockRows) {
      const int64_t qe = std::min<int64_t>(qs + kBlockRows, b[doc + 1]);
      const int64_t ks = g.window >= 0 ? std::max<int64_t>(b[doc], qs - g.window) : b[doc];
      const int64_t ke = g.causal ? qe : b[doc + 1];
      for (int64_t h = 0; h < g.Hq; ++h) items.push_back({h, qs, qe, ks, ke});
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const WorkItem& a, const WorkItem& b) {
    return (a.q_end - a.q_begin) * (a.k_end - a.k_begin) > (b.q_end - b.q_begin) * (b.k_end - b.k_begin);
  });
  return items;
}

// Runs fn(item, thread_index) over all items, pulled dynamically by the available threads.
template <typename Fn>
void for_each_item(const std::vector<WorkItem>& items, int64_t n_threads, Fn&& fn) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state: without this guard the ATen ops
    // below would record autograd history on inputs that require grad.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = begin; t < end; ++t) {
      for (int64_t i = next++; i < int64_t(items.size()); i = next++) fn(items[i], t);
    }
  });
}

// Scaled, masked scores of one item, [rows, keys], in fp32 (fp64 for fp64 inputs).
at::Tensor item_scores(const Geometry& g, const WorkItem& it, const at::Tensor& q, const at::Tensor& k) {
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor qb = q.select(1, it.head).narrow(0, it.q_begin, it.q_end - it.q_begin);
  const at::Tensor kb = k.select(1, it.head / g.group).narrow(0, it.k_begin, it.k_end - it.k_begin);
  at::Tensor s = at::mm(qb, kb.t()).to(acc).mul_(g.scale);
  if (!g.causal && g.window < 0) return s;
  // Query i may see key j when j <= i (causal) and j >= i - window. Only the columns near the
  // diagonal and, with a window, near the left edge can be hidden; the loop touches just those.
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "packed_attention_mask", [&] {
    scalar_t* sp = s.data_ptr<scalar_t>();
    const int64_t rows = s.size(0), keys = s.size(1);
    const scalar_t hidden = -std::numeric_limits<scalar_t>::infinity();
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t i = it.q_begin + r;
      scalar_t* row = sp + r * keys;
      if (g.causal) {
        for (int64_t c = std::max<int64_t>(0, i + 1 - it.k_begin); c < keys; ++c) row[c] = hidden;
      }
      if (g.window >= 0) {
        const int64_t first_visible = std::min<int64_t>(keys, std::max<int64_t>(0, i - g.window - it.k_begin));
        for (int64_t c = 0; c < first_visible; ++c) row[c] = hidden;
      }
    }
  });
  return s;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                            double scale, bool causal, int64_t window) {
  const Geometry g = check_inputs(q, k, v, cu_seqlens, scale, causal, window);
  const auto items = plan_items(g, cu_seqlens);
  at::Tensor out = at::empty({g.T, g.Hq, g.D}, q.options());
  // lse is fp32 (fp64 for fp64 inputs, so that gradcheck sees an exact backward).
  at::Tensor lse = at::empty({g.Hq, g.T}, q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
  for_each_item(items, at::get_num_threads(), [&](const WorkItem& it, int64_t) {
    at::Tensor s = item_scores(g, it, q, k);
    at::Tensor row_lse = s.logsumexp(1);  // every row sees at least its own key
    s.sub_(row_lse.unsqueeze(1)).exp_();
    const at::Tensor vb = v.select(1, it.head / g.group).narrow(0, it.k_begin, it.k_end - it.k_begin);
    out.select(1, it.head).narrow(0, it.q_begin, it.q_end - it.q_begin).copy_(at::mm(s.to(v.scalar_type()), vb));
    lse.select(0, it.head).narrow(0, it.q_begin, it.q_end - it.q_begin).copy_(row_lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_seqlens, double scale, bool causal,
    int64_t window) {
  const Geometry g = check_inputs(q, k, v, cu_seqlens, scale, causal, window);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(),
                    "packed_attention: grad_out and out must have q's shape");
  const auto items = plan_items(g, cu_seqlens);
  const auto dtype = q.scalar_type();
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n_threads = at::get_num_threads();
  // delta_i = sum_d dO_id O_id, per query row and head: [T, Hq].
  const at::Tensor delta = (grad_out.to(acc) * out.to(acc)).sum(2);
  at::Tensor dq = at::empty_like(q);
  std::vector<at::Tensor> dk_part(n_threads), dv_part(n_threads);
  for (int64_t t = 0; t < n_threads; ++t) {
    dk_part[t] = at::zeros({g.T, g.Hkv, g.D}, k.options().dtype(acc));
    dv_part[t] = at::zeros({g.T, g.Hkv, g.D}, k.options().dtype(acc));
  }
  for_each_item(items, n_threads, [&](const WorkItem& it, int64_t thread) {
    const int64_t rows = it.q_end - it.q_begin, keys = it.k_end - it.k_begin, kvh = it.head / g.group;
    at::Tensor p = item_scores(g, it, q, k);
    p.sub_(lse.select(0, it.head).narrow(0, it.q_begin, rows).unsqueeze(1)).exp_();
    const at::Tensor qb = q.select(1, it.head).narrow(0, it.q_begin, rows);
    const at::Tensor kb = k.select(1, kvh).narrow(0, it.k_begin, keys);
    const at::Tensor vb = v.select(1, kvh).narrow(0, it.k_begin, keys);
    const at::Tensor dob = grad_out.select(1, it.head).narrow(0, it.q_begin, rows);
    at::Tensor dp = at::mm(dob, vb.t()).to(p.scalar_type());
    dp.sub_(delta.select(1, it.head).narrow(0, it.q_begin, rows).unsqueeze(1).to(p.scalar_type()));
    at::Tensor ds = p * dp;  // dS without the scale
    dq.select(1, it.head).narrow(0, it.q_begin, rows).copy_(at::mm(ds.to(dtype), kb).mul_(g.scale));
    dk_part[thread].select(1, kvh).narrow(0, it.k_begin, keys).add_(at::mm(ds.to(dtype).t(), qb), g.scale);
    dv_part[thread].select(1, kvh).narrow(0, it.k_begin, keys).add_(at::mm(p.to(dtype).t(), dob));
  });
  at::Tensor dk = dk_part[0], dv = dv_part[0];
  for (int64_t t = 1; t < n_threads; ++t) {
    dk.add_(dk_part[t]);
    dv.add_(dv_part[t]);
  }
  return {dq, dk.to(dtype), dv.to(dtype)};
}

TORCH_LIBRARY_IMPL(pangu_fastkd, CPU, m) {
  m.impl("packed_attention_fwd", &packed_attention_fwd_cpu);
  m.impl("packed_attention_bwd", &packed_attention_bwd_cpu);
}

}  // namespace pangu_fastkd
