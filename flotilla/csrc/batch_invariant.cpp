// Batch-invariant linear layers: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), registered as
// torch.ops.flotilla.batch_invariant_* (built with the rest of the kernel library by flotilla/ops.py).
//
// The contract is the reduction order: every output element is one float32 accumulator that starts at 0 and
// takes x[m, k] * w[n, k] with one fused multiply-add for k = 0, 1, ..., K - 1 in that order; the bias (if any)
// is added to the finished sum in float32 and the result is rounded once to the output dtype. Nothing in that
// order depends on M, on the row's position in x, on the thread count or on which instruction set runs, so a
// row gives bit-identical results alone or inside any batch, and the scalar, AVX2 and AVX-512 paths agree bit
// for bit (tests/test_batch_invariant.py checks both). bfloat16 and float16 inputs are widened to float32
// exactly; there is no bfloat16 dot-product instruction (vdpbf16ps sums pairs in its own order).
//
// Weights are packed once at load (`batch_invariant_pack`) into panels of 64 output columns, k-major:
// packed (ceil(N / 64), K, 64), zero-padded, in the weight's dtype. The kernels then broadcast one x value and
// multiply it with 64 consecutive weights (4 AVX-512 vectors), for up to 6 rows at a time: no horizontal sums.
// Speed comes from register blocking over m and n only; k is never split or reordered.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "isa.h"

namespace flotilla {
namespace batch_invariant {
namespace {

constexpr int64_t kPanel = 64;          // output columns per packed panel
constexpr int kRows = 6;                // rows per register block
constexpr int64_t kRowsPerTask = 96;    // rows one parallel task handles against one panel

// ---- scalar conversions ------------------------------------------------------------------------------------
inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) {
  uint32_t u = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen(at::Half v) { return static_cast<float>(v); }

template <typename T>
inline T narrow(float v) { return static_cast<T>(v); }  // float: identity; Half: round to nearest even
template <>
inline at::BFloat16 narrow(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint16_t bits = (u & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0}
                                                   : static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  return at::BFloat16(bits, at::BFloat16::from_bits());
}

// ---- scalar path -------------------------------------------------------------------------------------------
// acc (rows, 64) = x (rows, K; float32, row stride K) times one panel (K, 64). std::fmaf is the same single
// rounding as the vector FMAs below, so every path gives the same bits.
template <typename T>
void tile_scalar(const float* x, int rows, int64_t k_size, const T* panel, float* acc) {
  std::fill(acc, acc + rows * kPanel, 0.f);
  for (int64_t k = 0; k < k_size; ++k) {
    const T* wk = panel + k * kPanel;
    for (int r = 0; r < rows; ++r) {
      float xv = x[r * k_size + k];
      float* a = acc + r * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) a[j] = std::fmaf(xv, widen(wk[j]), a[j]);
    }
  }
}

#if defined(__x86_64__)
// ---- AVX2 + FMA path ---------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// One 16-column quarter of the panel at a time: ROWS x 2 accumulators of 8 lanes.
template <typename T, int ROWS>
void tile_avx2(const float* x, int64_t k_size, const T* panel, float* acc) {
  for (int q = 0; q < kPanel; q += 16) {
    __m256 a[ROWS][2];
    for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    const T* wq = panel + q;
    for (int64_t k = 0; k < k_size; ++k) {
      __m256 w0 = load8(wq + k * kPanel), w1 = load8(wq + k * kPanel + 8);
      for (int r = 0; r < ROWS; ++r) {
        __m256 xv = _mm256_broadcast_ss(x + r * k_size + k);
        a[r][0] = _mm256_fmadd_ps(xv, w0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(xv, w1, a[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      _mm256_storeu_ps(acc + r * kPanel + q, a[r][0]);
      _mm256_storeu_ps(acc + r * kPanel + q + 8, a[r][1]);
    }
  }
}

template <typename T>
void tile_avx2_rows(const float* x, int rows, int64_t k_size, const T* panel, float* acc) {
  switch (rows) {
    case 1: return tile_avx2<T, 1>(x, k_size, panel, acc);
    case 2: return tile_avx2<T, 2>(x, k_size, panel, acc);
    case 3: return tile_avx2<T, 3>(x, k_size, panel, acc);
    case 4: return tile_avx2<T, 4>(x, k_size, panel, acc);
    case 5: return tile_avx2<T, 5>(x, k_size, panel, acc);
    default: return tile_avx2<T, 6>(x, k_size, panel, acc);
  }
}
#pragma GCC pop_options

// ---- AVX-512 path ------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// The whole 64-column panel per k: ROWS x 4 accumulators (24 of the 32 registers at 6 rows).
template <typename T, int ROWS>
void tile_avx512(const float* x, int64_t k_size, const T* panel, float* acc) {
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
  for (int64_t k = 0; k < k_size; ++k) {
    const T* wk = panel + k * kPanel;
    __m512 w0 = load16(wk), w1 = load16(wk + 16), w2 = load16(wk + 32), w3 = load16(wk + 48);
    for (int r = 0; r < ROWS; ++r) {
      __m512 xv = _mm512_set1_ps(x[r * k_size + k]);
      a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(xv, w2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(xv, w3, a[r][3]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * kPanel + c * 16, a[r][c]);
}

template <typename T>
void tile_avx512_rows(const float* x, int rows, int64_t k_size, const T* panel, float* acc) {
  switch (rows) {
    case 1: return tile_avx512<T, 1>(x, k_size, panel, acc);
    case 2: return tile_avx512<T, 2>(x, k_size, panel, acc);
    case 3: return tile_avx512<T, 3>(x, k_size, panel, acc);
    case 4: return tile_avx512<T, 4>(x, k_size, panel, acc);
    case 5: return tile_avx512<T, 5>(x, k_size, panel, acc);
    default: return tile_avx512<T, 6>(x, k_size, panel, acc);
  }
}
#pragma GCC pop_options
#endif  // __x86_64__

// The path a level runs: 2 = AVX-512, 1 = AVX2, 0 = scalar.
int path_for(int64_t max_isa) {
  int level = std::min<int>(isa::level(), static_cast<int>(std::max<int64_t>(max_isa, 0)));
#if defined(__x86_64__)
  return level >= isa::kAvx512 ? 2 : level >= isa::kAvx2 ? 1 : 0;
#else
  (void)level;
  return 0;
#endif
}

template <typename T>
void tile(int path, const float* x, int rows, int64_t k_size, const T* panel, float* acc) {
#if defined(__x86_64__)
  if (path == 2) return tile_avx512_rows<T>(x, rows, k_size, panel, acc);
  if (path == 1) return tile_avx2_rows<T>(x, rows, k_size, panel, acc);
#endif
  tile_scalar<T>(x, rows, k_size, panel, acc);
}

template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    case at::kHalf: f(at::Half{}); break;
    default: TORCH_CHECK(false, "batch_invariant: unsupported dtype ", dtype, " (float32, bfloat16, float16)");
  }
}

// weight (N, K) -> packed (ceil(N / 64), K, 64) in the same dtype, columns past N zero.
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "batch_invariant_pack: weight must be (out_features, in_features)");
  auto w = weight.contiguous();
  int64_t n = w.size(0), k_size = w.size(1), panels = (n + kPanel - 1) / kPanel;
  auto packed = at::zeros({panels, k_size, kPanel}, w.options());
  dispatch(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* src = w.data_ptr<T>();
    T* dst = packed.data_ptr<T>();
    at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p)
        for (int64_t j = 0; j < kPanel && p * kPanel + j < n; ++j) {
          const T* row = src + (p * kPanel + j) * k_size;
          T* col = dst + p * k_size * kPanel + j;
          for (int64_t k = 0; k < k_size; ++k) col[k * kPanel] = row[k];
        }
    });
  });
  return packed;
}

// x (M, K) with unit column stride, packed from `pack` (same dtype) -> y (M, out_features) in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                  const c10::optional<at::Tensor>& bias, int64_t max_isa) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "batch_invariant_linear: x must be (M, K) with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "batch_invariant_linear: packed must come from batch_invariant_pack");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "batch_invariant_linear: x is ", x.scalar_type(),
              " but the packed weight is ", packed.scalar_type());
  int64_t m = x.size(0), k_size = x.size(1), panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == k_size, "batch_invariant_linear: x has ", k_size, " features, the weight ",
              packed.size(1));
  TORCH_CHECK(out_features > (panels - 1) * kPanel && out_features <= panels * kPanel,
              "batch_invariant_linear: out_features does not match the packed weight");
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.dim() == 1 && b.size(0) == out_features && b.scalar_type() == x.scalar_type(),
                "batch_invariant_linear: bias must be (out_features,) in x's dtype");
  }
  auto out = at::empty({m, out_features}, x.options());
  if (m == 0) return out;
  int path = path_for(max_isa);
  auto xf = at::empty({m, k_size}, x.options().dtype(at::kFloat));  // x widened once
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    int64_t xs = x.stride(0);
    float* xfp = xf.data_ptr<float>();
    at::parallel_for(0, m, 16, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r)
        for (int64_t k = 0; k < k_size; ++k) xfp[r * k_size + k] = widen(xp[r * xs + k]);
    });
    const T* wp = packed.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    int64_t chunks = (m + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, chunks * panels, 1, [&](int64_t s, int64_t e) {
      alignas(64) float acc[kRows * kPanel];
      for (int64_t t = s; t < e; ++t) {
        int64_t p = t % panels, chunk = t / panels;
        int64_t cols = std::min(kPanel, out_features - p * kPanel);
        for (int64_t m0 = chunk * kRowsPerTask; m0 < std::min(m, (chunk + 1) * kRowsPerTask); m0 += kRows) {
          int rows = static_cast<int>(std::min<int64_t>(kRows, m - m0));
          tile<T>(path, xfp + m0 * k_size, rows, k_size, wp + p * k_size * kPanel, acc);
          for (int r = 0; r < rows; ++r) {
            T* orow = op + (m0 + r) * out_features + p * kPanel;
            const float* a = acc + r * kPanel;
            if (bp != nullptr) {
              for (int64_t j = 0; j < cols; ++j) orow[j] = narrow<T>(a[j] + widen(bp[p * kPanel + j]));
            } else {
              for (int64_t j = 0; j < cols; ++j) orow[j] = narrow<T>(a[j]);
            }
          }
        }
      }
    });
  });
  return out;
}

// Which path `linear` runs under this cap on this CPU: 0 scalar, 1 AVX2, 2 AVX-512 (for tests and logs).
int64_t path(int64_t max_isa) { return path_for(max_isa); }

}  // namespace
}  // namespace batch_invariant
}  // namespace flotilla

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def("batch_invariant_pack(Tensor weight) -> Tensor");
  m.def("batch_invariant_linear(Tensor x, Tensor packed, int out_features, Tensor? bias=None, int max_isa=3) "
        "-> Tensor");
  m.def("batch_invariant_path(int max_isa=3) -> int", &flotilla::batch_invariant::path);
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("batch_invariant_pack", &flotilla::batch_invariant::pack);
  m.impl("batch_invariant_linear", &flotilla::batch_invariant::linear);
}
