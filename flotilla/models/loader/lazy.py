"""A checkpoint tensor that is read from disk only when (and as far as) a weight loader asks for it.

Tensor-parallel ranks load through these: ``narrow``/slicing reads just this rank's rows or columns from the
safetensors file, so a rank never materializes another rank's shard.
"""

from __future__ import annotations

import torch


class LazyTensor:
    """Wraps a safetensors slice handle. Contract: ``shape`` costs nothing; ``narrow(dim, start, length)``
    and ``[a:b]`` (dim 0) read only the selected part; ``materialize()`` reads everything. Results are
    converted to ``dtype``."""

    def __init__(self, handle, dtype: torch.dtype):
        self._handle = handle
        self.dtype = dtype
        self.shape = torch.Size(handle.get_shape())

    def _convert(self, t: torch.Tensor) -> torch.Tensor:
        return t if t.dtype == self.dtype else t.to(self.dtype)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        return self._convert(self._handle[tuple(index)])

    def __getitem__(self, index) -> torch.Tensor:
        return self._convert(self._handle[index])

    def materialize(self) -> torch.Tensor:
        return self._convert(self._handle[tuple(slice(None) for _ in self.shape)])
