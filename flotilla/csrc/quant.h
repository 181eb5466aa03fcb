// The packed ("repacked") layout of quantized weights, shared by quant_pack.cpp (GGUF blocks -> packed,
// packed -> float) and quant_matmul.cpp (x @ W^T on the packed weight, int8 activations).
//
// A weight W (N rows, K columns) of one GGUF block type is repacked once, at load, into groups of kRows = 16
// rows: group g holds rows 16g .. 16g + 15 (rows past N are zero), each group group_bytes(type, K) bytes, so
// one 512-bit vector covers one 4-byte slice of 16 rows (AVX-512 VNNI `vpdpbusd` computes 16 row dot products
// at once; AVX2 takes the two 8-row halves). Inside a group, the K / 32 blocks of 32 values come first
// (block j = columns 32j .. 32j + 31, at j * value_bytes), then the scale arrays; the group is padded to a
// multiple of 64 bytes. Values are unsigned, u in [0, 2^bits):
//   4-bit types (Q4_0, Q4_1, Q4_K): a block is four 64-byte vectors; vector i, row r, byte b (b < 4), at
//     64 i + 4 r + b, holds u[r][4i + b] in its low nibble and u[r][16 + 4i + b] in its high nibble.
//   5- and 6-bit types (Q5_0, Q5_1, Q5_K; Q6_K): the low 4 bits of every value as a 4-bit block, then a plane
//     of the high bits: column c = 4 i + b (i < 8) of row r has them at byte 4 r + b of the plane's vector
//     i / 4 (6-bit: two vectors, bits 2 (i % 4) and 2 (i % 4) + 1) or of its one vector (5-bit: bit i).
//     A block is 320 (5-bit) or 384 (6-bit) bytes: the file's bits, where a byte per value took 512.
//   8-bit types (Q8_0): a block is eight 64-byte vectors; byte 64 i + 4 r + b holds u[r][4i + b].
// In every layout the kernels unpack, per block, eight 64-byte vectors w[i] of one byte per value: w[i], byte
// 4 r + b, is u[r][4 i + b].
// Scales (fp16 little-endian bits; u8 / i8), each array indexed [..][16 rows]:
//   Q4_0, Q5_0, Q8_0:   d fp16[K/32][16]
//   Q4_1, Q5_1:         d fp16[K/32][16], m fp16[K/32][16]
//   Q4_K, Q5_K:         d fp16[K/256][16], dmin fp16[K/256][16], sc u8[K/32][16], mn u8[K/32][16]
//   Q6_K:               d fp16[K/256][16], sc i8[K/16][16]
// The value at row r, column k (block j = k / 32) is, in float32 with every product rounded once:
//   w = s * (u - o)             (types without a min)
//   w = s * (u - o) + mb        (Q4_1, Q5_1, Q4_K, Q5_K)
// with Q4_0: s = d, o = 8;  Q4_1: s = d, mb = m;  Q5_0: s = d, o = 16;  Q5_1: s = d, mb = m;
//      Q8_0: s = d, o = 128 (u = q + 128);  Q4_K, Q5_K: s = d * sc[j], mb = -(dmin * mn[j]), o = 0;
//      Q6_K: s = d * sc[k / 16], o = 32:
// the formulas and roundings of gguf.quants.dequantize (and flotilla/models/loader/gguf_dequant.py), so the
// packed weight dequantizes to exactly the values of the GGUF file.

#pragma once

#include <cstdint>
#include <cstring>

#include <c10/util/Half.h>

namespace flotilla {
namespace quant {

constexpr int kRows = 16;   // rows per group
constexpr int kBlock = 32;  // values per block (per activation scale)
constexpr int kSuper = 256; // values per K-quant super-block

// GGML type ids (gguf.GGMLQuantizationType) of the block types with a packed layout.
enum Type : int { kQ4_0 = 2, kQ4_1 = 3, kQ5_0 = 6, kQ5_1 = 7, kQ8_0 = 8, kQ4_K = 12, kQ5_K = 13, kQ6_K = 14 };

enum Scheme : int {
  kSimple = 0,  // d (and m) fp16 per 32-value block
  kKMin = 1,    // d, dmin fp16 per super-block; sc, mn u8 per 32-value block
  kK6 = 2,      // d fp16 per super-block; sc i8 per 16 values
};

struct Traits {
  int bits;        // 4, 5, 6 or 8: how values are stored
  int offset;      // o
  int scheme;
  bool has_min;    // mb term
  int max_u;       // the largest value u
  int gguf_block;  // values per GGUF block
  int gguf_bytes;  // bytes per GGUF block
};

inline bool supported(int type) {
  switch (type) {
    case kQ4_0: case kQ4_1: case kQ5_0: case kQ5_1: case kQ8_0: case kQ4_K: case kQ5_K: case kQ6_K: return true;
    default: return false;
  }
}

inline constexpr Traits traits(int type) {
  switch (type) {
    case kQ4_0: return {4, 8, kSimple, false, 15, 32, 18};
    case kQ4_1: return {4, 0, kSimple, true, 15, 32, 20};
    case kQ5_0: return {5, 16, kSimple, false, 31, 32, 22};
    case kQ5_1: return {5, 0, kSimple, true, 31, 32, 24};
    case kQ8_0: return {8, 128, kSimple, false, 255, 32, 34};
    case kQ4_K: return {4, 0, kKMin, true, 15, 256, 144};
    case kQ5_K: return {5, 0, kKMin, true, 31, 256, 176};
    case kQ6_K: return {6, 32, kK6, false, 63, 256, 210};
    default: return {0, 0, 0, false, 0, 0, 0};
  }
}

inline constexpr int64_t value_bytes(int bits) { return bits == 8 ? 512 : 256 + 64 * (bits - 4); }

// u[r][4 i + b] of block `blk` (its value bytes), for the unpacked vector i < 8, row r, byte b < 4.
inline int unpacked_value(const uint8_t* blk, int bits, int i, int r, int b) {
  if (bits == 8) return blk[64 * i + 4 * r + b];
  const uint8_t low = blk[64 * (i % 4) + 4 * r + b];
  int u = i < 4 ? low & 0xF : low >> 4;
  if (bits == 6) u |= ((blk[256 + 64 * (i / 4) + 4 * r + b] >> (2 * (i % 4))) & 3) << 4;
  if (bits == 5) u |= ((blk[256 + 4 * r + b] >> i) & 1) << 4;
  return u;
}

// Byte offsets of one group's parts for K columns (K a multiple of the GGUF block).
struct Layout {
  int64_t value_bytes;  // per 32-value block: 256 (4-bit), 320 (5-bit), 384 (6-bit) or 512 (8-bit)
  int64_t d_off, m_off, sc_off, mn_off;  // -1 where the type has no such array
  int64_t group_bytes;
};

inline Layout layout(int type, int64_t k) {
  const Traits t = traits(type);
  Layout l{};
  l.value_bytes = value_bytes(t.bits);
  const int64_t nb = k / kBlock, nsb = k / kSuper;
  int64_t pos = nb * l.value_bytes;
  l.d_off = pos;
  l.m_off = l.sc_off = l.mn_off = -1;
  if (t.scheme == kSimple) {
    pos += nb * kRows * 2;
    if (t.has_min) { l.m_off = pos; pos += nb * kRows * 2; }
  } else if (t.scheme == kKMin) {
    pos += nsb * kRows * 2;
    l.m_off = pos;  // dmin
    pos += nsb * kRows * 2;
    l.sc_off = pos;
    pos += nb * kRows;
    l.mn_off = pos;
    pos += nb * kRows;
  } else {
    pos += nsb * kRows * 2;
    l.sc_off = pos;
    pos += (k / 16) * kRows;
  }
  l.group_bytes = (pos + 63) / 64 * 64;
  return l;
}

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Per activation block (32 values of one row, x ~ d * q with the integer q = 255 h + l of its two int8 levels,
// quant_matmul.cpp): d, s = d * sum(q), the sum of all 32 q and of the first 16 (the halves Q6_K's scales need).
struct ActBlock {
  float d;
  float s;
  int32_t sum;
  int32_t sum_lo;
};

}  // namespace quant
}  // namespace flotilla
