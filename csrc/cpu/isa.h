// Hot loops compiled twice: for the baseline x86-64 ISA the extension is built for (SSE2: wheels
// must load on any x86-64 CPU) and for AVX2 + FMA, picked at run time. Why: the expert mixtures'
// inner loops are short vector loops of multiply-adds; SSE2 does 4 floats per instruction and no
// fused multiply-add, AVX2 + FMA 8 in one, which halved the mixture kernels' time.
//
// Usage: write the loop body once as a FASTMTL_ALWAYS_INLINE function, call it from two thin
// wrappers, one marked FASTMTL_TARGET_AVX2, and choose with cpu_has_avx2_fma(). The body is
// inlined into each wrapper and vectorised for that wrapper's ISA.
//
// FASTMTL_DISABLE_AVX2=1 in the environment (read once) forces the baseline loops, so the tests
// cover both versions on a machine with AVX2.
#pragma once

#include <cstdlib>
#include <cstring>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define FASTMTL_HAVE_ISA_DISPATCH 1
#define FASTMTL_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define FASTMTL_HAVE_ISA_DISPATCH 0
#define FASTMTL_TARGET_AVX2
#endif
#define FASTMTL_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fastmtl::cpu {

inline bool cpu_has_avx2_fma() {
#if FASTMTL_HAVE_ISA_DISPATCH
  static const bool supported = [] {
    const char* off = std::getenv("FASTMTL_DISABLE_AVX2");
    if (off && std::strcmp(off, "") != 0 && std::strcmp(off, "0") != 0) return false;
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
#else
  return false;
#endif
}

}  // namespace fastmtl::cpu
