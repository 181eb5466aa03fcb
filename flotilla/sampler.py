"""Batched sampling: logits of the B requests that sample this step -> one token each (+ logprobs).

``SamplingMetadata.build`` turns the requests' ``SamplingParams`` into tensors once per step; ``Sampler``
applies allowed_token_ids, bad_words, min_tokens suppression, logit_bias, penalties,
greedy/temperature/top-k/top-p/min-p and draws with the exponential race.

The random stream (one definition, computed by the CPU kernel ``sample_rows`` or, bit for bit, by
``race_sample`` in PyTorch ops, so a seed gives the same tokens with and without the kernels):
- Each random row gets a 64-bit key per step (``draw_keys``): a seeded request draws it from its own
  ``torch.Generator`` seeded with ``seed % 2**63`` (``torch.randint(0, 2**62, (1,), generator=g)``), so its
  tokens depend on nothing but the seed and its own logits; unseeded rows take theirs from one batched
  ``torch.randint(0, 2**62, (B,))`` on the global generator.
- Token i of the row draws U_i = ((h(key + (i + 1) * 0x9e3779b97f4a7c15) >> 41) + 0.5) * 2**-23, h being
  splitmix64's finalizer (uint64 arithmetic modulo 2**64), all float32 steps exact, so U_i is in (0, 1).
- With x the processed logits (after temperature and filters) and m the row's maximum, the row samples the
  first index of the maximum of fast_exp(x_i - m) / -fast_log(U_i) (float32, operation by operation as in
  flotilla/csrc/cpu_ops.cpp): the exponential race argmax(p_i / E_i), E_i ~ Exponential(1), a draw from
  softmax(x). A row with a NaN or +inf logit, or all -inf, takes torch.argmax's pick instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from flotilla.ops import use_kernels
from flotilla.sampling_params import SamplingParams

_PAD = -1  # pad value of the padded token-id tensors (never a real token id)


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
    without one (they share one batched noise draw). ``allowed_rows`` lists the rows with ``allowed_token_ids``
    and ``allowed_index/allowed_ids`` the (index into allowed_rows, token id) pairs they allow;
    ``bad_words_rows/ids`` the (row, token id) pairs that ``bad_words`` ban this step (the last token of a
    bad word whose other tokens end the output); ``logit_bias_rows/ids/values`` the (row, token id, bias)
    triples of ``logit_bias``. ``grammar_rows``/``grammar_bitmask`` (structured output)
    allow, on each constrained row, only the tokens whose bit is set. ``max_num_logprobs`` is None when no row wants
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
    grammar_rows: torch.Tensor | None = None  # (C,) long: rows constrained by a grammar
    grammar_bitmask: torch.Tensor | None = None  # (C, ceil(V / 32)) int32: bit j of word w allows token 32w + j
    allowed_rows: torch.Tensor | None = None  # (A,) long
    allowed_index: torch.Tensor | None = None  # (P,) long: index into allowed_rows
    allowed_ids: torch.Tensor | None = None  # (P,) long
    bad_words_rows: torch.Tensor | None = None  # (Q,) long
    bad_words_ids: torch.Tensor | None = None  # (Q,) long
    logit_bias_rows: torch.Tensor | None = None  # (K,) long
    logit_bias_ids: torch.Tensor | None = None  # (K,) long
    logit_bias_values: torch.Tensor | None = None  # (K,) float32
    _penalty_cache: tuple | None = field(default=None, repr=False)

    @property
    def no_token_extras(self) -> bool:
        """No row uses allowed_token_ids, bad_words or logit_bias this step."""
        return self.allowed_rows is None and self.bad_words_rows is None and self.logit_bias_rows is None

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
        if any(p.allowed_token_ids or p.bad_words_token_ids or p.logit_bias for p in params):
            _build_token_extras(md, params, output_token_ids, device)
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


def _build_token_extras(md: SamplingMetadata, params: list[SamplingParams], output_token_ids: list[list[int]],
                        device) -> None:
    """The sparse tensors of allowed_token_ids, bad_words (banned this step) and logit_bias."""
    def ids(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)
    allowed_rows, allowed_index, allowed_ids = [], [], []
    bad_rows, bad_ids = [], []
    bias_rows, bias_ids, bias_values = [], [], []
    for i, (p, out) in enumerate(zip(params, output_token_ids)):
        if p.allowed_token_ids:
            allowed_index.extend([len(allowed_rows)] * len(p.allowed_token_ids))
            allowed_rows.append(i)
            allowed_ids.extend(p.allowed_token_ids)
        for word in p.bad_words_token_ids or ():
            prefix = len(word) - 1
            if prefix <= len(out) and (prefix == 0 or list(out[-prefix:]) == list(word[:-1])):
                bad_rows.append(i)
                bad_ids.append(word[-1])
        if p.logit_bias:
            bias_rows.extend([i] * len(p.logit_bias))
            bias_ids.extend(p.logit_bias.keys())
            bias_values.extend(p.logit_bias.values())
    if allowed_rows:
        md.allowed_rows, md.allowed_index, md.allowed_ids = ids(allowed_rows), ids(allowed_index), ids(allowed_ids)
    if bad_rows:
        md.bad_words_rows, md.bad_words_ids = ids(bad_rows), ids(bad_ids)
    if bias_rows:
        md.logit_bias_rows, md.logit_bias_ids = ids(bias_rows), ids(bias_ids)
        md.logit_bias_values = _f32(bias_values, device)


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
    processing). Then: the grammar bitmask (structured output), allowed_token_ids (every other token -inf),
    bad_words (banned tokens -inf), min_tokens suppression, logit_bias (added), repetition penalty
    (HF: over prompt+output tokens, positive logits divided, negative multiplied), frequency and presence
    penalties (OpenAI: over output tokens).
    Greedy rows take the argmax (exactly the raw argmax when nothing above changed the logits); random rows
    are divided by temperature, filtered by top-k, top-p (one sort per row) and min-p (relative to the max
    probability), and sampled by the exponential race ``argmax(probs / Exponential(1))`` over the random
    stream of the module docstring (on the CPU one fused kernel pass per row, else ``race_sample``: the same
    tokens). A row never samples a token its filters removed. The input logits are not modified unless the
    caller passes ``owned=True``.
    """

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata, owned: bool = False) -> SamplerOutput:
        """logits (B, V); ``owned``: the caller hands the float32 logits over, so they may be modified in place
        (the model runner's fresh logits: saves a (B, V) copy per step)."""
        assert logits.dim() == 2 and logits.shape[0] == metadata.num_reqs, "logits must be (num_reqs, vocab)"
        raw_logprobs = None
        if metadata.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
        logits = self.process(logits, metadata, owned)  # (B, V)
        sampled = self.sample(logits, metadata)  # (B,)
        logprobs = None
        if raw_logprobs is not None:
            logprobs = gather_logprobs(raw_logprobs, sampled, metadata.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    @staticmethod
    def process(logits: torch.Tensor, metadata: SamplingMetadata, owned: bool = False) -> torch.Tensor:
        """The float32 logits (B, V) after the grammar bitmask, allowed_token_ids, bad_words, min_tokens,
        logit_bias and penalties, before temperature and the top-k/top-p/min-p filters. The input is modified
        in place only when ``owned`` (and may be returned as is when nothing applies to a greedy batch)."""
        read_only = metadata.all_greedy and metadata.no_penalties and metadata.min_tokens_rows is None \
            and metadata.grammar_rows is None and metadata.no_token_extras
        logits = logits.to(torch.float32, copy=not (read_only or owned))  # (B, V), ours to modify in place
        apply_grammar_bitmask(logits, metadata.grammar_rows, metadata.grammar_bitmask)
        if not metadata.no_token_extras:
            apply_allowed_and_bad_words(logits, metadata)
        apply_min_tokens_under_grammar(logits, metadata)
        if metadata.logit_bias_rows is not None:
            logits.index_put_((metadata.logit_bias_rows, metadata.logit_bias_ids), metadata.logit_bias_values,
                              accumulate=True)
        apply_penalties(logits, metadata)
        return logits

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
        keys = draw_keys(logits.shape[0], metadata.generators, metadata.num_unseeded_random > 0, logits.device)
        ops = use_kernels(logits) if logits.stride(1) == 1 else None
        if ops is not None:  # the race in one fused pass per row
            sampled = torch.empty(logits.shape[0], dtype=torch.long)
            ops.sample_rows(sampled, logits, torch.ones(logits.shape[0]), keys)
        else:  # the same stream in PyTorch ops
            sampled = race_sample(logits, keys)  # (B,)
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


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(C, W) int32 bitmask -> (C, vocab_size) bool, True where the token is allowed (bit j of word w is
    token 32 * w + j; tokens beyond 32 * W are not allowed)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)  # (32,)
    bits = (bitmask.unsqueeze(-1) >> shifts).bitwise_and_(1).bool()  # (C, W, 32)
    allowed = bits.reshape(bitmask.shape[0], -1)  # (C, 32 W)
    if allowed.shape[1] >= vocab_size:
        return allowed[:, :vocab_size]
    pad = torch.zeros(bitmask.shape[0], vocab_size - allowed.shape[1], dtype=torch.bool, device=bitmask.device)
    return torch.cat([allowed, pad], dim=1)


def apply_grammar_bitmask(logits: torch.Tensor, rows: torch.Tensor | None, bitmask: torch.Tensor | None) -> None:
    """Set the logits of tokens a grammar forbids to -inf in place. logits (B, V); rows (C,); bitmask (C, W)."""
    if rows is None:
        return
    allowed = unpack_bitmask(bitmask.to(logits.device), logits.shape[1])  # (C, V)
    logits[rows] = logits[rows].masked_fill_(~allowed, float("-inf"))  # (C, V)


def apply_allowed_and_bad_words(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """In place: on rows with allowed_token_ids every other token -inf; the banned bad-word tokens -inf.
    logits (B, V); token ids are in the vocabulary (the input processor checked them)."""
    rows = metadata.allowed_rows
    if rows is not None:
        banned = torch.ones(rows.shape[0], logits.shape[1], dtype=torch.bool, device=logits.device)  # (A, V)
        banned[metadata.allowed_index, metadata.allowed_ids] = False
        logits[rows] = logits[rows].masked_fill_(banned, float("-inf"))  # (A, V)
    if metadata.bad_words_rows is not None:
        logits[metadata.bad_words_rows, metadata.bad_words_ids] = float("-inf")


def apply_min_tokens_under_grammar(logits: torch.Tensor, metadata: SamplingMetadata) -> None:
    """``apply_min_tokens``, except that a grammar wins: a constrained row whose grammar allows only tokens
    min_tokens forbids (the document is complete: only EOS is left) keeps its grammar-masked logits, so it
    ends rather than sampling from nothing. logits (B, V), grammar mask already applied."""
    rows = metadata.grammar_rows
    if rows is None or metadata.min_tokens_rows is None:
        apply_min_tokens(logits, metadata)
        return
    masked = logits.index_select(0, rows)  # (C, V): grammar-masked, before min_tokens
    apply_min_tokens(logits, metadata)
    nothing_left = torch.isneginf(logits.index_select(0, rows)).all(dim=-1)  # (C,)
    if bool(nothing_left.any()):
        logits[rows[nothing_left]] = masked[nothing_left]


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
    """(B,) int64 keys of this step's random stream: rows in ``generators`` draw theirs from their own
    generator, the rest one batched draw (zeros when ``batched_draw`` is False)."""
    keys = torch.randint(0, 2 ** 62, (b,), device=device) if batched_draw \
        else torch.zeros(b, dtype=torch.long, device=device)
    for row, generator in generators.items():
        keys[row] = torch.randint(0, 2 ** 62, (1,), generator=generator, device=device)[0]
    return keys


# ---- The random stream in PyTorch ops (the twin of flotilla/csrc/cpu_ops.cpp's sample_rows) ----------------
# uint64 arithmetic runs on int64 tensors (two's complement: + and * wrap alike); right shifts are logical
# (masked). float32 steps follow the C++ operation by operation (it is compiled without contraction).
def _i64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


_GOLDEN, _MIX1, _MIX2 = _i64(0x9E3779B97F4A7C15), _i64(0xBF58476D1CE4E5B9), _i64(0x94D049BB133111EB)


def _c32(x: float) -> torch.Tensor:
    """A float32 constant (the decimal rounded to float32 as the C++ literal ``xf`` is; checked bit by bit)."""
    return torch.tensor(x, dtype=torch.float32)


def _inv(n: float) -> torch.Tensor:
    return _c32(1.0) / _c32(n)  # a float32 division, like the C++ constant 1.f / n


_LOG2E, _MAGIC = _c32(1.44269504088896341), _c32(12582912.0)
_LN2_HI, _LN2_LO = _c32(0.693359375), _c32(-2.12194440e-4)
_EXP_LO, _EXP_HI, _SQRT2, _LN2 = _c32(-87.3), _c32(88.7), _c32(1.41421356), _c32(0.693147180559945)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 tensors (their uint64 bits)."""
    return (z >> s).bitwise_and_((1 << (64 - s)) - 1)


def hash_uniform(keys: torch.Tensor, stop: int, start: int = 0) -> torch.Tensor:
    """U (B, stop - start) float32 in (0, 1): the stream's uniforms of each row's key (B,) int64 at the token
    positions start..stop-1."""
    z = torch.arange(start + 1, stop + 1, dtype=torch.int64, device=keys.device).mul_(_GOLDEN)[None, :] \
        + keys[:, None]  # (B, stop - start)
    z.bitwise_xor_(_shr(z, 30)).mul_(_MIX1)  # (B, V)
    z.bitwise_xor_(_shr(z, 27)).mul_(_MIX2)
    z.bitwise_xor_(_shr(z, 31))
    return _shr(z, 41).to(torch.float32).add_(0.5).mul_(2.0 ** -23)


def fast_exp_(x: torch.Tensor) -> torch.Tensor:
    """cpu_ops.cpp's fast_exp of a float32 tensor (never NaN), in place: exp to about 2 ulp, 0 below -87.3."""
    underflow = x < _EXP_LO
    x.clamp_(min=_EXP_LO, max=_EXP_HI)
    n = (x * _LOG2E).add_(_MAGIC).sub_(_MAGIC)  # round to nearest
    r = x.sub_(n * _LN2_HI).sub_(n * _LN2_LO)
    p = _inv(720.0) * r
    for c in (_inv(120.0), _inv(24.0), _inv(6.0), _c32(0.5), _c32(1.0)):
        p.add_(c).mul_(r)
    p.add_(1.0)
    scale = n.to(torch.int32).add_(127).bitwise_left_shift_(23).view(torch.float32)  # 2^n
    return p.mul_(scale).masked_fill_(underflow, 0.0)  # p * scale * 0 = +0 below the range


def fast_log(x: torch.Tensor) -> torch.Tensor:
    """cpu_ops.cpp's fast_log of a float32 tensor of positive values."""
    bits = x.view(torch.int32)
    e = (bits >> 23).bitwise_and_(0xFF).sub_(127)
    m = (bits & 0x7FFFFF).bitwise_or_(0x3F800000).view(torch.float32)  # in [1, 2)
    big = (m > _SQRT2).to(torch.float32)
    m.mul_(1.0 - 0.5 * big)  # halved above sqrt(2)
    s = (m - 1.0).div_(m + 1.0)
    s2 = s * s
    poly = s2 * _inv(9.0)
    for c in (_inv(7.0), _inv(5.0), _inv(3.0)):
        poly.add_(c).mul_(s2)
    poly.add_(1.0)
    return e.to(torch.float32).add_(big).mul_(_LN2).add_(s.mul_(2.0).mul_(poly))


_RACE_CHUNK = 1 << 15  # elements per pass: under torch's parallel grain, so each op runs on one thread, in cache


def race_sample(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` (B, V) float32 from the random stream of the module docstring, given
    each row's key (B,) int64: exactly the tokens of the ``sample_rows`` kernel. Returns (B,) long."""
    b, v = logits.shape
    finite = torch.where(torch.isnan(logits), float("-inf"), logits)  # (B, V)
    m = finite.amax(dim=1) if v else torch.zeros(b, device=logits.device)  # (B,) max of the non-NaN logits
    degenerate = torch.isnan(logits).any(dim=1) | ~torch.isfinite(m)  # (B,): these take torch.argmax's pick
    m = torch.where(degenerate, 0.0, m)
    best = torch.full((b,), -1.0, device=logits.device)  # (B,) best score so far (every score is >= 0)
    picks = torch.zeros(b, dtype=torch.long, device=logits.device)
    cols = max(1, min(v, _RACE_CHUNK))
    rows = max(1, _RACE_CHUNK // cols)
    for r0 in range(0, b, rows):
        r1 = min(b, r0 + rows)
        for c0 in range(0, v, cols):
            c1 = min(v, c0 + cols)
            p = fast_exp_(logits[r0:r1, c0:c1] - m[r0:r1, None])  # (b', c'), 0 for -inf
            expo = fast_log(hash_uniform(keys[r0:r1], c1, c0)).neg_()  # (b', c'), > 0
            score = p.div_(expo)
            idx = score.argmax(dim=1)  # (b',) first index of the chunk's maximum
            val = score.gather(1, idx[:, None])[:, 0]
            better = val > best[r0:r1]  # strictly: an earlier chunk wins ties
            best[r0:r1] = torch.where(better, val, best[r0:r1])
            picks[r0:r1] = torch.where(better, idx + c0, picks[r0:r1])
    return torch.where(degenerate, logits.argmax(dim=1) if v else picks, picks)


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
