"""Sentence embeddings from an encoder's token states: pooling, Matryoshka truncation, L2 normalisation.

The modes are sentence-transformers' ``Pooling`` modes, computed the same way on packed tokens (no padding
enters any of them): ``cls`` (the first token), ``lasttoken``, ``mean``, ``mean_sqrt_len_tokens`` (the sum
over sqrt(length)), ``max`` and ``weightedmean`` (token i weighted i + 1). Several modes are concatenated in
the order given. Sums are accumulated in float32 whatever the model's dtype; outputs are float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flotilla.layers.attention.encoder import PackedSequences

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def pool(hidden: torch.Tensor, layout: PackedSequences, modes: tuple[str, ...]) -> torch.Tensor:
    """hidden (T, H) packed per ``layout`` -> (B, len(modes) * H) float32, the modes concatenated."""
    unknown = [m for m in modes if m not in POOLING_MODES]
    if not modes or unknown:
        raise ValueError(f"pooling modes must be among {POOLING_MODES}, got {modes}")
    b, width = layout.num_seqs, hidden.shape[-1]
    x = hidden.float()  # (T, H)
    seq_of_token = layout.seq_of_token  # (T,)
    lens = layout.seq_lens.to(torch.float32)[:, None]  # (B, 1)
    sums = None
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(x.index_select(0, layout.starts))  # (B, H)
        elif mode == "lasttoken":
            out.append(x.index_select(0, layout.starts + layout.seq_lens - 1))  # (B, H)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            if sums is None:
                sums = x.new_zeros(b, width).index_add_(0, seq_of_token, x)  # (B, H)
            out.append(sums / (lens if mode == "mean" else lens.sqrt()))
        elif mode == "max":
            init = x.new_full((b, width), float("-inf"))
            out.append(init.scatter_reduce(0, seq_of_token[:, None].expand(-1, width), x, reduce="amax"))
        else:  # weightedmean
            weights = (layout.positions + 1).to(torch.float32)[:, None]  # (T, 1)
            num = x.new_zeros(b, width).index_add_(0, seq_of_token, x * weights)  # (B, H)
            den = x.new_zeros(b, 1).index_add_(0, seq_of_token, weights)  # (B, 1)
            out.append(num / den)
    return torch.cat(out, dim=-1)  # (B, len(modes) * H)


def finish_embeddings(pooled: torch.Tensor, dimensions: list[int | None], normalize: list[bool]) -> list[torch.Tensor]:
    """Per row of ``pooled`` (B, D): keep the first ``dimensions[i]`` values (Matryoshka; None keeps all),
    then L2-normalise when ``normalize[i]``. Returns B float32 tensors of shape (dimensions[i] or D,)."""
    rows = []
    for row, dims, norm in zip(pooled, dimensions, normalize):
        row = row[:dims] if dims is not None else row  # (d,)
        rows.append(F.normalize(row, p=2, dim=-1) if norm else row)
    return rows
