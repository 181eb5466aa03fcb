"""What happens to a model's weights between loading and the first step, shared by the target model (Worker)
and a draft model (spec_decode/draft_model.py).

``prepare_weights_`` in order: kept-quantized GGUF shards are packed (``finalize_quantized_``) or the float
weights quantized at load (int8, int4); kept-quantized weights get their float copies for large steps
(``add_dense_copies_``, when ``dense_min_rows`` > 0); Llama-family layers whose linears are all packed get
the one-op decode path; then either batch-invariant packing or oneDNN prepacking of the float weights.
"""

from __future__ import annotations

import logging

from torch import nn

from flotilla.layers.batch_invariant import make_batch_invariant_
from flotilla.layers.quant_weight import add_dense_copies_, finalize_quantized_
from flotilla.layers.quantization import prepack_model_, quantize_model_
from flotilla.ops import cpu_kernels, kernels_enabled, unavailable_reason

logger = logging.getLogger(__name__)


def can_keep_quantized(device, dtype: str) -> bool:
    """Whether GGUF blocks can stay quantized on ``device`` (the CPU kernels are on and built); otherwise
    they are dequantized to ``dtype`` at load, with a warning."""
    if device.type == "cpu" and cpu_kernels() is not None:
        return True
    logger.warning("GGUF weights are dequantized to %s: %s", dtype,
                   unavailable_reason() if device.type == "cpu" else f"no kernels for {device}")
    return False


def prepare_weights_(model: nn.Module, *, keep_quantized: bool, quantization: str | None, dense_min_rows: int,
                     batch_invariant: bool, prepack: bool = True, what: str = "model") -> None:
    """Prepare ``model``'s loaded weights in place (see the module docstring). ``keep_quantized``: the loader
    staged GGUF blocks (``quantization`` "gguf" with the CPU kernels available); ``quantization`` "int8" /
    "int4" quantizes float weights; ``dense_min_rows`` 0 keeps no float copy (else kept GGUF and int4 weights
    keep one for steps of at least that many tokens); ``prepack`` False leaves float
    weights for ``F.linear``."""
    if keep_quantized:
        logger.info("%s: GGUF weights kept quantized: %d weights packed", what, finalize_quantized_(model))
        if dense_min_rows > 0:
            count = add_dense_copies_(model, dense_min_rows)
            logger.info("%s: float copies of %d quantized weights for steps of >= %d tokens", what, count,
                        dense_min_rows)
    elif quantization in ("int8", "int4"):
        quantize_model_(model, quantization)
        if quantization == "int4" and dense_min_rows > 0:
            count = add_dense_copies_(model, dense_min_rows)
            logger.info("%s: float copies of %d int4 weights for steps of >= %d tokens", what, count, dense_min_rows)
    if (keep_quantized or quantization == "int4") and hasattr(model, "enable_fused_decode"):
        logger.info("%s: one-op decode layers: %d", what, model.enable_fused_decode())
    if batch_invariant:
        packed = make_batch_invariant_(model)  # instead of oneDNN's prepacking (its order depends on M)
        logger.info("%s: batch-invariant execution: %s", what, f"{packed} weights packed for the kernel" if packed
                    else "eager row-by-row fallback (no kernel library)")
    elif prepack and kernels_enabled():
        prepack_model_(model)  # CPU bfloat16 only; a no-op elsewhere
