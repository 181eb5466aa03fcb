"""Linear layers that own their tensor-parallel sharding.

Each parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that copies only this
rank's shard of a full (unsharded) checkpoint tensor, so models load weights without knowing the TP size.
At TP size 1 each layer is a plain ``F.linear`` (or the int8 kernel once quantized, layers/quantization.py).
A GGUF weight kept quantized (``QuantTensor``, layers/quant_weight.py) is narrowed the same way and staged on
the parameter at its row offset instead of copied; ``finalize_quantized_`` packs it after loading.
"""

from __future__ import annotations

import torch
from torch import nn

from flotilla.distributed.parallel_state import get_tp_group
from flotilla.layers.batch_invariant import ordered_all_reduce
from flotilla.layers.quant_weight import is_quantized, stage
from flotilla.layers.quantization import linear


def _param(shape: tuple[int, ...], dtype: torch.dtype, loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.weight_loader = loader
    return p


def full_tensor(loaded) -> torch.Tensor:
    """The whole checkpoint tensor: lazily read values (``materialize()``) are read completely here."""
    return loaded.materialize() if hasattr(loaded, "materialize") else loaded


def _check_shape(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(loaded.shape)}, "
                         f"parameter expects {tuple(param.shape)}")


def _store(param: nn.Parameter, row_offset: int, shard) -> None:
    """Rows ``row_offset ..`` of ``param`` := ``shard`` (a quantized shard is staged, not copied)."""
    if is_quantized(shard):
        stage(param, row_offset, shard)
    else:
        param.data.narrow(0, row_offset, shard.shape[0]).copy_(shard)


class ReplicatedLinear(nn.Module):
    """y = x W^T + b with the full weight on every rank."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.weight = _param((output_size, input_size), dtype, self.weight_loader)
        self.bias = _param((output_size,), dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        loaded = full_tensor(loaded)
        _check_shape(param, loaded, type(self).__name__)
        _store(param, 0, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split across TP ranks: rank r holds rows [r*out/tp, (r+1)*out/tp) of W.

    Output of ``forward`` is this rank's slice (num_tokens, output_size / tp) unless ``gather_output``.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, gather_output: bool = False,
                 dtype=torch.float32):
        super().__init__()
        self.tp = get_tp_group()
        if output_size % self.tp.world_size:
            raise ValueError(f"output size {output_size} is not divisible by TP size {self.tp.world_size}")
        self.output_size_per_rank = output_size // self.tp.world_size
        self.gather_output = gather_output
        self.weight = _param((self.output_size_per_rank, input_size), dtype, self.weight_loader)
        self.bias = _param((self.output_size_per_rank,), dtype, self.weight_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        shard = loaded.narrow(0, self.tp.rank_in_group * size, size)
        _check_shape(param, shard, type(self).__name__)
        _store(param, 0, shard)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self, self.bias)  # (num_tokens, out / tp)
        return self.tp.all_gather(y, dim=-1) if self.gather_output else y


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul (e.g. gate and up).

    ``shard_id`` i in the weight loader names which of ``output_sizes`` the checkpoint tensor is.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, dtype=torch.float32):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            return super().weight_loader(param, loaded)
        tp_size, rank = self.tp.world_size, self.tp.rank_in_group
        offset = sum(self.output_sizes[:shard_id]) // tp_size
        size = self.output_sizes[shard_id] // tp_size
        shard = loaded.narrow(0, rank * size, size)
        target = param.data.narrow(0, offset, size)
        _check_shape(target, shard, f"{type(self).__name__}[{shard_id}]")
        _store(param, offset, shard)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projections, sharded by attention head (GQA-aware).

    Query heads split evenly across ranks; when there are fewer KV heads than ranks each KV head is
    replicated on ``tp / num_kv_heads`` ranks. Output per rank: (num_tokens, (h + 2 * kvh) * head_dim) with
    h = heads / tp and kvh = max(1, kv_heads / tp).
    """

    def __init__(self, hidden_size: int, head_dim: int, total_num_heads: int, total_num_kv_heads: int,
                 bias: bool = False, dtype=torch.float32):
        tp_size = get_tp_group().world_size
        if total_num_heads % tp_size:
            raise ValueError(f"{total_num_heads} attention heads are not divisible by TP size {tp_size}")
        if total_num_kv_heads >= tp_size and total_num_kv_heads % tp_size:
            raise ValueError(f"{total_num_kv_heads} KV heads are not divisible by TP size {tp_size}")
        if total_num_kv_heads < tp_size and tp_size % total_num_kv_heads:
            raise ValueError(f"TP size {tp_size} is not a multiple of the {total_num_kv_heads} KV heads")
        self.head_dim = head_dim
        self.num_heads = total_num_heads // tp_size
        self.num_kv_heads = max(1, total_num_kv_heads // tp_size)
        self.kv_replicas = max(1, tp_size // total_num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp_size
        super().__init__(hidden_size, out, bias=bias, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        rank = self.tp.rank_in_group
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, start = 0, q_size, rank * q_size
        elif shard_id in ("k", "v"):
            offset = q_size + (kv_size if shard_id == "v" else 0)
            size, start = kv_size, (rank // self.kv_replicas) * kv_size
        else:
            raise ValueError(f"QKVParallelLinear needs shard_id 'q', 'k' or 'v', got {shard_id!r}")
        target = param.data.narrow(0, offset, size)
        shard = loaded.narrow(0, start, size)
        _check_shape(target, shard, f"QKVParallelLinear[{shard_id}]")
        _store(param, offset, shard)


class RowParallelLinear(nn.Module):
    """Input features split across TP ranks; partial products are summed with an all-reduce.

    Takes this rank's input slice (num_tokens, input_size / tp) and returns the full output on every rank.
    The bias is added once, after the reduction. In batch-invariant mode the partial sums are added in rank
    order (``ordered_all_reduce``).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = False, dtype=torch.float32):
        super().__init__()
        self.tp = get_tp_group()
        if input_size % self.tp.world_size:
            raise ValueError(f"input size {input_size} is not divisible by TP size {self.tp.world_size}")
        self.input_size_per_rank = input_size // self.tp.world_size
        self.weight = _param((output_size, self.input_size_per_rank), dtype, self.weight_loader)
        self.bias = _param((output_size,), dtype, self._bias_loader) if bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[1]
        shard = loaded.narrow(1, self.tp.rank_in_group * size, size)  # dequantized unless on block boundaries
        _check_shape(param, shard, type(self).__name__)
        _store(param, 0, shard)

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        loaded = full_tensor(loaded)
        _check_shape(param, loaded, type(self).__name__ + ".bias")
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self)  # (num_tokens, out), this rank's partial sum
        y = ordered_all_reduce(self.tp, y) if getattr(self, "batch_invariant", False) else self.tp.all_reduce(y)
        return y + self.bias if self.bias is not None else y
