// Batch-invariant linear layers: y[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n]), registered as
// torch.ops.flotilla.batch_invariant_* (built with the rest of the kernel library by flotilla/ops.py).
//
// The contract is the reduction order. Every output element is one float32 accumulator that starts at +0 and
// takes the products x[m, k] * w[n, k] one fused multiply-add (one rounding) at a time, in a fixed order of k;
// the bias (if any) is added to the finished sum in float32 and the result is rounded once to the output dtype.
// (For bfloat16 the bias add flushes denormals too.)
//   float32, float16: k = 0, 1, 2, ..., K - 1.
//   bfloat16: k = 1, 0, 3, 2, 5, 4, ... (pairs in order, the odd element first; an odd K gets a zero pair
//             element), with denormal inputs and results flushed to zero: exactly what AVX512-BF16's
//             vdpbf16ps does (two FMAs per lane, "DAZ in, FTZ out"), so that instruction can run it, and the
//             other paths do the same with MXCSR's FTZ/DAZ bits (and explicit flushes in scalar code).
// Nothing in that order depends on M, on the row's position in x, on the thread count or on which
// instruction set runs: a row gives bit-identical results alone or inside any batch, and the scalar, AVX2,
// AVX-512 and AVX512-BF16 paths agree bit for bit (tests/test_batch_invariant_kernel.py checks both).
//
// Weights are packed once at load (`batch_invariant_pack`) into panels of 64 output columns, zero-padded, in the
// weight's dtype: (ceil(N / 64), Kp, 64) with Kp = K, k-major ([k][column]) for float32/float16; Kp = K rounded up
// to even, pair-major ([k / 2][column][k % 2]) for bfloat16. The kernels broadcast one x value (or bf16 pair) and
// multiply it with 64 consecutive columns (4 AVX-512 vectors) for up to 6 rows at a time: no horizontal sums.
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
#include <limits>
#include <type_traits>

#include "common.h"
#include "isa.h"

namespace flotilla {
namespace batch_invariant {
namespace {

constexpr int64_t kPanel = 64;        // output columns per packed panel
constexpr int kRows = 6;              // rows per register block
constexpr int64_t kRowsPerTask = 96;  // rows one parallel task handles against one panel

// ---- scalar helpers ----------------------------------------------------------------------------------------
// Conversions (common.h): widen = to_f, narrow = from_f (bfloat16 on the bits, round to nearest even).
template <typename T>
inline float widen(T v) { return flotilla::kernels::to_f(v); }

// Denormals to zero of the same sign (vdpbf16ps's DAZ and FTZ).
inline float flush(float v) { return std::fabs(v) < std::numeric_limits<float>::min() ? std::copysign(0.f, v) : v; }

template <typename T>
inline T narrow(float v) { return flotilla::kernels::from_f<T>(v); }

// While alive (and `on`), sets MXCSR's flush-to-zero and denormals-are-zero bits: the bfloat16 contract.
class FlushDenormals {
 public:
  explicit FlushDenormals(bool on) {
#if defined(__x86_64__)
    if (on) {
      saved_ = _mm_getcsr();
      active_ = true;
      _mm_setcsr(saved_ | 0x8040u);
    }
#endif
    (void)on;
  }
  ~FlushDenormals() {
#if defined(__x86_64__)
    if (active_) _mm_setcsr(saved_);
#endif
  }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned int saved_ = 0;
  bool active_ = false;
};

// A tile: acc (rows, 64) = x rows (row stride kx) times one panel. x is float32 (for bfloat16: flushed, Kp wide)
// except on the vdpbf16ps path, where it is the bf16 pairs as 32-bit words (row stride kx = Kp / 2).
using Tile = void (*)(const void* x, int rows, int64_t kx, const void* panel, float* acc);

// ---- scalar path -------------------------------------------------------------------------------------------
// std::fmaf is the same single rounding as the vector FMAs below, so every path gives the same bits.
template <typename T>
void tile_seq_scalar(const void* xv, int rows, int64_t kx, const void* pv, float* acc) {
  const float* x = static_cast<const float*>(xv);
  const T* panel = static_cast<const T*>(pv);
  std::fill(acc, acc + rows * kPanel, 0.f);
  for (int64_t k = 0; k < kx; ++k) {
    for (int r = 0; r < rows; ++r) {
      float xk = x[r * kx + k];
      float* a = acc + r * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) a[j] = std::fmaf(xk, widen(panel[k * kPanel + j]), a[j]);
    }
  }
}

void tile_pair_scalar(const void* xv, int rows, int64_t kx, const void* pv, float* acc) {
  const float* x = static_cast<const float*>(xv);
  const at::BFloat16* panel = static_cast<const at::BFloat16*>(pv);
  std::fill(acc, acc + rows * kPanel, 0.f);
  for (int64_t p = 0; p < kx / 2; ++p) {
    const at::BFloat16* wp = panel + p * 2 * kPanel;
    for (int r = 0; r < rows; ++r) {
      float x1 = x[r * kx + 2 * p + 1], x0 = x[r * kx + 2 * p];
      float* a = acc + r * kPanel;
      for (int64_t j = 0; j < kPanel; ++j) {
        a[j] = flush(std::fmaf(x1, flush(widen(wp[2 * j + 1])), a[j]));
        a[j] = flush(std::fmaf(x0, flush(widen(wp[2 * j])), a[j]));
      }
    }
  }
}

#if defined(__x86_64__)
// ---- AVX2 + FMA path ---------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// float32/float16: one 16-column quarter of the panel at a time, ROWS x 2 accumulators of 8 lanes.
template <typename T, int ROWS>
void tile_seq_avx2(const void* xv, int, int64_t kx, const void* pv, float* acc) {
  const float* x = static_cast<const float*>(xv);
  const T* panel = static_cast<const T*>(pv);
  for (int q = 0; q < kPanel; q += 16) {
    __m256 a[ROWS][2];
    for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kx; ++k) {
      __m256 w0 = load8(panel + k * kPanel + q), w1 = load8(panel + k * kPanel + q + 8);
      for (int r = 0; r < ROWS; ++r) {
        __m256 xk = _mm256_broadcast_ss(x + r * kx + k);
        a[r][0] = _mm256_fmadd_ps(xk, w0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(xk, w1, a[r][1]);
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      _mm256_storeu_ps(acc + r * kPanel + q, a[r][0]);
      _mm256_storeu_ps(acc + r * kPanel + q + 8, a[r][1]);
    }
  }
}

// bfloat16 pairs: 16 columns (two vectors of 8 pairs) at a time; the odd element of a pair is its upper half.
template <int ROWS>
void tile_pair_avx2(const void* xv, int, int64_t kx, const void* pv, float* acc) {
  const float* x = static_cast<const float*>(xv);
  const at::BFloat16* panel = static_cast<const at::BFloat16*>(pv);
  const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int q = 0; q < kPanel; q += 16) {
    __m256 a[ROWS][2];
    for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t p = 0; p < kx / 2; ++p) {
      const at::BFloat16* wp = panel + (p * kPanel + q) * 2;
      __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
      __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp + 16));
      __m256 odd0 = _mm256_castsi256_ps(_mm256_and_si256(v0, hi)), odd1 = _mm256_castsi256_ps(_mm256_and_si256(v1, hi));
      __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
      __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
      for (int r = 0; r < ROWS; ++r) {
        __m256 x1 = _mm256_broadcast_ss(x + r * kx + 2 * p + 1), x0 = _mm256_broadcast_ss(x + r * kx + 2 * p);
        a[r][0] = _mm256_fmadd_ps(x0, even0, _mm256_fmadd_ps(x1, odd0, a[r][0]));
        a[r][1] = _mm256_fmadd_ps(x0, even1, _mm256_fmadd_ps(x1, odd1, a[r][1]));
      }
    }
    for (int r = 0; r < ROWS; ++r) {
      _mm256_storeu_ps(acc + r * kPanel + q, a[r][0]);
      _mm256_storeu_ps(acc + r * kPanel + q + 8, a[r][1]);
    }
  }
}

template <typename T>
Tile seq_avx2(int rows) {
  static const Tile fns[] = {nullptr, tile_seq_avx2<T, 1>, tile_seq_avx2<T, 2>, tile_seq_avx2<T, 3>,
                             tile_seq_avx2<T, 4>, tile_seq_avx2<T, 5>, tile_seq_avx2<T, 6>};
  return fns[rows];
}

Tile pair_avx2(int rows) {
  static const Tile fns[] = {nullptr, tile_pair_avx2<1>, tile_pair_avx2<2>, tile_pair_avx2<3>,
                             tile_pair_avx2<4>, tile_pair_avx2<5>, tile_pair_avx2<6>};
  return fns[rows];
}
#pragma GCC pop_options

// ---- AVX-512 path ------------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// float32/float16: the whole 64-column panel per k, ROWS x 4 accumulators (24 of the 32 registers at 6 rows).
template <typename T, int ROWS>
void tile_seq_avx512(const void* xv, int, int64_t kx, const void* pv, float* acc) {
  const float* x = static_cast<const float*>(xv);
  const T* panel = static_cast<const T*>(pv);
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kx; ++k) {
    const T* wk = panel + k * kPanel;
    __m512 w0 = load16(wk), w1 = load16(wk + 16), w2 = load16(wk + 32), w3 = load16(wk + 48);
    for (int r = 0; r < ROWS; ++r) {
      __m512 xk = _mm512_set1_ps(x[r * kx + k]);
      a[r][0] = _mm512_fmadd_ps(xk, w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(xk, w1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(xk, w2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(xk, w3, a[r][3]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * kPanel + c * 16, a[r][c]);
}

// bfloat16 pairs without AVX512-BF16: per pair, the odd elements of all 64 columns, then the even ones.
template <int ROWS>
void tile_pair_avx512(const void* xv, int, int64_t kx, const void* pv, float* acc) {
  const float* x = static_cast<const float*>(xv);
  const at::BFloat16* panel = static_cast<const at::BFloat16*>(pv);
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kx / 2; ++p) {
    const at::BFloat16* wp = panel + p * 2 * kPanel;
    __m512i v[4];
    for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_si512(wp + c * 32);
    for (int c = 0; c < 4; ++c) {
      __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v[c], hi));
      for (int r = 0; r < ROWS; ++r) a[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * kx + 2 * p + 1]), odd, a[r][c]);
    }
    for (int c = 0; c < 4; ++c) {
      __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v[c], 16));
      for (int r = 0; r < ROWS; ++r) a[r][c] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * kx + 2 * p]), even, a[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * kPanel + c * 16, a[r][c]);
}

template <typename T>
Tile seq_avx512(int rows) {
  static const Tile fns[] = {nullptr, tile_seq_avx512<T, 1>, tile_seq_avx512<T, 2>, tile_seq_avx512<T, 3>,
                             tile_seq_avx512<T, 4>, tile_seq_avx512<T, 5>, tile_seq_avx512<T, 6>};
  return fns[rows];
}

Tile pair_avx512(int rows) {
  static const Tile fns[] = {nullptr, tile_pair_avx512<1>, tile_pair_avx512<2>, tile_pair_avx512<3>,
                             tile_pair_avx512<4>, tile_pair_avx512<5>, tile_pair_avx512<6>};
  return fns[rows];
}
#pragma GCC pop_options

// ---- AVX512-BF16 path --------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")

// bfloat16 pairs with vdpbf16ps: x is the rows' bf16 pairs as 32-bit words (kx = Kp / 2 of them a row).
template <int ROWS>
void tile_pair_dp(const void* xv, int, int64_t kx, const void* pv, float* acc) {
  const uint32_t* x = static_cast<const uint32_t*>(xv);
  const at::BFloat16* panel = static_cast<const at::BFloat16*>(pv);
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r) a[r][0] = a[r][1] = a[r][2] = a[r][3] = _mm512_setzero_ps();
  for (int64_t p = 0; p < kx; ++p) {
    const at::BFloat16* wp = panel + p * 2 * kPanel;
    __m512bh w[4];
    for (int c = 0; c < 4; ++c) w[c] = (__m512bh)_mm512_loadu_si512(wp + c * 32);
    for (int r = 0; r < ROWS; ++r) {
      __m512bh xp = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * kx + p]));
      for (int c = 0; c < 4; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], w[c], xp);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + r * kPanel + c * 16, a[r][c]);
}

Tile pair_dp(int rows) {
  static const Tile fns[] = {nullptr, tile_pair_dp<1>, tile_pair_dp<2>, tile_pair_dp<3>,
                             tile_pair_dp<4>, tile_pair_dp<5>, tile_pair_dp<6>};
  return fns[rows];
}
#pragma GCC pop_options
#endif  // __x86_64__

// The path a cap runs: 3 = AVX512-BF16 (bfloat16 only; otherwise as 2), 2 = AVX-512, 1 = AVX2, 0 = scalar.
int path_for(int64_t max_isa) {
  int level = std::min<int>(isa::level(), static_cast<int>(std::max<int64_t>(max_isa, 0)));
#if defined(__x86_64__)
  return level >= isa::kAvx512Bf16 ? 3 : level >= isa::kAvx512 ? 2 : level >= isa::kAvx2 ? 1 : 0;
#else
  (void)level;
  return 0;
#endif
}

// The tile function for this dtype, path and row count.
template <typename T>
Tile tile_for(int path, int rows) {
  constexpr bool pairs = std::is_same_v<T, at::BFloat16>;
#if defined(__x86_64__)
  if constexpr (pairs) {
    if (path == 3) return pair_dp(rows);
    if (path == 2) return pair_avx512(rows);
    if (path == 1) return pair_avx2(rows);
  } else {
    if (path >= 2) return seq_avx512<T>(rows);
    if (path == 1) return seq_avx2<T>(rows);
  }
#endif
  if constexpr (pairs) {
    return tile_pair_scalar;
  } else {
    return tile_seq_scalar<T>;
  }
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

// K as packed: bfloat16 rounds up to whole pairs.
int64_t packed_k(at::ScalarType dtype, int64_t k) { return dtype == at::kBFloat16 ? k + (k & 1) : k; }

// weight (N, K) -> packed (ceil(N / 64), Kp, 64) in the same dtype (layouts in the header comment).
at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2, "batch_invariant_pack: weight must be (out_features, in_features)");
  auto w = weight.contiguous();
  int64_t n = w.size(0), k_size = w.size(1), panels = (n + kPanel - 1) / kPanel;
  int64_t kp = packed_k(w.scalar_type(), k_size);
  auto packed = at::zeros({panels, kp, kPanel}, w.options());
  dispatch(w.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t g = std::is_same_v<T, at::BFloat16> ? 2 : 1;  // k elements kept together per column
    const T* src = w.data_ptr<T>();
    T* dst = packed.data_ptr<T>();
    at::parallel_for(0, panels, 1, [&](int64_t b, int64_t e) {
      for (int64_t p = b; p < e; ++p)
        for (int64_t j = 0; j < kPanel && p * kPanel + j < n; ++j) {
          const T* row = src + (p * kPanel + j) * k_size;
          T* col = dst + p * kp * kPanel + j * g;
          for (int64_t k = 0; k < k_size; ++k) col[(k / g) * kPanel * g + k % g] = row[k];
        }
    });
  });
  return packed;
}

// x (M, K) as the tiles read it: float32 (bfloat16: flushed, zero-padded to Kp), or for the vdpbf16ps path the
// bf16 values themselves, zero-padded (read as pairs).
at::Tensor stage_x(const at::Tensor& x, int64_t kp, int path) {
  int64_t m = x.size(0), k_size = x.size(1), xs = x.stride(0);
  bool bf16 = x.scalar_type() == at::kBFloat16;
  if (bf16 && path == 3) {
    auto staged = at::zeros({m, kp}, x.options());
    staged.narrow(1, 0, k_size).copy_(x);
    return staged;
  }
  auto staged = at::zeros({m, kp}, x.options().dtype(at::kFloat));
  float* sp = staged.data_ptr<float>();
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* xp = x.data_ptr<T>();
    at::parallel_for(0, m, 16, [&](int64_t s, int64_t e) {
      for (int64_t r = s; r < e; ++r)
        for (int64_t k = 0; k < k_size; ++k) {
          float v = widen(xp[r * xs + k]);
          sp[r * kp + k] = bf16 ? flush(v) : v;
        }
    });
  });
  return staged;
}

// x (M, K) with unit column stride, packed from `pack` (same dtype) -> y (M, out_features) in x's dtype.
at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                  const c10::optional<at::Tensor>& bias, int64_t max_isa) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "batch_invariant_linear: x must be (M, K) with contiguous rows");
  TORCH_CHECK(packed.dim() == 3 && packed.size(2) == kPanel && packed.is_contiguous(),
              "batch_invariant_linear: packed must come from batch_invariant_pack");
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "batch_invariant_linear: x is ", x.scalar_type(),
              " but the packed weight is ", packed.scalar_type());
  int64_t m = x.size(0), k_size = x.size(1), panels = packed.size(0), kp = packed_k(x.scalar_type(), k_size);
  TORCH_CHECK(packed.size(1) == kp, "batch_invariant_linear: x has ", k_size, " features, the packed weight ",
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
  bool bf16 = x.scalar_type() == at::kBFloat16;
  auto staged = stage_x(x, kp, path);
  const char* xs = static_cast<const char*>(staged.data_ptr());
  int64_t kx = bf16 && path == 3 ? kp / 2 : kp;  // x elements (or pairs) a row
  size_t row_bytes = static_cast<size_t>(kx) * 4;  // float32 values or 32-bit pairs
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const T* wp = packed.data_ptr<T>();
    const T* bp = b.defined() ? b.data_ptr<T>() : nullptr;
    T* op = out.data_ptr<T>();
    int64_t chunks = (m + kRowsPerTask - 1) / kRowsPerTask;
    at::parallel_for(0, chunks * panels, 1, [&](int64_t s, int64_t e) {
      FlushDenormals ftz(bf16);  // float32/float16 keep denormals
      alignas(64) float acc[kRows * kPanel];
      for (int64_t t = s; t < e; ++t) {
        int64_t p = t / chunks, chunk = t % chunks;  // panel-major: a thread keeps its panels in cache
        int64_t cols = std::min(kPanel, out_features - p * kPanel);
        for (int64_t m0 = chunk * kRowsPerTask; m0 < std::min(m, (chunk + 1) * kRowsPerTask); m0 += kRows) {
          int rows = static_cast<int>(std::min<int64_t>(kRows, m - m0));
          tile_for<T>(path, rows)(xs + m0 * row_bytes, rows, kx, wp + p * kp * kPanel, acc);
          for (int r = 0; r < rows; ++r) {
            T* orow = op + (m0 + r) * out_features + p * kPanel;
            const float* a = acc + r * kPanel;
            if (bp != nullptr && bf16) {
              for (int64_t j = 0; j < cols; ++j) orow[j] = narrow<T>(flush(a[j] + flush(widen(bp[p * kPanel + j]))));
            } else if (bp != nullptr) {
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

// Which path `linear` runs under this cap on this CPU: 0 scalar, 1 AVX2, 2 AVX-512, 3 AVX512-BF16 (for tests and
// logs; float32/float16 run path 2 at cap 3).
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
