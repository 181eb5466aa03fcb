// Repacking GGUF blocks into flotilla's packed layout (quant.h) and dequantizing packed weights.
//
//   quant_pack(raw (N * row_bytes,) uint8, type, N, K) -> packed (groups * group_bytes,) uint8
//   quant_dequantize(out (n, K) float/bf16/half, packed, type, K, row_ids (n,) int64 or None)
//
// Both are plain C++ (no ISA variants): packing runs once per tensor at load, dequantizing serves the
// embedding lookup of a kept-quantized table and the prefill path (a dequantized tile for a GEMM).

#include <torch/library.h>

#include "common.h"
#include "quant.h"

namespace {
using namespace flotilla::kernels;
using namespace flotilla::quant;

// One GGUF block decoded: its values u (unsigned, quant.h) and scale fields.
struct Decoded {
  uint8_t u[kSuper];
  uint8_t d[2], m[2];       // fp16 bits: d, and m (simple) or dmin (K types)
  uint8_t sc[16], mn[8];    // K types: per 32 values (Q4_K/Q5_K) or per 16 (Q6_K, int8 bits)
};

void k4_scale_min(const uint8_t* s, int j, uint8_t& sc, uint8_t& mn) {
  if (j < 4) {
    sc = s[j] & 63;
    mn = s[j + 4] & 63;
  } else {
    sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// Decode one GGUF block (ggml-common.h layouts) of `type` at `b`.
void decode_block(int type, const uint8_t* b, Decoded& o) {
  switch (type) {
    case kQ4_0: case kQ4_1: {
      const uint8_t* qs = b + (type == kQ4_0 ? 2 : 4);
      std::memcpy(o.d, b, 2);
      if (type == kQ4_1) std::memcpy(o.m, b + 2, 2);
      for (int j = 0; j < 16; ++j) { o.u[j] = qs[j] & 0xF; o.u[j + 16] = qs[j] >> 4; }
      break;
    }
    case kQ5_0: case kQ5_1: {
      const int h = type == kQ5_0 ? 2 : 4;
      std::memcpy(o.d, b, 2);
      if (type == kQ5_1) std::memcpy(o.m, b + 2, 2);
      uint32_t qh;
      std::memcpy(&qh, b + h, 4);
      const uint8_t* qs = b + h + 4;
      for (int j = 0; j < 16; ++j) {
        o.u[j] = (qs[j] & 0xF) | (((qh >> j) & 1) << 4);
        o.u[j + 16] = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      }
      break;
    }
    case kQ8_0:
      std::memcpy(o.d, b, 2);
      for (int j = 0; j < 32; ++j) o.u[j] = static_cast<uint8_t>(static_cast<int8_t>(b[2 + j]) + 128);
      break;
    case kQ4_K: case kQ5_K: {
      std::memcpy(o.d, b, 2);
      std::memcpy(o.m, b + 2, 2);
      for (int j = 0; j < 8; ++j) k4_scale_min(b + 4, j, o.sc[j], o.mn[j]);
      const uint8_t* qs = b + (type == kQ4_K ? 16 : 48);
      const uint8_t* qh = b + 16;  // Q5_K only
      for (int c = 0; c < 4; ++c) {
        for (int l = 0; l < 32; ++l) {
          o.u[64 * c + l] = qs[32 * c + l] & 0xF;
          o.u[64 * c + 32 + l] = qs[32 * c + l] >> 4;
          if (type == kQ5_K) {
            o.u[64 * c + l] |= ((qh[l] >> (2 * c)) & 1) << 4;
            o.u[64 * c + 32 + l] |= ((qh[l] >> (2 * c + 1)) & 1) << 4;
          }
        }
      }
      break;
    }
    case kQ6_K: {
      const uint8_t* ql = b;
      const uint8_t* qh = b + 128;
      std::memcpy(o.sc, b + 192, 16);
      std::memcpy(o.d, b + 208, 2);
      for (int v = 0; v < kSuper; ++v) {
        int n = v / 128, qd = (v % 128) / 32, l = v % 32;
        uint8_t lo = ql[64 * n + l + 32 * (qd & 1)];
        lo = qd >= 2 ? (lo >> 4) : (lo & 0xF);
        o.u[v] = lo | (((qh[32 * n + l] >> (2 * qd)) & 3) << 4);
      }
      break;
    }
    default: TORCH_CHECK(false, "quant: unsupported type ", type);
  }
}

// Store u at (row rr of the group, column k) in the block layout of quant.h (the group starts zeroed).
inline void put_value(uint8_t* group, int bits, int64_t vb, int64_t k, int rr, int u) {
  const int64_t j = k / kBlock, kk = k % kBlock;
  const int i = static_cast<int>(kk / 4), b = static_cast<int>(kk % 4);
  uint8_t* blk = group + j * vb;
  if (bits == 8) {
    blk[64 * i + 4 * rr + b] = static_cast<uint8_t>(u);
    return;
  }
  blk[64 * (i % 4) + 4 * rr + b] |= static_cast<uint8_t>((u & 0xF) << (i < 4 ? 0 : 4));
  if (bits == 6) blk[256 + 64 * (i / 4) + 4 * rr + b] |= static_cast<uint8_t>(((u >> 4) & 3) << (2 * (i % 4)));
  if (bits == 5) blk[256 + 4 * rr + b] |= static_cast<uint8_t>(((u >> 4) & 1) << i);
}

void pack_row(int type, const uint8_t* raw_row, int64_t k, uint8_t* group, int rr, const Layout& l) {
  const Traits t = traits(type);
  Decoded o;
  for (int64_t sb = 0; sb < k / t.gguf_block; ++sb) {
    decode_block(type, raw_row + sb * t.gguf_bytes, o);
    const int64_t k0 = sb * t.gguf_block;
    for (int v = 0; v < t.gguf_block; ++v) put_value(group, t.bits, l.value_bytes, k0 + v, rr, o.u[v]);
    if (t.scheme == kSimple) {
      std::memcpy(group + l.d_off + (sb * kRows + rr) * 2, o.d, 2);
      if (t.has_min) std::memcpy(group + l.m_off + (sb * kRows + rr) * 2, o.m, 2);
    } else if (t.scheme == kKMin) {
      std::memcpy(group + l.d_off + (sb * kRows + rr) * 2, o.d, 2);
      std::memcpy(group + l.m_off + (sb * kRows + rr) * 2, o.m, 2);
      for (int j = 0; j < 8; ++j) {
        group[l.sc_off + (sb * 8 + j) * kRows + rr] = o.sc[j];
        group[l.mn_off + (sb * 8 + j) * kRows + rr] = o.mn[j];
      }
    } else {
      std::memcpy(group + l.d_off + (sb * kRows + rr) * 2, o.d, 2);
      for (int j = 0; j < 16; ++j) group[l.sc_off + (sb * 16 + j) * kRows + rr] = o.sc[j];
    }
  }
}

void check_geometry(int64_t type, int64_t n, int64_t k, const char* op) {
  TORCH_CHECK(supported(static_cast<int>(type)), op, ": GGML type ", type, " has no packed layout");
  const Traits t = traits(static_cast<int>(type));
  TORCH_CHECK(n >= 0 && k > 0 && k % t.gguf_block == 0, op, ": ", k, " columns are not whole blocks of ",
              t.gguf_block);
}

at::Tensor quant_pack(const at::Tensor& raw, int64_t type, int64_t n, int64_t k) {
  check_geometry(type, n, k, "quant_pack");
  const Traits t = traits(static_cast<int>(type));
  const int64_t row_bytes = k / t.gguf_block * t.gguf_bytes;
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.numel() == n * row_bytes,
              "quant_pack: raw must be ", n * row_bytes, " contiguous uint8 bytes, got ", raw.numel());
  const Layout l = layout(static_cast<int>(type), k);
  const int64_t groups = (n + kRows - 1) / kRows;
  at::Tensor packed = at::zeros({groups * l.group_bytes}, raw.options());
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = packed.data_ptr<uint8_t>();
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int rr = 0; rr < kRows && g * kRows + rr < n; ++rr) {
        pack_row(static_cast<int>(type), src + (g * kRows + rr) * row_bytes, k, dst + g * l.group_bytes, rr, l);
      }
    }
  });
  return packed;
}

// Row rr of a group dequantized into out (K,) float32 (quant.h's formula).
void dequantize_row(int type, const uint8_t* group, int rr, int64_t k, const Layout& l, float* out) {
  const Traits t = traits(type);
  for (int64_t j = 0; j < k / kBlock; ++j) {
    float s = 0.f, mb = 0.f, s_hi = 0.f;
    if (t.scheme == kSimple) {
      s = half_to_float(group + l.d_off + (j * kRows + rr) * 2);
      if (t.has_min) mb = half_to_float(group + l.m_off + (j * kRows + rr) * 2);
    } else if (t.scheme == kKMin) {
      const int64_t sb = j / 8;
      s = half_to_float(group + l.d_off + (sb * kRows + rr) * 2) *
          static_cast<float>(group[l.sc_off + j * kRows + rr]);
      mb = -(half_to_float(group + l.m_off + (sb * kRows + rr) * 2) *
             static_cast<float>(group[l.mn_off + j * kRows + rr]));
    } else {
      const float d = half_to_float(group + l.d_off + (j / 8 * kRows + rr) * 2);
      s = d * static_cast<float>(static_cast<int8_t>(group[l.sc_off + (2 * j) * kRows + rr]));
      s_hi = d * static_cast<float>(static_cast<int8_t>(group[l.sc_off + (2 * j + 1) * kRows + rr]));
    }
    for (int kk = 0; kk < kBlock; ++kk) {
      const int u = unpacked_value(group + j * l.value_bytes, t.bits, kk / 4, rr, kk % 4);
      const float scale = t.scheme == kK6 && kk >= 16 ? s_hi : s;
      float w = scale * static_cast<float>(u - t.offset);
      if (t.has_min) w = w + mb;
      out[j * kBlock + kk] = w;
    }
  }
}

// out (n, K) = the packed rows row_ids (or 0 .. n - 1 without ids), in out's dtype.
void quant_dequantize(at::Tensor& out, const at::Tensor& packed, int64_t type, int64_t k,
                      const std::optional<at::Tensor>& row_ids) {
  check_geometry(type, 0, k, "quant_dequantize");
  const Layout l = layout(static_cast<int>(type), k);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.numel() % l.group_bytes == 0,
              "quant_dequantize: packed must be whole groups of ", l.group_bytes, " bytes");
  TORCH_CHECK(out.dim() == 2 && out.size(1) == k && out.is_contiguous(), "quant_dequantize: out ", out.sizes(),
              " must be contiguous (n, ", k, ")");
  const int64_t n = out.size(0), rows = packed.numel() / l.group_bytes * kRows;
  at::Tensor ids;
  if (row_ids.has_value()) {
    ids = row_ids->contiguous();
    TORCH_CHECK(ids.scalar_type() == at::kLong && ids.numel() == n, "quant_dequantize: row_ids must be ", n,
                " int64 ids");
    check_indices(ids.data_ptr<int64_t>(), n, rows, "quant_dequantize", "row_ids");
  } else {
    TORCH_CHECK(n <= rows, "quant_dequantize: ", n, " rows asked of a packed weight of ", rows);
  }
  const int64_t* idp = row_ids.has_value() ? ids.data_ptr<int64_t>() : nullptr;
  const uint8_t* src = packed.data_ptr<uint8_t>();
  dispatch(out.scalar_type(), "quant_dequantize", [&](auto tag) {
    using scalar_t = typename decltype(tag)::type;
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
      std::vector<float> row(k);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t src_row = idp ? idp[r] : r;
        dequantize_row(static_cast<int>(type), src + src_row / kRows * l.group_bytes, static_cast<int>(src_row % kRows),
                       k, l, row.data());
        for (int64_t c = 0; c < k; ++c) dst[r * k + c] = from_f<scalar_t>(row[c]);
      }
    });
  });
}

int64_t quant_group_bytes(int64_t type, int64_t k) {
  check_geometry(type, 0, k, "quant_group_bytes");
  return layout(static_cast<int>(type), k).group_bytes;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def("quant_pack(Tensor raw, int type, int rows, int cols) -> Tensor");
  m.def("quant_dequantize(Tensor(a!) out, Tensor packed, int type, int cols, Tensor? row_ids) -> ()");
  m.def("quant_group_bytes(int type, int cols) -> int", &quant_group_bytes);
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("quant_pack", &quant_pack);
  m.impl("quant_dequantize", &quant_dequantize);
}
