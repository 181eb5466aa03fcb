"""The workload a plan is judged on: prompt and output length distributions and how requests arrive.

``--workload`` takes a preset name, ``key=value`` pairs, or both (``chat,rate=4``), or a YAML file of the
same keys. Keys: ``isl`` / ``osl`` (mean input / output tokens), ``range`` (lengths uniform in
``mean * [1 - range, 1 + range]``, vLLM's ``--random-range-ratio``), ``prefix`` (tokens of a system prompt
every request shares, counted in ``isl``: prefix-cache hits), and the arrivals, as ``vllm bench serve``'s
``--request-rate`` and ``--max-concurrency``: ``rate`` (requests/s over the whole deployment, Poisson) and/or
``concurrency`` (at most that many requests in flight; a request waits for a free slot, and its latency counts
from when it is sent). ``concurrency`` alone sends the first ones all at once (rate inf). Neither (``auto``,
the default) keeps each replica full: ``max_num_seqs`` requests in flight per replica, sent at 1.5x the rate
the cost model estimates the replica serves, so the load ramps up instead of arriving as one burst.
``requests``: how many requests to replay (default: enough for a steady state, see ``num_requests_for``);
``seed``.

Presets: ``chat`` (the default: 512 tokens in, 128 out, range 0.25).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, fields

import numpy as np

TOKEN_STEPS = 30_000  # output tokens a replayed workload aims to stay under (simulation time)
LOW_ID = 100  # token ids below this are left out of random prompts (special tokens), as flotilla bench does
PRESETS = {"chat": {"isl": 512, "osl": 128, "range": 0.25}}
_KEYS = {"isl": "input_len", "osl": "output_len", "range": "range_ratio", "prefix": "prefix_len",
         "rate": "rate", "concurrency": "concurrency", "requests": "num_requests", "seed": "seed"}


@dataclass(frozen=True)
class WorkloadRequest:
    """One replayed request: its prompt token ids and how many tokens it generates (ignore_eos)."""

    prompt: list[int]
    output_len: int


@dataclass(frozen=True)
class Workload:
    """See the module docstring. ``concurrency`` None and ``rate`` None: ``auto``."""

    name: str = "chat"
    input_len: int = 512
    output_len: int = 128
    range_ratio: float = 0.25
    prefix_len: int = 0
    rate: float | None = None
    concurrency: int | None = None
    num_requests: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1:
            raise ValueError("isl and osl must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise ValueError(f"range must be in [0, 1), got {self.range_ratio}")
        if not 0 <= self.prefix_len < self._min_len(self.input_len):
            raise ValueError(f"prefix ({self.prefix_len}) must be shorter than the shortest prompt "
                             f"({self._min_len(self.input_len)})")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a finite number > 0, got {self.rate}")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.num_requests}")

    def _min_len(self, mean: int) -> int:
        return max(1, int(mean * (1 - self.range_ratio)))

    def _max_len(self, mean: int) -> int:
        return max(self._min_len(mean), int(mean * (1 + self.range_ratio)))

    @property
    def max_seq_len(self) -> int:
        """The longest prompt + output this workload produces."""
        return self._max_len(self.input_len) + self._max_len(self.output_len)

    @property
    def auto_concurrency(self) -> bool:
        return self.rate is None and self.concurrency is None

    def describe(self) -> str:
        if self.auto_concurrency:
            arrival = "max_num_seqs in flight per replica (auto)"
        else:
            arrival = ", ".join(([f"rate {self.rate:g} req/s"] if self.rate is not None else [])
                                + ([f"concurrency {self.concurrency}"] if self.concurrency is not None else []))
        prefix = f", shared prefix {self.prefix_len}" if self.prefix_len else ""
        spread = f" (+-{self.range_ratio:.0%})" if self.range_ratio else ""
        return f"{self.name}: ~{self.input_len} in / ~{self.output_len} out{spread}{prefix}, {arrival}"

    def replica_load(self, replicas: int, max_num_seqs: int,
                     auto_rate: float | None = None) -> tuple[float | None, int | None]:
        """(rate, concurrency) one of ``replicas`` replicas sees: the deployment's split evenly (the router
        balances replicas); under auto, ``max_num_seqs`` in flight sent at ``auto_rate``."""
        if self.auto_concurrency:
            return auto_rate, max_num_seqs
        rate = self.rate / replicas if self.rate is not None else None
        conc = max(1, round(self.concurrency / replicas)) if self.concurrency is not None else None
        return rate, conc

    def num_requests_for(self, rate: float | None, concurrency: int | None) -> int:
        """Requests to replay for one replica: ``requests`` if given, else two waves of the concurrency, or
        about a minute of arrivals at the rate (32 to 256); fewer when that would make more than
        ``TOKEN_STEPS`` output tokens, but never fewer than one wave."""
        if self.num_requests is not None:
            return self.num_requests
        n = 2 * concurrency if concurrency is not None else 60 * rate if rate is not None else 64
        n = min(n, max(32, TOKEN_STEPS // self.output_len))
        return int(max(min(256, max(32, n)), concurrency or 0))

    def arrival_times(self, n: int, rate: float | None, seed: int | None = None) -> list[float]:
        """When each of ``n`` requests is sent (seconds from 0): all at 0 without a rate, else Poisson at
        ``rate`` req/s with the gaps ``flotilla bench serve`` draws for the same seed."""
        from flotilla.bench.datasets import arrival_gaps
        if rate is None:
            return [0.0] * n
        return np.cumsum(arrival_gaps(n, rate, 1.0, self.seed if seed is None else seed)).tolist()

    def requests(self, n: int, vocab_size: int, seed: int | None = None) -> list[WorkloadRequest]:
        """``n`` requests with random token prompts (ids in [100, vocab - 100)); the first ``prefix`` tokens
        are the same in every prompt. Deterministic in ``seed`` (default: the workload's)."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        ins = rng.integers(self._min_len(self.input_len), self._max_len(self.input_len) + 1, size=n)
        outs = rng.integers(self._min_len(self.output_len), self._max_len(self.output_len) + 1, size=n)
        high = max(LOW_ID + 1, vocab_size - LOW_ID)
        prefix = rng.integers(LOW_ID, high, size=self.prefix_len).tolist()
        return [WorkloadRequest(prefix + rng.integers(LOW_ID, high, size=int(i) - self.prefix_len).tolist(), int(o))
                for i, o in zip(ins, outs)]


def fit_to_context(workload: Workload, context: int) -> Workload:
    """``workload`` with its lengths scaled down (keeping their ratio) so its longest request fits a model of
    ``context`` tokens; unchanged when it fits."""
    if workload.max_seq_len <= context:
        return workload
    scale = context / workload.max_seq_len
    return dataclasses.replace(workload, input_len=max(1, int(workload.input_len * scale)),
                               output_len=max(1, int(workload.output_len * scale)), prefix_len=0,
                               name=f"{workload.name} (scaled to the model's {context}-token context)")


def parse_workload(text: str | None) -> Workload:
    """``--workload``: None or "" (the chat preset), a preset, ``key=value`` pairs, a preset followed by
    pairs (``chat,rate=4``), or a YAML file of the keys. ValueError naming the bad key or value."""
    if not text:
        text = "chat"
    if os.path.isfile(text):
        import yaml
        with open(text, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            raise ValueError(f"{text}: expected a mapping of workload keys")
        return _build(os.path.basename(text), {str(k): v for k, v in data.items()})
    parts = [p.strip() for p in text.split(",") if p.strip()]
    name = "custom"
    values: dict = {}
    for part in parts:
        if "=" not in part:
            if part not in PRESETS:
                raise ValueError(f"unknown workload preset {part!r} (presets: {', '.join(PRESETS)}; or key=value "
                                 f"pairs: {', '.join(_KEYS)})")
            name = part
            values.update(PRESETS[part])
            continue
        key, value = (s.strip() for s in part.split("=", 1))
        values[key] = value
    return _build(name, values)


def _build(name: str, values: dict) -> Workload:
    kwargs: dict = {}
    if name != "custom" and name in PRESETS:
        kwargs = {_KEYS[k]: v for k, v in PRESETS[name].items()}
    for key, value in values.items():
        if key not in _KEYS:
            raise ValueError(f"unknown workload key {key!r} (keys: {', '.join(_KEYS)})")
        if key == "concurrency" and str(value) == "auto":
            continue
        kwargs[_KEYS[key]] = _number(key, value)
    types = {f.name: f.type for f in fields(Workload)}
    for attr, value in kwargs.items():
        if "int" in str(types[attr]) and "float" not in str(types[attr]):
            if float(value) != int(value):
                raise ValueError(f"workload {attr}: expected an integer, got {value}")
            kwargs[attr] = int(value)
    return Workload(name=name, **kwargs)


def _number(key: str, value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"workload {key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"workload {key}: expected a finite number, got {value!r}")
    return number
