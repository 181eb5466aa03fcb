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

from dataclasses import dataclass, field

import torch

TOP_K = 5


@dataclass
class SequenceCheck:
    """One prompt's comparison: positions where the tokens differed and the largest logprob gap."""

    num_positions: int
    divergences: list[int] = field(default_factory=list)
    max_logprob_gap: float = 0.0


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
