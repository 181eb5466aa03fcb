"""``EngineClient``: the surface of an engine that the OpenAI server (and a ``ReplicaSet``) relies on.

``AsyncLLM`` is the reference implementation; ``flotilla.deploy.replica_set.ReplicaSet`` (several engines
behind one routing policy) and the Ray Serve ingress's remote-engine proxies implement it too, so one
``build_app`` serves any of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from flotilla.config import EngineConfig, ModelConfig
    from flotilla.engine.input_processor import InputProcessor
    from flotilla.engine.output_processor import OutputKind
    from flotilla.outputs import RequestOutput
    from flotilla.sampling_params import SamplingParams
    from flotilla.scheduler.scheduler import SchedulerStats
    from flotilla.tokenizer import Tokenizer


@runtime_checkable
class EngineClient(Protocol):
    """What the server uses of an engine. Every member must be cheap and non-blocking (the server reads them
    on its event loop), so remote implementations cache their values.

    - ``config`` / ``model_config``: the engine's validated configuration (``model_config.max_model_len``,
      ``.vocab_size``, ``.model`` and ``.name`` are read; ``config`` only by the startup banner).
    - ``tokenizer``: ``encode``, ``decode``, ``decode_token``, ``render_chat_template``, ``vocab_size``
      (called on the server's tokenizer thread).
    - ``input_processor.process(prompt, params) -> ProcessedPrompt``: tokenizes and validates a prompt,
      raising ``InvalidRequestError`` (400) for a bad one.
    - ``num_blocks``: KV cache blocks (for the banner).
    - ``latest_stats``: the last ``SchedulerStats`` snapshot (read at every ``/metrics`` scrape).
    - ``is_dead`` / ``dead_error``: True / the cause once the engine can no longer serve; then ``generate``
      raises ``EngineDeadError`` and open streams end with it.
    - ``num_queued_requests``: requests not yet scheduled (admission control: 429 past the limit);
      ``num_unfinished_requests``: requests added and not finished.
    - ``generate(prompt, params, request_id, output_kind, priority=0)``: an async iterator of
      ``RequestOutput`` (deltas with ``OutputKind.DELTA``); the request is added on the first iteration;
      leaving the iteration early aborts it. ``prompt`` is what ``input_processor.process`` accepts (the
      server passes ``{"prompt": text, "prompt_token_ids": ids}``). ``priority`` is the engine request's
      scheduling priority (lower is served earlier); an implementation that forwards requests carries it to
      the engine (or raises), never drops it. ``config.scheduler.policy`` is the engine's scheduling policy.
    - ``abort(request_id | [ids])``: ends those requests (their streams end without finishing); unknown
      ids are ignored.
    - ``shutdown()``: stops the engine; called by whoever created it, never by the server app.
    """

    config: "EngineConfig"
    model_config: "ModelConfig"
    tokenizer: "Tokenizer"
    input_processor: "InputProcessor"
    num_blocks: int
    latest_stats: "SchedulerStats"
    dead_error: BaseException | None

    @property
    def is_dead(self) -> bool: ...

    @property
    def num_queued_requests(self) -> int: ...

    @property
    def num_unfinished_requests(self) -> int: ...

    def generate(self, prompt: Any, sampling_params: "SamplingParams | None", request_id: str,
                 output_kind: "OutputKind" = ..., priority: int = 0) -> AsyncIterator["RequestOutput"]: ...

    def abort(self, request_id: str | list[str]) -> None: ...

    def shutdown(self) -> None: ...
