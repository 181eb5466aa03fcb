"""Weight offload on the CPU (issue 18, item 4): decode speed and peak memory with every weight resident against
``--max-resident-weights`` budgets that hold half the decoder layers and only a few, on the same model, greedy
tokens compared.

    .venv/bin/python benchmarks/offload.py [--model smollm2-135m-instruct] [--resident-layers all,15,4]
                                           [--max-tokens 64] [--dtype auto] [--threads N]

Each configuration runs in its own process (so peak memory is its own): ``LLM(model, max_resident_weights=B)``
with B = the always-resident weights (embeddings, head, norm) plus N decoder layers ("all": no offload), one
warm-up, then batch-1 greedy generation of --max-tokens tokens (``ignore_eos``). Decode tok/s =
(max_tokens - 1) / (time of max_tokens tokens - time of 1 token). A thread samples /proc/self/status every 5 ms:
peak ``RssAnon`` (the process's own memory: weights, KV cache, activations, torch) and peak ``VmRSS`` (also the
file pages of the memory-mapped model, which the kernel can drop). Prints a table and a JSON line; writes
benchmarks/results/offload.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

from batch_invariant_cost import cpu_model

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
GiB = 1 << 30


def _status_kib(fields: tuple[str, ...]) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[key] = int(value.split()[0])
    return out


class PeakMemory:
    """Samples RssAnon and VmRSS every ``period`` seconds on a daemon thread; ``peak`` holds the maxima (KiB)."""

    FIELDS = ("RssAnon", "VmRSS", "RssFile")

    def __init__(self, period: float = 0.005):
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.is_set():
            for k, v in _status_kib(self.FIELDS).items():
                self.peak[k] = max(self.peak[k], v)
            self._stop.wait(period)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peak


def weight_sizes(model: str, dtype: str) -> tuple[int, int, int, str]:
    """(bytes of one decoder layer, bytes of the other weights, number of layers, dtype), from the model built on
    the meta device (nothing allocated)."""
    import torch

    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.models.registry import get_model_class
    from flotilla.worker.worker import torch_dtype
    config = EngineArgs(model=model, dtype=dtype).create_engine_config()
    hf = config.model.hf_config
    with torch.device("meta"):
        m = get_model_class(hf.architectures)(hf, dtype=torch_dtype(config.model.dtype), max_model_len=512)
    layer = sum(p.numel() * p.element_size() for p in m.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    n = hf.num_hidden_layers
    return layer, total - n * layer, n, config.model.dtype


def child(args) -> dict:
    """One configuration, in this process: returns its measurements."""
    import torch

    from flotilla import LLM, SamplingParams
    if args.threads:
        torch.set_num_threads(args.threads)
    layer, other, n, dtype = weight_sizes(args.model, args.dtype)
    budget = None if args.child == "all" else (other + int(args.child) * layer + 4096) / GiB
    mem = PeakMemory()
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=512, num_kv_blocks=64, max_resident_weights=budget)
    llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))  # warm-up

    def timed(tokens: int):
        start = time.perf_counter()
        out = llm.generate([PROMPT], SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
        return time.perf_counter() - start, list(out[0].outputs[0].token_ids)
    model = llm.engine.executor.worker.model
    stream = getattr(model, "offload_stream", None)
    t1, _ = timed(1)
    fill0, wait0 = (stream.fill_seconds, stream.wait_seconds) if stream else (0.0, 0.0)
    tn, tokens = timed(args.max_tokens)
    peak = mem.stop()
    fill_s, wait_s = (stream.fill_seconds - fill0, stream.wait_seconds - wait0) if stream else (0.0, 0.0)
    streamed = sum(hasattr(model.model.layers[i], "layer") for i in range(n))
    return {"resident_layers": args.child, "budget_gib": budget, "streamed_layers": streamed,
            "slots": len(stream.slots) if stream else 0, "layer_mib": layer / (1 << 20), "other_mib": other / (1 << 20),
            "all_weights_mib": (other + n * layer) / (1 << 20), "dtype": dtype, "decode_tok_s": (args.max_tokens - 1) / (tn - t1),
            "peak_rss_anon_mib": peak["RssAnon"] / 1024, "peak_vm_rss_mib": peak["VmRSS"] / 1024,
            "peak_rss_file_mib": peak["RssFile"] / 1024,
            "fill_ms_per_layer": 1e3 * fill_s / max(1, streamed * args.max_tokens),
            "stall_share": wait_s / tn, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--resident-layers", default="all,15,4", help="comma separated: 'all' or a number of layers")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    rows = []
    for n in args.resident_layers.split(","):
        cmd = [sys.executable, __file__, "--child", n, "--model", args.model, "--dtype", args.dtype,
               "--max-tokens", str(args.max_tokens)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"configuration {n} failed:\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0].removeprefix("RESULT ")))
    base = rows[0]
    print(f"{args.model}, {base['dtype']}, {cpu_model()}, load average {os.getloadavg()[0]:.1f}, "
          f"all weights {base['all_weights_mib']:.0f} MiB (one layer {base['layer_mib']:.1f} MiB, "
          f"embeddings/head/norm {base['other_mib']:.0f} MiB)")
    print("| resident layers | streamed | decode tok/s | slowdown | peak RssAnon MiB | peak VmRSS MiB | fill ms/layer "
          "| compute stalled on fills | tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        same = "identical" if r["tokens"] == base["tokens"] else "DIFFER"
        print(f"| {r['resident_layers']} | {r['streamed_layers']} ({r['slots']} slots) | {r['decode_tok_s']:.1f} | "
              f"{base['decode_tok_s'] / r['decode_tok_s']:.2f}x | {r['peak_rss_anon_mib']:.0f} | "
              f"{r['peak_vm_rss_mib']:.0f} | {r['fill_ms_per_layer']:.1f} | {100 * r['stall_share']:.0f}% | {same} |")
    result = {"model": args.model, "cpu": cpu_model(), "max_tokens": args.max_tokens, "rows": rows}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "offload.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}
                     | {"rows": [{k: v for k, v in r.items() if k != "tokens"} for r in rows]}))


if __name__ == "__main__":
    main()
