"""Encode + decode time of the hot-path wire messages (``flotilla.wire``), one process, no sockets.

    .venv/bin/python benchmarks/wire_codec.py [--running 64] [--new 8] [--prompt-len 512] [--repeats 7]

Messages, shaped like a busy engine step:
- ``prefill step``: a ``Step`` (driver -> every worker rank) of a SchedulerOutput with --running decoding
  requests (one new token each, a new block every 16th) and --new new requests of --prompt-len tokens;
- ``decode step``: the same without new requests (the steady state);
- ``step result``: the sampler rank's ``StepResult`` for those requests;
- ``core outputs``: the engine core's ``Outputs`` for --running + --new sequences, without and with 5 logprobs.
Prints the median microseconds of one encode+decode round trip (of --repeats runs) and the message size,
plus a JSON line.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

from flotilla.engine.core import EngineCoreOutputs
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                       SchedulerOutput)
from flotilla.scheduler.scheduler import SchedulerStats


def build_scheduler_output(running: int, new: int, prompt_len: int, seed: int = 0) -> SchedulerOutput:
    rng = random.Random(seed)
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=256, stop=["\n\n"], eos_token_ids=(2,))
    new_reqs = []
    for i in range(new):
        prompt = [rng.randrange(49152) for _ in range(prompt_len)]
        new_reqs.append(NewRequestData(f"cmpl-new-{i:024x}", prompt, list(prompt), params,
                                       list(range(i * 32, i * 32 + prompt_len // 16)), 0))
    cached = [CachedRequestData(f"cmpl-run-{i:024x}", [rng.randrange(49152)], [1000 + i] if i % 16 == 0 else [],
                                300 + i) for i in range(running)]
    num = {r.req_id: prompt_len for r in new_reqs} | {r.req_id: 1 for r in cached}
    return SchedulerOutput(new_reqs, cached, num, sum(num.values()), {"cmpl-done-1"}, set())


def build_runner_output(so: SchedulerOutput, seed: int = 0) -> ModelRunnerOutput:
    rng = random.Random(seed)
    return ModelRunnerOutput({rid: rng.randrange(49152) for rid in so.num_scheduled_tokens}, {})


def build_core_outputs(so: SchedulerOutput, logprobs: int, seed: int = 0) -> EngineCoreOutputs:
    rng = random.Random(seed)

    def position():
        return ([rng.randrange(49152) for _ in range(logprobs + 1)], [-rng.random() for _ in range(logprobs + 1)],
                list(range(1, logprobs + 2)))

    outputs = [EngineCoreOutput(rid, [rng.randrange(49152)], [position()] if logprobs else [], None, None, 0)
               for rid in so.num_scheduled_tokens]
    return EngineCoreOutputs(outputs, [r.req_id for r in so.scheduled_new_reqs],
                             SchedulerStats(len(outputs), 3, 0.42, 10_000, 4_000, 0), time.monotonic())


def median_us(roundtrip, repeats: int, target_s: float = 0.2) -> float:
    """Median microseconds of one call of ``roundtrip`` (each run loops long enough to be measurable)."""
    roundtrip()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < target_s / 4:
        roundtrip()
        n += 1
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            roundtrip()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def messages(args) -> dict[str, tuple]:
    """name -> (codec, message) with msgspec's codecs."""
    from flotilla.engine.messages import FROM_CORE, Outputs
    from flotilla.scheduler.wire import FROM_WORKER, TO_WORKER, Step, StepResult
    prefill = build_scheduler_output(args.running, args.new, args.prompt_len)
    decode = build_scheduler_output(args.running, 0, args.prompt_len)
    return {"prefill step": (TO_WORKER, Step(prefill)), "decode step": (TO_WORKER, Step(decode)),
            "step result": (FROM_WORKER, StepResult(build_runner_output(prefill))),
            "core outputs": (FROM_CORE, Outputs(build_core_outputs(prefill, 0))),
            "core outputs, 5 logprobs": (FROM_CORE, Outputs(build_core_outputs(prefill, 5)))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--running", type=int, default=64)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    results = {}
    for name, (codec, msg) in messages(args).items():
        data = codec.encode(msg)
        assert codec.decode(data) == msg
        us = median_us(lambda: codec.decode(codec.encode(msg)), args.repeats)
        results[name] = {"us": round(us, 1), "bytes": len(data)}
        print(f"{name:>26}: {us:8.1f} us per encode+decode, {len(data):7d} bytes")
    print(json.dumps({"benchmark": "wire_codec", "cpu": cpu_model(), **vars(args), "results": results}))


if __name__ == "__main__":
    main()
