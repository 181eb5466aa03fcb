// flotilla's fused CPU kernels, registered as torch.ops.flotilla.* (built on first use by flotilla/ops.py).
//
// Each op replaces a chain of small eager PyTorch ops on the decode hot path, and reproduces the rounding of
// the eager chain it replaces in bfloat16/float16 (every intermediate the eager code rounds to the
// activation dtype is rounded here too), so switching kernels on or off changes no greedy token in tests.
// Attention is the exception: it keeps scores, probabilities and the output accumulator in float32.
//
// Layouts (see flotilla/layers/attention/torch_paged.py):
//   KV cache of one layer: (2, kv_heads, num_blocks, block_size, head_dim); k_cache = cache[0].
//   q: (num_tokens, num_heads, head_dim); k, v: (num_tokens, kv_heads, head_dim), head_dim contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

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

namespace {

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
void check_indices(const int64_t* idx, int64_t n, int64_t limit, const char* op, const char* what) {
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

// ---- RMSNorm -------------------------------------------------------------------------------------------
// Eager: x.float(); x * rsqrt(mean(x^2) + eps) -> T; weight * that -> T.
template <typename T>
FLOTILLA_INLINE void rms_norm_row(const T* x, const T* w, T* out, int64_t h, float eps) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < h; ++i) { float v = to_f(x[i]); ss += v * v; }
  float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = from_f<T>(to_f(w[i]) * round_t<T>(to_f(x[i]) * inv));
}

template <typename T>
struct NormArgs {
  T* x;          // (N, H) rows x_stride apart
  int64_t x_stride;
  T* residual;   // (N, H) contiguous, fused_add_rms_norm only
  const T* w;    // (H,)
  T* out;        // (N, H) contiguous
  int64_t h;
  float eps;
};

template <typename T>
FLOTILLA_INLINE void rms_norm_rows(const NormArgs<T>& a, int64_t b, int64_t e) {
  for (int64_t r = b; r < e; ++r) rms_norm_row(a.x + r * a.x_stride, a.w, a.out + r * a.h, a.h, a.eps);
}

template <typename T>
FLOTILLA_INLINE void fused_add_rms_norm_rows(const NormArgs<T>& a, int64_t b, int64_t e) {
  for (int64_t r = b; r < e; ++r) {
    T* xr = a.x + r * a.h;
    T* rr = a.residual + r * a.h;
#pragma omp simd
    for (int64_t i = 0; i < a.h; ++i) rr[i] = from_f<T>(to_f(xr[i]) + to_f(rr[i]));
    rms_norm_row(rr, a.w, xr, a.h, a.eps);
  }
}

// out = rms_norm(x) * weight.  x, out: (N, H) contiguous rows.
void rms_norm(at::Tensor& out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.is_contiguous() && weight.is_contiguous());
  TORCH_CHECK(out.sizes() == x.sizes() && weight.numel() == x.size(1), "rms_norm: out ", out.sizes(), ", weight ",
              weight.sizes(), " do not fit x ", x.sizes());
  int64_t n = x.size(0), h = x.size(1), xs = x.stride(0);
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    NormArgs<scalar_t> a{const_cast<scalar_t*>(x.data_ptr<scalar_t>()), xs, nullptr, weight.data_ptr<scalar_t>(),
                         out.data_ptr<scalar_t>(), h, static_cast<float>(eps)};
    parallel_rows<NormArgs<scalar_t>, rms_norm_rows<scalar_t>>(n, 16, a);
  });
}

// residual = x + residual (rounded to T); x = rms_norm(residual) * weight.  In place, (N, H) contiguous.
void fused_add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous());
  TORCH_CHECK(x.dim() >= 1 && residual.sizes() == x.sizes() && weight.numel() == x.size(-1),
              "fused_add_rms_norm: residual ", residual.sizes(), ", weight ", weight.sizes(), " do not fit x ",
              x.sizes());
  int64_t h = x.size(-1), n = h ? x.numel() / h : 0;
  dispatch(x.scalar_type(), "fused_add_rms_norm", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    NormArgs<scalar_t> a{x.data_ptr<scalar_t>(), h, residual.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                         x.data_ptr<scalar_t>(), h, static_cast<float>(eps)};
    parallel_rows<NormArgs<scalar_t>, fused_add_rms_norm_rows<scalar_t>>(n, 16, a);
  });
}

// ---- SwiGLU --------------------------------------------------------------------------------------------
// out (N, D) = silu(x[:, :D]) * x[:, D:], x (N, 2D).  Eager rounds silu(gate) to T before the product.
template <typename T>
struct SiluArgs {
  const T* x;  // (N, 2D) rows x_stride apart
  int64_t x_stride;
  T* out;      // (N, D) contiguous
  int64_t d;
};

// Elements [b, e) of the flattened (N, D) output.
template <typename T>
FLOTILLA_INLINE void silu_and_mul_range(const SiluArgs<T>& a, int64_t b, int64_t e) {
  int64_t d = a.d;
  while (b < e) {
    int64_t r = b / d, c0 = b % d, c1 = std::min(d, c0 + (e - b));
    const T* g = a.x + r * a.x_stride;
    const T* u = g + d;
    T* o = a.out + r * d;
#pragma omp simd
    for (int64_t c = c0; c < c1; ++c) {
      float gv = to_f(g[c]);
      float s = round_t<T>(gv / (1.f + fast_exp(-gv)));
      o[c] = from_f<T>(s * to_f(u[c]));
    }
    b += c1 - c0;
  }
}

void silu_and_mul(at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.is_contiguous());
  TORCH_CHECK(x.size(1) % 2 == 0 && out.dim() == 2 && out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2,
              "silu_and_mul: x ", x.sizes(), " must be (N, 2D) and out (N, D), got out ", out.sizes());
  int64_t n = x.size(0), d = x.size(1) / 2, xs = x.stride(0);
  dispatch(x.scalar_type(), "silu_and_mul", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    SiluArgs<scalar_t> a{x.data_ptr<scalar_t>(), xs, out.data_ptr<scalar_t>(), d};
    parallel_rows<SiluArgs<scalar_t>, silu_and_mul_range<scalar_t>>(n * d, 4096, a);
  });
}

// ---- Rotary embedding (neox / rotate_half layout), in place ---------------------------------------------
// Eager: cos, sin = cache[pos].to(T); x * cos -> T; rotate_half(x) * sin -> T; sum -> T.
template <typename T>
FLOTILLA_INLINE void rope_head(T* x, const float* cos, const float* sin, int64_t half) {
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    float x1 = to_f(x[i]), x2 = to_f(x[i + half]);
    float c1 = round_t<T>(cos[i]), s1 = round_t<T>(sin[i]);
    float c2 = round_t<T>(cos[i + half]), s2 = round_t<T>(sin[i + half]);
    float a1 = round_t<T>(x1 * c1), b1 = round_t<T>(-x2 * s1);
    float a2 = round_t<T>(x2 * c2), b2 = round_t<T>(x1 * s2);
    x[i] = from_f<T>(a1 + b1);
    x[i + half] = from_f<T>(a2 + b2);
  }
}

template <typename T>
struct RopeArgs {
  const int64_t* positions;  // (T,)
  T* q;                      // (T, H, D), tokens q_stride apart
  T* k;                      // (T, KVH, D), tokens k_stride apart
  int64_t q_stride, k_stride, hq, hk, d;
  const float* cos;          // (P, D)
  const float* sin;          // (P, D)
};

template <typename T>
FLOTILLA_INLINE void rope_tokens(const RopeArgs<T>& a, int64_t b, int64_t e) {
  for (int64_t i = b; i < e; ++i) {
    const float* c = a.cos + a.positions[i] * a.d;
    const float* s = a.sin + a.positions[i] * a.d;
    for (int64_t h = 0; h < a.hq; ++h) rope_head(a.q + i * a.q_stride + h * a.d, c, s, a.d / 2);
    for (int64_t h = 0; h < a.hk; ++h) rope_head(a.k + i * a.k_stride + h * a.d, c, s, a.d / 2);
  }
}

// positions (T,) int64; q (T, H, D), k (T, KVH, D) with contiguous heads; cos/sin caches (P, D) float32.
void rotary_embedding(const at::Tensor& positions, at::Tensor& q, at::Tensor& k, const at::Tensor& cos_cache,
                      const at::Tensor& sin_cache) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.stride(2) == 1 && k.stride(2) == 1);
  TORCH_CHECK(q.stride(1) == q.size(2) && k.stride(1) == k.size(2), "rotary_embedding: heads must be contiguous");
  TORCH_CHECK(cos_cache.scalar_type() == at::kFloat && cos_cache.is_contiguous() && sin_cache.is_contiguous());
  TORCH_CHECK(q.size(2) % 2 == 0 && k.size(0) == q.size(0) && k.size(2) == q.size(2),
              "rotary_embedding: q ", q.sizes(), " and k ", k.sizes(), " must share tokens and an even head size");
  TORCH_CHECK(cos_cache.dim() == 2 && cos_cache.size(1) == q.size(2) && sin_cache.sizes() == cos_cache.sizes() &&
              sin_cache.scalar_type() == at::kFloat, "rotary_embedding: cos/sin caches ", cos_cache.sizes(), ", ",
              sin_cache.sizes(), " must be (positions, ", q.size(2), ") float32");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == q.size(0),
              "rotary_embedding: positions must be one int64 per token");
  int64_t t = q.size(0);
  auto pos = positions.contiguous();
  check_indices(pos.data_ptr<int64_t>(), t, cos_cache.size(0), "rotary_embedding", "positions");
  dispatch(q.scalar_type(), "rotary_embedding", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    RopeArgs<scalar_t> a{pos.data_ptr<int64_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), q.stride(0),
                         k.stride(0), q.size(1), k.size(1), q.size(2), cos_cache.data_ptr<float>(),
                         sin_cache.data_ptr<float>()};
    parallel_rows<RopeArgs<scalar_t>, rope_tokens<scalar_t>>(t, 8, a);
  });
}

// ---- KV cache write ------------------------------------------------------------------------------------
// k, v (T, KVH, D) with contiguous heads -> caches (KVH, num_blocks * block_size, D) at slot_mapping (T,).
void write_kv_cache(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                    const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1 && k.stride(1) == k.size(2) && v.stride(1) == v.size(2));
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(v.sizes() == k.sizes() && k_cache.sizes() == v_cache.sizes() && k_cache.dim() >= 2 &&
              k_cache.size(0) == k.size(1) && k_cache.size(-1) == k.size(2), "write_kv_cache: k ", k.sizes(),
              ", v ", v.sizes(), " do not fit the caches ", k_cache.sizes(), ", ", v_cache.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.numel() == k.size(0),
              "write_kv_cache: slot_mapping must be one int64 per token");
  int64_t t = k.size(0), kvh = k.size(1), d = k.size(2);
  int64_t slots_per_head = kvh * d ? k_cache.numel() / (kvh * d) : 0;
  auto slots = slot_mapping.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  check_indices(sp, t, slots_per_head, "write_kv_cache", "slot_mapping");  // before any write
  dispatch(k.scalar_type(), "write_kv_cache", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* kp = k.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    scalar_t* kc = k_cache.data_ptr<scalar_t>();
    scalar_t* vc = v_cache.data_ptr<scalar_t>();
    for (int64_t i = 0; i < t; ++i) {
      for (int64_t h = 0; h < kvh; ++h) {
        std::copy_n(kp + i * k.stride(0) + h * d, d, kc + (h * slots_per_head + sp[i]) * d);
        std::copy_n(vp + i * v.stride(0) + h * d, d, vc + (h * slots_per_head + sp[i]) * d);
      }
    }
  });
}

// Scores s (len,) -> exp(s - max(s)) in place; returns their sum (the softmax's normalizer).
FLOTILLA_INLINE float exp_shifted_in_place(float* s, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < len; ++t) m = std::max(m, s[t]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) { s[t] = fast_exp(s[t] - m); sum += s[t]; }
  return sum;
}

// ---- Paged decode attention ----------------------------------------------------------------------------
// One query token per sequence, read straight from the cache blocks (no gather copy).
// q (N, H, D); k_cache, v_cache (KVH, num_blocks, block_size, D); block_tables (N, max_blocks) int64;
// seq_lens (N,) int64; out (N, H * D).  Query head h reads kv head h / (H / KVH).
template <typename T>
void decode_one(const T* q, int64_t q_head_stride, const T* kc, const T* vc, const int64_t* table,
                int64_t len, int64_t block_size, int64_t d, int64_t g, float scale, T* out,
                std::vector<float>& buf) {
  // buf: g*d query (scaled), g*len scores, g*d accumulators
  buf.resize(static_cast<size_t>(g * d * 2 + g * len));
  float* qf = buf.data();
  float* acc = qf + g * d;
  float* sc = acc + g * d;
  for (int64_t j = 0; j < g; ++j)
    for (int64_t c = 0; c < d; ++c) qf[j * d + c] = to_f(q[j * q_head_stride + c]) * scale;
  float kf[256];
  for (int64_t t = 0; t < len; ++t) {
    const T* kr = kc + (table[t / block_size] * block_size + t % block_size) * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) kf[c] = to_f(kr[c]);
    for (int64_t j = 0; j < g; ++j) {
      const float* qj = qf + j * d;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t c = 0; c < d; ++c) s += qj[c] * kf[c];
      sc[j * len + t] = s;
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    float* s = sc + j * len;
    float inv = 1.f / exp_shifted_in_place(s, len);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) s[t] *= inv;
  }
  std::fill(acc, acc + g * d, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const T* vr = vc + (table[t / block_size] * block_size + t % block_size) * d;
#pragma omp simd
    for (int64_t c = 0; c < d; ++c) kf[c] = to_f(vr[c]);
    for (int64_t j = 0; j < g; ++j) {
      float p = sc[j * len + t];
      float* aj = acc + j * d;
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) aj[c] += p * kf[c];
    }
  }
  for (int64_t j = 0; j < g; ++j)
    for (int64_t c = 0; c < d; ++c) out[j * d + c] = from_f<T>(acc[j * d + c]);
}

#ifdef FLOTILLA_X86_AVX512
// 16 bfloat16 values widened to float32 (exact: the bits shifted into the high half), AVX-512F only.
FLOTILLA_TARGET_AVX512 inline __m512 load_bf16x16(const at::BFloat16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// r = [sum(v[0]), ..., sum(v[15])]: 16 horizontal sums at once (a transpose-and-add tree, ~3 instructions per
// sum instead of a full reduction each).
FLOTILLA_TARGET_AVX512 inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4];
  for (int k = 0; k < 8; ++k)
    a[k] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * k], v[2 * k + 1]), _mm512_unpackhi_ps(v[2 * k], v[2 * k + 1]));
  for (int k = 0; k < 4; ++k) {
    __m512d x = _mm512_castps_pd(a[2 * k]), y = _mm512_castps_pd(a[2 * k + 1]);
    b[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // b[k], per 128-bit lane: partial sums of v[4k .. 4k+3]; add the four lanes, keeping the order.
  __m512 c0 = _mm512_add_ps(_mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(b[0], b[1], _MM_SHUFFLE(3, 1, 3, 1)));
  __m512 c1 = _mm512_add_ps(_mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_f32x4(b[2], b[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(c0, c1, _MM_SHUFFLE(3, 1, 3, 1)));
}

// The same computation for bfloat16 with AVX-512: head_dim = 16 * NC, G query heads per kv head (all G
// queries stay in registers, so each key and value row is widened to float32 once for the G heads). Values are
// read block by block (no division per token). Scores, softmax and sums stay float32.
template <int NC, int G>
FLOTILLA_TARGET_AVX512 void decode_one_avx512(const at::BFloat16* q, const at::BFloat16* kc, const at::BFloat16* vc,
                       const int64_t* table, int64_t len, int64_t block_size, float scale, at::BFloat16* out,
                       std::vector<float>& buf) {
  constexpr int D = NC * 16;
  buf.resize(static_cast<size_t>(G * len));
  float* sc = buf.data();  // (G, len)
  __m512 qv[G][NC];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < NC; ++c) qv[j][c] = _mm512_mul_ps(load_bf16x16(q + j * D + c * 16), _mm512_set1_ps(scale));
  // Scores 16 keys at a time: widen the 16 key rows once, then 16 dot-product vectors per head and one hsum16.
  alignas(64) float kf[16 * D];
  for (int64_t start = 0; start < len; start += 16) {
    int64_t n = std::min<int64_t>(16, len - start);
    // The next 16 keys sit in other blocks (other pages): start fetching them now.
    for (int64_t t = start + 16; t < std::min<int64_t>(start + 32, len); ++t) {
      const char* kr = reinterpret_cast<const char*>(kc + (table[t / block_size] * block_size + t % block_size) * D);
      for (int off = 0; off < D * 2; off += 64) _mm_prefetch(kr + off, _MM_HINT_T0);
    }
    for (int64_t tt = 0; tt < 16; ++tt) {
      int64_t t = start + std::min(tt, n - 1);  // past the end: repeat the last key (its score is dropped)
      const at::BFloat16* kr = kc + (table[t / block_size] * block_size + t % block_size) * D;
      for (int c = 0; c < NC; ++c) _mm512_store_ps(kf + tt * D + c * 16, load_bf16x16(kr + c * 16));
    }
    for (int j = 0; j < G; ++j) {
      __m512 acc[16];
      for (int tt = 0; tt < 16; ++tt) {
        acc[tt] = _mm512_mul_ps(qv[j][0], _mm512_load_ps(kf + tt * D));
        for (int c = 1; c < NC; ++c) acc[tt] = _mm512_fmadd_ps(qv[j][c], _mm512_load_ps(kf + tt * D + c * 16), acc[tt]);
      }
      __m512 r = hsum16(acc);
      if (n == 16) {
        _mm512_storeu_ps(sc + j * len + start, r);
      } else {
        _mm512_mask_storeu_ps(sc + j * len + start, static_cast<__mmask16>((1u << n) - 1), r);
      }
    }
  }
  float inv[G];
  for (int j = 0; j < G; ++j) inv[j] = 1.f / exp_shifted_in_place(sc + j * len, len);
  __m512 acc[G][NC];
  for (int j = 0; j < G; ++j)
    for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_setzero_ps();
  for (int64_t start = 0, blk = 0; start < len; start += block_size, ++blk) {
    const at::BFloat16* vb = vc + table[blk] * block_size * D;
    int64_t n = std::min(block_size, len - start);
    if (start + block_size < len) {  // prefetch the next block's values
      const char* nb = reinterpret_cast<const char*>(vc + table[blk + 1] * block_size * D);
      int64_t bytes = std::min(block_size, len - start - block_size) * D * 2;
      for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(nb + off, _MM_HINT_T0);
    }
    for (int64_t tt = 0; tt < n; ++tt) {
      __m512 vf[NC];
      for (int c = 0; c < NC; ++c) vf[c] = load_bf16x16(vb + tt * D + c * 16);
      for (int j = 0; j < G; ++j) {
        __m512 p = _mm512_set1_ps(sc[j * len + start + tt]);
        for (int c = 0; c < NC; ++c) acc[j][c] = _mm512_fmadd_ps(p, vf[c], acc[j][c]);
      }
    }
  }
  alignas(64) float tmp[D];
  for (int j = 0; j < G; ++j) {
    for (int c = 0; c < NC; ++c) _mm512_store_ps(tmp + c * 16, _mm512_mul_ps(acc[j][c], _mm512_set1_ps(inv[j])));
    for (int c = 0; c < D; ++c) out[j * D + c] = from_f<at::BFloat16>(tmp[c]);
  }
}

using DecodeFn = void (*)(const at::BFloat16*, const at::BFloat16*, const at::BFloat16*, const int64_t*, int64_t,
                          int64_t, float, at::BFloat16*, std::vector<float>&);

// The AVX-512 kernel for this head_dim and group size, or nullptr (then the portable one runs).
inline DecodeFn avx512_decode_fn(int64_t d, int64_t g) {
  if (d == 64) {
    switch (g) {
      case 1: return decode_one_avx512<4, 1>;
      case 2: return decode_one_avx512<4, 2>;
      case 3: return decode_one_avx512<4, 3>;
      case 4: return decode_one_avx512<4, 4>;
      case 5: return decode_one_avx512<4, 5>;
      case 6: return decode_one_avx512<4, 6>;
    }
  } else if (d == 128) {
    switch (g) {
      case 1: return decode_one_avx512<8, 1>;
      case 2: return decode_one_avx512<8, 2>;
      case 3: return decode_one_avx512<8, 3>;
    }
  }
  return nullptr;
}
#endif

void paged_decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2), "q: (N, H, D), contiguous heads");
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.is_contiguous());
  TORCH_CHECK(out.is_contiguous() && block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong);
  int64_t n = q.size(0), hq = q.size(1), d = q.size(2);
  int64_t kvh = k_cache.size(0), num_blocks = k_cache.size(1), block_size = k_cache.size(2);
  TORCH_CHECK(d <= 256 && kvh > 0 && hq % kvh == 0 && k_cache.size(3) == d, "paged_decode_attention: bad head sizes");
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && out.numel() == n * hq * d, "paged_decode_attention: v_cache ",
              v_cache.sizes(), " or out ", out.sizes(), " do not fit k_cache ", k_cache.sizes(), " and q ", q.sizes());
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == n && seq_lens.numel() == n,
              "paged_decode_attention: block_tables ", block_tables.sizes(), " and seq_lens ", seq_lens.sizes(),
              " need one row per query (", n, ")");
  int64_t g = hq / kvh;
  auto tables = block_tables.contiguous();
  auto lens = seq_lens.contiguous();
  int64_t max_blocks = tables.size(1);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(lp[i] > 0 && lp[i] <= max_blocks * block_size, "paged_decode_attention: seq_lens[", i, "] = ",
                lp[i], " is outside [1, ", max_blocks * block_size, "] (block_tables' ", max_blocks, " blocks of ",
                block_size, ")");
    int64_t used = (lp[i] + block_size - 1) / block_size;  // the blocks this sequence reads
    for (int64_t j = 0; j < used; ++j) {
      int64_t blk = tp[i * max_blocks + j];
      TORCH_CHECK(blk >= 0 && blk < num_blocks, "paged_decode_attention: block_tables[", i, "][", j, "] = ", blk,
                  " is outside [0, ", num_blocks, ") (the cache's blocks)");
    }
  }
  dispatch(q.scalar_type(), "paged_decode_attention", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* qp = q.data_ptr<scalar_t>();
    const scalar_t* kp = k_cache.data_ptr<scalar_t>();
    const scalar_t* vp = v_cache.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    int64_t head_elems = num_blocks * block_size * d;
    [[maybe_unused]] bool use_avx512 = flotilla::isa::level() >= flotilla::isa::kAvx512;
    at::parallel_for(0, n * kvh, 1, [&](int64_t b, int64_t e) {
      std::vector<float> buf;
      for (int64_t w = b; w < e; ++w) {
        int64_t i = w / kvh, h = w % kvh;
#ifdef FLOTILLA_X86_AVX512
        if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
          if (DecodeFn fn = use_avx512 ? avx512_decode_fn(d, g) : nullptr) {
            fn(qp + i * q.stride(0) + h * g * d, kp + h * head_elems, vp + h * head_elems, tp + i * max_blocks,
               lp[i], block_size, static_cast<float>(scale), op + i * hq * d + h * g * d, buf);
            continue;
          }
        }
#endif
        decode_one<scalar_t>(qp + i * q.stride(0) + h * g * d, d, kp + h * head_elems, vp + h * head_elems,
                             tp + i * max_blocks, lp[i], block_size, d, g, static_cast<float>(scale),
                             op + i * hq * d + h * g * d, buf);
      }
    });
  });
}

// ---- Greedy sampling -----------------------------------------------------------------------------------
// out (B,) int64 = the first index of each row's maximum of x (B, V) float32, NaN counting as the maximum
// (torch.argmax's rule); rows in parallel (torch's CPU argmax runs them on one thread).
void argmax_rows(at::Tensor& out, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat, "argmax_rows: (B, V) float32");
  TORCH_CHECK(out.is_contiguous() && out.scalar_type() == at::kLong && out.numel() == x.size(0));
  int64_t b = x.size(0), v = x.size(1), xs = x.stride(0);
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, b, 1, [&](int64_t s, int64_t e) {
    for (int64_t r = s; r < e; ++r) {
      const float* row = xp + r * xs;
      float m = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t i = 0; i < v; ++i) {
        m = std::max(m, row[i]);
        nan |= row[i] != row[i];
      }
      int64_t idx = 0;
      for (int64_t i = 0; i < v; ++i) {
        if (nan ? row[i] != row[i] : row[i] == m) { idx = i; break; }  // NaN is the maximum, as in torch
      }
      op[r] = idx;
    }
  });
}

// ---- Random sampling -----------------------------------------------------------------------------------
// ln(x) for x > 0 in float32 to about 1e-6 relative, vectorizable: x = 2^e * m, m in [sqrt(.5), sqrt(2)),
// ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), by its series to s^9.
#pragma omp declare simd
inline float fast_log(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  int32_t e = static_cast<int32_t>((bits >> 23) & 0xff) - 127;
  uint32_t mb = (bits & 0x7fffffu) | 0x3f800000u;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mb, sizeof m);
  float big = m > 1.41421356f ? 1.f : 0.f;
  m = m * (1.f - 0.5f * big);
  float ef = static_cast<float>(e) + big;
  float s = (m - 1.f) / (m + 1.f), s2 = s * s;
  float poly = 1.f + s2 * (1.f / 3 + s2 * (1.f / 5 + s2 * (1.f / 7 + s2 * (1.f / 9))));
  return ef * 0.693147180559945f + 2.f * s * poly;
}

// A uniform in (0, 1) from a 64-bit key and a position: splitmix64's finalizer of key + (i + 1) * golden, its
// top 23 bits + 1/2, times 2^-23 (every step exact in float32, so u is never 0 or 1).
#pragma omp declare simd
inline float hash_uniform(uint64_t key, uint64_t i) {
  uint64_t z = key + (i + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return (static_cast<float>(z >> 41) + 0.5f) * (1.f / 8388608.f);
}

// out (B,) int64: one draw per row from softmax(x[r] * inv_temperature[r]) by the exponential race,
// argmax_i p_i / E_i with p_i = fast_exp((x_i - max) * inv_t) and E_i = -fast_log(U_i), U_i = hash_uniform(key, i)
// (the first index on ties). A row's draw depends only on its key (B,) int64 and its own logits, and a tiny
// change in one logit can only flip the draw between two near-tied candidates. x (B, V) float32; a -inf logit
// never wins. A row with a NaN or +inf logit, or all -inf, takes argmax_rows' pick (the first NaN, else the
// first maximum). flotilla/sampler.py's race_sample computes the same stream with PyTorch ops, bit for bit.
void sample_rows(at::Tensor& out, const at::Tensor& x, const at::Tensor& inv_temperature, const at::Tensor& keys) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat, "sample_rows: (B, V) float32");
  TORCH_CHECK(inv_temperature.is_contiguous() && keys.is_contiguous() && out.is_contiguous());
  TORCH_CHECK(inv_temperature.scalar_type() == at::kFloat && keys.scalar_type() == at::kLong &&
              out.scalar_type() == at::kLong);
  int64_t b = x.size(0), v = x.size(1), xs = x.stride(0);
  TORCH_CHECK(inv_temperature.numel() == b && keys.numel() == b && out.numel() == b,
              "sample_rows: inv_temperature, keys and out need one entry per row of x");
  const float* xp = x.data_ptr<float>();
  const float* tp = inv_temperature.data_ptr<float>();
  const int64_t* kp = keys.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, b, 1, [&](int64_t s, int64_t e) {
    std::vector<float> score(static_cast<size_t>(v));
    for (int64_t r = s; r < e; ++r) {
      const float* row = xp + r * xs;
      float it = tp[r];
      uint64_t key = static_cast<uint64_t>(kp[r]);
      float m = -std::numeric_limits<float>::infinity();
      int nan = 0;
#pragma omp simd reduction(max : m) reduction(| : nan)
      for (int64_t i = 0; i < v; ++i) {
        m = std::max(m, row[i]);
        nan |= row[i] != row[i];
      }
      if (nan || !std::isfinite(m)) {  // degenerate row: torch.argmax's pick
        int64_t idx = 0;
        for (int64_t i = 0; i < v; ++i) {
          if (nan ? row[i] != row[i] : row[i] == m) { idx = i; break; }
        }
        op[r] = idx;
        continue;
      }
      float* sc = score.data();
      float best = 0.f;
#pragma omp simd reduction(max : best)
      for (int64_t i = 0; i < v; ++i) {
        float p = fast_exp((row[i] - m) * it);  // 0 for -inf
        float expo = -fast_log(hash_uniform(key, static_cast<uint64_t>(i)));  // > 0
        sc[i] = p / expo;
        best = std::max(best, sc[i]);
      }
      int64_t pick = 0;
      for (int64_t i = 0; i < v; ++i) {
        if (sc[i] == best) { pick = i; break; }
      }
      op[r] = pick;
    }
  });
}

// ---- Run-time ISA level ------------------------------------------------------------------------------
int64_t isa_level() { return flotilla::isa::level(); }

int64_t isa_detected() { return flotilla::isa::detected(); }

// Caps the level kernels dispatch on (tests run the portable paths on a wide machine); returns the old cap.
int64_t set_isa_cap(int64_t cap) {
  TORCH_CHECK(cap >= flotilla::isa::kScalar && cap <= flotilla::isa::kAvx512Bf16, "set_isa_cap: level ", cap,
              " outside [", flotilla::isa::kScalar, ", ", flotilla::isa::kAvx512Bf16, "]");
  int64_t previous = flotilla::isa::cap_storage().load();
  flotilla::isa::set_cap(static_cast<int>(cap));
  return previous;
}

}  // namespace

TORCH_LIBRARY(flotilla, m) {
  m.def("isa_level() -> int", &isa_level);
  m.def("isa_detected() -> int", &isa_detected);
  m.def("set_isa_cap(int cap) -> int", &set_isa_cap);
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("fused_add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
  m.def("rotary_embedding(Tensor positions, Tensor(a!) q, Tensor(b!) k, Tensor cos_cache, Tensor sin_cache) -> ()");
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
  m.def("sample_rows(Tensor(a!) out, Tensor x, Tensor inv_temperature, Tensor keys) -> ()");
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("write_kv_cache", &write_kv_cache);
  m.impl("paged_decode_attention", &paged_decode_attention);
  m.impl("argmax_rows", &argmax_rows);
  m.impl("sample_rows", &sample_rows);
}
