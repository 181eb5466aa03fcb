"""Lazily read safetensors tensors (what tensor-parallel ranks load through) equal the eager ones."""

from __future__ import annotations

import torch

from flotilla.models.loader import ResolvedModel, iterate_weights, iterate_weights_filtered, load_hf_config
from flotilla.models.loader.lazy import LazyTensor


def test_lazy_slices_equal_eager_tensors(tiny_llama):
    path, _ = tiny_llama
    resolved = ResolvedModel(source=path, kind="hf_dir")
    config = load_hf_config(resolved)
    eager = dict(iterate_weights(resolved, config, torch.float32))
    seen = 0
    for name, lazy in iterate_weights_filtered(resolved, config, torch.bfloat16, None, lazy=True):
        assert isinstance(lazy, LazyTensor) and lazy.shape == eager[name].shape
        full = eager[name].to(torch.bfloat16)
        rows = lazy.shape[0]
        assert torch.equal(lazy.narrow(0, rows // 2, rows - rows // 2), full.narrow(0, rows // 2, rows - rows // 2))
        assert torch.equal(lazy[: rows // 3], full[: rows // 3])
        if len(lazy.shape) == 2:
            cols = lazy.shape[1]
            assert torch.equal(lazy.narrow(1, 1, cols - 1), full.narrow(1, 1, cols - 1))
        assert torch.equal(lazy.materialize(), full) and lazy.materialize().dtype == torch.bfloat16
        seen += 1
    assert seen == len(eager)
