"""Prompt logprobs in the prefill: the logprob of each prompt token given the tokens before it, plus the top-K.

Contract: ``PromptLogprobsJob`` lists, for one step, the flat-batch rows whose next token is a prompt token of
a request that wants prompt logprobs; ``compute_prompt_logprobs`` turns those rows of the final hidden states
into ``PositionLogprobs`` (the prompt token's logprob and rank, then the top-K of the raw distribution, the
same format and numbers as sample logprobs). Full-vocabulary logits exist for at most ``chunk_rows`` rows at a
time, whatever the prompt length. ``compute_logits`` is called the same number of times with the same shapes on
every tensor-parallel rank of the last stage (it all-gathers), also on ranks that then drop the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flotilla.sampler import gather_logprobs
from flotilla.scheduler.output import PositionLogprobs

CHUNK_ROWS = 256


@dataclass
class PromptLogprobsJob:
    """This step's prompt-logprob rows: for request ``req_ids[i]``, rows ``rows[i]`` of the flat batch predict
    ``targets[i]`` (its next prompt tokens); ``num_logprobs[i]`` is its K."""

    req_ids: list[str] = field(default_factory=list)
    rows: list[range] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)
    num_logprobs: list[int] = field(default_factory=list)

    def add(self, req_id: str, token_ids: list[int], num_prompt_tokens: int, first_row: int, first_pos: int,
            num_tokens: int, num_logprobs: int) -> None:
        """Rows ``first_row ..`` hold positions ``first_pos .. first_pos + num_tokens - 1`` of ``req_id``; the
        last prompt position predicts a generated token, so it is left out."""
        end_pos = min(first_pos + num_tokens, num_prompt_tokens - 1)
        if end_pos <= first_pos:
            return
        self.req_ids.append(req_id)
        self.rows.append(range(first_row, first_row + end_pos - first_pos))
        self.targets.append(token_ids[first_pos + 1:end_pos + 1])
        self.num_logprobs.append(num_logprobs)

    def __bool__(self) -> bool:
        return bool(self.req_ids)


def compute_prompt_logprobs(hidden: torch.Tensor, job: PromptLogprobsJob,
                            compute_logits: Callable[[torch.Tensor], torch.Tensor], keep: bool,
                            chunk_rows: int = CHUNK_ROWS) -> dict[str, list[PositionLogprobs]]:
    """``PositionLogprobs`` for every row of ``job``, by request (empty when not ``keep``: a rank that only
    joins the logits collective). ``hidden``: (T, hidden) final hidden states of the step's flat batch."""
    rows = torch.tensor([r for rs in job.rows for r in rs], dtype=torch.long, device=hidden.device)  # (M,)
    targets = torch.tensor([t for ts in job.targets for t in ts], dtype=torch.long, device=hidden.device)  # (M,)
    max_k = max(job.num_logprobs)
    ids: list[list[int]] = []
    lps: list[list[float]] = []
    ranks: list[list[int]] = []
    for start in range(0, rows.numel(), chunk_rows):
        logits = compute_logits(hidden[rows[start:start + chunk_rows]])  # (C, vocab) float32
        if not keep:
            continue
        raw = torch.log_softmax(logits, dim=-1)  # (C, vocab)
        del logits
        chunk = gather_logprobs(raw, targets[start:start + chunk_rows], max_k)  # (C, 1 + max_k) each
        ids.extend(chunk.token_ids.tolist())
        lps.extend(chunk.logprobs.tolist())
        ranks.extend(chunk.ranks.tolist())
    out: dict[str, list[PositionLogprobs]] = {}
    if not keep:
        return out
    offset = 0
    for req_id, rs, k in zip(job.req_ids, job.rows, job.num_logprobs):
        out[req_id] = [(ids[i][:1 + k], lps[i][:1 + k], ranks[i][:1 + k]) for i in range(offset, offset + len(rs))]
        offset += len(rs)
    return out
