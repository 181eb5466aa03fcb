"""Vocabulary-parallel token embedding and LM head (tied or not)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.distributed.parallel_state import get_tp_group
from flotilla.layers.quant_weight import is_quantized, stage
from flotilla.layers.quantization import linear


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows across TP ranks.

    Rank r holds rows [r*V/tp, (r+1)*V/tp) (the vocabulary is padded up to a multiple of tp); tokens of
    other ranks embed to zero locally and the all-reduce sums the one non-zero contribution.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32):
        super().__init__()
        self.tp = get_tp_group()
        self.num_embeddings = num_embeddings
        self.rows_per_rank = -(-num_embeddings // self.tp.world_size)
        self.vocab_start = self.tp.rank_in_group * self.rows_per_rank
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, embedding_dim, dtype=dtype),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if loaded.shape[1] != param.shape[1] or loaded.shape[0] != self.num_embeddings:
            raise ValueError(f"embedding: checkpoint has shape {tuple(loaded.shape)}, expected "
                             f"({self.num_embeddings}, {param.shape[1]})")
        start = min(self.vocab_start, self.num_embeddings)
        shard = loaded.narrow(0, start, min(self.rows_per_rank, self.num_embeddings - start))
        if is_quantized(shard):  # kept quantized (layers/quant_weight.py); padding rows stay zero
            stage(param, 0, shard)
        else:
            param.data[:shard.shape[0]].copy_(shard)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        qw = getattr(self, "quant_weight", None)
        if qw is not None:
            return qw.embedding(ids.reshape(-1)).view(*ids.shape, qw.cols)
        return F.embedding(ids, self.weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.world_size == 1:
            return self._lookup(input_ids)  # (num_tokens, hidden)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = self._lookup(local.masked_fill(outside, 0))
        out.masked_fill_(outside.unsqueeze(-1), 0.0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Output projection to vocabulary logits, sharded like the embedding; logits are all-gathered.

    With tied embeddings the model passes its embedding module and the head reuses its weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype=torch.float32,
                 tied_to: VocabParallelEmbedding | None = None):
        super().__init__(num_embeddings, embedding_dim, dtype=dtype)
        if tied_to is not None:
            self.weight = tied_to.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = linear(hidden, self)  # (num_seqs, V / tp)
        logits = self.tp.all_gather(logits, dim=-1)  # (num_seqs, padded V)
        return logits[..., :self.num_embeddings]
