"""Benchmark workloads: random token prompts (vLLM's ``--dataset-name random``) and shared-prefix groups."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Token ids below this are left out of random prompts (special/control tokens of common vocabularies).
LOW_ID = 100


@dataclass
class BenchRequest:
    prompt: list[int] | str
    prompt_len: int
    output_len: int


def _lengths(rng, n: int, mean: int, range_ratio: float) -> np.ndarray:
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.integers(lo, hi + 1, size=n)


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float = 0.0,
                    vocab_size: int = 49152, seed: int = 0) -> list[BenchRequest]:
    """``num_prompts`` prompts of random token ids; lengths uniform in input_len * [1 - r, 1 + r]."""
    rng = np.random.default_rng(seed)
    in_lens = _lengths(rng, num_prompts, input_len, range_ratio)
    out_lens = _lengths(rng, num_prompts, output_len, range_ratio)
    high = max(LOW_ID + 1, vocab_size - LOW_ID)
    return [BenchRequest(rng.integers(LOW_ID, high, size=int(n)).tolist(), int(n), int(m))
            for n, m in zip(in_lens, out_lens)]


def shared_prefix_requests(num_groups: int, prompts_per_group: int, system_len: int, question_len: int,
                           output_len: int, vocab_size: int = 49152, seed: int = 0) -> list[BenchRequest]:
    """G groups of Q prompts; the prompts of a group share a ``system_len``-token prefix and end with a
    distinct ``question_len``-token question. Groups are interleaved (as arrivals from many tenants)."""
    rng = np.random.default_rng(seed)
    high = max(LOW_ID + 1, vocab_size - LOW_ID)
    systems = [rng.integers(LOW_ID, high, size=system_len).tolist() for _ in range(num_groups)]
    out = []
    for _ in range(prompts_per_group):
        for system in systems:
            question = rng.integers(LOW_ID, high, size=question_len).tolist()
            out.append(BenchRequest(system + question, system_len + question_len, output_len))
    return out


def arrival_gaps(n: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each request: 0 for rate inf, else Gamma(shape=burstiness,
    scale=1/(rate*burstiness)) gaps (a Poisson process at burstiness 1)."""
    if request_rate == float("inf"):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    theta = 1.0 / (request_rate * burstiness)
    return rng.gamma(shape=burstiness, scale=theta, size=n).tolist()
