"""DESIGN.md's oracle rule over whole greedy sequences, for tests that compare flotilla with transformers.

``check_against_oracle`` takes flotilla's greedy tokens and top-k logprobs for one prompt and the transformers
model (in the same dtype and with the same weights). The oracle is run teacher-forced on flotilla's own
sequence (one forward pass over prompt + generated tokens), so every position is compared under the same
prefix, not only the positions before the first divergence. At each position:

- the tokens are identical (flotilla's token is the oracle's argmax), or, where they diverge, each side's
  token is in the other side's top-5;
- the logprob flotilla reports for its token is within ``logprob_tol`` of the oracle's for that token.

It returns a ``SequenceCheck`` so a test can also bound how many positions diverged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

TOP_K = 5


@dataclass
class SequenceCheck:
    """One prompt's comparison: positions where the tokens differed and the largest logprob gap."""

    num_positions: int
    divergences: list[int] = field(default_factory=list)
    max_logprob_gap: float = 0.0
    sum_logprob_gap: float = 0.0


def oracle_logprobs(hf_model, prompt_ids: list[int], gen_ids: list[int]) -> torch.Tensor:
    """Teacher-forced log-softmax of the oracle: row t is the distribution that predicts ``gen_ids[t]``
    given ``prompt_ids + gen_ids[:t]``. -> (len(gen_ids), vocab) float32."""
    ids = torch.tensor([prompt_ids + gen_ids[:-1]])  # (1, P + G - 1)
    with torch.no_grad():
        logits = hf_model(ids).logits[0, len(prompt_ids) - 1:]  # (G, vocab)
    return torch.log_softmax(logits.float(), dim=-1)


def top_k_of(step: dict, k: int = TOP_K) -> set[int]:
    """Token ids of rank <= k in one position of flotilla's logprobs (``{token: Logprob}``)."""
    return {t for t, lp in step.items() if lp.rank is not None and lp.rank <= k}


def check_against_oracle(hf_model, prompt_ids: list[int], gen_ids: list[int], gen_logprobs: list[dict],
                         logprob_tol: float, label: str = "") -> SequenceCheck:
    """Apply the oracle rule at every generated position (see the module docstring); AssertionError naming
    the prompt and position on the first violation. ``gen_logprobs`` must hold at least the top-5."""
    assert len(gen_ids) == len(gen_logprobs) and gen_ids, f"{label}: no tokens or logprobs to compare"
    ref = oracle_logprobs(hf_model, prompt_ids, gen_ids)  # (G, vocab)
    ref_top = torch.topk(ref, TOP_K, dim=-1).indices.tolist()  # (G, 5)
    check = SequenceCheck(len(gen_ids))
    for t, (tok, step) in enumerate(zip(gen_ids, gen_logprobs)):
        mine = top_k_of(step)
        assert len(mine) >= TOP_K, f"{label} position {t}: flotilla returned only {len(mine)} top logprobs"
        oracle_tok = ref_top[t][0]
        if tok != oracle_tok:
            check.divergences.append(t)
            assert tok in ref_top[t] and oracle_tok in mine, (
                f"{label} position {t}: flotilla chose {tok}, the oracle {oracle_tok}; the oracle's top-5 "
                f"{ref_top[t]}, flotilla's {sorted(mine)}")
        gap = abs(step[tok].logprob - ref[t, tok].item())
        check.max_logprob_gap = max(check.max_logprob_gap, gap)
        check.sum_logprob_gap += gap
        assert gap <= logprob_tol, (f"{label} position {t}: token {tok} has logprob {step[tok].logprob:.5f} in "
                                    f"flotilla, {ref[t, tok].item():.5f} in the oracle (tolerance {logprob_tol})")
    return check


def check_outputs_against_oracle(hf_model, outputs, logprob_tol: float) -> list[SequenceCheck]:
    """``check_against_oracle`` for every ``RequestOutput`` of a greedy ``LLM.generate`` run with
    ``logprobs >= 5``."""
    checks = []
    for out in outputs:
        got = out.outputs[0]
        checks.append(check_against_oracle(hf_model, list(out.prompt_token_ids), list(got.token_ids),
                                           got.logprobs, logprob_tol, label=f"prompt {out.prompt!r}"))
    return checks


ACT_BLOCK = 32
# |flotilla - oracle| logprob of a kept-quantized model against the rounded-activation oracle. Float32 summation
# order alone leaves ~1e-6 (the tiny int4 Qwen2: 3e-6), but rounding is discontinuous: a last-bit difference
# moves an activation across a rounding step (a whole step d, large in the blocks of SmolLM2's outlier
# channels), and such flips compound over the layers. Measured up to 0.14 on SmolLM2 (mean 0.033, against
# 0.037 for the float model), 0.08 on Qwen2.5-Coder-0.5B, 0.02 on the tiny int4 Llama (mean 5e-4 against 0.05).
ROUNDED_LOGPROB_TOL = 0.3


def round_activations(x: torch.Tensor) -> torch.Tensor:
    """x (..., K) -> the activations the quantized-weight kernels multiply (flotilla/csrc/quant_matmul.cpp):
    per block of 32 values, llama.cpp's int8 rounding h (step d = max|x| / 127), then the float32 residual
    rounded in steps of d / 255 (l, clamped to [-127, 127]): (d / 255) * (255 h + l), in float32. K must be a
    multiple of 32."""
    shape = x.shape
    xb = x.float().reshape(-1, shape[-1] // ACT_BLOCK, ACT_BLOCK)  # (rows, blocks, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    d = amax / 127.0
    h = torch.round(xb * inv)
    low = torch.clamp(torch.round((xb - h * d) * (inv * 255.0)), -127, 127)
    return ((255.0 * h + low) * (d / 255.0)).reshape(shape).to(x.dtype)


@contextmanager
def rounded_activations(hf_model, module_names):
    """Inside the block, the inputs of ``hf_model``'s linear modules named in ``module_names`` (e.g.
    ``model.layers.0.self_attn.q_proj``, ``lm_head``) are rounded as ``round_activations``: with the weights
    the quantized file's values (dequantized), the oracle of flotilla's kept-quantized path up to float32
    summation order."""
    modules = dict(hf_model.named_modules())
    missing = sorted(set(module_names) - set(modules))
    assert not missing, f"no such modules in the oracle: {missing[:5]}"
    hooks = [modules[name].register_forward_pre_hook(lambda _m, args: (round_activations(args[0]), *args[1:]))
             for name in module_names]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def packed_linear_names(reader, hf_model) -> list[str]:
    """The oracle's linear modules whose weights flotilla keeps quantized for the GGUF file ``reader``
    (``gguf_file.open_gguf``): matmul weights of a type with a packed layout; the LM head is the token
    embedding when the file has no ``output.weight`` (tied). The others run float weights on both sides."""
    from flotilla.layers.quant_weight import PACKED_TYPES
    from flotilla.models.loader import gguf_to_hf_name
    types = {gguf_to_hf_name(t.name): int(t.tensor_type) for t in reader.tensors}
    types.setdefault("lm_head.weight", types["model.embed_tokens.weight"])
    linears = {name for name, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(name for name in linears if types.get(f"{name}.weight") in PACKED_TYPES)
