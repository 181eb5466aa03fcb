"""Response pieces shared by completions and chat: choice accumulation, logprobs formats, usage.

Contract: ``ChoiceAccumulator`` folds delta ``CompletionOutput``s of one choice into its final text,
token ids, logprobs and finish reason. ``completion_logprobs`` builds OpenAI's legacy completions format
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``); ``chat_logprobs`` builds the chat format
(``content``: token, logprob, bytes, top_logprobs). Both take one ``dict[token_id, Logprob]`` per token
whose entries are the sampled token plus the top-N (the engine's ``SampleLogprobs``). ``echo_logprobs``
builds the legacy object for an echoed prompt from the engine's ``PromptLogprobs`` (the first token's
``token_logprobs`` and ``top_logprobs`` entries are null, as OpenAI and vLLM answer; lm-evaluation-harness
reads this); ``concat_logprobs`` joins it with the completion's. ``prompt_logprobs_json`` is vLLM's
``prompt_logprobs`` field: per prompt token null or ``{token_id: {logprob, rank, decoded_token}}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from flotilla.outputs import CompletionOutput, Logprob, PromptLogprobs


@dataclass
class ChoiceAccumulator:
    """One choice of a non-streaming response, built from its delta outputs."""

    index: int
    text_parts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None

    def add(self, delta: CompletionOutput) -> None:
        self.text_parts.append(delta.text)
        if delta.cumulative_logprob is not None:  # a running total, also in deltas
            self.cumulative_logprob = delta.cumulative_logprob
        self.token_ids.extend(delta.token_ids)
        if delta.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    @property
    def text(self) -> str:
        return "".join(self.text_parts)


def best_of(choices: list[ChoiceAccumulator], samples: int, n: int, keep_logprobs: bool) -> list[ChoiceAccumulator]:
    """vLLM's ``best_of``: ``choices`` hold ``samples`` consecutive samples per prompt; of each prompt's, the
    ``n`` with the highest cumulative logprob (ties: the earlier sample), renumbered ``prompt * n + j`` in that
    order; their ``logprobs`` are dropped unless ``keep_logprobs`` (the request asked for them)."""
    if samples == n:
        return choices
    picked = []
    for start in range(0, len(choices), samples):
        group = sorted(choices[start:start + samples], key=_likelihood, reverse=True)
        for j, ch in enumerate(group[:n]):
            ch.index = start // samples * n + j
            if not keep_logprobs:
                ch.logprobs = None
            picked.append(ch)
    return picked


def _likelihood(choice: ChoiceAccumulator) -> float:
    return float("-inf") if choice.cumulative_logprob is None else choice.cumulative_logprob


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(token_id: int, entries: dict[int, Logprob], tokenizer) -> str:
    entry = entries.get(token_id)
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return tokenizer.decode_token(token_id)


def completion_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], tokenizer,
                        initial_offset: int = 0) -> tuple[dict, int]:
    """The legacy ``logprobs`` object for these tokens and the text offset after them."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = initial_offset
    for token_id, entries in zip(token_ids, logprobs):
        text = _token_text(token_id, entries, tokenizer)
        sampled = entries.get(token_id)
        tokens.append(text)
        token_logprobs.append(_finite(sampled.logprob) if sampled is not None else None)
        top_logprobs.append({_token_text(t, entries, tokenizer): _finite(lp.logprob) for t, lp in entries.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": offsets}, offset


def _top(entries: dict[int, Logprob], token_id: int, top_n: int) -> dict[int, Logprob]:
    """``token_id``'s entry plus the entries ranked ``top_n`` or better (the engine may hold more)."""
    return {t: lp for t, lp in entries.items() if t == token_id or (lp.rank is not None and lp.rank <= top_n)}


def echo_logprobs(prompt_token_ids: list[int], prompt_logprobs: PromptLogprobs, tokenizer,
                  top_n: int) -> tuple[dict, int]:
    """The legacy ``logprobs`` object of an echoed prompt (top-``top_n`` per token) and the text offset
    after it."""
    first = tokenizer.decode_token(prompt_token_ids[0])
    head = {"tokens": [first], "token_logprobs": [None], "top_logprobs": [None], "text_offset": [0]}
    rest = [_top(e, t, top_n) for t, e in zip(prompt_token_ids[1:], prompt_logprobs[1:])]
    tail, offset = completion_logprobs(prompt_token_ids[1:], rest, tokenizer, len(first))
    return concat_logprobs(head, tail), offset


def concat_logprobs(a: dict, b: dict) -> dict:
    """Two legacy ``logprobs`` objects, one after the other."""
    return {key: a[key] + b[key] for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}


def prompt_logprobs_json(prompt_token_ids: list[int], prompt_logprobs: PromptLogprobs, top_n: int) -> list:
    """vLLM's ``prompt_logprobs`` response field (top-``top_n`` plus the prompt token at each position)."""
    return [None if e is None else {t: {"logprob": _finite(lp.logprob), "rank": lp.rank,
                                        "decoded_token": lp.decoded_token}
                                    for t, lp in _top(e, tok, top_n).items()}
            for tok, e in zip(prompt_token_ids, prompt_logprobs)]


def chat_logprobs(token_ids: list[int], logprobs: list[dict[int, Logprob]], tokenizer, top_n: int) -> dict:
    """The chat ``logprobs`` object: per token its text, logprob, UTF-8 bytes and the top ``top_n``."""
    content = []
    for token_id, entries in zip(token_ids, logprobs):
        sampled = entries.get(token_id)
        ranked = sorted((lp.rank if lp.rank is not None else 1 << 30, t, lp) for t, lp in entries.items())
        top = [_chat_entry(_token_text(t, entries, tokenizer), lp.logprob) for rank, t, lp in ranked
               if rank <= top_n]
        entry = _chat_entry(_token_text(token_id, entries, tokenizer),
                            sampled.logprob if sampled is not None else float("-inf"))
        entry["top_logprobs"] = top
        content.append(entry)
    return {"content": content}


def _chat_entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def _finite(value: float) -> float:
    """JSON has no -Infinity: report impossible tokens with a very low finite logprob (as vLLM)."""
    return max(value, -9999.0)
