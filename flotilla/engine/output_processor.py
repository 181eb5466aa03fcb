"""Turns the scheduler's per-step token outputs into user-facing RequestOutputs.

Owns detokenization, stop strings (which finish a request from outside the scheduler), logprob
formatting and the fan-in of ``n`` child sequences into one parent request.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from flotilla.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from flotilla.sampling_params import SamplingParams
from flotilla.scheduler.output import EngineCoreOutput
from flotilla.tokenizer import IncrementalDetokenizer, Tokenizer


class OutputKind(enum.Enum):
    CUMULATIVE = 0  # every output carries the full text so far
    DELTA = 1  # every output carries only what is new (streaming)
    FINAL_ONLY = 2  # one output when the request is finished


@dataclass
class ChildState:
    """One of the n samples of a request."""

    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_sent_tokens: int = 0
    num_sent_logprobs: int = 0
    final_sent: bool = False


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[ChildState]
    output_kind: OutputKind
    arrival_time: float
    num_cached_tokens: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    prompt_logprobs: PromptLogprobs | None = None  # from the first sample whose prompt completed
    prompt_logprobs_sent: bool = False

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)


def child_request_ids(request_id: str, n: int) -> list[str]:
    """Scheduler ids of a request's samples: the id itself for n == 1, else "<i>_<id>" (as vLLM)."""
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    child_ids_to_stop: list[str]  # samples ended by a stop string: the scheduler must finish them


class OutputProcessor:
    """Per-request output state. Contract: after ``process_outputs`` reports a request finished, its
    state is gone; ``child_ids_to_stop`` must be passed to ``Scheduler.finish_requests``."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self.child_to_parent: dict[str, tuple[str, int]] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: SamplingParams, output_kind: OutputKind) -> list[str]:
        child_ids = child_request_ids(request_id, params.n)
        children = []
        for i, cid in enumerate(child_ids):
            detok = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                           params.stop, params.include_stop_str_in_output)
            wants_lp = params.logprobs is not None
            children.append(ChildState(i, detok, logprobs=[] if wants_lp else None,
                                       cumulative_logprob=0.0 if wants_lp else None))
            self.child_to_parent[cid] = (request_id, i)
        self.requests[request_id] = RequestState(request_id, prompt, list(prompt_token_ids), children,
                                                 output_kind, time.monotonic())
        return child_ids

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def abort_requests(self, request_ids) -> list[str]:
        """Forget the requests; returns the child ids the scheduler must abort."""
        child_ids = []
        for rid in request_ids:
            state = self.requests.pop(rid, None)
            if state is None:
                continue
            ids = child_request_ids(rid, len(state.children))
            for cid in ids:
                self.child_to_parent.pop(cid, None)
            child_ids.extend(ids)
        return child_ids

    def mark_scheduled(self, child_ids, timestamp: float) -> list[str]:
        """Record the first scheduling of requests' samples; returns the parents that just left the queue."""
        started = []
        for cid in child_ids:
            parent = self.child_to_parent.get(cid)
            state = self.requests.get(parent[0]) if parent else None
            if state is not None and state.first_scheduled_time is None:
                state.first_scheduled_time = timestamp
                started.append(state.request_id)
        return started

    def process_outputs(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, RequestState] = {}
        to_stop: list[str] = []
        for out in core_outputs:
            parent = self.child_to_parent.get(out.req_id)
            if parent is None:
                continue
            state = self.requests[parent[0]]
            child = state.children[parent[1]]
            if self._apply(state, child, out):
                to_stop.append(out.req_id)
            touched[state.request_id] = state
        results = []
        for state in touched.values():
            result = self._make_output(state)
            if result is not None:
                results.append(result)
            if state.finished:
                self.abort_requests([state.request_id])
        return ProcessedOutputs(results, to_stop)

    def _apply(self, state: RequestState, child: ChildState, out: EngineCoreOutput) -> bool:
        """Add a step's tokens to a child; True when a stop string ended it (scheduler must be told)."""
        if child.finish_reason is not None:
            return False
        if state.first_token_time is None and out.new_token_ids:
            state.first_token_time = time.monotonic()
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        if out.prompt_logprobs is not None and state.prompt_logprobs is None:
            state.prompt_logprobs = self._prompt_logprobs(out.prompt_logprobs)
        tokens, logprobs, stop = self._detokenize(child, out)
        child.token_ids.extend(tokens)
        if child.logprobs is not None:
            for ids, lps, ranks in logprobs:
                child.cumulative_logprob += lps[0]
                child.logprobs.append({t: Logprob(lp, r, self.tokenizer.decode_token(t))
                                       for t, lp, r in zip(ids, lps, ranks)})
        if stop is not None:
            child.finish_reason, child.stop_reason = "stop", stop
            return out.finish_reason is None
        if out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        return False

    @staticmethod
    def _detokenize(child: ChildState, out: EngineCoreOutput):
        """Feed a step's tokens to the child's detokenizer: (tokens kept, their logprobs, the stop string that
        ended the text or None). Several tokens in one step (speculative decoding) with stop strings go one at a
        time, and the tokens after the one that completes a stop string are dropped, so the output is the one
        of a step per token. A stop token id / EOS that ended the request is kept in token_ids but not in the
        text (as vLLM)."""
        tokens, logprobs = out.new_token_ids, out.new_logprobs
        stop_terminated = out.finish_reason == "stop"
        if len(tokens) <= 1 or not child.detokenizer.stop:
            return tokens, logprobs, child.detokenizer.update(tokens, stop_terminated=stop_terminated)
        for n in range(1, len(tokens) + 1):
            stop = child.detokenizer.update(tokens[n - 1:n], stop_terminated=stop_terminated and n == len(tokens))
            if stop is not None:
                return tokens[:n], logprobs[:n], stop
        return tokens, logprobs, None

    def _make_output(self, state: RequestState) -> RequestOutput | None:
        kind = state.output_kind
        if kind == OutputKind.FINAL_ONLY and not state.finished:
            return None
        delta = kind == OutputKind.DELTA
        outputs = []
        for c in state.children:
            if delta and c.num_sent_tokens == len(c.token_ids) and (c.finish_reason is None or c.final_sent):
                continue
            outputs.append(self._completion(c, delta))
        if delta and not outputs:
            return None
        prompt_logprobs = state.prompt_logprobs
        if delta and state.prompt_logprobs_sent:
            prompt_logprobs = None
        state.prompt_logprobs_sent = state.prompt_logprobs_sent or prompt_logprobs is not None
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outputs, state.finished,
                             num_cached_tokens=state.num_cached_tokens,
                             metrics={"arrival_time": state.arrival_time,
                                      "first_scheduled_time": state.first_scheduled_time,
                                      "first_token_time": state.first_token_time},
                             prompt_logprobs=prompt_logprobs)

    def _prompt_logprobs(self, positions) -> PromptLogprobs:
        """The engine's per-position tuples as ``PromptLogprobs``: None for the first prompt token."""
        decode = self.tokenizer.decode_token
        return [None] + [{t: Logprob(lp, r, decode(t)) for t, lp, r in zip(ids, lps, ranks)}
                         for ids, lps, ranks in positions]

    @staticmethod
    def _completion(c: ChildState, delta: bool) -> CompletionOutput:
        finished = c.finish_reason is not None
        text = c.detokenizer.get_next_output_text(finished, delta)
        if delta:
            tokens = c.token_ids[c.num_sent_tokens:]
            logprobs = c.logprobs[c.num_sent_logprobs:] if c.logprobs is not None else None
        else:
            tokens, logprobs = list(c.token_ids), (list(c.logprobs) if c.logprobs is not None else None)
        c.num_sent_tokens = len(c.token_ids)
        c.final_sent = finished
        c.num_sent_logprobs = len(c.logprobs) if c.logprobs is not None else 0
        return CompletionOutput(c.index, text, tokens, c.cumulative_logprob, logprobs, c.finish_reason,
                                c.stop_reason)
