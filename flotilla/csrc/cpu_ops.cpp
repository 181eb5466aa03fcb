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

#include <torch/library.h>

#include "common.h"

namespace {
using namespace flotilla::kernels;

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
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("write_kv_cache", &write_kv_cache);
}
