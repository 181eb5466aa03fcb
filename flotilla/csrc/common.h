// Helpers shared by the kernel sources of flotilla's CPU kernel library (flotilla/csrc/*.cpp, compiled into
// one library by flotilla/kernel_build.py): float conversions that round exactly as PyTorch does, a vectorizable
// exp, dtype dispatch, index checks, and the run-time ISA variants of row loops.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "isa.h"

// The library is compiled at a portable baseline (x86-64-v3 or the compiler's default, see flotilla/ops.py);
// the AVX-512 code below is compiled for AVX-512 with target attributes and chosen at run time by
// flotilla::isa::level(), so one build runs on every machine of its kind.
#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define FLOTILLA_X86_AVX512 1
#define FLOTILLA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <limits>
#include <vector>


namespace flotilla {
namespace kernels {


// Conversions to and from float32. bfloat16 is done on the bits (c10::BFloat16's conversions keep loops from
// vectorizing); rounding is to nearest even, NaN stays NaN, exactly as c10::BFloat16 rounds.
template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <>
inline float to_f(at::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
inline T from_f(float x) { return static_cast<T>(x); }

template <>
inline at::BFloat16 from_f(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0}
                                                   : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return at::BFloat16(bits, at::BFloat16::from_bits());
}

// Round a float through the activation dtype (what storing an eager intermediate in T does).
template <typename T>
inline float round_t(float x) { return to_f(from_f<T>(x)); }

// exp(x) in float32 to about 2 ulp (0 below -87.3), written so the compiler vectorizes loops that call it (std::exp does not
// vectorize without -ffast-math): x = n ln2 + r, |r| <= ln2/2, exp(r) by its degree-6 Taylor polynomial.
#pragma omp declare simd
inline float fast_exp(float x) {
  float zero = x < -87.3f ? 0.f : 1.f;  // exp(-inf) and anything below float32's range is 0
  x = std::min(std::max(x, -87.3f), 88.7f);
  float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale * zero;
}

template <typename T>
struct Tag { using type = T; };

// Calls f(Tag<scalar type>{}) for float32, bfloat16 or float16 (a function, not a macro, so the loops inside
// f may carry OpenMP pragmas).
template <typename F>
void dispatch(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat: f(Tag<float>{}); break;
    case at::kBFloat16: f(Tag<at::BFloat16>{}); break;
    case at::kHalf: f(Tag<at::Half>{}); break;
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

// Every entry of idx (n,) lies in [0, limit), else a RuntimeError naming the op and the first bad entry (checked
// before a kernel indexes memory with them).
inline void check_indices(const int64_t* idx, int64_t n, int64_t limit, const char* op, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(idx[i] >= 0 && idx[i] < limit, op, ": ", what, "[", i, "] = ", idx[i], " is outside [0, ", limit,
                ")");
  }
}

// ---- Run-time ISA variants of the row loops ------------------------------------------------------------
// A row kernel is `Impl(args, begin, end)`, always inlined into two wrappers: one compiled at the library's
// baseline, one for AVX-512, so its auto-vectorized loops use the widest vectors the CPU runs (chosen per call
// by flotilla::isa::level()). Both round identically (elementwise float32, no contraction); only the order of
// a row's sums (RMSNorm) follows the vector width.
#define FLOTILLA_INLINE inline __attribute__((always_inline))

template <typename Args, void (*Impl)(const Args&, int64_t, int64_t)>
void rows_base(const Args& a, int64_t b, int64_t e) { Impl(a, b, e); }

#ifdef FLOTILLA_X86_AVX512
template <typename Args, void (*Impl)(const Args&, int64_t, int64_t)>
FLOTILLA_TARGET_AVX512 void rows_avx512(const Args& a, int64_t b, int64_t e) { Impl(a, b, e); }
#endif

// Impl over [0, n) in parallel chunks of at least `grain`, in the variant of the current ISA level.
template <typename Args, void (*Impl)(const Args&, int64_t, int64_t)>
void parallel_rows(int64_t n, int64_t grain, const Args& a) {
  void (*fn)(const Args&, int64_t, int64_t) = rows_base<Args, Impl>;
#ifdef FLOTILLA_X86_AVX512
  if (flotilla::isa::level() >= flotilla::isa::kAvx512) fn = rows_avx512<Args, Impl>;
#endif
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(a, b, e); });
}

}  // namespace kernels
}  // namespace flotilla
