"""PoolingParams: how one embedding request is pooled (vLLM's names)."""

from __future__ import annotations

from dataclasses import dataclass

from flotilla.errors import InvalidRequestError


@dataclass(frozen=True)
class PoolingParams:
    """``dimensions``: keep only the first this many values of the embedding (Matryoshka models only; the
    embedding is normalised after truncation when the model normalises). ``normalize``: override the model's
    L2 normalisation (None: as its sentence-transformers config says). ``validate`` checks the form; whether
    the model allows ``dimensions`` is checked against the model (``InvalidRequestError`` naming the field)."""

    dimensions: int | None = None
    normalize: bool | None = None

    def validate(self) -> None:
        d = self.dimensions
        if d is not None and (isinstance(d, bool) or not isinstance(d, int) or d < 1):
            raise InvalidRequestError(f"dimensions must be a positive integer, got {d!r}", "dimensions")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise InvalidRequestError(f"normalize must be true, false or null, got {self.normalize!r}", "normalize")
