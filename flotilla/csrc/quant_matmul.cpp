// y = x @ W^T with W in flotilla's packed quantized layout (quant.h): llama.cpp's scheme, activations
// quantized per block of 32 to int8 and multiplied with the weight's integer values exactly, with one more
// int8 row per activation row for the rounding's residual (two-level activations, below).
//
//   quant_matmul(out (M, N), x (M, K), packed, type, N): out and x float32, bfloat16 or float16 (the same),
//   each with contiguous rows (out may be a column slice of a wider tensor).
//
// Activation row m, block j (32 values x) is rounded twice: d = max|x| / 127, q = round(x / d) (to nearest
// even) in int8; then the same for the float32 residual x - q * d (d' <= d / 254). Each of the two int8 rows
// gets sum = sum(q) (and the sum of the first 16), s = d * sum, and is multiplied like one activation row:
// for each weight row and block, the integer dot product P = sum(u * q) of the weight's unsigned values u is
// exact (int32), and the block adds
//   c = (s_w * d) * float(P - o * sum)  [+ mb * s for types with a min; Q6_K: its two 16-value halves]
// to the row's float32 accumulator, blocks in order; out[m] = y(hi row) + y(residual row). Every ISA path
// below (scalar, AVX2 `vpmaddubsw`, AVX-512 VNNI `vpdpbusd`, chosen at run time by flotilla::isa) performs
// exactly these float32 operations in this order, so all paths give bit-identical results
// (tests/test_quant_kernels.py checks it). Against x @ dequantize(W)^T the only error is the residual's
// rounding: |error| <= sum over blocks of (d' / 2) * sum|w| (plus float32 accumulation). One rounding alone
// (llama.cpp's q8 activations, error up to (d / 2) * sum|w|) moved SmolLM2's logits by ~0.05 where the
// float model's first chat token leads by 0.08, and changed its answers.
//
// Rows are processed in the packed groups of 16 (one vector of 16 int32 lanes per 4-byte slice), in
// parallel over groups; activation rows go 4 (AVX-512) or 2 (AVX2) at a time through each weight block, so
// a prefill reads each weight byte once per 4 rows, with groups taken in chunks that stay in the L2 cache.
// The vector paths prefetch the next group while multiplying one (struct Prefetch): at M=1 that doubled the
// rate at which weights stream from memory on an AMD EPYC (13.6 -> 27 GB/s on one core).

#include <torch/library.h>

#include "common.h"
#include "quant.h"

#if defined(__x86_64__) && (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 10))
#include <immintrin.h>
#define FLOTILLA_QUANT_X86 1
#define FLOTILLA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define FLOTILLA_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))
#endif

namespace {
using namespace flotilla::kernels;
using namespace flotilla::quant;

struct MatArgs {
  const int8_t* qx;     // (M, K) quantized activations
  const ActBlock* ab;   // (M, K / 32)
  int64_t m, k, n;
  const uint8_t* packed;
  Layout l;
  float* y;             // (M, ldy) results
  int64_t ldy;
};

using GroupFn = void (*)(const MatArgs&, int64_t, int64_t);

// ---- Activations -----------------------------------------------------------------------------------------
// One block of 32 float32 values -> int8 q = round(x / d), d = max|x| / 127 (to nearest even), and its ActBlock.
inline ActBlock quantize_block(const float* xb, int8_t* q) {
  float amax = 0.f;
  for (int i = 0; i < kBlock; ++i) amax = std::max(amax, std::abs(xb[i]));
  const float d = amax / 127.f;
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  int32_t sum = 0, sum_lo = 0;
  for (int i = 0; i < kBlock; ++i) {
    const int32_t v = static_cast<int32_t>(std::nearbyint(xb[i] * id));
    q[i] = static_cast<int8_t>(v);
    sum += v;
    if (i < 16) sum_lo += v;
  }
  return ActBlock{d, d * static_cast<float>(sum), sum, sum_lo};
}

// Activation row x (K) -> two int8 rows: hi = the block rounding of x, lo = the block rounding of the
// residual x - q_hi * d_hi (float32). x ~ q_hi * d_hi + q_lo * d_lo with |error| <= d_lo / 2 <= d_hi / 508 per
// value: ~15 bits per block instead of 8, because one int8 rounding per block flips near-tied greedy tokens
// (SmolLM2's chat answers; the residual row costs integer work only, the weight is read once for both rows).
template <typename T>
void quantize_row(const T* x, int64_t k, int8_t* q_hi, ActBlock* ab_hi, int8_t* q_lo, ActBlock* ab_lo) {
  float xb[kBlock], rb[kBlock];
  for (int64_t j = 0; j < k / kBlock; ++j) {
    for (int i = 0; i < kBlock; ++i) xb[i] = to_f(x[j * kBlock + i]);
    ab_hi[j] = quantize_block(xb, q_hi + j * kBlock);
    const float d = ab_hi[j].d;
    for (int i = 0; i < kBlock; ++i) rb[i] = xb[i] - static_cast<float>(q_hi[j * kBlock + i]) * d;
    ab_lo[j] = quantize_block(rb, q_lo + j * kBlock);
  }
}

inline void store_rows(const MatArgs& a, int64_t g, int64_t m, const float* acc) {
  const int64_t n0 = g * kRows, rows = std::min<int64_t>(kRows, a.n - n0);
  float* dst = a.y + m * a.ldy + n0;
  for (int64_t r = 0; r < rows; ++r) dst[r] = acc[r];
}

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
    const int8_t* q = a.qx + m0 * a.k + j * kBlock;
    const ActBlock& ab = a.ab[m0 * nb + j];
    int32_t p[kRows] = {}, p_hi[kRows] = {};
    for (int i = 0; i < (t.bits == 4 ? 4 : 8); ++i) {
      for (int r = 0; r < kRows; ++r) {
        for (int b = 0; b < 4; ++b) {
          const uint8_t byte = v[64 * i + 4 * r + b];
          if constexpr (t.bits == 4) {
            p[r] += (byte & 0xF) * q[4 * i + b] + (byte >> 4) * q[16 + 4 * i + b];
          } else if (t.scheme == kK6 && i >= 4) {
            p_hi[r] += byte * q[4 * i + b];
          } else {
            p[r] += byte * q[4 * i + b];
          }
        }
      }
    }
    for (int r = 0; r < kRows; ++r) {
      float c;
      if constexpr (t.scheme == kK6) {
        c = (s[r] * ab.d) * static_cast<float>(p[r] - t.offset * ab.sum_lo) +
            (s_hi[r] * ab.d) * static_cast<float>(p_hi[r] - t.offset * (ab.sum - ab.sum_lo));
      } else {
        c = (s[r] * ab.d) * static_cast<float>(p[r] - t.offset * ab.sum);
        if constexpr (t.has_min) c = c + mb[r] * ab.s;
      }
      acc[r] = acc[r] + c;
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
    // w[gi] holds, per row, the four values of columns 4 gi .. 4 gi + 3 of the block
    const uint8_t* v = grp + j * l.value_bytes;
    __m512i w[8];
    if constexpr (t.bits == 4) {
      for (int i = 0; i < 4; ++i) {
        const __m512i x = _mm512_loadu_si512(v + 64 * i);
        w[i] = _mm512_and_si512(x, nib);
        w[4 + i] = _mm512_and_si512(_mm512_srli_epi16(x, 4), nib);
      }
    } else {
      for (int i = 0; i < 8; ++i) w[i] = _mm512_loadu_si512(v + 64 * i);
    }
    for (int mi = 0; mi < MB; ++mi) {
      const int8_t* q = a.qx + (m0 + mi) * a.k + j * kBlock;
      const ActBlock& ab = a.ab[(m0 + mi) * nb + j];
      __m512i p0 = _mm512_setzero_si512(), p1 = _mm512_setzero_si512();
      __m512i p2 = _mm512_setzero_si512(), p3 = _mm512_setzero_si512();
      int32_t q4[8];
      std::memcpy(q4, q, 32);
      p0 = _mm512_dpbusd_epi32(p0, w[0], _mm512_set1_epi32(q4[0]));
      p1 = _mm512_dpbusd_epi32(p1, w[1], _mm512_set1_epi32(q4[1]));
      p0 = _mm512_dpbusd_epi32(p0, w[2], _mm512_set1_epi32(q4[2]));
      p1 = _mm512_dpbusd_epi32(p1, w[3], _mm512_set1_epi32(q4[3]));
      p2 = _mm512_dpbusd_epi32(p2, w[4], _mm512_set1_epi32(q4[4]));
      p3 = _mm512_dpbusd_epi32(p3, w[5], _mm512_set1_epi32(q4[5]));
      p2 = _mm512_dpbusd_epi32(p2, w[6], _mm512_set1_epi32(q4[6]));
      p3 = _mm512_dpbusd_epi32(p3, w[7], _mm512_set1_epi32(q4[7]));
      const __m512 dx = _mm512_set1_ps(ab.d);
      __m512 c;
      if constexpr (t.scheme == kK6) {
        const __m512i lo = _mm512_sub_epi32(_mm512_add_epi32(p0, p1), _mm512_set1_epi32(t.offset * ab.sum_lo));
        const __m512i hi = _mm512_sub_epi32(_mm512_add_epi32(p2, p3),
                                            _mm512_set1_epi32(t.offset * (ab.sum - ab.sum_lo)));
        c = _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(s, dx), _mm512_cvtepi32_ps(lo)),
                          _mm512_mul_ps(_mm512_mul_ps(s_hi, dx), _mm512_cvtepi32_ps(hi)));
      } else {
        __m512i p = _mm512_add_epi32(_mm512_add_epi32(p0, p1), _mm512_add_epi32(p2, p3));
        if constexpr (t.offset != 0) p = _mm512_sub_epi32(p, _mm512_set1_epi32(t.offset * ab.sum));
        c = _mm512_mul_ps(_mm512_mul_ps(s, dx), _mm512_cvtepi32_ps(p));
        if constexpr (t.has_min) c = _mm512_add_ps(c, _mm512_mul_ps(mb, _mm512_set1_ps(ab.s)));
      }
      acc[mi] = _mm512_add_ps(acc[mi], c);
    }
  }
  for (int mi = 0; mi < MB; ++mi) {
    float out[kRows];
    _mm512_storeu_ps(out, acc[mi]);
    store_rows(a, g, m0 + mi, out);
  }
}

// ---- AVX2 ------------------------------------------------------------------------------------------------
// One 8-row half h of a group: bytes 32 h .. 32 h + 31 of each 64-byte vector. vpmaddubsw multiplies u8 by
// s8 into saturating int16 pairs: exact for u <= 63 (2 * 63 * 127 < 2^15); Q8_0 (u = q + 128) goes through
// the sign trick (|q| * sign(x, q)) and adds back 128 * sum.
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
    if constexpr (t.bits == 4) {
      for (int i = 0; i < 4; ++i) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 64 * i));
        w[i] = _mm256_and_si256(x, nib);
        w[4 + i] = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
      }
    } else {
      for (int i = 0; i < 8; ++i) w[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 64 * i));
    }
    for (int mi = 0; mi < MB; ++mi) {
      const int8_t* q = a.qx + (m0 + mi) * a.k + j * kBlock;
      const ActBlock& ab = a.ab[(m0 + mi) * nb + j];
      int32_t q4[8];
      std::memcpy(q4, q, 32);
      __m256i part[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
      for (int gi = 0; gi < 8; ++gi) {
        const __m256i xb = _mm256_set1_epi32(q4[gi]);
        __m256i prod;
        if constexpr (t.max_u > 127) {
          const __m256i ws = _mm256_xor_si256(w[gi], flip);  // q as int8
          prod = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(xb, ws));
        } else {
          prod = _mm256_maddubs_epi16(w[gi], xb);
        }
        part[gi / 4] = _mm256_add_epi32(part[gi / 4], _mm256_madd_epi16(prod, ones));
      }
      if constexpr (t.max_u > 127) {  // back to sum(u * q) = sum(q_w * q) + 128 * sum(q)
        part[0] = _mm256_add_epi32(part[0], _mm256_set1_epi32(128 * ab.sum));
      }
      const __m256 dx = _mm256_set1_ps(ab.d);
      __m256 c;
      if constexpr (t.scheme == kK6) {
        const __m256i lo = _mm256_sub_epi32(part[0], _mm256_set1_epi32(t.offset * ab.sum_lo));
        const __m256i hi = _mm256_sub_epi32(part[1], _mm256_set1_epi32(t.offset * (ab.sum - ab.sum_lo)));
        c = _mm256_add_ps(_mm256_mul_ps(_mm256_mul_ps(s, dx), _mm256_cvtepi32_ps(lo)),
                          _mm256_mul_ps(_mm256_mul_ps(s_hi, dx), _mm256_cvtepi32_ps(hi)));
      } else {
        __m256i p = _mm256_add_epi32(part[0], part[1]);
        if constexpr (t.offset != 0) p = _mm256_sub_epi32(p, _mm256_set1_epi32(t.offset * ab.sum));
        c = _mm256_mul_ps(_mm256_mul_ps(s, dx), _mm256_cvtepi32_ps(p));
        if constexpr (t.has_min) c = _mm256_add_ps(c, _mm256_mul_ps(mb, _mm256_set1_ps(ab.s)));
      }
      acc[mi] = _mm256_add_ps(acc[mi], c);
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
constexpr int kMaxMB = 4;

struct Path {
  GroupFn fn[kMaxMB + 1];  // by the number of activation rows it takes (1 .. max_mb)
  int max_mb;
};

template <int TYPE>
Path path_for_type() {
#ifdef FLOTILLA_QUANT_X86
  if (flotilla::isa::avx512_vnni())
    return {{nullptr, group_vnni<TYPE, 1>, group_vnni<TYPE, 2>, group_vnni<TYPE, 3>, group_vnni<TYPE, 4>}, 4};
  if (flotilla::isa::level() >= flotilla::isa::kAvx2)
    return {{nullptr, group_avx2<TYPE, 1>, group_avx2<TYPE, 2>, nullptr, nullptr}, 2};
#endif
  return {{nullptr, group_scalar<TYPE>, nullptr, nullptr, nullptr}, 1};
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
  // activation row r becomes rows 2r (hi) and 2r + 1 (lo residual): out[r] = y[2r] + y[2r + 1]
  const int64_t nb = k / kBlock;
  std::vector<int8_t> qx(2 * m * k);
  std::vector<ActBlock> ab(2 * m * nb);
  std::vector<float> y(2 * m * n);
  MatArgs a{qx.data(), ab.data(), 2 * m, k, n, packed.data_ptr<uint8_t>(), l, y.data(), n};
  dispatch(x.scalar_type(), "quant_matmul", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const int64_t xs = x.stride(0);
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        quantize_row(xp + r * xs, k, qx.data() + 2 * r * k, ab.data() + 2 * r * nb, qx.data() + (2 * r + 1) * k,
                     ab.data() + (2 * r + 1) * nb);
    });
    run(a, path_for(static_cast<int>(type)));
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t os = out.stride(0);
    at::parallel_for(0, m * n, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const int64_t r = i / n, c = i % n;
        op[r * os + c] = from_f<scalar_t>(y[2 * r * n + c] + y[(2 * r + 1) * n + c]);
      }
    });
  });
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
