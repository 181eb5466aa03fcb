"""N-gram prompt lookup (vLLM's ``"method": "ngram"``): propose the tokens that followed the latest earlier
occurrence of the sequence's last n tokens. No model, no state: a pure function of the token ids."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def propose_ngram(token_ids: list[int] | np.ndarray, k: int, min_n: int, max_n: int) -> list[int]:
    """Up to ``k`` draft tokens for a sequence (prompt + output so far).

    For n from ``max_n`` down to ``min_n``: if the last n tokens occur earlier in the sequence (an occurrence
    that ends before the last token), return the (at most k) tokens that followed the latest such occurrence.
    The longest matching n wins; no match gives no drafts (``[]``).
    """
    tokens = np.asarray(token_ids, dtype=np.int64)
    length = tokens.shape[0]
    if k <= 0:
        return []
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        windows = sliding_window_view(tokens[:-1], n)  # (length - n, n): every earlier n-gram
        hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n  # the token after the latest match (< length)
            return tokens[start:start + k].tolist()
    return []


class NgramProposer:
    """The model runner's n-gram proposer: ``propose(runner, states, emitted)`` -> drafts per request id, from
    each request's tokens (``states[i].token_ids``) followed by the tokens it emitted this step. Requests with
    structured output get none (their tokens must pass the grammar; speculation skips them)."""

    def __init__(self, k: int, min_n: int, max_n: int):
        self.k, self.min_n, self.max_n = k, min_n, max_n

    def propose(self, runner, states, emitted: list[list[int]]) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for s, tokens in zip(states, emitted):
            if s.sampling_params.structured_outputs is not None:
                continue
            drafts = propose_ngram(s.token_ids + tokens, self.k, self.min_n, self.max_n)
            if drafts:
                out[s.req_id] = drafts
        return out

    def on_step(self, so) -> None:
        """Nothing to track (the proposal is a function of the tokens)."""

    def probs_for(self, req_id: str, drafts: list[int]) -> None:
        """None: n-gram drafts are deterministic (q is one-hot)."""
        return None
