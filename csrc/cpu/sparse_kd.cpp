// Fused linear sparse-KD / cross-entropy loss: CPU kernel.
//
// Rows (supervised positions only) are processed in chunks sized from a memory budget. Per chunk:
//   1. logits[c, V] = H[c] W^T (+ b)          one GEMM into a reused buffer
//   2. epilogue, parallel over rows            row logsumexp, divergence, CE; the buffer is
//                                              overwritten with d(loss)/d(logits)
//   3. grad_H[c] = dlogits W,  grad_W += dlogits^T H[c],  grad_b += colsum(dlogits)
// so nothing of size N x V is ever allocated and backward only scales the stored gradients.
//
// The buffer has the input dtype: float32/float64 inputs get exact GEMMs; bfloat16/float16 inputs
// use the CPU's half-precision GEMM (oneDNN), which accumulates in fp32 but rounds its output to
// the input dtype. The epilogue upcasts each row to fp32, so the logits carry one rounding
// (relative 2^-8 for bf16) and d(loss)/d(logits) is rounded once before the gradient GEMMs; this is
// the same precision plain PyTorch gets in bf16 (tests/test_sparse_kd.py checks the error against
// it). grad_W is accumulated over chunks in fp32.
//
// Math: the loss of docs/kd-losses.md and its gradient as derived in that page's 'Gradients'
// section (z the soft-capped logits, u = z / T, q = softmax(u), pi = softmax(z), S the support).
// Specific to this kernel: every token outside S shares one coefficient kr of
// exp((z_v - m_rest) / T), so the row's gradient is one vector pass plus fix-ups at the support
// ids and the label. The tokens outside S ("rest") are summed over the gaps between the sorted
// support ids, relative to their own maximum m_rest, so q(rest) has neither cancellation nor
// underflow.
#include "vec.h"
#include "common/sparse_kd_args.h"
#include "common/sparse_kd_chunks.h"
#include "common/sparse_kd_rows.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <vector>

namespace pangu_fastkd {

int64_t default_chunk_budget_bytes();

namespace {

using sparse_kd::kForwardKL;
using sparse_kd::kNoTeacher;
using sparse_kd::kReverseKL;
using sparse_kd::kSampled;
using sparse_kd::kTail;
using sparse_kd::kTopK;

constexpr double kEps = 1e-12;
const double kLogEps = std::log(kEps);
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// The checked loss options (csrc/common/sparse_kd_args.h) and what this call asks of the epilogue.
struct Options : sparse_kd::LossOptions {
  double scale = 1;          // of each row's loss and gradient
  bool write_grad = false;   // overwrite the logits buffer with d(scale * loss)/d(logits)
  bool compute_stats = false;
};

// Sparse target rows, converted once to contiguous int32 / fp32 (they are N x K, small).
struct Target {
  const int32_t* ids = nullptr;
  const float* logits = nullptr;  // top-K teacher logits, or sampled weights
  const float* lse = nullptr;
  const float* label_logit = nullptr;
};

// What one row contributes: its loss and the statistics of KDStats, in that order.
struct RowResult {
  double loss = 0, divergence = 0, ce = 0, q_support = 0, p_support = 0, lse = 0, correct = 0;
};

// One support bucket of a row: a token id, its teacher value and the student's logit there.
struct SupportEntry {
  int64_t id;
  double teacher;  // teacher logit (top-K) or weight (sampled)
  double z;        // student logit (after softcap)
};

// ---------------------------------------------------------------------------------------------
// Vectorised row passes. `acc_t` is float (fp32/bf16/fp16 inputs) or double (float64 inputs).

template <typename acc_t>
acc_t row_max(const acc_t* z, int64_t n) {
  using V = at::vec::Vectorized<acc_t>;
  return at::vec::reduce_all<acc_t>([](V& a, V& b) { return at::vec::maximum(a, b); }, z, n);
}

template <typename acc_t>
void apply_softcap(acc_t* z, int64_t n, acc_t cap) {
  using V = at::vec::Vectorized<acc_t>;
  const V c(cap), inv_c(acc_t(1) / cap);
  at::vec::map([&](V x) { return c * (x * inv_c).tanh(); }, z, z, n);
}

// Adds sum(exp(z - m)) and sum(exp((z - m) / T)) over z[begin, end) to s1 and sT.
template <typename acc_t>
void sum_exp(const acc_t* z, int64_t begin, int64_t end, acc_t m, acc_t inv_t, bool same_t,
             double& s1, double& sT) {
  using V = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  V acc1(0), accT(0);
  const V vm(m), vinv(inv_t);
  int64_t v = begin;
  for (; v + W <= end; v += W) {
    V x = V::loadu(z + v) - vm;
    acc1 += x.exp();
    if (!same_t) accT += (x * vinv).exp();
  }
  if (v < end) {
    // Lanes past `count` load as 0; mask them to -inf so they add exp(-inf) = 0.
    const int64_t count = end - v;
    V x = V::loadu(z + v, count) - vm;
    V lanes = V::set(V(-std::numeric_limits<acc_t>::infinity()), x, count);
    acc1 += lanes.exp();
    if (!same_t) accT += (lanes * vinv).exp();
  }
  const double r1 = at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, acc1);
  s1 += r1;
  sT += same_t ? r1 : at::vec::vec_reduce_all<acc_t>([](V& a, V& b) { return a + b; }, accT);
}

// Overwrites z with coef_t * exp((z - m) / T) + coef_1 * exp(z - m), times the softcap derivative.
template <typename acc_t>
void write_row_grad(acc_t* z, int64_t n, acc_t m, acc_t inv_t, bool same_t, acc_t coef_t,
                    acc_t coef_1, acc_t softcap) {
  using V = at::vec::Vectorized<acc_t>;
  const V vm(m), vinv(inv_t), ct(coef_t), c1(coef_1), one(1), inv_cap(softcap > 0 ? 1 / softcap : 0);
  const bool capped = softcap > 0;
  at::vec::map(
      [&](V x) {
        V d = x - vm;
        V g = same_t ? (ct + c1) * d.exp() : ct * (d * vinv).exp() + c1 * d.exp();
        if (capped) {
          V r = x * inv_cap;
          g = g * (one - r * r);
        }
        return g;
      },
      z, z, n);
}

// ---------------------------------------------------------------------------------------------
// Per-row loss and gradient.

// Sums over the tokens outside the support, relative to their own maximum m_rest.
struct RestSums {
  bool empty = true;  // the support covers the whole vocabulary
  double m_rest = kNegInf;
  double r1 = 0;      // sum exp(z - m_rest)
  double rT = 0;      // sum exp((z - m_rest) / T); >= 1 when not empty
  double shift_t = 0; // exp((m_rest - m) / T): converts rT to the scale of sT
};

struct BucketTerms {
  double D = 0;
  double kr = 0;              // coefficient of exp((z_v - m_rest) / T) for tokens outside S
  std::vector<double> d_sup;  // dD/du at each support entry
  double p_support = 0;
};

double log_floor(double logx) { return std::max(logx, kLogEps); }

// Reverse KL / JSD over buckets with probabilities q, log q, p, log p (the last bucket may be
// "rest"). Returns D and c_b = g_b - gbar, so that dD/du_v = q_v c_b(v).
void reverse_or_jsd(const Options& o, const std::vector<double>& p, const std::vector<double>& logp,
                    const std::vector<double>& q, const std::vector<double>& logq, double& D,
                    std::vector<double>& c) {
  const size_t B = p.size();
  c.assign(B, 0.0);
  D = 0;
  if (o.divergence == kReverseKL) {
    for (size_t b = 0; b < B; ++b) D += q[b] * (log_floor(logq[b]) - log_floor(logp[b]));
    for (size_t b = 0; b < B; ++b) c[b] = log_floor(logq[b]) - log_floor(logp[b]) - D;
    return;
  }
  const double beta = o.beta;
  double gbar = 0;
  for (size_t b = 0; b < B; ++b) {
    const double m = beta * p[b] + (1 - beta) * q[b];
    const double logm = std::log(std::max(m, kEps));
    if (p[b] > 0) D += beta * p[b] * (log_floor(logp[b]) - logm);
    D += (1 - beta) * q[b] * (log_floor(logq[b]) - logm);
    c[b] = (1 - beta) * (log_floor(logq[b]) - logm);
    gbar += q[b] * c[b];
  }
  for (size_t b = 0; b < B; ++b) c[b] -= gbar;
}

// sT: sum of exp((z - m) / T) over the whole row; rest: the same outside the support.
BucketTerms divergence_terms(const Options& o, const std::vector<SupportEntry>& sup, double m,
                             double sT, const RestSums& rest, double lam, int64_t row) {
  const double T = o.temperature;
  const size_t n = sup.size();
  const double log_sT = std::log(sT);
  // q_v for a token outside S is exp((z_v - m_rest) / T) * rest_scale.
  const double rest_scale = rest.shift_t / sT;
  BucketTerms out;
  out.d_sup.assign(n, 0.0);
  std::vector<double> logq(n), q(n);
  for (size_t j = 0; j < n; ++j) {
    logq[j] = (sup[j].z - m) / T - log_sT;
    q[j] = std::exp(logq[j]);
  }

  if (o.kind == kSampled) {
    double W = 0;
    for (size_t j = 0; j < n; ++j) {
      W += sup[j].teacher;
      out.D -= sup[j].teacher * logq[j];
      out.d_sup[j] = q[j];  // times W below
    }
    for (size_t j = 0; j < n; ++j) out.d_sup[j] = q[j] * W - sup[j].teacher;
    out.kr = W * rest_scale;
    out.p_support = W;
    return out;
  }

  if (o.missing_mass == kTail) {
    std::vector<double> logp(n), p(n);
    double P_S = 0;
    for (size_t j = 0; j < n; ++j) {
      logp[j] = sup[j].teacher / T - lam;
      p[j] = std::exp(logp[j]);
      P_S += p[j];
    }
    const double p_rest = rest.empty ? 0.0 : std::max(0.0, 1.0 - P_S);
    const double log_q_rest = rest.empty ? kNegInf : std::log(rest.rT) + (rest.m_rest - m) / T - log_sT;
    out.p_support = P_S;
    if (o.divergence == kForwardKL) {
      const double P = P_S + p_rest;
      for (size_t j = 0; j < n; ++j) {
        if (p[j] > 0) out.D += p[j] * (logp[j] - logq[j]);
        out.d_sup[j] = q[j] * P - p[j];
      }
      // -p_rest q_v / q_rest = -p_rest exp((z_v - m_rest) / T) / rT: finite even when q_rest is tiny.
      out.kr = P * rest_scale;
      if (p_rest > 0) {
        out.D += p_rest * (std::log(p_rest) - log_q_rest);
        out.kr -= p_rest / rest.rT;
      }
      return out;
    }
    // Reverse KL and JSD: buckets are the support plus "rest".
    p.push_back(p_rest);
    logp.push_back(p_rest > 0 ? std::log(p_rest) : kNegInf);
    q.push_back(std::exp(log_q_rest));
    logq.push_back(log_q_rest);
    std::vector<double> c;
    reverse_or_jsd(o, p, logp, q, logq, out.D, c);
    for (size_t j = 0; j < n; ++j) out.d_sup[j] = q[j] * c[j];
    out.kr = c[n] * rest_scale;
    return out;
  }

  // renorm: the teacher renormalised over the support, p~ = softmax_S(t / T).
  double t_max = kNegInf;
  for (const auto& e : sup) t_max = std::max(t_max, e.teacher / T);
  TORCH_INTERNAL_ASSERT(std::isfinite(t_max), "row ", row, ": checked by sparse_kd::check_rows");
  double t_sum = 0;
  for (const auto& e : sup) t_sum += std::exp(e.teacher / T - t_max);
  std::vector<double> logp(n), p(n);
  for (size_t j = 0; j < n; ++j) {
    logp[j] = sup[j].teacher / T - t_max - std::log(t_sum);
    p[j] = std::exp(logp[j]);
  }
  out.p_support = 1.0;
  if (o.divergence == kForwardKL) {
    for (size_t j = 0; j < n; ++j) {
      if (p[j] > 0) out.D += p[j] * (logp[j] - logq[j]);
      out.d_sup[j] = q[j] - p[j];
    }
    out.kr = rest_scale;
    return out;
  }
  // q~ = q / Q_S, from the logits so that it stays exact when Q_S underflows.
  double z_max = kNegInf;
  for (const auto& e : sup) z_max = std::max(z_max, e.z);
  double z_sum = 0;
  for (const auto& e : sup) z_sum += std::exp((e.z - z_max) / T);
  std::vector<double> logqt(n), qt(n);
  for (size_t j = 0; j < n; ++j) {
    logqt[j] = (sup[j].z - z_max) / T - std::log(z_sum);
    qt[j] = std::exp(logqt[j]);
  }
  std::vector<double> c;
  reverse_or_jsd(o, p, logp, qt, logqt, out.D, c);
  for (size_t j = 0; j < n; ++j) out.d_sup[j] = qt[j] * c[j];
  out.kr = 0;
  return out;
}

// Collects the support of one row (valid ids, plus the label under label conditioning), sorted
// by id so the tokens outside it form contiguous gaps.
void build_support(const Options& o, const Target& tg, int64_t row, int64_t y,
                   std::vector<SupportEntry>& sup) {
  sup.clear();
  if (o.kind == kNoTeacher || o.kd_weight == 0) return;
  const int32_t* ids = tg.ids + row * o.K;
  const float* vals = tg.logits + row * o.K;
  bool label_seen = false;
  for (int64_t j = 0; j < o.K; ++j) {
    if (ids[j] < 0) continue;
    sup.push_back({ids[j], vals[j], 0.0});
    label_seen |= ids[j] == y;
  }
  if (o.kind == kTopK && o.include_label && !label_seen) sup.push_back({y, tg.label_logit[row], 0.0});
  std::sort(sup.begin(), sup.end(), [](const SupportEntry& a, const SupportEntry& b) { return a.id < b.id; });
  TORCH_INTERNAL_ASSERT(!sup.empty(), "row ", row, ": checked by sparse_kd::check_rows");
}

// Loss and statistics of one row; overwrites z with d(scale * loss)/dz when o.write_grad.
template <typename acc_t>
RowResult process_row(const Options& o, const Target& tg, acc_t* z, int64_t row, int64_t y,
                      std::vector<SupportEntry>& sup) {
  const int64_t V = o.V;
  const double T = o.temperature;
  const bool same_t = T == 1.0;
  if (o.softcap > 0) apply_softcap<acc_t>(z, V, acc_t(o.softcap));
  build_support(o, tg, row, y, sup);
  for (auto& e : sup) e.z = z[e.id];
  const double zy = z[y];
  const acc_t inv_t = acc_t(1.0 / T);

  // The tokens outside the support form the gaps between the sorted support ids.
  RestSums rest;
  auto for_each_gap = [&](auto&& fn) {
    int64_t prev = 0;
    for (const auto& e : sup) {
      if (e.id > prev) fn(prev, e.id);
      prev = e.id + 1;
    }
    if (V > prev) fn(prev, V);
  };
  for_each_gap([&](int64_t b, int64_t e) {
    rest.empty = false;
    rest.m_rest = std::max<double>(rest.m_rest, row_max<acc_t>(z + b, e - b));
  });
  double m = rest.m_rest;
  for (const auto& e : sup) m = std::max(m, e.z);
  if (!rest.empty) {
    for_each_gap([&](int64_t b, int64_t e) {
      sum_exp<acc_t>(z, b, e, acc_t(rest.m_rest), inv_t, same_t, rest.r1, rest.rT);
    });
    rest.shift_t = std::exp((rest.m_rest - m) / T);
  }
  const double shift_1 = rest.empty ? 0.0 : std::exp(rest.m_rest - m);
  double s1 = rest.r1 * shift_1, sT = rest.rT * rest.shift_t;
  for (const auto& e : sup) {
    s1 += std::exp(e.z - m);
    sT += std::exp((e.z - m) / T);
  }
  RowResult res;
  res.lse = m + std::log(s1);
  res.ce = res.lse - zy;
  BucketTerms terms;
  if (!sup.empty()) {
    const double lam = tg.lse ? double(tg.lse[row]) : 0.0;
    terms = divergence_terms(o, sup, m, sT, rest, lam, row);
    for (const auto& e : sup) res.q_support += std::exp((e.z - m) / T) / sT;
  }
  res.divergence = terms.D;
  res.p_support = terms.p_support;
  res.loss = o.kd_weight * T * T * terms.D + (1 - o.kd_weight) * res.ce + o.z_loss * res.lse * res.lse;
  if (o.compute_stats) {
    int64_t arg = 0;
    while (arg < V && z[arg] != acc_t(m)) ++arg;  // first maximum, like torch.argmax
    res.correct = arg == y ? 1.0 : 0.0;
  }
  if (!o.write_grad) return res;

  // pi-coefficient: CE and z-loss both push softmax(z); the KD term pushes softmax(z / T).
  // The row pass is based at m_rest (tokens outside S never overflow there); support entries,
  // which it may get wrong, are all rewritten below.
  const double b1 = (1 - o.kd_weight) + 2 * o.z_loss * res.lse;
  const double base = rest.empty ? m : rest.m_rest;
  const double coef_1 = o.scale * b1 * shift_1 / s1;
  const double coef_t = o.scale * o.kd_weight * T * terms.kr;
  const double cap = o.softcap;
  auto cap_grad = [cap](double zv) { return cap > 0 ? 1 - (zv / cap) * (zv / cap) : 1.0; };
  write_row_grad<acc_t>(z, V, acc_t(base), inv_t, same_t, acc_t(coef_t), acc_t(coef_1), acc_t(cap));
  bool label_in_support = false;
  for (size_t j = 0; j < sup.size(); ++j) {
    const auto& e = sup[j];
    double g = o.kd_weight * T * terms.d_sup[j] + b1 * std::exp(e.z - m) / s1;
    if (e.id == y) {
      g -= 1 - o.kd_weight;
      label_in_support = true;
    }
    z[e.id] = acc_t(o.scale * g * cap_grad(e.z));
  }
  if (!label_in_support) {
    const double g = o.kd_weight * T * terms.kr * std::exp((zy - rest.m_rest) / T) +
                     b1 * std::exp(zy - m) / s1 - (1 - o.kd_weight);
    z[y] = acc_t(o.scale * g * cap_grad(zy));
  }
  return res;
}

// Runs the epilogue over the rows of one chunk; `buf` is [rows, V] in the GEMM dtype.
template <typename buf_t, typename acc_t>
void chunk_epilogue(const Options& o, const Target& tg, at::Tensor buf, const int64_t* src_rows,
                    const int64_t* labels, RowResult* results) {
  const int64_t rows = buf.size(0), V = o.V;
  buf_t* data = buf.data_ptr<buf_t>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<SupportEntry> sup;
    std::vector<acc_t> scratch;
    if constexpr (!std::is_same_v<buf_t, acc_t>) scratch.resize(V);
    for (int64_t r = begin; r < end; ++r) {
      buf_t* row_ptr = data + r * V;
      acc_t* z;
      if constexpr (std::is_same_v<buf_t, acc_t>) {
        z = row_ptr;
      } else {
        at::vec::convert(row_ptr, scratch.data(), V);
        z = scratch.data();
      }
      const int64_t src = src_rows[r];
      results[r] = process_row<acc_t>(o, tg, z, src, labels[src], sup);
      if constexpr (!std::is_same_v<buf_t, acc_t>) {
        if (o.write_grad) at::vec::convert(scratch.data(), row_ptr, V);
      }
    }
  });
}

using chunks::chunk_rows_for;
using chunks::GradWeightAccumulator;

// PANGU_FASTKD_PROFILE=1 prints where the time of each call goes (GEMMs vs epilogue).
struct PhaseTimer {
  using clock = std::chrono::steady_clock;
  bool enabled = std::getenv("PANGU_FASTKD_PROFILE") != nullptr;
  clock::time_point last = clock::now();
  double seconds[4] = {0, 0, 0, 0};  // logits GEMM, epilogue, grad_hidden GEMM, grad_weight GEMM

  void lap(int phase) {
    const auto now = clock::now();
    seconds[phase] += std::chrono::duration<double>(now - last).count();
    last = now;
  }
  void report(int64_t rows, int64_t chunk) const {
    if (!enabled) return;
    std::fprintf(stderr,
                 "sparse_kd: rows=%lld chunk=%lld logits=%.3fs epilogue=%.3fs grad_hidden=%.3fs "
                 "grad_weight=%.3fs\n",
                 (long long)rows, (long long)chunk, seconds[0], seconds[1], seconds[2], seconds[3]);
  }
};

}  // namespace

// PANGU_FASTKD_CHUNK_MB overrides the 128 MiB default for the logits buffer.
int64_t default_chunk_budget_bytes() { return chunks::chunk_budget_bytes(); }

namespace {

void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "sparse_kd: ", name, " must be on the CPU, got ", t.device());
}

// The op on CPU tensors. The checks, the target conversion and the output assembly are the
// shared host prologue and epilogue (csrc/common/sparse_kd_args.h, sparse_kd_rows.h); this is
// the chunk loop and the deterministic reduction.
sparse_kd::Outputs sparse_kd_fused_cpu(const sparse_kd::Call& call) {
  Options o;
  static_cast<sparse_kd::LossOptions&>(o) = sparse_kd::check_arguments(call, check_cpu);
  const sparse_kd::Target target = sparse_kd::convert_target(call, o);
  const sparse_kd::SupervisedRows sup = sparse_kd::check_rows(call, o, target);
  const int64_t N = o.N, d = o.d, V = o.V, n_sup = sup.count;
  o.scale = o.loss_scale(n_sup);
  o.write_grad = call.need_grad_input || call.need_grad_weight;
  o.compute_stats = call.compute_stats;

  // Raw rows for the epilogue: int32 ids (checked to lie in [-1, V)), f32 values, int64 labels.
  at::Tensor ids32;
  Target tg;
  if (target.defined()) {
    ids32 = target.ids.to(at::kInt).contiguous();
    tg.ids = ids32.data_ptr<int32_t>();
    tg.logits = target.values.data_ptr<float>();
    if (o.kind == kTopK) {
      tg.lse = target.teacher_lse.data_ptr<float>();
      tg.label_logit = target.label_logit.data_ptr<float>();
    }
  }
  const int64_t* lab = sup.labels.data_ptr<int64_t>();
  const at::Tensor row_index = sup.all() ? at::arange(N, sup.labels.options()) : sup.index;
  const int64_t* rows = row_index.data_ptr<int64_t>();

  const auto dtype = o.dtype;
  const at::Tensor H = call.hidden.contiguous(), W = call.weight.contiguous();
  const at::Tensor H_sup = sup.pick(H);
  at::Tensor grad_h_sup;
  if (call.need_grad_input) grad_h_sup = at::empty({n_sup, d}, H.options());

  // ---- chunks
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  const int64_t chunk = chunk_rows_for(V, d, H.element_size(), half && call.need_grad_weight,
                                       call.chunk_rows, n_sup);
  const int64_t n_chunks = (n_sup + chunk - 1) / chunk;
  at::Tensor buffer = at::empty({n_sup > 0 ? chunk : 0, V}, H.options());
  std::optional<GradWeightAccumulator> grad_w;
  if (call.need_grad_weight) grad_w.emplace(W, call.bias.has_value(), n_chunks);
  std::vector<RowResult> results(n_sup);
  const at::Tensor Wt = W.t();
  PhaseTimer timer;
  for (int64_t ci = 0; ci < n_chunks; ++ci) {
    const int64_t c0 = ci * chunk, cn = std::min(chunk, n_sup - c0);
    at::Tensor Hc = H_sup.narrow(0, c0, cn);
    at::Tensor buf = buffer.narrow(0, 0, cn);
    timer.lap(3);
    if (call.bias.has_value()) {
      at::addmm_out(buf, *call.bias, Hc, Wt);
    } else {
      at::mm_out(buf, Hc, Wt);
    }
    timer.lap(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "sparse_kd_epilogue", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      chunk_epilogue<scalar_t, acc_t>(o, tg, buf, rows + c0, lab, results.data() + c0);
    });
    timer.lap(1);
    if (call.need_grad_input) {
      at::Tensor gh = grad_h_sup.narrow(0, c0, cn);  // mm_out needs an lvalue
      at::mm_out(gh, buf, W);
    }
    timer.lap(2);
    if (grad_w) grad_w->add_chunk(ci, buf, Hc);
  }
  timer.lap(3);
  timer.report(n_sup, chunk);

  // ---- reduction (sequential over rows: the same sum whatever the thread count)
  double total = 0;
  for (const auto& r : results) total += r.loss;
  const auto acc_dtype = dtype == at::kDouble ? at::kDouble : at::kFloat;
  // A finite double beyond float's range is the fp32 overflow it is (inf), as PyTorch's fp32
  // sum would give; at::scalar_tensor would throw an opaque conversion error instead.
  double value = total * o.scale;
  if (acc_dtype == at::kFloat && std::isfinite(value) && std::abs(value) > std::numeric_limits<float>::max()) {
    value = std::copysign(std::numeric_limits<double>::infinity(), value);
  }
  at::Tensor loss = at::scalar_tensor(value, call.hidden.options().dtype(acc_dtype));
  at::Tensor stats_sup;
  if (call.compute_stats) {
    stats_sup = at::empty({n_sup, sparse_kd::kStatColumns}, call.hidden.options().dtype(at::kFloat));
    auto acc = stats_sup.accessor<float, 2>();
    for (int64_t i = 0; i < n_sup; ++i) {
      const auto& r = results[i];
      const double vals[sparse_kd::kStatColumns] = {r.divergence, r.ce,  r.q_support,
                                                    r.p_support,  r.lse, r.correct};
      for (int k = 0; k < sparse_kd::kStatColumns; ++k) acc[i][k] = float(vals[k]);
    }
  }
  return sparse_kd::assemble_outputs(call, o, sup, loss, grad_h_sup, stats_sup, grad_w);
}

}  // namespace

TORCH_LIBRARY_IMPL(pangu_fastkd, CPU, m) {
  m.impl("sparse_kd_fused", &sparse_kd::op_entry<sparse_kd_fused_cpu>);
}

}  // namespace pangu_fastkd
