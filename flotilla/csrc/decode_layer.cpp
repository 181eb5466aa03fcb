// One decoder layer of a Llama-family model for a step of decodes only, as one op (flotilla/layers/
// fused_decode.py): at batch 1 a small model's step is mostly the ~25 Python-level calls per layer (module
// calls, views, one kernel each), not the kernels. This runs the same kernels, in the same order and on the
// same tensors as LlamaDecoderLayer.forward's kernel path, through the dispatcher from C++: bit-identical
// results (tests/test_fused_decode.py), without the Python in between.
//
//   decode_layer(hidden, residual, first, positions, norm1, norm2, eps, <qkv>, <o>, <gate_up>, <down>,
//                cos_cache, sin_cache, kv_cache, block_tables, seq_lens, slot_mapping,
//                num_heads, num_kv_heads, head_dim, scale) -> the MLP output (T, H)
//
// A linear <w> is its row segments of the packed quantized weight (Tensor[] packed, int[] GGML types, int[]
// rows) and an optional bias. `first`: hidden is the embedding output; it becomes the residual (the caller passes
// it as `residual` too), as in the Python path. Otherwise hidden (the previous MLP output) and residual are
// updated in place by the fused add + RMSNorm, as there.

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "common.h"

namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

struct Ops {
  c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double)> rms_norm =
      handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, double)>("flotilla::rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)> add_rms_norm =
      handle<void(at::Tensor&, at::Tensor&, const at::Tensor&, double)>("flotilla::fused_add_rms_norm");
  c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)> matmul =
      handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t)>("flotilla::quant_matmul");
  c10::TypedOperatorHandle<void(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>
      rotary = handle<void(const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&, const at::Tensor&)>(
          "flotilla::rotary_embedding");
  c10::TypedOperatorHandle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&)>
      write_kv = handle<void(const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&)>(
          "flotilla::write_kv_cache");
  c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                const at::Tensor&, const at::Tensor&, double)>
      attention = handle<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                              const at::Tensor&, double)>("flotilla::paged_decode_attention");
  c10::TypedOperatorHandle<void(at::Tensor&, const at::Tensor&)> silu_and_mul =
      handle<void(at::Tensor&, const at::Tensor&)>("flotilla::silu_and_mul");
};

const Ops& ops() {
  static const Ops o;
  return o;
}

// x (T, K) @ W^T (+ bias) over W's row segments, as QuantizedWeight.matmul: one segment is quant_linear's
// product plus the bias; several fill column slices of one output, then the bias.
at::Tensor linear(const at::Tensor& x, at::TensorList packed, at::IntArrayRef types, at::IntArrayRef rows,
                  const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(!packed.empty() && packed.size() == types.size() && packed.size() == rows.size(),
              "decode_layer: a linear needs one type and row count per packed segment");
  int64_t n = 0;
  for (int64_t r : rows) n += r;
  at::Tensor out = at::empty({x.size(0), n}, x.options());
  int64_t start = 0;
  for (size_t s = 0; s < packed.size(); ++s) {
    at::Tensor slice = packed.size() == 1 ? out : out.narrow(1, start, rows[s]);
    ops().matmul.call(slice, x, packed[s], types[s], rows[s]);
    start += rows[s];
  }
  return bias.has_value() ? (packed.size() == 1 ? out.add_(*bias) : out.add(*bias)) : out;
}

at::Tensor decode_layer(at::Tensor& hidden, at::Tensor& residual, bool first, const at::Tensor& positions,
                        const at::Tensor& norm1, const at::Tensor& norm2, double eps,
                        at::TensorList qkv_w, at::IntArrayRef qkv_types, at::IntArrayRef qkv_rows,
                        const std::optional<at::Tensor>& qkv_bias,
                        at::TensorList o_w, at::IntArrayRef o_types, at::IntArrayRef o_rows,
                        const std::optional<at::Tensor>& o_bias,
                        at::TensorList gu_w, at::IntArrayRef gu_types, at::IntArrayRef gu_rows,
                        const std::optional<at::Tensor>& gu_bias,
                        at::TensorList down_w, at::IntArrayRef down_types, at::IntArrayRef down_rows,
                        const std::optional<at::Tensor>& down_bias,
                        const at::Tensor& cos_cache, const at::Tensor& sin_cache, const at::Tensor& kv_cache,
                        const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& slot_mapping,
                        int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double scale) {
  TORCH_CHECK(hidden.dim() == 2 && hidden.is_contiguous() && residual.sizes() == hidden.sizes(),
              "decode_layer: hidden and residual must be contiguous (T, H)");
  const Ops& o = ops();
  const int64_t t = hidden.size(0);
  at::Tensor x;  // the normed input of the attention block
  if (first) {
    x = at::empty_like(hidden);
    o.rms_norm.call(x, hidden, norm1, eps);
  } else {
    o.add_rms_norm.call(hidden, residual, norm1, eps);
    x = hidden;
  }
  at::Tensor qkv = linear(x, qkv_w, qkv_types, qkv_rows, qkv_bias);  // (T, (h + 2 kvh) * d)
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor q = qkv.narrow(1, 0, q_size).view({t, num_heads, head_dim});
  at::Tensor k = qkv.narrow(1, q_size, kv_size).view({t, num_kv_heads, head_dim});
  at::Tensor v = qkv.narrow(1, q_size + kv_size, kv_size).view({t, num_kv_heads, head_dim});
  o.rotary.call(positions, q, k, cos_cache, sin_cache);
  at::Tensor k_cache = kv_cache.select(0, 0), v_cache = kv_cache.select(0, 1);
  o.write_kv.call(k, v, k_cache, v_cache, slot_mapping);
  at::Tensor attn = at::empty({t, q_size}, hidden.options());
  o.attention.call(attn, q, k_cache, v_cache, block_tables, seq_lens, scale);
  at::Tensor h = linear(attn, o_w, o_types, o_rows, o_bias);  // (T, H)
  o.add_rms_norm.call(h, residual, norm2, eps);
  at::Tensor gu = linear(h, gu_w, gu_types, gu_rows, gu_bias);  // (T, 2 I)
  at::Tensor act = at::empty({t, gu.size(1) / 2}, hidden.options());
  o.silu_and_mul.call(act, gu);
  return linear(act, down_w, down_types, down_rows, down_bias);  // (T, H)
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(flotilla, m) {
  m.def("decode_layer(Tensor(a!) hidden, Tensor(b!) residual, bool first, Tensor positions, Tensor norm1, "
        "Tensor norm2, float eps, Tensor[] qkv_w, int[] qkv_types, int[] qkv_rows, Tensor? qkv_bias, "
        "Tensor[] o_w, int[] o_types, int[] o_rows, Tensor? o_bias, Tensor[] gu_w, int[] gu_types, int[] gu_rows, "
        "Tensor? gu_bias, Tensor[] down_w, int[] down_types, int[] down_rows, Tensor? down_bias, Tensor cos_cache, "
        "Tensor sin_cache, Tensor(c!) kv_cache, Tensor block_tables, Tensor seq_lens, Tensor slot_mapping, "
        "int num_heads, int num_kv_heads, int head_dim, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(flotilla, CPU, m) {
  m.impl("decode_layer", &decode_layer);
}
