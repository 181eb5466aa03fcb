"""One batch of rows through an ``LLM``: prompts or chat conversations in, one flat result per row out.

Shared by the Spark UDF and the Ray Data engine stage, which only rename the fields:

- ``sampling_params_from(value)``: a ``SamplingParams`` from one, a dict of its fields (a Ray Data row's
  ``sampling_params`` column) or None (the defaults); validated at once, ``n`` must be 1 (one output row per
  input row). Bad values raise ``ValueError`` naming the field.
- ``generate_rows(llm, inputs, params)``: each input is a prompt (``str``) or a conversation (a list of
  ``{"role", "content"}`` dicts, rendered with the model's chat template, as ``LLM.chat`` does); all go to
  one ``LLM.generate`` call, so the engine batches them continuously. Returns a ``RowResult`` per input, in
  input order. A missing input (None) raises ``ValueError`` naming its position.
- ``plain(value)``: numpy arrays and scalars (what Arrow-backed batches hold) as Python lists and numbers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flotilla.errors import InvalidRequestError
from flotilla.sampling_params import SamplingParams


@dataclass
class RowResult:
    """The output of one row: generated text and token ids, why it ended ("stop" | "length"), and the
    prompt's and the output's token counts."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


def sampling_params_from(value: SamplingParams | Mapping[str, Any] | None,
                         default: SamplingParams | None = None) -> SamplingParams:
    """``value`` as validated ``SamplingParams``; None gives ``default`` (or the defaults). A dict may hold
    any ``SamplingParams`` field (None values are left at their defaults, as Arrow fills missing struct
    fields with nulls)."""
    if value is None:
        params = default if default is not None else SamplingParams()
    elif isinstance(value, SamplingParams):
        params = value
    elif isinstance(value, Mapping):
        fields = {f.name for f in dataclasses.fields(SamplingParams) if f.init}
        given = {k: plain(v) for k, v in value.items() if v is not None}
        unknown = sorted(set(given) - fields)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        params = SamplingParams(**given)
    else:
        raise TypeError(f"sampling params must be SamplingParams, a dict or None, got {type(value).__name__}")
    try:
        params.validate()
    except InvalidRequestError as e:
        raise ValueError(f"invalid sampling params: {e}") from None
    if params.n != 1:
        raise ValueError(f"sampling params n must be 1 in a batch job (one output row per input row), got {params.n}")
    return params


def generate_rows(llm, inputs: Sequence[str | Sequence[Mapping[str, Any]]],
                  params: SamplingParams | Sequence[SamplingParams]) -> list[RowResult]:
    """Generate one output per input (see the module docstring)."""
    tokenizer = llm.get_tokenizer()
    prompts: list[Any] = []
    for i, item in enumerate(inputs):
        if item is None:
            raise ValueError(f"row {i} of the batch has no prompt (null)")
        if isinstance(item, str):
            prompts.append(item)
        else:
            conversation = [dict(m) for m in plain(item)]
            prompts.append({"prompt_token_ids": tokenizer.apply_chat_template(conversation,
                                                                              add_generation_prompt=True)})
    outputs = llm.generate(prompts, params) if prompts else []
    results = []
    for out in outputs:
        sample = out.outputs[0]
        results.append(RowResult(text=sample.text, token_ids=list(sample.token_ids),
                                 finish_reason=sample.finish_reason, prompt_tokens=len(out.prompt_token_ids),
                                 completion_tokens=len(sample.token_ids)))
    return results


def plain(value: Any) -> Any:
    """Numpy arrays, numpy scalars and nested containers of them as plain Python values."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    tolist = getattr(value, "tolist", None)  # numpy arrays and scalars
    if tolist is not None and type(value).__module__ == "numpy":
        return plain(tolist())
    return value
