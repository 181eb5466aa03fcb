// y = x @ W^T with W in flotilla's packed quantized layout (quant.h): llama.cpp's scheme, activations
// quantized per block of 32 to integers and multiplied with the weight's integer values exactly, with two int8
// levels per activation value (below) so the rounding stays ~15 bits fine.
//
//   quant_matmul(out (M, N), x (M, K), packed, type, N): out and x float32, bfloat16 or float16 (the same),
//   each with contiguous rows (out may be a column slice of a wider tensor).
//
// Activation row m, block j (32 values x): d = max|x| / 127, h = round(x / d) (to nearest even) in int8; the
// float32 residual r = x - h * d (|r| <= d / 2) is rounded in steps of d / 255: l = round(r * 255 / d), clamped
// to [-127, 127]. So x ~ (d / 255) * q with the integer q = 255 h + l, |error| <= d / 510 per value. Each block
// keeps dx = d / 255, sum = sum(q) (and sum_lo, the sum over its first 16 values: Q6_K's halves) and
// s = dx * sum. For each weight row and block the integer dot product P = sum(u * q) of the weight's unsigned
// values u is exact in int32, computed as 255 * sum(u * h) + sum(u * l) (two int8 rows through the same
// weight bytes), and the block adds, in float32 with every operation rounded once:
//   acc = fma(s_w * dx, float(P - o * sum), acc)   then, for types with a min,   acc = fma(mb, s, acc)
// (Q6_K: its two 16-value halves, each with its own scale, first half first). Every ISA path below (scalar,
// AVX2 `vpmaddubsw`, AVX-512 VNNI `vpdpbusd`, chosen at run time by flotilla::isa) performs exactly these
// operations in this order, so all paths give bit-identical results, and a row's result does not depend on
// the other rows of x (speculative verification of 5 tokens gives the bits of 5 single-token steps)
// (tests/test_quant_kernels.py checks both). Against x @ dequantize(W)^T the only error is the residual's
// rounding: |error| <= sum over blocks of (d / 510) * sum|w| (plus float32 accumulation). One rounding alone
// (llama.cpp's q8 activations, error up to (d / 2) * sum|w|) moved SmolLM2's logits by ~0.05 where the
// float model's first chat token leads by 0.08, and changed its answers.
//
// Rows are processed in the packed groups of 16 (one vector of 16 int32 lanes per 4-byte slice), in
// parallel over groups; activation rows go up to 4 (AVX-512) or 2 (AVX2) at a time through each weight block,
// so a multi-token step reads each weight byte once per 4 rows, with groups taken in chunks that stay in the
// L2 cache. Combining the two levels in integers (one float step per row and block, not two) and loading the
// activations' broadcasts straight from memory made a step of 5 tokens cost ~3x one token instead of ~4x.
// The vector paths prefetch the next group while multiplying one (struct Prefetch): at M=1 that doubled the
// rate at which weights stream from memory on an AMD EPYC (13.6 -> 27 GB/s on one core).

#include <torch/library.h>

#include "common.h"
#include "quant.h"

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define FLOTILLA_QUANT_X86 1
#define FLOTILLA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FLOTILLA_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))
#endif

namespace {
using namespace flotilla::kernels;
using namespace flotilla::quant;

constexpr int kLoSteps = 255;  // the residual level's step is d / 255: q = 255 h + l

struct MatArgs {
  const int8_t* qx;     // (2M, K): row m's h at row 2m, its residual l at row 2m + 1
  const ActBlock* ab;   // (M, K / 32)
  int64_t m, k, n;
  const uint8_t* packed;
  Layout l;
  void* out;            // (M, ldo) of out_type
  int64_t ldo;
  at::ScalarType out_type;
};

using GroupFn = void (*)(const MatArgs&, int64_t, int64_t);

// ---- Activations -----------------------------------------------------------------------------------------
// One block of 32 float32 values -> h (row 2m), l (row 2m + 1) and its ActBlock (see the top of the file).
inline ActBlock quantize_block(const float* xb, int8_t* h, int8_t* l) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::abs(xb[i]));
  const float d = amax / 127.f;
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  const float il = id * static_cast<float>(kLoSteps);
  int32_t sum = 0, sum_lo = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int32_t hv = static_cast<int32_t>(std::nearbyint(xb[i] * id));
    const float r = xb[i] - static_cast<float>(hv) * d;
    const int32_t lv = std::clamp(static_cast<int32_t>(std::nearbyint(r * il)), -127, 127);
    h[i] = static_cast<int8_t>(hv);
    l[i] = static_cast<int8_t>(lv);
    const int32_t q = kLoSteps * hv + lv;
    sum += q;
    if (i < 16) sum_lo += q;
  }
  const float dx = d / static_cast<float>(kLoSteps);
  return ActBlock{dx, dx * static_cast<float>(sum), sum, sum_lo};
}

template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* h, int8_t* l, ActBlock* ab) {
  float xb[kBlock];
  for (int64_t j = 0; j < k / kBlock; ++j) {
    for (int i = 0; i < kBlock; ++i) xb[i] = to_f(x[j * kBlock + i]);
    ab[j] = quantize_block(xb, h + j * kBlock, l + j * kBlock);
  }
}

// The 16 results of group g for activation row m, rounded to out's dtype (rows past N dropped).
inline void store_rows(const MatArgs& a, int64_t g, int64_t m, const float* acc) {
  const int64_t n0 = g * kRows, rows = std::min<int64_t>(kRows, a.n - n0);
  dispatch(a.out_type, "quant_matmul", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    scalar_t* dst = static_cast<scalar_t*>(a.out) + m * a.ldo + n0;
    for (int64_t r = 0; r < rows; ++r) dst[r] = from_f<scalar_t>(acc[r]);
  });
}

// 255 h + l of the two levels' integer dot products.
inline int32_t combine(int32_t ph, int32_t pl) { return ph * kLoSteps + pl; }

// ---- Portable path ---------------------------------------------------------------------------------------
// The block's 16 row scales: s (and s_hi, Q6_K's second half) and mb.
template <int TYPE>
inline void block_scales_scalar(const uint8_t* grp, const Layout& l, int64_t j, float* s, float* s_hi, float* mb) {
  constexpr Traits t = traits(TYPE);
  for (int r = 0; r < kRows; ++r) {
    if constexpr (t.scheme == kSimple) {
      s[r] = half_to_float(grp + l.d_off + (j * kRows + r) * 2);
      if constexpr (t.has_min) mb[r] = half_to_float(grp + l.m_off + (j * kRows + r) * 2);
    } else if constexpr (t.scheme == kKMin) {
      const float d = half_to_float(grp + l.d_off + (j / 8 * kRows + r) * 2);
      const float dmin = half_to_float(grp + l.m_off + (j / 8 * kRows + r) * 2);
      s[r] = d * static_cast<float>(grp[l.sc_off + j * kRows + r]);
      mb[r] = -(dmin * static_cast<float>(grp[l.mn_off + j * kRows + r]));
    } else {
      const float d = half_to_float(grp + l.d_off + (j / 8 * kRows + r) * 2);
      s[r] = d * static_cast<float>(static_cast<int8_t>(grp[l.sc_off + 2 * j * kRows + r]));
      s_hi[r] = d * static_cast<float>(static_cast<int8_t>(grp[l.sc_off + (2 * j + 1) * kRows + r]));
    }
  }
}

template <int TYPE>
void group_scalar(const MatArgs& a, int64_t g, int64_t m0) {
  constexpr Traits t = traits(TYPE);
  const uint8_t* grp = a.packed + g * a.l.group_bytes;
  const int64_t nb = a.k / kBlock;
  float acc[kRows] = {};
  float s[kRows], s_hi[kRows], mb[kRows];
  for (int64_t j = 0; j < nb; ++j) {
    block_scales_scalar<TYPE>(grp, a.l, j, s, s_hi, mb);
    const uint8_t* v = grp + j * a.l.value_bytes;
    const ActBlock& ab = a.ab[m0 * nb + j];
    int32_t p[2][kRows] = {}, p_hi[2][kRows] = {};  // [level][row]: h, l; p_hi: Q6_K's second half
    for (int lv = 0; lv < 2; ++lv) {
      const int8_t* q = a.qx + (2 * m0 + lv) * a.k + j * kBlock;
      for (int i = 0; i < 8; ++i) {  // columns 4 i .. 4 i + 3
        for (int r = 0; r < kRows; ++r) {
          for (int b = 0; b < 4; ++b) {
            const int32_t pu = unpacked_value(v, t.bits, i, r, b) * q[4 * i + b];
            if (t.scheme == kK6 && i >= 4) p_hi[lv][r] += pu; else p[lv][r] += pu;
          }
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      if constexpr (t.scheme == kK6) {
        const int32_t lo = combine(p[0][r], p[1][r]) - t.offset * ab.sum_lo;
        const int32_t hi = combine(p_hi[0][r], p_hi[1][r]) - t.offset * (ab.sum - ab.sum_lo);
        acc[r] = std::fma(s[r] * ab.d, static_cast<float>(lo), acc[r]);
        acc[r] = std::fma(s_hi[r] * ab.d, static_cast<float>(hi), acc[r]);
      } else {
        const int32_t pq = combine(p[0][r], p[1][r]) - t.offset * ab.sum;
        acc[r] = std::fma(s[r] * ab.d, static_cast<float>(pq), acc[r]);
        if constexpr (t.has_min) acc[r] = std::fma(mb[r], ab.s, acc[r]);
      }
    }
  }
  store_rows(a, g, m0, acc);
}

#ifdef FLOTILLA_QUANT_X86
// The next group's bytes, fetched into the L2 cache a slice per block while this group is multiplied, so a
// thread's single pass over the weight never waits on memory: a group's values and its scale arrays are three
// separate streams, too short for the hardware prefetcher to lock on to each group anew (M=1 ran at half the
// bandwidth a plain read of the same bytes gets).
struct Prefetch {
  const char* next;   // the next group; nullptr for the last, and on later passes over the activation rows
  const char* end;    // the next group's end
  int64_t per_block;  // bytes of it to fetch per block of this group (whole cache lines)
  Prefetch(const MatArgs& a, int64_t g, int64_t m0) {
    const int64_t groups = (a.n + kRows - 1) / kRows, nb = a.k / kBlock;
    next = m0 == 0 && g + 1 < groups ? reinterpret_cast<const char*>(a.packed + (g + 1) * a.l.group_bytes) : nullptr;
    end = next == nullptr ? nullptr : next + a.l.group_bytes;
    per_block = (a.l.group_bytes / nb + 63) / 64 * 64;
  }
  inline void block(int64_t j) const {
    if (next == nullptr) return;
    const char* p = next + j * per_block;
    for (const char* line = p; line < p + per_block && line < end; line += 64) _mm_prefetch(line, _MM_HINT_T1);
  }
};

// ---- AVX-512 VNNI ----------------------------------------------------------------------------------------
// The 4 int8 activations at p in every 32-bit lane, straight from memory (a broadcast load: no vector ALU op,
// where a broadcast from a general register costs one per use).
FLOTILLA_TARGET_VNNI inline __m512i bcast4_512(const int8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return _mm512_castps_si512(_mm512_set1_ps(f));
}

// 255 h + l per lane.
FLOTILLA_TARGET_VNNI inline __m512i combine_512(__m512i h, __m512i l) {
  return _mm512_add_epi32(_mm512_sub_epi32(_mm512_slli_epi32(h, 8), h), l);
}

template <int TYPE, int MB>
FLOTILLA_TARGET_VNNI void group_vnni(const MatArgs& a, int64_t g, int64_t m0) {
  constexpr Traits t = traits(TYPE);
  const Layout& l = a.l;
  const uint8_t* grp = a.packed + g * l.group_bytes;
  const int64_t nb = a.k / kBlock;
  const __m512i nib = _mm512_set1_epi8(0x0F);
  const __m512 sign = _mm512_set1_ps(-0.f);
  __m512 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm512_setzero_ps();
  __m512 dv = _mm512_setzero_ps(), dminv = _mm512_setzero_ps();
  const Prefetch pf(a, g, m0);
  for (int64_t j = 0; j < nb; ++j) {
    pf.block(j);
    __m512 s, s_hi = _mm512_setzero_ps(), mb = _mm512_setzero_ps();
    if constexpr (t.scheme == kSimple) {
      s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + l.d_off + j * 32)));
      if constexpr (t.has_min)
        mb = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + l.m_off + j * 32)));
    } else {
      if (j % 8 == 0) {
        dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + l.d_off + j / 8 * 32)));
        if constexpr (t.scheme == kKMin)
          dminv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + l.m_off + j / 8 * 32)));
      }
      if constexpr (t.scheme == kKMin) {
        const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.sc_off + j * 16));
        const __m128i mn = _mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.mn_off + j * 16));
        s = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
        mb = _mm512_xor_ps(_mm512_mul_ps(dminv, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn))), sign);
      } else {
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.sc_off + 2 * j * 16));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.sc_off + (2 * j + 1) * 16));
        s = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(lo)));
        s_hi = _mm512_mul_ps(dv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(hi)));
      }
    }
    // w[i] holds, per row, the four values of columns 4 i .. 4 i + 3 of the block
    const uint8_t* v = grp + j * l.value_bytes;
    __m512i w[8];
    if constexpr (t.bits == 8) {
      for (int i = 0; i < 8; ++i) w[i] = _mm512_loadu_si512(v + 64 * i);
    } else {
      for (int i = 0; i < 4; ++i) {
        const __m512i x = _mm512_loadu_si512(v + 64 * i);
        w[i] = _mm512_and_si512(x, nib);
        w[4 + i] = _mm512_and_si512(_mm512_srli_epi16(x, 4), nib);
      }
      if constexpr (t.bits == 6) {  // bits 2 (i % 4) .. + 1 of plane vector i / 4 -> bits 4, 5
        const __m512i m = _mm512_set1_epi8(0x30);
        for (int h = 0; h < 2; ++h) {
          const __m512i x = _mm512_loadu_si512(v + 256 + 64 * h);
          w[4 * h] = _mm512_or_si512(w[4 * h], _mm512_and_si512(_mm512_slli_epi16(x, 4), m));
          w[4 * h + 1] = _mm512_or_si512(w[4 * h + 1], _mm512_and_si512(_mm512_slli_epi16(x, 2), m));
          w[4 * h + 2] = _mm512_or_si512(w[4 * h + 2], _mm512_and_si512(x, m));
          w[4 * h + 3] = _mm512_or_si512(w[4 * h + 3], _mm512_and_si512(_mm512_srli_epi16(x, 2), m));
        }
      } else if constexpr (t.bits == 5) {  // bit i of the plane -> bit 4
        const __m512i x = _mm512_loadu_si512(v + 256), m = _mm512_set1_epi8(0x10);
        w[0] = _mm512_or_si512(w[0], _mm512_and_si512(_mm512_slli_epi16(x, 4), m));
        w[1] = _mm512_or_si512(w[1], _mm512_and_si512(_mm512_slli_epi16(x, 3), m));
        w[2] = _mm512_or_si512(w[2], _mm512_and_si512(_mm512_slli_epi16(x, 2), m));
        w[3] = _mm512_or_si512(w[3], _mm512_and_si512(_mm512_slli_epi16(x, 1), m));
        w[4] = _mm512_or_si512(w[4], _mm512_and_si512(x, m));
        w[5] = _mm512_or_si512(w[5], _mm512_and_si512(_mm512_srli_epi16(x, 1), m));
        w[6] = _mm512_or_si512(w[6], _mm512_and_si512(_mm512_srli_epi16(x, 2), m));
        w[7] = _mm512_or_si512(w[7], _mm512_and_si512(_mm512_srli_epi16(x, 3), m));
      }
    }
    for (int mi = 0; mi < MB; ++mi) {
      const int8_t* qh = a.qx + 2 * (m0 + mi) * a.k + j * kBlock;
      const int8_t* ql = qh + a.k;
      const ActBlock& ab = a.ab[(m0 + mi) * nb + j];
      const __m512 dx = _mm512_set1_ps(ab.d);
      // dot products of the two levels; Q6_K keeps its halves (columns 0-15: w[0..3], 16-31: w[4..7]) apart,
      // the others split them into chains only where few rows leave too little independent work
      constexpr bool split = t.scheme == kK6 || MB <= 2;
      __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
      __m512i l0 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
      for (int i = 0; i < 4; ++i) {
        h0 = _mm512_dpbusd_epi32(h0, w[i], bcast4_512(qh + 4 * i));
        l0 = _mm512_dpbusd_epi32(l0, w[i], bcast4_512(ql + 4 * i));
        if constexpr (split) {
          h1 = _mm512_dpbusd_epi32(h1, w[4 + i], bcast4_512(qh + 16 + 4 * i));
          l1 = _mm512_dpbusd_epi32(l1, w[4 + i], bcast4_512(ql + 16 + 4 * i));
        } else {
          h0 = _mm512_dpbusd_epi32(h0, w[4 + i], bcast4_512(qh + 16 + 4 * i));
          l0 = _mm512_dpbusd_epi32(l0, w[4 + i], bcast4_512(ql + 16 + 4 * i));
        }
      }
      if constexpr (t.scheme == kK6) {
        const __m512i lo = _mm512_sub_epi32(combine_512(h0, l0), _mm512_set1_epi32(t.offset * ab.sum_lo));
        const __m512i hi = _mm512_sub_epi32(combine_512(h1, l1), _mm512_set1_epi32(t.offset * (ab.sum - ab.sum_lo)));
        acc[mi] = _mm512_fmadd_ps(_mm512_mul_ps(s, dx), _mm512_cvtepi32_ps(lo), acc[mi]);
        acc[mi] = _mm512_fmadd_ps(_mm512_mul_ps(s_hi, dx), _mm512_cvtepi32_ps(hi), acc[mi]);
      } else {
        if constexpr (split) {
          h0 = _mm512_add_epi32(h0, h1);
          l0 = _mm512_add_epi32(l0, l1);
        }
        __m512i p = combine_512(h0, l0);
        if constexpr (t.offset != 0) p = _mm512_sub_epi32(p, _mm512_set1_epi32(t.offset * ab.sum));
        acc[mi] = _mm512_fmadd_ps(_mm512_mul_ps(s, dx), _mm512_cvtepi32_ps(p), acc[mi]);
        if constexpr (t.has_min) acc[mi] = _mm512_fmadd_ps(mb, _mm512_set1_ps(ab.s), acc[mi]);
      }
    }
  }
  for (int mi = 0; mi < MB; ++mi) {
    float out[kRows];
    _mm512_storeu_ps(out, acc[mi]);
    store_rows(a, g, m0 + mi, out);
  }
}

// ---- AVX2 ------------------------------------------------------------------------------------------------
FLOTILLA_TARGET_AVX2 inline __m256i bcast4_256(const int8_t* p) {
  float f;
  std::memcpy(&f, p, 4);
  return _mm256_castps_si256(_mm256_set1_ps(f));
}

FLOTILLA_TARGET_AVX2 inline __m256i combine_256(__m256i h, __m256i l) {
  return _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(h, 8), h), l);
}

// One 8-row half h of a group: bytes 32 h .. 32 h + 31 of each 64-byte vector. vpmaddubsw multiplies u8 by
// s8 into saturating int16 pairs: exact for u <= 63 (2 * 63 * 127 < 2^15); Q8_0 (u = q + 128) goes through
// the sign trick (|q| * sign(x, q)): its sum(q * x) is sum(u * x) - 128 sum(x), just what the offset subtracts.
template <int TYPE, int MB>
FLOTILLA_TARGET_AVX2 void half_avx2(const MatArgs& a, int64_t g, int64_t m0, int h, float (*out)[kRows]) {
  constexpr Traits t = traits(TYPE);
  const Layout& l = a.l;
  const uint8_t* grp = a.packed + g * l.group_bytes;
  const int64_t nb = a.k / kBlock;
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(-128);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 acc[MB];
  for (int i = 0; i < MB; ++i) acc[i] = _mm256_setzero_ps();
  __m256 dv = _mm256_setzero_ps(), dminv = _mm256_setzero_ps();
  const Prefetch pf(a, g, m0);
  for (int64_t j = 0; j < nb; ++j) {
    if (h == 0) pf.block(j);
    __m256 s, s_hi = _mm256_setzero_ps(), mb = _mm256_setzero_ps();
    if constexpr (t.scheme == kSimple) {
      s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.d_off + j * 32 + 16 * h)));
      if constexpr (t.has_min)
        mb = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.m_off + j * 32 + 16 * h)));
    } else {
      if (j % 8 == 0) {
        dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.d_off + j / 8 * 32 + 16 * h)));
        if constexpr (t.scheme == kKMin)
          dminv = _mm256_cvtph_ps(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(grp + l.m_off + j / 8 * 32 + 16 * h)));
      }
      if constexpr (t.scheme == kKMin) {
        const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(grp + l.sc_off + j * 16 + 8 * h));
        const __m128i mn = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(grp + l.mn_off + j * 16 + 8 * h));
        s = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
        mb = _mm256_xor_ps(_mm256_mul_ps(dminv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn))), sign);
      } else {
        const __m128i lo = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(grp + l.sc_off + 2 * j * 16 + 8 * h));
        const __m128i hi =
            _mm_loadl_epi64(reinterpret_cast<const __m128i*>(grp + l.sc_off + (2 * j + 1) * 16 + 8 * h));
        s = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo)));
        s_hi = _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi)));
      }
    }
    const uint8_t* v = grp + j * l.value_bytes + 32 * h;
    __m256i w[8];
    if constexpr (t.bits == 8) {
      for (int i = 0; i < 8; ++i) w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 64 * i));
    } else {
      for (int i = 0; i < 4; ++i) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 64 * i));
        w[i] = _mm256_and_si256(x, nib);
        w[4 + i] = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
      }
      if constexpr (t.bits == 6) {
        const __m256i m = _mm256_set1_epi8(0x30);
        for (int p = 0; p < 2; ++p) {
          const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 256 + 64 * p));
          w[4 * p] = _mm256_or_si256(w[4 * p], _mm256_and_si256(_mm256_slli_epi16(x, 4), m));
          w[4 * p + 1] = _mm256_or_si256(w[4 * p + 1], _mm256_and_si256(_mm256_slli_epi16(x, 2), m));
          w[4 * p + 2] = _mm256_or_si256(w[4 * p + 2], _mm256_and_si256(x, m));
          w[4 * p + 3] = _mm256_or_si256(w[4 * p + 3], _mm256_and_si256(_mm256_srli_epi16(x, 2), m));
        }
      } else if constexpr (t.bits == 5) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 256)), m = _mm256_set1_epi8(0x10);
        w[0] = _mm256_or_si256(w[0], _mm256_and_si256(_mm256_slli_epi16(x, 4), m));
        w[1] = _mm256_or_si256(w[1], _mm256_and_si256(_mm256_slli_epi16(x, 3), m));
        w[2] = _mm256_or_si256(w[2], _mm256_and_si256(_mm256_slli_epi16(x, 2), m));
        w[3] = _mm256_or_si256(w[3], _mm256_and_si256(_mm256_slli_epi16(x, 1), m));
        w[4] = _mm256_or_si256(w[4], _mm256_and_si256(x, m));
        w[5] = _mm256_or_si256(w[5], _mm256_and_si256(_mm256_srli_epi16(x, 1), m));
        w[6] = _mm256_or_si256(w[6], _mm256_and_si256(_mm256_srli_epi16(x, 2), m));
        w[7] = _mm256_or_si256(w[7], _mm256_and_si256(_mm256_srli_epi16(x, 3), m));
      }
    }
    for (int mi = 0; mi < MB; ++mi) {
      const int8_t* qh = a.qx + 2 * (m0 + mi) * a.k + j * kBlock;
      const ActBlock& ab = a.ab[(m0 + mi) * nb + j];
      __m256i part[2][2];  // [level][columns 0-15, 16-31]
      for (int lv = 0; lv < 2; ++lv) {
        const int8_t* q = qh + lv * a.k;
        part[lv][0] = part[lv][1] = _mm256_setzero_si256();
        for (int gi = 0; gi < 8; ++gi) {
          const __m256i xb = bcast4_256(q + 4 * gi);
          __m256i prod;
          if constexpr (t.max_u > 127) {
            const __m256i ws = _mm256_xor_si256(w[gi], flip);  // q as int8
            prod = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xb, ws));
          } else {
            prod = _mm256_maddubs_epi16(w[gi], xb);
          }
          part[lv][gi / 4] = _mm256_add_epi32(part[lv][gi / 4], _mm256_madd_epi16(prod, ones));
        }
      }
      const __m256 dx = _mm256_set1_ps(ab.d);
      if constexpr (t.scheme == kK6) {
        const __m256i lo = _mm256_sub_epi32(combine_256(part[0][0], part[1][0]), _mm256_set1_epi32(t.offset * ab.sum_lo));
        const __m256i hi = _mm256_sub_epi32(combine_256(part[0][1], part[1][1]),
                                            _mm256_set1_epi32(t.offset * (ab.sum - ab.sum_lo)));
        acc[mi] = _mm256_fmadd_ps(_mm256_mul_ps(s, dx), _mm256_cvtepi32_ps(lo), acc[mi]);
        acc[mi] = _mm256_fmadd_ps(_mm256_mul_ps(s_hi, dx), _mm256_cvtepi32_ps(hi), acc[mi]);
      } else {
        __m256i p = combine_256(_mm256_add_epi32(part[0][0], part[0][1]), _mm256_add_epi32(part[1][0], part[1][1]));
        // Q8_0's sign trick already subtracted 128 sum(q), its offset term
        if constexpr (t.offset != 0 && t.max_u <= 127) p = _mm256_sub_epi32(p, _mm256_set1_epi32(t.offset * ab.sum));
        acc[mi] = _mm256_fmadd_ps(_mm256_mul_ps(s, dx), _mm256_cvtepi32_ps(p), acc[mi]);
        if constexpr (t.has_min) acc[mi] = _mm256_fmadd_ps(mb, _mm256_set1_ps(ab.s), acc[mi]);
      }
    }
  }
  for (int mi = 0; mi < MB; ++mi) _mm256_storeu_ps(out[mi] + 8 * h, acc[mi]);
}

template <int TYPE, int MB>
FLOTILLA_TARGET_AVX2 void group_avx2(const MatArgs& a, int64_t g, int64_t m0) {
  float out[MB][kRows];
  half_avx2<TYPE, MB>(a, g, m0, 0, out);
  if (g * kRows + 8 < a.n) half_avx2<TYPE, MB>(a, g, m0, 1, out);
  for (int mi = 0; mi < MB; ++mi) store_rows(a, g, m0 + mi, out[mi]);
}
#endif  // FLOTILLA_QUANT_X86

// ---- Dispatch --------------------------------------------------------------------------------------------
constexpr int kMaxMB = 8;
#ifndef VNNI_MB
#define VNNI_MB 8
#endif

struct Path {
  GroupFn fn[kMaxMB + 1];  // by the number of activation rows it takes (1 .. max_mb)
  int max_mb;
};

template <int TYPE>
Path path_for_type() {
#ifdef FLOTILLA_QUANT_X86
  if (flotilla::isa::avx512_vnni())
    return {{nullptr, group_vnni<TYPE, 1>, group_vnni<TYPE, 2>, group_vnni<TYPE, 3>, group_vnni<TYPE, 4>,
             group_vnni<TYPE, 5>, group_vnni<TYPE, 6>, group_vnni<TYPE, 7>, group_vnni<TYPE, 8>}, VNNI_MB};
  if (flotilla::isa::level() >= flotilla::isa::kAvx2)
    return {{nullptr, group_avx2<TYPE, 1>, group_avx2<TYPE, 2>}, 2};
#endif
  return {{nullptr, group_scalar<TYPE>}, 1};
}

Path path_for(int type) {
  switch (type) {
    case kQ4_0: return path_for_type<kQ4_0>();
    case kQ4_1: return path_for_type<kQ4_1>();
    case kQ5_0: return path_for_type<kQ5_0>();
    case kQ5_1: return path_for_type<kQ5_1>();
    case kQ8_0: return path_for_type<kQ8_0>();
    case kQ4_K: return path_for_type<kQ4_K>();
    case kQ5_K: return path_for_type<kQ5_K>();
    case kQ6_K: return path_for_type<kQ6_K>();
    default: TORCH_CHECK(false, "quant_matmul: GGML type ", type, " has no packed layout");
  }
}

constexpr int64_t kChunkBytes = 256 << 10;  // weight bytes a thread sweeps per pass over the activation rows

void run(const MatArgs& a, const Path& path) {
  const int64_t groups = (a.n + kRows - 1) / kRows;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / a.l.group_bytes);
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
      const int64_t c1 = std::min(g1, c0 + chunk);
      for (int64_t m0 = 0; m0 < a.m;) {
        const int mb = static_cast<int>(std::min<int64_t>(path.max_mb, a.m - m0));
        for (int64_t g = c0; g < c1; ++g) path.fn[mb](a, g, m0);
        m0 += mb;
      }
    }
  });
}

void quant_matmul(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed, int64_t type, int64_t n) {
  TORCH_CHECK(supported(static_cast<int>(type)), "quant_matmul: GGML type ", type, " has no packed layout");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.dim() == 2 && out.stride(1) == 1,
              "quant_matmul: x and out must be 2-D with contiguous rows");
  const int64_t m = x.size(0), k = x.size(1);
  const Traits t = traits(static_cast<int>(type));
  TORCH_CHECK(k % t.gguf_block == 0, "quant_matmul: K = ", k, " is not whole blocks of ", t.gguf_block);
  TORCH_CHECK(out.size(0) == m && out.size(1) == n && out.scalar_type() == x.scalar_type(), "quant_matmul: out ",
              out.sizes(), " ", out.scalar_type(), " does not fit x ", x.sizes(), " ", x.scalar_type(), " and N ", n);
  const Layout l = layout(static_cast<int>(type), k);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() &&
              packed.numel() == (n + kRows - 1) / kRows * l.group_bytes,
              "quant_matmul: packed has ", packed.numel(), " bytes, not the ", (n + kRows - 1) / kRows, " groups of ",
              l.group_bytes, " of ", n, " rows");
  if (m == 0 || n == 0) return;
  // activation row r becomes int8 rows 2r (h) and 2r + 1 (l), with one ActBlock per block
  const int64_t nb = k / kBlock;
  std::vector<int8_t> qx(2 * m * k);
  std::vector<ActBlock> ab(m * nb);
  MatArgs a{qx.data(), ab.data(), m, k, n, packed.data_ptr<uint8_t>(), l, out.data_ptr(), out.stride(0),
            out.scalar_type()};
  dispatch(x.scalar_type(), "quant_matmul", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        quantize_row(xp + r * xs, k, qx.data() + 2 * r * k, qx.data() + (2 * r + 1) * k, ab.data() + r * nb);
    });
  });
  run(a, path_for(static_cast<int>(type)));
}

// y (..., N) = x (..., K) @ W^T, plus bias (N,) (x's dtype) added to the rounded product as in eager code:
// one op where quant_matmul needs the caller to shape and allocate.
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t type, int64_t n,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "quant_linear: x must have a last dimension");
  const int64_t k = x.size(-1);
  at::Tensor x2 = x.reshape({-1, k});
  if (x2.stride(1) != 1) x2 = x2.contiguous();
  at::Tensor out = at::empty({x2.size(0), n}, x.options());
  quant_matmul(out, x2, packed, type, n);
  if (bias.has_value()) out.add_(*bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return out.view(shape);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def("quant_matmul(Tensor(a!) out, Tensor x, Tensor packed, int type, int rows) -> ()");
  m.def("quant_linear(Tensor x, Tensor packed, int type, int rows, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("quant_matmul", &quant_matmul);
  m.impl("quant_linear", &quant_linear);
}
