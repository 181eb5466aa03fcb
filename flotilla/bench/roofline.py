"""``flotilla bench roofline``: this machine's limits and the decode/prefill lower bounds they imply.

Measured in the same run (BENCHMARK.md, "Physical limits"):

* **BW**, memory read bandwidth: ``measure_memory_bandwidth`` sums (or copies) a large float32 tensor
  (default 512 MiB, far beyond any cache) and takes the median over repeats. A sum reads ``size`` bytes; a
  copy moves ``2 * size`` (read + write).
* **F**, matmul FLOP/s at the model's shapes and dtype: ``measure_matmul_flops`` times ``F.linear`` with
  activations (M, K) against a weight laid out as the model's (N, K), median over repeats, for each matmul
  of a forward pass (fused qkv, o, gate_up, down, lm_head) at M = batch size (decode) and M = prompt
  length (prefill). The bounds use the fastest shape (a lower bound needs the highest rate); every shape's
  rate is in the JSON.

From the model's config (``model_shape``): parameter count, per-token KV bytes, weight bytes. A decode step
multiplies every weight except the input embedding table (a lookup of B rows), so
``decode_params = params - vocab * hidden`` for untied embeddings and ``params`` for tied ones (the lm_head
reads the shared table); FLOP and weight bytes per token use ``decode_params``.

* decode step at batch B with C tokens of context each:
  ``max((decode_params * elem + B * C * kv_bytes_per_token) / BW, 2 * decode_params * B / F_decode)``,
  and the implied max decode rate ``B / that`` tokens/s;
* prefill of S tokens: ``2 * decode_params * S / F_prefill`` (also shown: the weight + KV-write read time,
  the bound is the larger of the two).

Attention's own FLOP (``4 * layers * heads * head_dim * C`` per decode token) is reported but left out of
the bound, as in BENCHMARK.md. The measuring functions are importable for MBU/MFU elsewhere::

    from flotilla.bench.roofline import measure_memory_bandwidth, measure_matmul_flops, model_shape
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from flotilla.deploy.engine_args import finite_float

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- shapes

@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder, read from its config."""

    name: str
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def qkv_size(self) -> int:
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def layer_params(self) -> int:
        h, i, q = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim
        attn = h * self.qkv_size + q * h + (self.qkv_size if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        return attn + mlp + 2 * h  # + two RMSNorm weights

    @property
    def params(self) -> int:
        """Every distinct parameter (the tied embedding counted once)."""
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        return embed + self.num_layers * self.layer_params() + self.hidden_size + head

    @property
    def decode_params(self) -> int:
        """Parameters a forward pass multiplies with: all but the input embedding table's lookup."""
        return self.num_layers * self.layer_params() + self.hidden_size + self.vocab_size * self.hidden_size

    def kv_bytes_per_token(self, elem: int) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * elem

    def attention_flops_per_token(self, context_len: int) -> int:
        return 4 * self.num_layers * self.num_heads * self.head_dim * context_len

    def matmul_shapes(self) -> dict[str, tuple[int, int, int]]:
        """name -> (K, N, count per forward pass) of the weight matmuls."""
        h, i, q = self.hidden_size, self.intermediate_size, self.num_heads * self.head_dim
        return {"qkv": (h, self.qkv_size, self.num_layers), "o": (q, h, self.num_layers),
                "gate_up": (h, 2 * i, self.num_layers), "down": (i, h, self.num_layers),
                "lm_head": (h, self.vocab_size, 1)}


def shape_from_hf_config(cfg, name: str = "") -> ModelShape:
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    model_type = str(getattr(cfg, "model_type", "")).lower()
    attention_bias = bool(getattr(cfg, "attention_bias", False))
    return ModelShape(name=name, hidden_size=int(cfg.hidden_size), intermediate_size=int(cfg.intermediate_size),
                      vocab_size=int(cfg.vocab_size), num_layers=int(cfg.num_hidden_layers), num_heads=heads,
                      num_kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads), head_dim=int(head_dim),
                      tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
                      qkv_bias=attention_bias or model_type.startswith("qwen2"), o_bias=attention_bias,
                      mlp_bias=bool(getattr(cfg, "mlp_bias", False)))


def model_shape(model: str | None) -> ModelShape:
    """The shape of ``model`` (alias, HF directory or .gguf; None = the default model), from its config."""
    from flotilla.models.loader import load_hf_config, resolve_model
    resolved = resolve_model(model)
    return shape_from_hf_config(load_hf_config(resolved), resolved.alias or model or resolved.source)


# ------------------------------------------------------------------------------------------- measuring

def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_memory_bandwidth(size_mib: float = 512, repeats: int = 5, device: str = "cpu",
                             method: str = "sum") -> float:
    """Memory bandwidth in bytes/s: median over ``repeats`` of summing (reads ``size``) or copying (reads
    and writes ``size``) a float32 tensor of ``size_mib`` MiB."""
    n = max(1, int(size_mib * 2**20) // 4)
    with torch.inference_mode():
        src = torch.ones(n, dtype=torch.float32, device=device)
        if method == "sum":
            moved, fn = src.numel() * 4, src.sum
        elif method == "copy":
            dst = torch.empty_like(src)
            moved, fn = 2 * src.numel() * 4, (lambda: dst.copy_(src))
        else:
            raise ValueError(f"method must be 'sum' or 'copy', got {method!r}")
        return moved / median_time(fn, repeats, device=device)


def measure_matmul_flops(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, repeats: int = 5,
                         device: str = "cpu") -> float:
    """FLOP/s of ``F.linear((m, k), weight (n, k))`` (2*m*k*n FLOP), median over ``repeats``."""
    with torch.inference_mode():
        gen = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(n, k, generator=gen) / k ** 0.5).to(device=device, dtype=dtype)
        return 2.0 * m * k * n / median_time(lambda: F.linear(x, w), repeats, device=device)


def measure_model_matmuls(shape: ModelShape, m: int, dtype: torch.dtype = torch.float32, repeats: int = 5,
                          device: str = "cpu") -> dict[str, float]:
    """FLOP/s of each of the model's weight matmuls with ``m`` activation rows; also ``"forward"``: the
    rate of one whole forward pass's matmuls (each counted as often as the model runs it)."""
    rates, flops, seconds = {}, 0.0, 0.0
    for name, (k, n, count) in shape.matmul_shapes().items():
        rate = measure_matmul_flops(m, k, n, dtype, repeats, device)
        rates[name] = rate
        flops += count * 2.0 * m * k * n
        seconds += count * 2.0 * m * k * n / rate
    rates["forward"] = flops / seconds
    return rates


# -------------------------------------------------------------------------------------------- bounds

def bounds(shape: ModelShape, dtype: str, batch_size: int, prompt_len: int, context_len: int, bw: float,
           f_decode: float, f_prefill: float) -> dict:
    """Decode-step and prefill lower bounds (seconds) from BW (bytes/s) and F (FLOP/s)."""
    elem = torch.empty((), dtype=DTYPES[dtype]).element_size()
    weight_read = shape.decode_params * elem
    kv_tok = shape.kv_bytes_per_token(elem)
    decode_bytes = weight_read + batch_size * context_len * kv_tok
    decode_mem = decode_bytes / bw
    decode_compute = 2.0 * shape.decode_params * batch_size / f_decode
    decode = max(decode_mem, decode_compute)
    prefill_compute = 2.0 * shape.decode_params * prompt_len / f_prefill
    prefill_mem = (weight_read + prompt_len * kv_tok) / bw
    return {"dtype_bytes": elem, "weight_bytes": shape.params * elem, "decode_weight_bytes": weight_read,
            "kv_bytes_per_token": kv_tok, "decode_bytes_per_step": decode_bytes,
            "decode_flops_per_step": 2.0 * shape.decode_params * batch_size,
            "attention_flops_per_decode_step": float(batch_size * shape.attention_flops_per_token(context_len)),
            "decode_step_memory_s": decode_mem, "decode_step_compute_s": decode_compute,
            "decode_step_lower_bound_s": decode, "decode_bound_by": "memory" if decode_mem >= decode_compute
            else "compute", "max_decode_tokens_per_s": batch_size / decode,
            "prefill_compute_s": prefill_compute, "prefill_memory_s": prefill_mem,
            "prefill_lower_bound_s": max(prefill_compute, prefill_mem),
            "max_prefill_tokens_per_s": prompt_len / max(prefill_compute, prefill_mem)}


def run_roofline(model: str | None = None, dtype: str = "float32", batch_size: int = 32, prompt_len: int = 512,
                 context_len: int | None = None, bw_size_mib: float = 512, bw_method: str = "sum",
                 repeats: int = 5, device: str = "cpu") -> dict:
    """Measure BW and F and compute the bounds for ``model``; everything in one JSON-able dict."""
    shape = model_shape(model)
    context_len = prompt_len if context_len is None else context_len
    tdtype = DTYPES[dtype]
    bw = measure_memory_bandwidth(bw_size_mib, repeats, device, bw_method)
    decode_rates = measure_model_matmuls(shape, batch_size, tdtype, repeats, device)
    prefill_rates = measure_model_matmuls(shape, prompt_len, tdtype, repeats, device)
    f_decode, f_prefill = max(decode_rates.values()), max(prefill_rates.values())
    out = {"model": shape.name, "dtype": dtype, "device": device, "torch_threads": torch.get_num_threads(),
           "batch_size": batch_size, "prompt_len": prompt_len, "context_len": context_len,
           "params": shape.params, "decode_params": shape.decode_params, "shape": asdict(shape),
           "bw_bytes_per_s": bw, "bw_method": bw_method, "bw_size_mib": bw_size_mib, "repeats": repeats,
           "flops_per_s_decode": f_decode, "flops_per_s_prefill": f_prefill,
           "matmul_flops_per_s_decode": decode_rates, "matmul_flops_per_s_prefill": prefill_rates}
    out.update(bounds(shape, dtype, batch_size, prompt_len, context_len, bw, f_decode, f_prefill))
    return out


# -------------------------------------------------------------------------------------------- report

def format_report(r: dict) -> str:
    g, ms = 1e9, 1e3
    lines = [f"Roofline for {r['model']} ({r['dtype']}, {r['device']}, {r['torch_threads']} torch threads)",
             f"  parameters                  {r['params'] / 1e6:10.2f} M  (decode multiplies "
             f"{r['decode_params'] / 1e6:.2f} M)",
             f"  weight bytes                {r['weight_bytes'] / 1e6:10.2f} MB",
             f"  KV bytes per token          {r['kv_bytes_per_token'] / 1e3:10.2f} KB",
             f"  memory bandwidth BW         {r['bw_bytes_per_s'] / g:10.2f} GB/s  ({r['bw_method']} of "
             f"{r['bw_size_mib']:g} MiB, median of {r['repeats']})",
             f"  matmul F at M={r['batch_size']:<6d}      {r['flops_per_s_decode'] / g:10.2f} GFLOP/s",
             f"  matmul F at M={r['prompt_len']:<6d}      {r['flops_per_s_prefill'] / g:10.2f} GFLOP/s",
             "", f"  {'matmul':10s} {'GFLOP/s @M=' + str(r['batch_size']):>18s} "
                 f"{'GFLOP/s @M=' + str(r['prompt_len']):>18s}"]
    for name, rate in r["matmul_flops_per_s_decode"].items():
        lines.append(f"  {name:10s} {rate / g:18.2f} {r['matmul_flops_per_s_prefill'][name] / g:18.2f}")
    lines += ["",
              f"  decode step, batch {r['batch_size']}, context {r['context_len']}: >= "
              f"{r['decode_step_lower_bound_s'] * ms:.3f} ms (memory {r['decode_step_memory_s'] * ms:.3f} ms, "
              f"compute {r['decode_step_compute_s'] * ms:.3f} ms; {r['decode_bound_by']} bound)",
              f"    -> at most {r['max_decode_tokens_per_s']:.1f} decode tokens/s",
              f"  prefill of {r['prompt_len']} tokens: >= {r['prefill_lower_bound_s'] * ms:.3f} ms "
              f"(compute {r['prefill_compute_s'] * ms:.3f} ms, memory {r['prefill_memory_s'] * ms:.3f} ms)",
              f"    -> at most {r['max_prefill_tokens_per_s']:.1f} prefill tokens/s"]
    return "\n".join(lines)


def add_roofline_parser(sub) -> None:
    p = sub.add_parser("roofline", help="measure memory bandwidth and matmul FLOP/s; decode/prefill bounds")
    p.add_argument("--model", default=None, help="alias, HF directory or .gguf (default: smollm2-135m-instruct)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32, help="decode batch B")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill length S")
    p.add_argument("--context-len", type=int, default=None, help="KV tokens per sequence at decode "
                                                                "(default: --prompt-len)")
    p.add_argument("--bw-size-mib", type=finite_float, default=512, help="size of the bandwidth test tensor")
    p.add_argument("--bw-method", choices=["sum", "copy"], default="sum")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--output-json", default=None)
    p.set_defaults(func=cmd_bench_roofline)


def cmd_bench_roofline(ns: argparse.Namespace) -> int:
    if ns.num_threads:
        torch.set_num_threads(ns.num_threads)
    r = run_roofline(ns.model, ns.dtype, ns.batch_size, ns.prompt_len, ns.context_len, ns.bw_size_mib,
                     ns.bw_method, ns.repeats, ns.device)
    print(format_report(r))
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(r, f, indent=2)
    return 0
