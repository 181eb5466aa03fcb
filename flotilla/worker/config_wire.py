"""EngineConfig on the wire, to start worker ranks (processes or Ray actors) without pickle.

The wire types are derived from the config dataclasses' own fields, so a field added to any of them travels
without an edit here: ``wire_type(EngineConfig)`` is a Struct with one field per ``EngineConfig`` field, each
nested config dataclass mirrored the same way (``ModelConfig`` without ``hf_config``: the Hugging Face config
is not shipped, a worker re-reads it from the same model source). Every field is required and no other is
accepted; decoding type-checks each one and rebuilds the dataclasses, which validate themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import typing

import msgspec

from flotilla.config import EngineConfig, ModelConfig
from flotilla.wire import Codec

# hf_config is re-read from the source; runner/pooler: an embedding (pooling) model runs in the serving
# process and its config never crosses a process boundary (encode refuses one), so a shipped config generates.
_NOT_SHIPPED = {ModelConfig: ("hf_config", "runner", "pooler")}


@functools.cache
def wire_type(cls: type) -> type[msgspec.Struct]:
    """The Struct mirroring the config dataclass ``cls`` (same field names and types, all required)."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, wire_type(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else hints[f.name])
              for f in dataclasses.fields(cls) if f.name not in _NOT_SHIPPED.get(cls, ())]
    return msgspec.defstruct(f"{cls.__name__}Wire", fields, module=__name__, kw_only=True,
                             forbid_unknown_fields=True)


def _to_wire(value):
    if not dataclasses.is_dataclass(value):
        return value
    struct = wire_type(type(value))
    return struct(**{name: _to_wire(getattr(value, name)) for name in struct.__struct_fields__})


def _from_wire(value, cls: type, **given):
    """Rebuild the config dataclass ``cls`` from its wire Struct; ``given`` fields are passed as they are."""
    if not dataclasses.is_dataclass(cls):
        return value
    hints = typing.get_type_hints(cls)
    return cls(**{name: _from_wire(getattr(value, name), hints[name]) for name in value.__struct_fields__
                  if name not in given}, **given)


CONFIG: Codec = Codec(wire_type(EngineConfig), "engine config")


def encode_engine_config(config: EngineConfig) -> bytes:
    """``config`` as msgpack; ValueError for a pooling (embedding) model's config, which is never shipped."""
    if config.model.runner != "generate":
        raise ValueError(f"a {config.model.runner!r} model's engine config is not shipped to other processes "
                         "(embedding models run in the serving process)")
    return CONFIG.encode(_to_wire(config))


def decode_engine_config(data: bytes) -> EngineConfig:
    """The EngineConfig in ``data`` (its HF config re-read from the model source); ``WireError`` if malformed,
    ``ValueError`` if a config dataclass rejects a value."""
    from flotilla.models.loader import ResolvedModel, load_hf_config
    wire = CONFIG.decode(data)
    hf_config = load_hf_config(ResolvedModel(source=wire.model.source, kind=wire.model.source_kind))
    model = _from_wire(wire.model, ModelConfig, hf_config=hf_config)
    return _from_wire(wire, EngineConfig, model=model)
