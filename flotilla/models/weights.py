"""Route checkpoint tensors (Hugging Face names) to parameters through their weight loaders."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from flotilla.errors import ModelLoadError
from flotilla.layers.linear import full_tensor


def load_named_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                       stacked_params: list[tuple[str, str, object]], skip: tuple[str, ...] = ()) -> set[str]:
    """Load ``(hf_name, tensor)`` pairs into ``model``; fused parameters take ``shard_id``.

    Returns the set of parameter names that were loaded and raises ModelLoadError if any parameter got
    nothing or a checkpoint tensor has no parameter.
    """
    params = dict(model.named_parameters(remove_duplicate=True))
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        target, shard_id = name, None
        for hf_frag, our_frag, sid in stacked_params:
            if hf_frag in name:
                target, shard_id = name.replace(hf_frag, our_frag), sid
                break
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"checkpoint tensor {name!r} does not match any parameter of "
                                 f"{type(model).__name__}")
        loader = getattr(param, "weight_loader", _default_loader)
        try:
            loader(param, tensor, shard_id) if shard_id is not None else loader(param, tensor)
        except (ValueError, RuntimeError) as e:
            raise ModelLoadError(f"cannot load checkpoint tensor {name!r}: {e}") from None
        loaded.add(target)
    missing = set(params) - loaded
    if missing:
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    return loaded


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    loaded = full_tensor(loaded)
    if param.shape != loaded.shape:
        raise ValueError(f"shape {tuple(loaded.shape)} != parameter shape {tuple(param.shape)}")
    param.data.copy_(loaded)
