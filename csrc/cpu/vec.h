// SIMD vectors for the CPU kernels.
//
// at::vec chooses its vector width from CPU_CAPABILITY macros that PyTorch defines only for its own
// per-ISA builds. This extension is compiled on the machine that runs it (setup.py passes
// -march=native unless PANGU_FASTKD_NATIVE=0), so the compiler's own ISA macros pick the widest
// implementation it can use. Include this header before any other ATen header.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

namespace pangu_fastkd {

// The ISA the vector code was compiled for, reported by build_info().
inline const char* vector_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace pangu_fastkd
