"""One entry point for checkpoint tensors, whatever the storage: ``iterate_weights``.

Tensors come out under Hugging Face parameter names (``model.layers.0.self_attn.q_proj.weight`` ...), in
the requested dtype, one at a time. Tied embeddings are not duplicated: a checkpoint without
``lm_head.weight`` yields none, and the model ties it. Before the first tensor is read, the checkpoint's
tensor names are checked against what the architecture needs (for the decoder families flotilla knows),
so a missing tensor is reported with the file name rather than midway through loading.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from flotilla.errors import ModelLoadError
from flotilla.models.loader.gguf_file import gguf_architecture, open_gguf
from flotilla.models.loader.gguf_loader import gguf_to_hf_name, iterate_gguf
from flotilla.models.loader.resolve import ResolvedModel
from flotilla.models.loader.safetensors_loader import iterate_safetensors, plan_safetensors

WeightFilter = Callable[[str], bool]

_DECODER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def iterate_weights(resolved: ResolvedModel, hf_config: Any,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every ``(hf_name, tensor)`` of the checkpoint, tensors in ``dtype``.

    Raises ModelLoadError (naming the file) for corrupt, truncated or incomplete checkpoints.
    """
    return iterate_weights_filtered(resolved, hf_config, dtype, wanted=None)


def iterate_weights_filtered(resolved: ResolvedModel, hf_config: Any, dtype: torch.dtype,
                             wanted: WeightFilter | None, lazy: bool = False,
                             keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Like ``iterate_weights`` but only tensors whose HF name ``wanted(name)`` accepts; the others are
    neither read from disk nor dequantized (a tensor-parallel or pipeline rank skips what it does not own).

    Validation (file headers, completeness) happens eagerly, at the call, not at the first ``next()``.
    With ``lazy``, safetensors values are ``LazyTensor``s so a tensor-parallel rank reads only its shard
    (GGUF tensors are dequantized whole, then sliced). With ``keep_quantized``, a GGUF file's matmul weights
    of the types the kernels run come as ``QuantTensor``s (``gguf_loader.iterate_gguf``).
    """
    if resolved.kind == "hf_dir":
        plan = plan_safetensors(resolved.source)
        check_complete(plan.names, hf_config, resolved.source)
        return iterate_safetensors(plan, dtype, wanted, lazy=lazy)
    if resolved.kind == "gguf":
        reader = open_gguf(resolved.source)
        arch = gguf_architecture(reader, resolved.source)
        names = [n for n in (gguf_to_hf_name(t.name) for t in reader.tensors) if n is not None]
        check_complete(names, hf_config, resolved.source)
        return iterate_gguf(reader, resolved.source, arch, hf_config, dtype, wanted, keep_quantized)
    raise ModelLoadError(f"unknown model source kind {resolved.kind!r}")


def expected_weight_names(hf_config: Any) -> set[str] | None:
    """The HF tensor names a checkpoint of ``hf_config``'s architecture must contain, or None for an
    architecture this module does not know (then nothing is checked)."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs or archs[0] not in _DECODER_ARCHITECTURES:
        return None
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not getattr(hf_config, "tie_word_embeddings", False):
        names.add("lm_head.weight")
    qwen2 = archs[0] == "Qwen2ForCausalLM"
    attn_bias = qwen2 or bool(getattr(hf_config, "attention_bias", False))
    mlp_bias = bool(getattr(hf_config, "mlp_bias", False))
    for i in range(int(hf_config.num_hidden_layers)):
        p = f"model.layers.{i}."
        names |= {p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            names.add(f"{p}self_attn.{proj}.weight")
            if attn_bias and (proj != "o_proj" or not qwen2):
                names.add(f"{p}self_attn.{proj}.bias")
        for proj in ("gate_proj", "up_proj", "down_proj"):
            names.add(f"{p}mlp.{proj}.weight")
            if mlp_bias:
                names.add(f"{p}mlp.{proj}.bias")
    return names


def check_complete(names: list[str], hf_config: Any, source: str) -> None:
    """Raise ModelLoadError naming ``source`` if the checkpoint lacks tensors its architecture needs."""
    expected = expected_weight_names(hf_config)
    if expected is None:
        return
    missing = sorted(expected - set(names))
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint {source} is missing {len(missing)} tensor(s) that "
                             f"{hf_config.architectures[0]} needs: {shown}{more}")
