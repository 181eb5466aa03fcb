// Run-time instruction-set dispatch shared by every source file of flotilla's CPU kernel library.
//
// The library is compiled once at a portable baseline (flotilla/ops.py picks it: x86-64-v3, i.e. AVX2 + FMA,
// on x86-64 CPUs that have it, else the compiler's default) so one build runs on every machine of that kind.
// Faster paths are compiled for a wider instruction set inside `#pragma GCC target(...)` regions (or functions
// with `__attribute__((target(...)))`) and chosen at run time with `flotilla::isa::level()`.
//
// `level()` is the best level this CPU supports, capped by `set_cap()` (the `torch.ops.flotilla.set_isa_cap`
// op): tests cap it to run the portable paths on a machine that has the wide ones.

#pragma once

#include <algorithm>
#include <atomic>

namespace flotilla {
namespace isa {

enum Level : int {
  kScalar = 0,      // the compiler's baseline (no explicit vector code)
  kAvx2 = 1,        // AVX2 + FMA (x86-64-v3)
  kAvx512 = 2,      // AVX-512 F/BW/VL/DQ
  kAvx512Bf16 = 3,  // AVX-512 + AVX512_BF16
};

inline int detect() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  bool bf16 = avx512 && __builtin_cpu_supports("avx512bf16");
  return bf16 ? kAvx512Bf16 : avx512 ? kAvx512 : avx2 ? kAvx2 : kScalar;
#else
  return kScalar;
#endif
}

// The level the CPU supports (detected once).
inline int detected() {
  static const int value = detect();
  return value;
}

inline std::atomic<int>& cap_storage() {
  static std::atomic<int> cap{kAvx512Bf16};
  return cap;
}

// The cap on the level used (tests lower it to exercise portable paths).
inline void set_cap(int cap) { cap_storage().store(cap, std::memory_order_relaxed); }

// The level kernels dispatch on: min(detected, cap).
inline int level() { return std::min(detected(), cap_storage().load(std::memory_order_relaxed)); }

// AVX512_VNNI (vpdpbusd: 64 int8 products per instruction), detected once; the int8 dot products of
// quant_matmul.cpp use it at level kAvx512 and above (AVX-512 CPUs without it take the AVX2 path there).
inline bool detect_avx512_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return detected() >= kAvx512 && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

inline bool avx512_vnni() {
  static const bool value = detect_avx512_vnni();
  return value && level() >= kAvx512;
}

}  // namespace isa
}  // namespace flotilla
