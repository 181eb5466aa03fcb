"""Per-request grammar matchers of one sampling rank and the token bitmasks of each step.

Contract (``StructuredDecoding``): ``add(req_id, params, output_token_ids)`` registers a constrained sequence
(its grammar compiles in the ``GrammarCache`` pool; on resume after preemption the matcher is rebuilt and the
output so far replayed). ``start_fill(req_ids)`` starts, on a background thread, the bitmask of the next
token for every constrained id among ``req_ids`` (the rows that sample this step) and returns a ``Future`` of
``(rows, bitmask)``: ``rows`` (C,) the positions in ``req_ids``, ``bitmask`` (C, ceil(V / 32)) int32, bit j of
row i set when token j is allowed; it is started before the model's forward pass and collected after it, so
the masks are computed while the model runs (xgrammar and llguidance release the GIL). A matcher that
already terminated allows only its EOS ids. ``accept(req_id, token)`` advances the matcher by the sampled token.
``fill_seconds`` / ``wait_seconds`` add up the time spent filling and the time the sampler waited for it.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from flotilla.sampling_params import SamplingParams
from flotilla.structured.grammar import GrammarCache

logger = logging.getLogger(__name__)


@dataclass
class _Entry:
    grammar: Future  # of a compiled grammar (GrammarCache): new_matcher() -> an xgrammar-like matcher
    replay: list[int]  # output tokens to feed a new matcher (resume after preemption)
    eos_token_ids: tuple[int, ...]
    matcher: object | None = None
    rejected: list[int] = field(default_factory=list)


class StructuredDecoding:
    """Matchers of the constrained requests on the rank that samples (see the module contract)."""

    def __init__(self, cache: GrammarCache, vocab_size: int):
        self.cache = cache
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._entries: dict[str, _Entry] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flotilla-bitmask")
        self.fill_seconds = 0.0
        self.wait_seconds = 0.0

    def add(self, req_id: str, params: SamplingParams, output_token_ids: list[int]) -> None:
        so = params.structured_outputs
        if so is None:
            return
        self._entries[req_id] = _Entry(self.cache.get(so), list(output_token_ids), tuple(params.eos_token_ids))

    def remove(self, req_id: str) -> None:
        self._entries.pop(req_id, None)

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._entries

    def start_fill(self, req_ids: list[str]) -> Future | None:
        """None when none of ``req_ids`` is constrained (the step costs nothing extra)."""
        rows = [i for i, r in enumerate(req_ids) if r in self._entries]
        if not rows:
            return None
        entries = [self._entries[req_ids[i]] for i in rows]
        return self._pool.submit(self._fill, rows, entries)

    def collect(self, fut: Future | None) -> tuple[list[int], torch.Tensor] | None:
        if fut is None:
            return None
        start = time.perf_counter()
        result = fut.result()
        self.wait_seconds += time.perf_counter() - start
        return result

    def _fill(self, rows: list[int], entries: list[_Entry]) -> tuple[list[int], torch.Tensor]:
        start = time.perf_counter()
        bitmask = torch.full((len(rows), self.words), -1, dtype=torch.int32)  # (C, W): all allowed
        for i, entry in enumerate(entries):
            matcher = self._matcher(entry)
            if matcher.is_terminated():
                bitmask[i].zero_()
                for t in entry.eos_token_ids:
                    if t < self.vocab_size:
                        bitmask[i, t // 32] |= _bit(t % 32)
            else:
                matcher.fill_next_token_bitmask(bitmask, i)
        self.fill_seconds += time.perf_counter() - start
        return rows, bitmask

    def _matcher(self, entry: _Entry):
        if entry.matcher is None:
            entry.matcher = entry.grammar.result().new_matcher()
            for t in entry.replay:
                if not entry.matcher.accept_token(t):
                    raise RuntimeError(f"replaying token {t} into a rebuilt grammar matcher failed")
            entry.replay = []
        return entry.matcher

    def accept(self, req_id: str, token_id: int) -> None:
        entry = self._entries.get(req_id)
        if entry is None or entry.matcher is None or entry.matcher.is_terminated():
            return
        if not entry.matcher.accept_token(token_id):  # the mask allowed it: only a vocabulary mismatch gets here
            logger.warning("grammar matcher of %s rejected sampled token %d", req_id, token_id)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self.cache.shutdown()


def _bit(j: int) -> int:
    """Bit j (0..31) of an int32 word, as a signed int32 value."""
    return (1 << j) - (1 << 32) if j == 31 else 1 << j
