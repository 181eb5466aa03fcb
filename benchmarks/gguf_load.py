"""The three parts of loading a GGUF model that flotilla does itself, each against the path it replaced, in
one run: header parsing (``gguf_file.open_gguf`` vs ``gguf.GGUFReader``), dequantization
(``gguf_dequant.dequantize`` vs ``gguf.quants.dequantize``, on the model's own tensors) and the tokenizer
(``Tokenizer.from_pretrained(..., config=...)`` vs ``AutoTokenizer.from_pretrained(dir, gguf_file=...)``).

    .venv/bin/python benchmarks/gguf_load.py [--model qwen2.5-coder-0.5b-instruct] [--threads 1] [--repeats 3]

Dequantization uses, for each quantized type of the file, its --max-tensors largest tensors of at most 8M
values (F32 tensors are copied, not dequantized), pages already in memory, each result dropped before the
next as the loader does; times are the best of --repeats. Prints one line per part (old, new, ratio) and a
JSON line.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import time

import torch


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def header(path: str, repeats: int) -> tuple[float, float]:
    from gguf import GGUFReader

    from flotilla.models.loader.gguf_file import open_gguf

    return best_time(lambda: GGUFReader(path), repeats), best_time(lambda: open_gguf(path), repeats)


def dequantization(path: str, repeats: int, max_tensors: int) -> dict[str, tuple[float, float, int]]:
    """{type: (gguf numpy s, torch s, values)} over up to ``max_tensors`` tensors of each type."""
    from gguf.quants import dequantize as gguf_dequantize

    from flotilla.models.loader.gguf_dequant import dequantize
    from flotilla.models.loader.gguf_file import open_gguf

    reader = open_gguf(path)
    by_type = collections.defaultdict(list)
    for t in sorted(reader.tensors, key=lambda t: -t.n_elements):
        if t.tensor_type.name != "F32" and t.n_elements <= 8 << 20 and len(by_type[t.tensor_type]) < max_tensors:
            by_type[t.tensor_type].append(reader.raw(t))
    out = {}
    for qtype, raws in by_type.items():
        for raw in raws:
            raw.sum()  # page the bytes in before timing

        def old_path():
            for r in raws:
                gguf_dequantize(r.numpy(), qtype)

        def new_path():
            for r in raws:
                dequantize(r, qtype)

        old, new = best_time(old_path, repeats), best_time(new_path, repeats)
        out[qtype.name] = (old, new, sum(dequantize(r, qtype).numel() for r in raws))
    return out


def tokenizer(path: str, repeats: int) -> tuple[float, float]:
    from transformers import AutoTokenizer

    from flotilla.models.loader import ResolvedModel, load_hf_config
    from flotilla.tokenizer import Tokenizer

    directory, name = os.path.split(path)
    config = load_hf_config(ResolvedModel(path, "gguf"))
    old = best_time(lambda: AutoTokenizer.from_pretrained(directory, gguf_file=name), repeats)
    new = best_time(lambda: Tokenizer.from_pretrained(directory, gguf_file=name, config=config), repeats)
    return old, new


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="alias or .gguf path")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tensors", type=int, default=8)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from flotilla.models.loader import resolve_model

    path = resolve_model(args.model).source
    cpu = cpu_model()
    print(f"{args.model} ({path}), torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}")
    result = {"model": args.model, "threads": torch.get_num_threads(), "cpu": cpu}
    old, new = header(path, args.repeats)
    print(f"header        gguf.GGUFReader {old:8.3f} s   open_gguf {new:8.3f} s   {old / new:6.1f}x")
    result["header"] = {"old_s": old, "new_s": new}
    result["dequantize"] = {}
    for name, (old, new, values) in dequantization(path, args.repeats, args.max_tensors).items():
        print(f"dequant {name:5s} gguf numpy {old * 1e9 / values:6.2f} ns/value   torch {new * 1e9 / values:6.2f} "
              f"ns/value   {old / new:6.1f}x   ({values / 1e6:.1f}M values)")
        result["dequantize"][name] = {"old_s": old, "new_s": new, "values": values}
    old, new = tokenizer(path, max(1, args.repeats // 2))
    print(f"tokenizer     AutoTokenizer   {old:8.3f} s   with config {new:6.3f} s   {old / new:6.1f}x")
    result["tokenizer"] = {"old_s": old, "new_s": new}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
