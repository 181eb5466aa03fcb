"""Weights of a GGUF file as Hugging Face named tensors, dequantized one tensor at a time (or, for layers that
keep them quantized, as their raw blocks: ``QuantTensor``).

Name mapping (GGUF -> Hugging Face; ``.weight``/``.bias`` suffixes carry over):

    token_embd            -> model.embed_tokens
    output_norm           -> model.norm
    output                -> lm_head                (absent when embeddings are tied)
    blk.N.attn_norm       -> model.layers.N.input_layernorm
    blk.N.ffn_norm        -> model.layers.N.post_attention_layernorm
    blk.N.attn_q/k/v      -> model.layers.N.self_attn.q_proj/k_proj/v_proj   (qwen2: with biases)
    blk.N.attn_output     -> model.layers.N.self_attn.o_proj
    blk.N.ffn_gate/up/down -> model.layers.N.mlp.gate_proj/up_proj/down_proj

For architecture "llama", llama.cpp's converter permutes the rows of q_proj and k_proj (per head it
interleaves the two rotary halves); ``unpermute_rows`` undoes that exactly as transformers' GGUF loader
does. qwen2 files are stored unpermuted.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from gguf import GGMLQuantizationType

from flotilla.errors import ModelLoadError
from flotilla.layers.quant_weight import PACKED_TYPES, QuantTensor
from flotilla.models.loader.gguf_dequant import dequantize
from flotilla.models.loader.gguf_file import GGUFFile, GGUFTensor

logger = logging.getLogger(__name__)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_BLOCK_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_GLOBAL_RE = re.compile(r"([a-z_]+)\.(weight|bias)")


def gguf_to_hf_name(gguf_name: str) -> str | None:
    """The Hugging Face parameter name of GGUF tensor ``gguf_name``, or None if it has no counterpart
    (e.g. ``rope_freqs.weight``, which transformers ignores as well)."""
    if m := _BLOCK_RE.fullmatch(gguf_name):
        layer, part, suffix = m.groups()
        hf = _BLOCK_NAMES.get(part)
        return None if hf is None else f"model.layers.{layer}.{hf}.{suffix}"
    if m := _GLOBAL_RE.fullmatch(gguf_name):
        part, suffix = m.groups()
        hf = _GLOBAL_NAMES.get(part)
        return None if hf is None else f"{hf}.{suffix}"
    return None


def unpermute_rows(w: np.ndarray | torch.Tensor, n_head: int) -> np.ndarray | torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows were reordered from HF's (half, dim) layout to
    interleaved (dim, half) pairs. ``n_head`` is num_attention_heads for q and num_key_value_heads for k.
    Works for weights ``(rows, cols)`` and biases ``(rows,)``."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"{rows} rows do not split into {n_head} heads of rotary pairs")
    dim = rows // n_head // 2
    # (n_head, dim, 2, ...) -> (n_head, 2, dim, ...)
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # a copy


def iterate_gguf(reader: GGUFFile, path: str, arch: str, hf_config: Any, dtype: torch.dtype,
                 wanted: Callable[[str], bool] | None = None,
                 keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | QuantTensor]]:
    """Yield ``(hf_name, tensor)`` for every mapped tensor of the file, in file order, converted to
    ``dtype`` (each a new tensor, not a view of the file). Tensors ``wanted`` rejects are skipped before
    dequantization. Values are those of ``gguf.quants.dequantize`` (see ``gguf_dequant``).

    With ``keep_quantized``, the weights of linear layers, the LM head and the token embedding whose block
    type has a packed layout (``quant_weight.PACKED_TYPES``) come as ``QuantTensor``s instead: their raw
    blocks (q/k rows of "llama" files unpermuted), for layers to keep quantized."""
    n_head = int(hf_config.num_attention_heads)
    n_kv_head = int(getattr(hf_config, "num_key_value_heads", None) or n_head)
    for t in reader.tensors:
        hf_name = gguf_to_hf_name(t.name)
        if hf_name is None:
            logger.warning("GGUF file %s: skipping tensor %r, which has no Hugging Face counterpart",
                           path, t.name)
            continue
        if wanted is not None and not wanted(hf_name):
            continue
        if keep_quantized and _keepable(hf_name, t):
            yield hf_name, _quant_tensor(reader, t, path, arch, n_head, n_kv_head)
        else:
            yield hf_name, _load_tensor(reader, t, path, arch, n_head, n_kv_head, dtype)


def _keepable(hf_name: str, t: GGUFTensor) -> bool:
    """Whether tensor ``t`` can stay quantized: a 2-D weight of a matmul (or the embedding table) in a block
    type the kernels run."""
    matmul = hf_name.endswith("_proj.weight") or hf_name in ("lm_head.weight", "model.embed_tokens.weight")
    return matmul and len(t.shape) == 2 and int(t.tensor_type) in PACKED_TYPES


def _quant_tensor(reader: GGUFFile, t: GGUFTensor, path: str, arch: str, n_head: int,
                  n_kv_head: int) -> QuantTensor:
    rows, cols = t.torch_shape
    data = reader.raw(t).view(rows, -1)  # (rows, row_bytes): every row is whole blocks
    if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
        data = unpermute_rows(data, n_head if ".attn_q." in t.name else n_kv_head)
    return QuantTensor(int(t.tensor_type), data, cols, _dequantize_raw)


def _dequantize_raw(raw: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(raw, GGMLQuantizationType(qtype), dtype)


def _load_tensor(reader: GGUFFile, t: GGUFTensor, path: str, arch: str, n_head: int, n_kv_head: int,
                 dtype: torch.dtype) -> torch.Tensor:
    hf_shape = t.torch_shape  # GGUF dims are (ne0 = cols, ne1 = rows)
    try:
        w = dequantize(reader.raw(t), t.tensor_type, dtype).view(hf_shape)
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute_rows(w, n_head if ".attn_q." in t.name else n_kv_head)
    except NotImplementedError as e:
        raise ModelLoadError(f"GGUF file {path}: tensor {t.name!r} uses quantization "
                             f"{t.tensor_type.name}, which cannot be dequantized ({e})") from None
    except (ValueError, IndexError, TypeError, RuntimeError) as e:
        raise ModelLoadError(f"GGUF file {path}: tensor {t.name!r} ({t.tensor_type.name}, shape "
                             f"{hf_shape}) is corrupt: {e}") from None
    return w
