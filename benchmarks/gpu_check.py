"""The GPU path's device check (issue 18, item 5), one script for one lent session (about 6 minutes on an H200).

    python3 benchmarks/gpu_check.py [--out DIR] [--smoke]

On the device machine (its own python3 with torch, triton and transformers; flotilla's other imports carried as
wheels, see below), in order:

1. **Kernels**: the Triton paged-attention backend against the PyTorch backend on CUDA, bfloat16, for decodes,
   verification chunks, chunked and fresh prefill (max abs error).
2. **Correctness**: greedy tokens of tiny random Llama and Qwen2 models on CUDA in float32 (Triton backend,
   decode from CUDA graphs) against transformers' ``generate`` on the same GPU; bfloat16 tokens compared too
   (agreement rate: rounding may flip near ties). The same run with ``enforce_eager=True``: tokens identical.
3. **Batch-1 decode roofline**: a random Llama-3.2-3B-shaped model in bfloat16, 128 greedy tokens at batch 1,
   with and without CUDA graphs. TPOT = (time of 129 tokens - time of 1) / 128. Bytes per token = every weight
   read once plus the KV cache read so far; roofline TPOT = bytes / the bandwidth of a device-to-device copy
   measured in the same run. Reported: achieved fraction (target >= 70%).
4. **Throughput at concurrency 64**: 64 random 128-token prompts, 128 output tokens each (ignore EOS), flotilla
   ``LLM.generate`` against transformers ``generate`` on the same model and GPU (batch 64, greedy, static cache
   when available), output tokens per second.

Writes DIR/gpu_check.json (default $OUT or .) and prints it. ``--smoke`` runs every step with tiny shapes (on
the CPU: the Triton kernels in the interpreter, no graphs), to check the script here before a device session.

Device run (one call within the 10-minute limit): ``scripts/device_wheels.sh`` here downloads what the image
lacks (gguf, msgspec, pyzmq) into .device-wheels; then ``run(carry=[".device-wheels"], timeout_s=540,
command="python3 -m pip install -q --no-deps .device-wheels/*.whl && python3 -m pip install -q --no-deps
--no-build-isolation -e . && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT")``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
    os.environ.setdefault("FLOTILLA_ATTENTION_BACKEND", "triton")  # the GPU backend, interpreted

import torch  # noqa: E402

GiB = 1 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device: str, gib: float) -> float:
    """Bytes/s of a device-to-device copy (read + write counted), best of 5 after a warm-up."""
    n = int(gib * GiB) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * a.element_size() / best


def kernel_check(device: str, dtype: torch.dtype) -> dict:
    """Max abs difference of the Triton backend against the PyTorch backend per step kind."""
    from flotilla.layers.attention.backend import CommonAttentionMetadata
    from flotilla.layers.attention.torch_paged import TorchPagedAttentionBackend
    from flotilla.layers.attention.triton_paged import TritonPagedAttentionBackend
    bs, nblocks, heads, kv_heads, hd = 16, 1024, 12, 2, 128
    steps = {"decodes": ([1] * 8, [5, 16, 47, 100, 300, 511, 64, 1000]), "verification": ([5, 5], [300, 17]),
             "mixed": ([1, 1, 3, 200], [5, 700, 4, 0]), "chunked": ([1, 400, 7], [33, 120, 0])}
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, (qlens, ctx) in steps.items():
        r = len(qlens)
        width = max(-(-(q + c) // bs) for q, c in zip(qlens, ctx))
        tables = (torch.randperm(nblocks - 1, generator=g)[:r * width] + 1).view(r, width)
        q_t, c_t = torch.tensor(qlens), torch.tensor(ctx)
        pos = torch.cat([torch.arange(c, c + q) for q, c in zip(qlens, ctx)])
        req = torch.repeat_interleave(torch.arange(r), q_t)
        slots = tables[req, pos // bs] * bs + pos % bs
        common = CommonAttentionMetadata(q_t, c_t, tables.to(device), slots.to(device), qlens.count(1), bs,
                                         max(qlens), int((q_t + c_t).max()))
        t = int(q_t.sum())
        q, k, v = (torch.randn(t, h, hd, generator=g).to(device, dtype) for h in (heads, kv_heads, kv_heads))
        cache = torch.randn(2, kv_heads, nblocks, bs, hd, generator=g).to(device, dtype)
        res = []
        for backend in (TorchPagedAttentionBackend(), TritonPagedAttentionBackend()):
            c = cache.clone()
            res.append(backend.forward(q, k, v, c, backend.build_metadata(common), hd ** -0.5).float())
        out[name] = float((res[0] - res[1]).abs().max())
    return out


def tiny_model(family: str, out_dir: str, **shape) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    cfg = dict(vocab_size=2048, hidden_size=192, intermediate_size=384, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)
    cfg.update(shape)
    torch.manual_seed(0)
    cls, conf = (LlamaForCausalLM, LlamaConfig) if family == "llama" else (Qwen2ForCausalLM, Qwen2Config)
    model = cls(conf(**cfg)).to(torch.bfloat16 if cfg["hidden_size"] >= 1024 else torch.float32).eval()
    path = os.path.join(out_dir, family)
    model.save_pretrained(path, safe_serialization=True)
    save_tokenizer(path, cfg["vocab_size"])
    return path


def save_tokenizer(path: str, vocab_size: int) -> None:
    """A word-level tokenizer with one token per id ("<t17>"), so any generated id detokenizes (no hub here)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<t0>", pad_token="<t0>", bos_token="<t1>",
                            eos_token="<t2>").save_pretrained(path)


def hf_greedy(path: str, prompts: list[list[int]], max_tokens: int, device: str, dtype: torch.dtype) -> list:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=device)
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0)
            outs.append(gen[0, len(p):].tolist())
    del model
    return outs


def flotilla_llm(path: str, device: str, dtype: str, **kw):
    from flotilla import LLM
    return LLM(model=path, device=device, dtype=dtype, **kw)


def greedy(llm, prompts: list[list[int]], max_tokens: int) -> list:
    from flotilla import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


def correctness(tmp: str, device: str, smoke: bool) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 2000, size=n).tolist() for n in (5, 37, 130)]
    n_tok = 8 if smoke else 32
    res = {}
    for family in ("llama", "qwen2"):
        path = tiny_model(family, tmp)
        ref32 = hf_greedy(path, prompts, n_tok, device, torch.float32)
        for dtype in ("float32",) if smoke else ("float32", "bfloat16"):
            for eager in (False, True):
                llm = flotilla_llm(path, device, dtype, max_model_len=512, enforce_eager=eager)
                worker = llm.engine.executor.worker
                ours = greedy(llm, prompts, n_tok)
                key = f"{family}_{dtype}_{'eager' if eager else 'graphs'}"
                res[key + "_backend"] = type(worker.backend).__name__
                res[key + "_graphs"] = worker.runner.graphs is not None
                if dtype == "float32":
                    res[key + "_equal_transformers"] = ours == ref32
                else:
                    ref = hf_greedy(path, prompts, n_tok, device, torch.bfloat16)
                    agree = [sum(a == b for a, b in zip(x, y)) / len(y) for x, y in zip(ours, ref)]
                    res[key + "_agreement_transformers"] = round(statistics.mean(agree), 3)
                res.setdefault(f"{family}_{dtype}_tokens", []).append(ours)
                del llm
            runs = res.pop(f"{family}_{dtype}_tokens")
            res[f"{family}_{dtype}_graphs_equal_eager"] = runs[0] == runs[1]
    return res


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_roofline(path: str, device: str, bandwidth: float, smoke: bool) -> dict:
    from flotilla import SamplingParams
    n = 16 if smoke else 128
    prompt = list(range(100, 164))
    res = {}
    for eager in (False, True):
        llm = flotilla_llm(path, device, "bfloat16", max_model_len=1024, enforce_eager=eager, max_num_seqs=64)
        worker = llm.engine.executor.worker
        wbytes = weight_bytes(worker.model)
        cfg = llm.engine.config.model
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
        one, full = SamplingParams(max_tokens=1, ignore_eos=True), SamplingParams(max_tokens=n + 1, ignore_eos=True)
        llm.generate([prompt], full)  # warm-up
        t1, tn = [], []
        for _ in range(3):
            t = time.perf_counter(); llm.generate([prompt], one); t1.append(time.perf_counter() - t)
            t = time.perf_counter(); llm.generate([prompt], full); tn.append(time.perf_counter() - t)
        tpot = (statistics.median(tn) - statistics.median(t1)) / n
        mean_ctx = len(prompt) + n / 2
        bytes_per_token = wbytes + kv_per_token * mean_ctx
        roof = bytes_per_token / bandwidth
        key = "eager" if eager else "graphs"
        res[f"tpot_ms_{key}"] = round(tpot * 1e3, 3)
        res[f"roofline_fraction_{key}"] = round(roof / tpot, 3)
        res["weight_bytes"] = wbytes
        res["roofline_tpot_ms"] = round(roof * 1e3, 3)
        del llm
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return res


def throughput(path: str, device: str, smoke: bool) -> dict:
    import numpy as np
    from flotilla import SamplingParams
    conc, in_len, out_len = (4, 16, 8) if smoke else (64, 128, 128)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(100, 30000, size=in_len).tolist() for _ in range(conc)]
    llm = flotilla_llm(path, device, "bfloat16", max_model_len=1024, max_num_seqs=conc)
    params = SamplingParams(max_tokens=out_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4))
    times = []
    for _ in range(2):
        t = time.perf_counter(); llm.generate(prompts, params); times.append(time.perf_counter() - t)
    ours = conc * out_len / min(times)
    del llm
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    ids = torch.tensor(prompts, device=device)
    hf_times = []
    with torch.inference_mode():
        for _ in range(2):
            sync(); t = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=out_len, min_new_tokens=out_len,
                           do_sample=False, pad_token_id=0)
            sync(); hf_times.append(time.perf_counter() - t)
    hf = conc * out_len / min(hf_times)
    return {"concurrency": conc, "flotilla_tok_s": round(ours, 1), "transformers_tok_s": round(hf, 1),
            "ratio": round(ours / hf, 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)", "torch": torch.__version__,
              "commit": commit}

    def save():
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
            json.dump(result, f, indent=1)

    steps = [("kernels", lambda tmp: kernel_check(device, torch.bfloat16 if device == "cuda" else torch.float32)),
             ("correctness", lambda tmp: correctness(tmp, device, args.smoke))]
    shape = (dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000) if args.smoke else
             dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                  num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True))
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in steps:
            log(name)
            try:
                result[name] = fn(tmp)
            except Exception as e:  # one failed step still reports the others
                result[name] = {"error": repr(e)}
            save()
        log("building the decode model")
        big = tiny_model("llama", os.path.join(tmp, "big"), **shape)
        bandwidth = copy_bandwidth(device, 0.25 if args.smoke else 4)
        result["copy_bandwidth_gb_s"] = round(bandwidth / 1e9, 1)
        for name, fn in (("decode_b1", lambda: decode_roofline(big, device, bandwidth, args.smoke)),
                         ("throughput_c64", lambda: throughput(big, device, args.smoke))):
            log(name)
            try:
                result[name] = fn()
            except Exception as e:
                result[name] = {"error": repr(e)}
            save()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
