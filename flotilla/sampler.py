"""Batched sampling: logits of the B requests that sample this step -> one token each (+ logprobs).

``SamplingMetadata.build`` turns the requests' ``SamplingParams`` into tensors once per step; ``Sampler``
applies min_tokens suppression, penalties, greedy/temperature/top-k/top-p/min-p and draws with the
exponential-race trick. Seeded requests draw their noise (or, in the CPU kernel, its key) from their own
``torch.Generator`` only, so their tokens depend on nothing but the seed and their own logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from flotilla.ops import use_kernels
from flotilla.sampling_params import SamplingParams

_PAD = -1  # pad value of the padded token-id tensors (never a real token id)
# Smallest positive float32: exponential noise is clamped to it so probs / noise is never 0 / 0 (= nan).
_TINY = torch.finfo(torch.float32).tiny


class LogprobsTensors(NamedTuple):
    """Logprobs of one step. Column 0 is the sampled token, columns 1..N the top-N of the raw distribution.

    All three are ``(B, 1 + N)``; ``ranks`` counts from 1 (the most likely token); ties share the best rank.
    """

    token_ids: torch.Tensor  # (B, 1 + N) long
    logprobs: torch.Tensor  # (B, 1 + N) float32
    ranks: torch.Tensor  # (B, 1 + N) long


@dataclass
class SamplerOutput:
    """The sampler's result: one token per row, and logprobs when any row asked for them."""

    sampled_token_ids: torch.Tensor  # (B,) long
    logprobs: LogprobsTensors | None = None


@dataclass
class SamplingMetadata:
    """Per-step sampling tensors for the B rows that sample this step (row i = ``params[i]``).

    Contract: a field is ``None`` when no row uses the feature, so the sampler skips it at no cost.
    ``temperature`` holds 1.0 on greedy rows; ``greedy_mask`` is set only for mixed batches. ``top_k`` uses
    0 for "disabled". Penalty rows use the neutral values (1, 0, 0). The padded token-id tensors use -1 as
    padding; ``penalty_tensors(V)`` turns them into the (B, V) count and seen masks (cached).
    ``min_tokens_rows/ids`` list the (row, token id) pairs whose logits are set to -inf this step: the
    EOS ids (unless ``ignore_eos``) and ``stop_token_ids`` of rows with fewer than ``min_tokens`` outputs.
    ``generators`` maps a random row to its own generator; ``num_unseeded_random`` counts the random rows
    without one (they share one batched noise draw). ``max_num_logprobs`` is None when no row wants
    logprobs, else the largest N requested (0 = only the sampled token).
    """

    num_reqs: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None = None  # (B,) float32
    greedy_mask: torch.Tensor | None = None  # (B,) bool
    top_k: torch.Tensor | None = None  # (B,) long
    top_p: torch.Tensor | None = None  # (B,) float32
    min_p: torch.Tensor | None = None  # (B,) float32
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    num_unseeded_random: int = 0
    max_num_logprobs: int | None = None
    repetition_penalties: torch.Tensor | None = None  # (B,) float32
    frequency_penalties: torch.Tensor | None = None  # (B,) float32
    presence_penalties: torch.Tensor | None = None  # (B,) float32
    prompt_token_ids: torch.Tensor | None = None  # (B, max_prompt_len) long, -1 padded
    output_token_ids: torch.Tensor | None = None  # (B, max_output_len) long, -1 padded
    min_tokens_rows: torch.Tensor | None = None  # (M,) long
    min_tokens_ids: torch.Tensor | None = None  # (M,) long
    _penalty_cache: tuple | None = field(default=None, repr=False)

    @property
    def no_penalties(self) -> bool:
        return (self.repetition_penalties is None and self.frequency_penalties is None
                and self.presence_penalties is None)

    @classmethod
    def build(cls, params: list[SamplingParams], generators: list[torch.Generator | None],
              prompt_token_ids: list[list[int]], output_token_ids: list[list[int]],
              device: torch.device | str, vocab_size: int | None = None) -> "SamplingMetadata":
        """Build the metadata of one step. ``vocab_size`` (optional) materializes the penalty tensors now."""
        num_reqs = len(params)
        assert len(generators) == len(prompt_token_ids) == len(output_token_ids) == num_reqs
        greedy = [p.greedy for p in params]
        md = cls(num_reqs=num_reqs, all_greedy=all(greedy), all_random=not any(greedy))
        if not md.all_greedy:
            md.temperature = _f32([1.0 if g else p.temperature for p, g in zip(params, greedy)], device)
            if not md.all_random:
                md.greedy_mask = torch.tensor(greedy, dtype=torch.bool, device=device)
            md.generators = {i: g for i, g in enumerate(generators) if g is not None and not greedy[i]}
            md.num_unseeded_random = num_reqs - sum(greedy) - len(md.generators)
            _build_filters(md, params, greedy, device)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        md.max_num_logprobs = max(wanted) if wanted else None
        _build_penalties(md, params, prompt_token_ids, output_token_ids, device)
        _build_min_tokens(md, params, output_token_ids, device)
        if vocab_size is not None and not md.no_penalties:
            md.penalty_tensors(vocab_size)
        return md

    def penalty_tensors(self, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(output_counts (B, V) float32, seen_mask (B, V) bool of prompt∪output, or None if unused)."""
        if self._penalty_cache is None or self._penalty_cache[0].shape[1] != vocab_size:
            counts = _bincount_rows(self.output_token_ids, vocab_size)  # (B, V)
            seen = None
            if self.repetition_penalties is not None:
                seen = (counts > 0) | (_bincount_rows(self.prompt_token_ids, vocab_size) > 0)  # (B, V)
            self._penalty_cache = (counts, seen)
        return self._penalty_cache


def _f32(values: list[float], device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _build_filters(md: SamplingMetadata, params: list[SamplingParams], greedy: list[bool], device) -> None:
    """Top-k / top-p / min-p tensors, only when some random row uses them (greedy rows stay neutral)."""
    top_k = [0 if g or p.top_k <= 0 else p.top_k for p, g in zip(params, greedy)]
    top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
    min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
    if any(k > 0 for k in top_k):
        md.top_k = torch.tensor(top_k, dtype=torch.long, device=device)
    if any(p < 1.0 for p in top_p):
        md.top_p = _f32(top_p, device)
    if any(p > 0.0 for p in min_p):
        md.min_p = _f32(min_p, device)


def _build_penalties(md: SamplingMetadata, params: list[SamplingParams], prompt_token_ids: list[list[int]],
                     output_token_ids: list[list[int]], device) -> None:
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    if any(r != 1.0 for r in rep):
        md.repetition_penalties = _f32(rep, device)
        md.prompt_token_ids = _pad_ids(prompt_token_ids, device)
    if any(f != 0.0 for f in freq):
        md.frequency_penalties = _f32(freq, device)
    if any(p != 0.0 for p in pres):
        md.presence_penalties = _f32(pres, device)
    if not md.no_penalties:
        md.output_token_ids = _pad_ids(output_token_ids, device)


def _build_min_tokens(md: SamplingMetadata, params: list[SamplingParams], output_token_ids: list[list[int]],
                      device) -> None:
    rows: list[int] = []
    ids: list[int] = []
    for i, (p, out) in enumerate(zip(params, output_token_ids)):
        if len(out) >= p.min_tokens:
            continue
        suppressed = set(p.stop_token_ids or ())
        if not p.ignore_eos:
            suppressed.update(p.eos_token_ids)
        rows.extend([i] * len(suppressed))
        ids.extend(sorted(suppressed))
    if rows:
        md.min_tokens_rows = torch.tensor(rows, dtype=torch.long, device=device)
        md.min_tokens_ids = torch.tensor(ids, dtype=torch.long, device=device)


def _pad_ids(rows: list[list[int]], device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0)
    padded = [list(r) + [_PAD] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.long, device=device).reshape(len(rows), width)  # (B, L)


def _bincount_rows(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Per-row token counts (B, V) float32 of a -1 padded (B, L) id tensor; ids outside [0, V) are ignored."""
    num_rows = ids.shape[0]
    valid = (ids >= 0) & (ids < vocab_size)  # (B, L)
    index = torch.where(valid, ids, vocab_size)  # (B, L): invalid ids go to the spill column V
    counts = torch.zeros(num_rows, vocab_size + 1, dtype=torch.float32, device=ids.device)  # (B, V + 1)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=torch.float32))
    return counts[:, :vocab_size]  # (B, V)


class Sampler:
    """Logits (B, V) + SamplingMetadata -> SamplerOutput.

    Contract: logprobs are of the raw model distribution (``log_softmax`` of the logits before any
    processing). Then: min_tokens suppression, repetition penalty (HF: over prompt+output tokens, positive
    logits divided, negative multiplied), frequency and presence penalties (OpenAI: over output tokens).
    Greedy rows take the argmax (exactly the raw argmax when nothing above changed the logits); random rows
    are divided by temperature, filtered by top-k, top-p (one sort per row) and min-p (relative to the max
    probability), and sampled by the exponential race ``argmax(probs / Exponential(1))`` (on the CPU one fused
    kernel pass per row, its noise a counter hash of one key per row). A row never samples a token its
    filters removed. The input logits are not modified unless the caller passes ``owned=True``.
    """

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata, owned: bool = False) -> SamplerOutput:
        """logits (B, V); ``owned``: the caller hands the float32 logits over, so they may be modified in place
        (the model runner's fresh logits: saves a (B, V) copy per step)."""
        assert logits.dim() == 2 and logits.shape[0] == metadata.num_reqs, "logits must be (num_reqs, vocab)"
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        read_only = metadata.all_greedy and metadata.no_penalties and metadata.min_tokens_rows is None
        logits = logits.to(torch.float32, copy=not (read_only or owned))  # (B, V), ours to modify in place
        apply_min_tokens(logits, metadata)
        apply_penalties(logits, metadata)
        sampled = self.sample(logits, metadata)  # (B,)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    @staticmethod
    def sample(logits: torch.Tensor, metadata: SamplingMetadata) -> torch.Tensor:
        """Greedy and random sampling of processed logits (B, V) -> token ids (B,). Modifies ``logits``."""
        if metadata.all_greedy:
            return greedy(logits)  # (B,)
        greedy_tokens = None if metadata.all_random else greedy(logits)  # (B,)
        logits.div_(metadata.temperature.unsqueeze(1))  # (B, V)
        if metadata.top_k is not None or metadata.top_p is not None:
            logits = apply_top_k_top_p(logits, metadata.top_k, metadata.top_p)
        if metadata.min_p is not None:
            apply_min_p(logits, metadata.min_p)
        ops = use_kernels(logits) if logits.stride(1) == 1 else None
        if ops is not None:  # the race in one fused pass per row, with counter-hash noise
            keys = draw_keys(logits.shape[0], metadata.generators, metadata.num_unseeded_random > 0, logits.device)
            sampled = torch.empty(logits.shape[0], dtype=torch.long)
            ops.sample_rows(sampled, logits, torch.ones(logits.shape[0]), keys)
        else:
            probs = torch.softmax(logits, dim=-1)  # (B, V)
            sampled = exponential_race(probs, metadata.generators, metadata.num_unseeded_random > 0)  # (B,)
        if greedy_tokens is not None:
            sampled = torch.where(metadata.greedy_mask, greedy_tokens, sampled)
        return sampled


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax over the vocabulary, (B, V) -> (B,); the CPU kernel runs the rows in parallel."""
    ops = use_kernels(logits) if logits.dtype == torch.float32 and logits.dim() == 2 and logits.stride(1) == 1 \
        else None
    if ops is None:
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long)
    ops.argmax_rows(out, logits)
    return out


def apply_min_tokens(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Set the suppressed (row, token) logits to -inf in place. logits: (B, V)."""
    if metadata.min_tokens_rows is None:
        return
    rows, ids = metadata.min_tokens_rows, metadata.min_tokens_ids  # (M,), (M,)
    in_vocab = ids < logits.shape[1]  # (M,)
    logits[rows[in_vocab], ids[in_vocab]] = float("-inf")


def apply_penalties(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """Repetition (HF), frequency and presence (OpenAI) penalties, in place. logits: (B, V) float32."""
    if metadata.no_penalties:
        return
    counts, seen = metadata.penalty_tensors(logits.shape[1])  # (B, V), (B, V) | None
    if metadata.repetition_penalties is not None:
        penalty = torch.where(seen, metadata.repetition_penalties.unsqueeze(1), 1.0)  # (B, V)
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    if metadata.frequency_penalties is not None:
        logits.sub_(metadata.frequency_penalties.unsqueeze(1) * counts)
    if metadata.presence_penalties is not None:
        logits.sub_(metadata.presence_penalties.unsqueeze(1) * (counts > 0))


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None,
                      top_p: torch.Tensor | None) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's top-k and top-p sets with one ascending sort per row.

    logits: (B, V); top_k: (B,) long with 0 = disabled; top_p: (B,) float with 1.0 = disabled.
    Ties with the k-th largest logit are kept. Top-p keeps the smallest set of most likely tokens whose
    probability reaches p (always at least the most likely token). Returns the masked logits (B, V).
    """
    vocab = logits.shape[1]
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)  # (B, V), (B, V)
    if top_k is not None:
        k = torch.where(top_k <= 0, vocab, top_k.clamp(max=vocab))  # (B,)
        kth_value = logits_sort.gather(1, (vocab - k).unsqueeze(1))  # (B, 1)
        logits_sort.masked_fill_(logits_sort < kth_value, float("-inf"))
    if top_p is not None:
        probs_sum = logits_sort.softmax(dim=-1).cumsum_(dim=-1)  # (B, V), ascending cumulative mass
        top_p_mask = probs_sum <= (1.0 - top_p).unsqueeze(1)  # (B, V)
        top_p_mask[:, -1] = False  # the most likely token always survives
        logits_sort.masked_fill_(top_p_mask, float("-inf"))
    return logits_sort.scatter(1, logits_idx, logits_sort)  # (B, V) back in vocab order


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Mask (in place) tokens whose probability is below ``min_p * max_prob`` of their row.

    logits: (B, V); min_p: (B,) with 0 = disabled.
    """
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # (B, 1)
    logits.masked_fill_(probs < threshold, float("-inf"))


def draw_keys(b: int, generators: dict[int, torch.Generator], batched_draw: bool, device) -> torch.Tensor:
    """(B,) int64 noise keys for the fused race: rows in ``generators`` draw theirs from their own generator,
    the rest one batched draw (zeros when ``batched_draw`` is False)."""
    keys = torch.randint(0, 2 ** 62, (b,), device=device) if batched_draw \
        else torch.zeros(b, dtype=torch.long, device=device)
    for row, generator in generators.items():
        keys[row] = torch.randint(0, 2 ** 62, (1,), generator=generator, device=device)[0]
    return keys


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator],
                     batched_draw: bool = True) -> torch.Tensor:
    """Sample one token per row: argmax(probs / q) with q ~ Exponential(1), i.e. a draw from ``probs``.

    probs: (B, V), modified in place. Rows in ``generators`` draw q from their own generator (their row's
    noise only); the other rows share one batched draw, skipped when ``batched_draw`` is False (no such row
    needs a sample). Returns (B,) long.
    """
    q = torch.ones_like(probs)  # (B, V)
    if batched_draw:
        q.exponential_()  # one batched draw for every row not owning a generator
    for row, generator in generators.items():
        q[row].exponential_(generator=generator)  # (V,)
    q.clamp_(min=_TINY)
    return probs.div_(q).argmax(dim=-1)  # (B,)


def gather_logprobs(raw_logprobs: torch.Tensor, sampled: torch.Tensor, num_logprobs: int) -> LogprobsTensors:
    """Sampled token's logprob and rank + the top-N tokens of the raw distribution.

    raw_logprobs: (B, V) float32; sampled: (B,) long. Returns (B, 1 + N) tensors (see LogprobsTensors).
    """
    sampled_lp = raw_logprobs.gather(1, sampled.unsqueeze(1))  # (B, 1)
    sampled_rank = (raw_logprobs > sampled_lp).sum(dim=-1, keepdim=True) + 1  # (B, 1)
    token_ids = sampled.unsqueeze(1)  # (B, 1)
    logprobs = sampled_lp
    ranks = sampled_rank
    if num_logprobs > 0:
        top_lp, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)  # (B, N), sorted descending
        top_ranks = torch.arange(1, num_logprobs + 1, device=raw_logprobs.device).expand_as(top_ids)  # (B, N)
        token_ids = torch.cat([token_ids, top_ids], dim=1)  # (B, 1 + N)
        logprobs = torch.cat([logprobs, top_lp], dim=1)  # (B, 1 + N)
        ranks = torch.cat([ranks, top_ranks], dim=1)  # (B, 1 + N)
    return LogprobsTensors(token_ids=token_ids, logprobs=logprobs, ranks=ranks.long())
