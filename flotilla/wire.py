"""The one codec of every process boundary: msgspec msgpack, typed and validated on decode, never pickle.

What crosses a process (frontend <-> engine core, driver <-> worker ranks, the engine config a worker starts
from, the Ray Serve ingress <-> model replicas) is a documented wire type: a ``WireStruct`` subclass (a
msgspec Struct, written as a msgpack array in field order), or one of the public value dataclasses inside
one (``SamplingParams``, the config dataclasses, ``SchedulerStats``, ``RequestOutput``'s parts: written as
msgpack maps, every field). A ``Codec`` is bound to one type: ``encode`` refuses anything that is not plain
msgpack data, a Struct or a dataclass (``TypeError``: there is no pickle fallback), and ``decode`` returns
exactly that type with every field type-checked and each dataclass's ``__post_init__`` (its validation) run,
or raises ``WireError`` naming the message and the path of the bad field.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

T = TypeVar("T")


class WireError(ValueError):
    """Bytes that are not a valid message of the expected type: truncated, not msgpack, a wrong tag, a
    missing, extra or mistyped field, or a value its dataclass rejects. The message names what was expected
    and where (msgspec's path, e.g. ``$[1].outputs[3][0]``)."""


class WireStruct(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    """Base of flotilla's wire types: a msgpack array in field order (compact and fast to decode);
    decoding refuses an array with more elements than the type has fields. Subclasses document each field.
    Message unions tag their members (``class Ready(WireStruct, tag="ready")``): the tag is element 0."""


class Codec(Generic[T]):
    """Encodes values of one type to msgpack bytes and decodes bytes back into exactly that type.

    ``what`` names the message in errors ("engine core -> frontend message"). Encoders and decoders are
    reused (msgspec's fast path); both are safe to call from several threads.
    """

    __slots__ = ("type", "what", "_encoder", "_decoder")

    def __init__(self, type_: Any, what: str):
        self.type = type_
        self.what = what
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(type_)

    def encode(self, value: T) -> bytes:
        return self._encoder.encode(value)

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as e:  # ValidationError (wrong shape or value) is a DecodeError
            raise WireError(f"malformed {self.what}: {e}") from None
