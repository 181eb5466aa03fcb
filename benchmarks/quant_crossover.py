"""Where the kept-quantized int8 kernels stop beating bfloat16 matmuls (issue 18's per-step choice of kernel,
``--gguf-dense-min-tokens``): one decoder layer's four linear weights of SmolLM2-135M and Qwen2.5-1.5B, random
values rounded to GGUF Q4_1 (the kernels' cost hardly depends on the values), multiplied by M activation rows
with ``quant_linear`` (int8 two-level activations) and with oneDNN's prepacked bfloat16 weight, in this process.

    .venv/bin/python benchmarks/quant_crossover.py [--models smollm2,qwen15] [--rows 1,2,4,8,16,32,64,128]

Prints, per M, the summed time of the layer's four matmuls on each path and their ratio (quantized/bfloat16;
below 1 the quantized kernels win). The same weights are multiplied again and again, so a SmolLM2 layer (2 MB
quantized) stays in the caches while a Qwen layer's bfloat16 weights (71 MB) do not: the crossover, not the
absolute times, is what this measures.
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = {"smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536)],
          "qwen15": [(2048, 1536), (1536, 1536), (17920, 1536), (1536, 8960)]}
Q4_1 = 3


def timed(fn, reps: int) -> float:
    fn()
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,qwen15")
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16,32,64,128")
    args = ap.parse_args()
    from flotilla.layers import torch_compat
    from flotilla.layers.quant_weight import pack
    from flotilla.layers.quantization import quantize_int4
    from flotilla.ops import use_kernels
    ops = use_kernels(torch.empty(0))
    if ops is None:
        raise SystemExit("flotilla's CPU kernels are unavailable")
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}, kernel ISA level {int(ops.isa_detected())}")
    print("| model | M | quantized ms | bfloat16 ms | quantized / bfloat16 |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        weights = [torch.randn(n, k) * 0.02 for n, k in SHAPES[name]]
        packed = [pack(quantize_int4(w)) for w in weights]
        dense = [torch_compat.onednn_prepack(w.bfloat16(), 64) for w in weights]
        for m in (int(r) for r in args.rows.split(",")):
            xs = [torch.randn(m, w.shape[1]).bfloat16() for w in weights]
            reps = max(3, 200 // m)
            tq = sum(timed(lambda x=x, p=p, n=w.shape[0]: ops.quant_linear(x, p, Q4_1, n, None), reps)
                     for x, p, w in zip(xs, packed, weights))
            td = sum(timed(lambda x=x, d=d: torch_compat.onednn_linear(x, d, None), reps) for x, d in zip(xs, dense))
            print(f"| {name} | {m} | {tq * 1e3:.3f} | {td * 1e3:.3f} | {tq / td:.2f} |", flush=True)


if __name__ == "__main__":
    main()
