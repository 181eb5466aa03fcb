"""Decode steps replayed from CUDA graphs (vLLM's full-graph decode; off with ``--enforce-eager``).

A decode step (one token per request, up to the largest capture size) runs the model's forward pass from a
graph captured once per batch size: the launch cost of hundreds of small kernels per step goes away, which is
what batch-1 decode on a GPU is bound by. The graph reads its inputs from static buffers: the step's token
ids, positions, cache slots, block tables and the attention backend's tiles are copied into them, the batch
is padded to the next captured size (padding rows write no cache slot and attend nothing) and the first rows
of the graph's output are the step's hidden states.

Contract: ``DecodeGraphs.run(inputs)`` returns what ``model(input_ids, positions, ctx, None)`` returns for a
decode step ``inputs`` that ``can_run`` accepts, with the attention backend's metadata built from the static
buffers (``TritonPagedAttentionBackend``: its forward reads the step only from device tensors). With
``capture=False`` the same buffers feed an eager forward pass (how the CPU tests check the padding and the
buffers; graphs need CUDA).
"""

from __future__ import annotations

import logging
import time

import torch

from flotilla.layers.attention import AttentionContext
from flotilla.layers.attention.triton_paged import TritonPagedMetadata

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, then every multiple of 8 up to ``max_num_seqs`` (at most 512), as vLLM's
    default; the largest is at least ``max_num_seqs`` rounded up (capped at 512)."""
    top = min(max(1, max_num_seqs), 512)
    sizes = [s for s in (1, 2, 4) if s < top] + list(range(8, top + 1, 8))
    if not sizes or sizes[-1] < top:
        sizes.append(top if top <= 4 else -(-top // 8) * 8)
    return sorted(set(sizes))


class DecodeGraphs:
    """Static input buffers and one captured forward pass per batch size (see the module docstring).

    ``max_blocks``: the most cache blocks a request can hold (max_model_len / block_size rounded up)."""

    def __init__(self, model: torch.nn.Module, backend, kv_caches, device: torch.device, sizes: list[int],
                 max_blocks: int, capture: bool = True):
        self.model, self.backend, self.kv_caches, self.device = model, backend, kv_caches, device
        self.sizes = sorted(sizes)
        self.max_blocks = max_blocks
        self.capture = capture
        n = self.sizes[-1]
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.long, device=device)
        # tiles (4, n): request, first token, tokens (0 = padding), first position; one token per tile
        self.tiles = torch.zeros(4, n, dtype=torch.int32, device=device)
        self.tiles[0] = self.tiles[1] = torch.arange(n, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph | None, torch.Tensor | None]] = {}
        self.pool = None

    def _ctx(self, b: int) -> AttentionContext:
        md = TritonPagedMetadata(self.slot_mapping[:b], self.block_tables[:b], self.tiles[:, :b], 1)
        return AttentionContext(self.backend, md, self.kv_caches)

    def _forward(self, b: int) -> torch.Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self._ctx(b), None)

    @torch.inference_mode()
    def capture_all(self) -> None:
        """Capture every size, largest first, in one memory pool (padding rows only: no cache slot is written).
        Each size runs once eagerly first (Triton compiles its kernels then, outside the capture)."""
        if not self.capture:
            return
        start = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.sizes):
            self.tiles[2, :b] = 0
            self._forward(b)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                hidden = self._forward(b)
            self.graphs[b] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        logger.info("captured %d CUDA graphs for decode batches up to %d in %.1f s", len(self.sizes), self.sizes[-1],
                    time.perf_counter() - start)

    def can_run(self, inputs) -> bool:
        """A decode-only step (every request one token) that fits the largest size and the block-table width."""
        common = inputs.common
        return (common.max_query_len == 1 and inputs.input_ids.numel() <= self.sizes[-1]
                and common.block_tables.shape[1] <= self.max_blocks)

    @torch.inference_mode()
    def run(self, inputs) -> torch.Tensor:
        """(T, hidden) for a decode step of T requests (``can_run``)."""
        common = inputs.common
        t = inputs.input_ids.numel()
        b = next(s for s in self.sizes if s >= t)
        nblk = common.block_tables.shape[1]
        self.input_ids[:t].copy_(inputs.input_ids, non_blocking=True)
        self.positions[:t].copy_(inputs.positions, non_blocking=True)
        self.slot_mapping[:t].copy_(common.slot_mapping, non_blocking=True)
        self.slot_mapping[t:b].fill_(-1)
        self.block_tables[:t, :nblk].copy_(common.block_tables, non_blocking=True)
        self.tiles[2, :t].fill_(1)
        self.tiles[2, t:b].fill_(0)
        self.tiles[3, :t].copy_(inputs.positions, non_blocking=True)  # a decode's position = its context length
        if not self.capture:
            return self._forward(b)[:t]
        graph, hidden = self.graphs[b]
        graph.replay()
        return hidden[:t]
