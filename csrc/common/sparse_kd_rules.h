// The option rules of the sparse-KD loss that tie two arguments together, written once for every
// C++ layer that enforces them: the op's argument checks (csrc/common/sparse_kd_args.h) and the
// host tiling of the Ascend C epilogue (csrc/ascend/sparse_kd_tiling_host.h), which is a kernel
// API of its own and words its messages in its field names. No torch here: the tiling is also
// compiled into the twin's kernel test programs, which see only the standard library.
#pragma once

#include <cmath>
#include <cstdint>

namespace pangu_fastkd::sparse_kd_rules {

// The option codes of the op schema (csrc/ops.cpp), equal to the indices of DIVERGENCES and
// MISSING_MASS_MODES in pangu_fastkd/ops/sparse_kd_targets.py.
inline constexpr int64_t kForwardKLCode = 0;
inline constexpr int64_t kTailCode = 0;

// Tail mode reads p_j = exp(t_j / T - Lambda) off the cached teacher lse Lambda, a probability
// only at the temperature the cache was written at (docs/kd-losses.md, 'Missing mass').
inline bool tail_temperature_matches(double temperature, double cache_temperature) {
  return std::fabs(temperature - cache_temperature) <= 1e-6;
}

// A top-K target in tail mode needs the cache temperature; other targets and modes do not.
inline bool tail_rule_holds(bool top_k, int64_t missing_mass, double temperature,
                            double cache_temperature) {
  return !top_k || missing_mass != kTailCode ||
         tail_temperature_matches(temperature, cache_temperature);
}

// Sampled targets are draws from the teacher: the cross-entropy against them estimates forward
// KL only, and they carry no label logit to add to the support.
inline bool sampled_divergence_allowed(bool sampled, int64_t divergence) {
  return !sampled || divergence == kForwardKLCode;
}
inline bool sampled_label_allowed(bool sampled, bool include_label) {
  return !sampled || !include_label;
}

}  // namespace pangu_fastkd::sparse_kd_rules
