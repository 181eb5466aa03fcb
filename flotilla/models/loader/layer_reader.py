"""Reading one decoder layer's checkpoint tensors again and again from a memory-mapped model file (weight
offload, ``flotilla.models.offload``).

``LayerReader.read(layer)`` yields the layer's ``(hf_name, tensor)`` pairs exactly as ``iterate_weights_filtered``
does for them (same dtype conversion, GGUF dequantization and q/k unpermutation), so a layer read here loads the
same values as at start-up. The files stay open for the reader's life: safetensors through ``safe_open`` (a
memory map), GGUF through ``GGUFFile``'s copy-on-write map; nothing is copied until a tensor is read, and the
page cache (not the process's anonymous memory) holds the file's bytes.

Not thread-safe: one thread reads at a time (the offload prefetcher's).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from flotilla.errors import ModelLoadError
from flotilla.models.loader.gguf_file import gguf_architecture, open_gguf
from flotilla.models.loader.gguf_loader import _load_tensor, gguf_to_hf_name
from flotilla.models.loader.resolve import ResolvedModel
from flotilla.models.loader.safetensors_loader import plan_safetensors

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(hf_name: str) -> int | None:
    """The decoder layer index of checkpoint tensor ``hf_name`` (None for embeddings, norms, the head)."""
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


class LayerReader:
    """Per-layer reads of ``resolved`` (a safetensors directory or a GGUF file) in ``dtype``.

    Contract: ``read(i)`` yields every checkpoint tensor named ``model.layers.{i}.*``, each a new tensor (not a
    view of the file); ModelLoadError if the file went bad. ``close()`` releases the maps.
    """

    def __init__(self, resolved: ResolvedModel, hf_config: Any, dtype: torch.dtype):
        self.dtype = dtype
        self._stack = ExitStack()
        # layer -> [(hf_name, safetensors handle or GGUF tensor entry)]
        self._by_layer: dict[int, list[tuple[str, Any]]] = {}
        self._gguf = None
        if resolved.kind == "hf_dir":
            for path, names in plan_safetensors(resolved.source).files:
                wanted = [n for n in names if layer_of(n) is not None]
                if not wanted:
                    continue
                handle = self._stack.enter_context(safe_open(path, framework="pt"))
                for n in wanted:
                    self._by_layer.setdefault(layer_of(n), []).append((n, handle))
        elif resolved.kind == "gguf":
            reader = open_gguf(resolved.source)
            n_head = int(hf_config.num_attention_heads)
            n_kv_head = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
            self._gguf = (reader, resolved.source, gguf_architecture(reader, resolved.source), n_head, n_kv_head)
            for t in reader.tensors:
                name = gguf_to_hf_name(t.name)
                if name is not None and layer_of(name) is not None:
                    self._by_layer.setdefault(layer_of(name), []).append((name, t))
        else:
            raise ModelLoadError(f"unknown model source kind {resolved.kind!r}")

    def names(self, layer: int) -> list[str]:
        """The checkpoint tensor names of ``layer`` (empty when the checkpoint has none)."""
        return [n for n, _ in self._by_layer.get(layer, [])]

    def read(self, layer: int) -> Iterator[tuple[str, torch.Tensor]]:
        if self._gguf is not None:
            reader, path, arch, n_head, n_kv_head = self._gguf
            for name, t in self._by_layer.get(layer, []):  # the same dequantization as gguf_loader.iterate_gguf
                yield name, _load_tensor(reader, t, path, arch, n_head, n_kv_head, self.dtype)
            return
        for name, handle in self._by_layer.get(layer, []):
            try:
                t = handle.get_tensor(name)
            except SafetensorError as e:
                raise ModelLoadError(f"cannot read tensor {name!r} from the safetensors file: {e}") from None
            yield name, t if t.dtype == self.dtype else t.to(self.dtype)

    def close(self) -> None:
        self._stack.close()
        self._gguf = None
