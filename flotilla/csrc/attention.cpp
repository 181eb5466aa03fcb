// Paged decode attention, registered as torch.ops.flotilla.paged_decode_attention (part of flotilla's CPU kernel
// library; see cpu_ops.cpp for the conventions). Scores, probabilities and the output accumulator stay float32.
//
// Layouts (see flotilla/layers/attention/torch_paged.py):
//   KV cache of one layer: (2, kv_heads, num_blocks, block_size, head_dim); k_cache = cache[0].
//   q: (num_tokens, num_heads, head_dim), head_dim contiguous.

#include <torch/library.h>

#include "common.h"

namespace {
using namespace flotilla::kernels;

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

// The AVX-512 kernel for this head_dim and group size, or nullptr.
inline DecodeFn avx512_decode_fn(int64_t d, int64_t g) {
  if (d == 64) {
    switch (g) {
      case 1: return decode_one_avx512<4, 1>;
      case 2: return decode_one_avx512<4, 2>;
      case 3: return decode_one_avx512<4, 3>;
      case 4: return decode_one_avx512<4, 4>;
      case 5: return decode_one_avx512<4, 5>;
      case 6: return decode_one_avx512<4, 6>;
      case 7: return decode_one_avx512<4, 7>;
      case 8: return decode_one_avx512<4, 8>;
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

// The AVX-512 kernel for the largest part of the group (a divisor of g) it specializes, and that part's size;
// the group is attended part by part (each part reads the keys and values again, from cache). nullptr: the
// portable kernel runs (no specialization for this head_dim).
inline DecodeFn avx512_decode_part(int64_t d, int64_t g, int64_t& part) {
  for (part = g; part > 0; --part)
    if (g % part == 0)
      if (DecodeFn fn = avx512_decode_fn(d, part)) return fn;
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
          int64_t part = 0;
          if (DecodeFn fn = use_avx512 ? avx512_decode_part(d, g, part) : nullptr) {
            for (int64_t j = h * g; j < (h + 1) * g; j += part)  // query heads j .. j + part - 1
              fn(qp + i * q.stride(0) + j * d, kp + h * head_elems, vp + h * head_elems, tp + i * max_blocks,
                 lp[i], block_size, static_cast<float>(scale), op + i * hq * d + j * d, buf);
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor seq_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
