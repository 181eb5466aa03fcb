// Sampling kernels, registered as torch.ops.flotilla.argmax_rows and torch.ops.flotilla.sample_rows (part of
// flotilla's CPU kernel library). sample_rows defines flotilla's random stream; flotilla/sampler.py's eager
// path reproduces it bit for bit (tests/test_random_stream.py).

#include <torch/library.h>

#include "common.h"

namespace {
using namespace flotilla::kernels;

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def("argmax_rows(Tensor(a!) out, Tensor x) -> ()");
  m.def("sample_rows(Tensor(a!) out, Tensor x, Tensor inv_temperature, Tensor keys) -> ()");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("argmax_rows", &argmax_rows);
  m.impl("sample_rows", &sample_rows);
}
