"""The frontend <-> engine-core-process messages: tagged ``WireStruct``s (``flotilla.wire``), never pickle.

The frontend (``AsyncLLM``) sends ``ToCore`` messages, the core process answers with ``FromCore`` messages;
``TO_CORE`` and ``FROM_CORE`` are their codecs (decoding anything else raises ``WireError``). Payloads are
the engine core's own types (``EngineCoreRequest``, ``EngineCoreOutputs``), so nothing is converted by hand.
"""

from __future__ import annotations

from typing import Union

from flotilla.engine.core import EngineCoreOutputs, EngineCoreRequest
from flotilla.wire import Codec, WireStruct


class AddRequest(WireStruct, tag="add"):
    """Frontend -> core: schedule ``request`` (one sequence; ``n > 1`` is fanned out by the frontend)."""

    request: EngineCoreRequest


class AbortRequests(WireStruct, tag="abort"):
    """Frontend -> core: finish the sequences ``ids`` and free their KV blocks; ``stopped``: a stop string
    ended them (finish reason "stop"), else they were aborted."""

    ids: list[str]
    stopped: bool


class Shutdown(WireStruct, tag="shutdown"):
    """Frontend -> core: exit."""


class Ready(WireStruct, tag="ready"):
    """Core -> frontend, once: the model is loaded and the KV cache holds ``num_blocks`` blocks."""

    num_blocks: int


class Outputs(WireStruct, tag="outputs"):
    """Core -> frontend: one step's ``outputs`` (or a stats refresh after aborts while idle)."""

    outputs: EngineCoreOutputs


class Failed(WireStruct, tag="failed"):
    """Core -> frontend, last: the core failed with ``error`` (the message), an exception of class
    ``error_type`` (a ``flotilla.errors`` name); the process exits."""

    error: str
    error_type: str


ToCore = Union[AddRequest, AbortRequests, Shutdown]
FromCore = Union[Ready, Outputs, Failed]
TO_CORE: Codec[ToCore] = Codec(ToCore, "frontend -> engine core message")
FROM_CORE: Codec[FromCore] = Codec(FromCore, "engine core -> frontend message")
