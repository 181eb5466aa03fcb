"""Verification of speculative tokens (Leviathan et al. 2023; Chen et al. 2023): the tokens it emits follow the
target model's distribution exactly, whatever the drafts were.

A request with k drafts d_1..d_k has k + 1 rows of target logits: row j (0-based) is the target's next-token
distribution p_j after the known tokens and d_1..d_j. Per request:
- greedy (temperature 0): d_j+1 is accepted while it equals argmax(p_j); the first mismatch emits argmax(p_j)
  instead and stops; all k accepted emit the bonus argmax(p_k). The output is token for token the output of
  decoding one token per step.
- random: d_j+1 is accepted with probability min(1, p_j(d) / q_j(d)), q_j being the draft's distribution (a
  deterministic proposal such as n-gram lookup has q_j = one-hot(d), so the probability is p_j(d)); the first
  rejection emits a sample of the residual max(p_j - q_j, 0) renormalised (for a one-hot q_j: p_j without d)
  and stops; all accepted emit a sample of p_k. Each emitted token is then distributed exactly as p.
p is the distribution the sampler would sample from: the logits after the request's processors (penalties,
min_tokens, bad_words, logit_bias, allowed_token_ids, grammar) over its output so far plus the drafts before
the row, then temperature, top-k, top-p and min-p, softmax.

Randomness: a seeded request draws from its own ``torch.Generator`` (uniforms for the acceptance tests, then
one ``torch.multinomial`` draw), so its tokens depend only on its seed, its logits and its drafts; others
draw from the global generator. This stream differs from the sampler's exponential race: with speculation on,
a seed reproduces the same tokens under the same speculative config, not the tokens of a run without it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flotilla.sampler import Sampler, SamplingMetadata, apply_min_p, apply_top_k_top_p, gather_logprobs, greedy
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import PositionLogprobs


@dataclass
class VerifyResult:
    """Per request: the emitted tokens (the accepted drafts, then one sampled token: 1 to k + 1 tokens) and,
    when the request wants logprobs, one ``PositionLogprobs`` per emitted token (else None)."""

    token_ids: list[list[int]]
    logprobs: list[list[PositionLogprobs] | None]


def expand_rows(params: list[SamplingParams], prompts: list[list[int]], outputs: list[list[int]],
                drafts: list[list[int]]) -> tuple[list[SamplingParams], list[list[int]], list[list[int]]]:
    """One row per verified position: request i gets len(drafts[i]) + 1 rows, row j seeing its output followed
    by the first j drafts (so penalties, min_tokens and bad_words apply as if the drafts had been sampled)."""
    row_params, row_prompts, row_outputs = [], [], []
    for p, prompt, out, d in zip(params, prompts, outputs, drafts):
        for j in range(len(d) + 1):
            row_params.append(p)
            row_prompts.append(prompt)
            row_outputs.append(list(out) + list(d[:j]))
    return row_params, row_prompts, row_outputs


def verify(logits: torch.Tensor, md: SamplingMetadata, params: list[SamplingParams], drafts: list[list[int]],
           draft_probs: list[torch.Tensor | None], generators: list[torch.Generator | None]) -> VerifyResult:
    """Verify the drafts of B requests.

    logits: (R, V) float32 target logits, R = sum(len(d) + 1), the rows of request i contiguous and in order
    (they are modified in place); md: the ``SamplingMetadata`` of those R rows (``expand_rows``); drafts[i]:
    request i's proposed tokens; draft_probs[i]: (len(drafts[i]), V) float32 draft distributions, or None for
    a deterministic proposal; generators[i]: request i's generator (None: the global one).
    """
    raw_logprobs = torch.log_softmax(logits, dim=-1) if md.max_num_logprobs is not None else None  # (R, V)
    processed = Sampler.process(logits, md, owned=True)  # (R, V)
    argmax = greedy(processed).tolist() if not md.all_random else None  # (R,)
    probs = None if md.all_greedy else target_probs(processed, md)  # (R, V)
    emitted: list[list[int]] = []
    base = 0
    for p, d, q, gen in zip(params, drafts, draft_probs, generators):
        rows = slice(base, base + len(d) + 1)
        if p.greedy:
            emitted.append(_verify_greedy(argmax[rows], d))
        else:
            emitted.append(_verify_random(probs[rows], d, q, gen))
        base += len(d) + 1
    return VerifyResult(emitted, _logprobs(raw_logprobs, params, drafts, emitted))


def target_probs(processed: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Processed logits (R, V) -> the sampling distribution (R, V): temperature, top-k/top-p, min-p, softmax.
    Modifies ``processed``. Rows of greedy requests hold a distribution that is not used."""
    processed.div_(md.temperature.unsqueeze(1))  # (R, V)
    if md.top_k is not None or md.top_p is not None:
        processed = apply_top_k_top_p(processed, md.top_k, md.top_p)
    if md.min_p is not None:
        apply_min_p(processed, md.min_p)
    return torch.softmax(processed, dim=-1)  # (R, V)


def _verify_greedy(argmax: list[int], drafts: list[int]) -> list[int]:
    """argmax: the k + 1 rows' argmax tokens."""
    out = []
    for j, token in enumerate(drafts):
        if token != argmax[j]:
            out.append(argmax[j])
            return out
        out.append(token)
    out.append(argmax[len(drafts)])
    return out


def _verify_random(p: torch.Tensor, drafts: list[int], q: torch.Tensor | None,
                   gen: torch.Generator | None) -> list[int]:
    """p: (k + 1, V) target distributions; q: (k, V) draft distributions or None (one-hot drafts)."""
    k = len(drafts)
    accepted = 0
    if k:
        u = torch.rand(k, generator=gen, device=p.device)  # (k,)
        idx = torch.arange(k, device=p.device)
        d = torch.tensor(drafts, dtype=torch.long, device=p.device)  # (k,)
        p_d = p[idx, d]  # (k,)
        q_d = q[idx, d] if q is not None else torch.ones_like(p_d)  # (k,)
        ok = (u * q_d < p_d).tolist()  # accept iff u < p/q (q_d > 0: the draft was drawn from q)
        while accepted < k and ok[accepted]:
            accepted += 1
    if accepted < k:
        row = p[accepted]
        if q is not None:
            residual = (row - q[accepted]).clamp_(min=0.0)  # (V,)
        else:
            residual = row.clone()
            residual[drafts[accepted]] = 0.0
        if not float(residual.sum()) > 0.0:  # p == q up to rounding: the rejection had probability ~0
            residual = row
        token = int(torch.multinomial(residual, 1, generator=gen))
    else:
        token = int(torch.multinomial(p[k], 1, generator=gen))
    return list(drafts[:accepted]) + [token]


def _logprobs(raw_logprobs: torch.Tensor | None, params: list[SamplingParams], drafts: list[list[int]],
              emitted: list[list[int]]) -> list[list[PositionLogprobs] | None]:
    """Raw-distribution logprobs of each emitted token at its row (token j of request i: its row j), with the
    request's top-N."""
    if raw_logprobs is None:
        return [None] * len(params)
    rows, tokens = [], []
    base = 0
    for p, d, e in zip(params, drafts, emitted):
        if p.logprobs is not None:
            rows.extend(range(base, base + len(e)))
            tokens.extend(e)
        base += len(d) + 1
    wanted = max(p.logprobs for p in params if p.logprobs is not None)
    lp = gather_logprobs(raw_logprobs[rows], torch.tensor(tokens, dtype=torch.long, device=raw_logprobs.device),
                         wanted)
    ids, lps, ranks = (t.tolist() for t in lp)
    out: list[list[PositionLogprobs] | None] = []
    pos = 0
    for p, e in zip(params, emitted):
        if p.logprobs is None:
            out.append(None)
            continue
        n = 1 + p.logprobs
        out.append([(ids[r][:n], lps[r][:n], ranks[r][:n]) for r in range(pos, pos + len(e))])
        pos += len(e)
    return out
