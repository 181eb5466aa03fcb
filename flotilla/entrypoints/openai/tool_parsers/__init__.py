"""Tool parsers for ``tool_choice: auto`` (``flotilla serve --enable-auto-tool-choice --tool-call-parser
NAME``): each turns a model's free text into ``(content, tool_calls)`` and streams the same as deltas.

| module | what |
| ``json_calls`` | incremental JSON call scanning and OpenAI tool-call deltas (shared) |
| ``hermes`` | ``<tool_call>{...}</tool_call>`` blocks (Hermes, Qwen2.5) |
| ``text_calls`` | the driver of the parsers below: call regions inline in the text, the rest content |
| ``llama3_json`` | ``{"name": ..., "parameters": {...}}`` objects, ``;``-separated, after ``<|python_tag|>`` or not |
| ``pythonic`` | ``[fn(a=1), g()]`` Python call lists, read with ``ast`` |
"""

from __future__ import annotations

from flotilla.entrypoints.openai.tool_parsers.hermes import HermesToolParser
from flotilla.entrypoints.openai.tool_parsers.llama3_json import Llama3JsonToolParser
from flotilla.entrypoints.openai.tool_parsers.pythonic import PythonicToolParser

# vLLM's names (``llama4_json`` is vLLM's second name for ``llama3_json``)
TOOL_PARSERS = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser,
                "llama4_json": Llama3JsonToolParser, "pythonic": PythonicToolParser}
# vLLM parser names flotilla does not implement (a clear error instead of "unknown")
NOT_IMPLEMENTED = ("mistral", "granite", "internlm", "jamba", "llama4_pythonic")


def check_tool_parser(name: str | None) -> str | None:
    """``name`` if it is an available parser (or None); ValueError listing the available ones otherwise."""
    if name is None or name in TOOL_PARSERS:
        return name
    why = "is not implemented in flotilla" if name in NOT_IMPLEMENTED else "is unknown"
    raise ValueError(f"--tool-call-parser {name!r} {why}; available: {', '.join(sorted(TOOL_PARSERS))}")
