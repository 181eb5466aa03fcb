"""Weights kept quantized: GGUF blocks (or int4 blocks made at load) run by flotilla's int8-activation kernels.

Flow (``--quantization gguf``, the default for GGUF files on the CPU):

1. The GGUF loader yields a ``QuantTensor`` (the raw blocks of one 2-D tensor) instead of a dequantized one.
2. A layer's weight loader narrows it to this rank's shard like any tensor (rows always; columns only on
   block boundaries, else the shard is dequantized) and ``stage``s it on the parameter at its row offset, so a
   fused q/k/v or gate/up weight may mix types (Q4_K_M files put q in Q5_0 and v in Q8_0).
3. ``finalize_quantized_(model)`` packs each staged parameter into a ``QuantizedWeight`` (module attribute
   ``quant_weight``, shared by a tied embedding and LM head), rows without a quantized shard kept dense, and
   frees the float parameter.

``QuantizedWeight.matmul`` runs ``torch.ops.flotilla.quant_matmul`` (flotilla/csrc/quant_matmul.cpp: the
weight stays 4-8 bits; activations are quantized to int8 per block of 32, as llama.cpp does). The packed
layout (flotilla/csrc/quant.h) dequantizes to exactly the GGUF values; ``dequantize_packed`` is its eager
PyTorch reading, used when the kernel library is switched off after load and by the tests.

Per-step choice of kernel (``add_dense_copies_``, vLLM's GGUF path does the same on CUDA): the int8 kernels
read a quarter of bfloat16's bytes, which wins where a step is bound by memory bandwidth (decode with few
requests), but at many rows per step a bfloat16 matmul computes faster than they do (3.4x at 256 rows on an
AVX-512-BF16 CPU, benchmarks/RESULTS.md). So a weight may also hold a float copy of its dequantized values
(oneDNN-prepacked on bfloat16 CPUs), and a matmul of at least ``dense_min_rows`` rows uses it. Both readings
multiply the same GGUF values; they differ by the int8 activation rounding (see quant_matmul.cpp) and the float
copy's rounding to ``dtype``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flotilla.layers import torch_compat
from flotilla.ops import switched_off, use_kernels

logger = logging.getLogger(__name__)

# GGML type id -> (values per block, bytes per block) of the types with a packed layout (quant.h).
PACKED_TYPES = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144), 13: (256, 176),
                14: (256, 210)}
TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}
ROWS = 16  # rows per packed group


@dataclass(frozen=True)
class QuantTensor:
    """The raw GGUF blocks of a 2-D tensor (rows, cols): ``data`` (rows, row_bytes) uint8, each row whole
    blocks of GGML type ``qtype``. ``dequantizer(raw 1-D uint8, qtype, dtype) -> values 1-D`` is the loader's
    (gguf_dequant.dequantize), passed in so this layer does not import the loader."""

    qtype: int
    data: torch.Tensor
    cols: int
    dequantizer: Callable[[torch.Tensor, int, torch.dtype], torch.Tensor]

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.data.shape[0], self.cols))

    @property
    def block(self) -> int:
        return PACKED_TYPES[self.qtype][0]

    def narrow(self, dim: int, start: int, length: int) -> QuantTensor | torch.Tensor:
        """Rows ``start:start+length`` (dim 0), or columns (dim 1): quantized where the columns are whole
        blocks, else the dequantized float32 columns."""
        if dim == 0:
            return QuantTensor(self.qtype, self.data.narrow(0, start, length), self.cols, self.dequantizer)
        block, size = PACKED_TYPES[self.qtype]
        if start % block or length % block:
            return self.dequantize(torch.float32).narrow(1, start, length)
        data = self.data.narrow(1, start // block * size, length // block * size)
        return QuantTensor(self.qtype, data, length, self.dequantizer)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The values (rows, cols) in ``dtype``, exactly as the GGUF loader dequantizes them."""
        return self.dequantizer(self.data.contiguous().view(-1), self.qtype, dtype).view(self.shape)


def is_quantized(t) -> bool:
    return isinstance(t, QuantTensor)


def stage(param: nn.Parameter, row_offset: int, qt: QuantTensor) -> None:
    """Record ``qt`` as rows ``row_offset ..`` of ``param`` (packed by ``finalize_quantized_``)."""
    if qt.cols != param.shape[1] or row_offset + qt.shape[0] > param.shape[0]:
        raise ValueError(f"quantized shard {tuple(qt.shape)} at row {row_offset} does not fit the parameter "
                         f"{tuple(param.shape)}")
    staged = getattr(param, "quant_staged", None)
    if staged is None:
        staged = param.quant_staged = []
    staged.append((row_offset, qt))


@dataclass
class Segment:
    """Rows ``start:stop`` of a weight: ``packed`` uint8 of GGML type ``qtype``, or ``dense`` (rows, cols)."""

    start: int
    stop: int
    qtype: int | None = None
    packed: torch.Tensor | None = None
    dense: torch.Tensor | None = None


class QuantizedWeight:
    """A (rows, cols) weight as row segments, each packed (one GGML type) or dense; activations in ``dtype``.

    ``matmul(x (..., cols)) -> (..., rows)``, ``embedding(ids (n,)) -> (n, cols)`` and ``dequantize()``.
    """

    def __init__(self, rows: int, cols: int, segments: list[Segment], dtype: torch.dtype):
        self.rows, self.cols, self.segments, self.dtype = rows, cols, segments, dtype
        # the float copy for large steps (set_dense): (rows, cols) in dtype, oneDNN-prepacked or plain
        self.dense: torch.Tensor | None = None
        self.dense_prepacked = False
        self.dense_min_rows = 0  # matmuls of at least this many rows use ``dense`` (when it is set)
        only = segments[0] if len(segments) == 1 and segments[0].packed is not None else None
        ops = use_kernels(only.packed) if only is not None else None
        # the decode path: one op, the kernel library bound once (packing needed it, so it is loaded)
        self._one = (ops.quant_linear, only.packed, only.qtype) if ops is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes of the quantized segments (the float copy, if any, is ``dense_nbytes``)."""
        return sum((s.packed if s.packed is not None else s.dense).nbytes for s in self.segments)

    @property
    def dense_nbytes(self) -> int:
        return 0 if self.dense is None else self.rows * self.cols * self.dense.element_size()

    def set_dense(self, min_rows: int) -> None:
        """Keep a float copy (dtype) of the weight for matmuls of at least ``min_rows`` rows (>= 1)."""
        if min_rows < 1:
            raise ValueError(f"min_rows must be >= 1, got {min_rows}")
        from flotilla.layers.quantization import prepack_supported
        w = self.dequantize(self.dtype)  # (rows, cols)
        packed = torch_compat.onednn_prepack(w, 64) if prepack_supported(self.dtype, w.device) else None
        self.dense, self.dense_prepacked = (packed, True) if packed is not None else (w, False)
        self.dense_min_rows = min_rows

    def uses_dense(self, rows: int) -> bool:
        """Whether a matmul of ``rows`` rows multiplies the float copy."""
        return self.dense is not None and rows >= self.dense_min_rows and not switched_off()

    def _dense_mm(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols)  # (M, cols)
        if self.dense_prepacked and x2.dtype == self.dtype:
            y = torch_compat.onednn_linear(x2, self.dense, bias)
        else:
            y = F.linear(x2, self.dense.to(x2.dtype), bias)
        return y.view(*lead, self.rows)

    def describe(self) -> str:
        return "+".join(TYPE_NAMES[s.qtype] if s.qtype is not None else str(s.dense.dtype).removeprefix("torch.")
                        for s in self.segments)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W^T (+ bias)``: x (..., cols) -> (..., rows) in x's dtype."""
        if self.dense is not None and self.uses_dense(x.numel() // self.cols):
            return self._dense_mm(x, bias)
        if self._one is not None and not switched_off():
            op, packed, qtype = self._one
            return op(x, packed, qtype, self.rows, bias)
        ops = use_kernels(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.cols)  # (M, cols)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if len(self.segments) == 1:
            y = self._segment_mm(ops, self.segments[0], x2, None)
        else:
            y = x2.new_empty(x2.shape[0], self.rows)  # (M, rows)
            for seg in self.segments:
                self._segment_mm(ops, seg, x2, y[:, seg.start:seg.stop])
        y = y.view(*lead, self.rows)
        return y if bias is None else y + bias

    @staticmethod
    def _segment_mm(ops, seg: Segment, x2: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        n = seg.stop - seg.start
        if seg.dense is not None:
            y = F.linear(x2, seg.dense)
        elif ops is not None:
            y = out if out is not None else x2.new_empty(x2.shape[0], n)
            ops.quant_matmul(y, x2, seg.packed, seg.qtype, n)
            return y
        else:  # kernels switched off after load: the eager reading of the packed layout
            y = F.linear(x2, dequantize_packed(seg.packed, seg.qtype, n, x2.shape[1]).to(x2.dtype))
        if out is not None:
            out.copy_(y)
            return out
        return y

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (n,) (each in [0, rows)) dequantized to ``dtype``: (n, cols)."""
        out = torch.empty(ids.shape[0], self.cols, dtype=self.dtype)
        ops = use_kernels(ids)
        for seg in self.segments:
            inside = (ids >= seg.start) & (ids < seg.stop)
            local = (ids[inside] - seg.start).long()
            if seg.dense is not None:
                out[inside] = seg.dense[local]
            elif ops is not None:
                rows = torch.empty(local.shape[0], self.cols, dtype=self.dtype)
                ops.quant_dequantize(rows, seg.packed, seg.qtype, self.cols, local)
                out[inside] = rows
            else:
                full = dequantize_packed(seg.packed, seg.qtype, seg.stop - seg.start, self.cols)
                out[inside] = full[local].to(self.dtype)
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole weight (rows, cols) in ``dtype``: by the kernel library's ``quant_dequantize`` when it is
        on (a third of the eager reading's time; it runs for every weight that gets a float copy at load), else
        by ``dequantize_packed``; the same values either way."""
        ops = use_kernels(torch.empty(0))
        out = torch.empty(self.rows, self.cols, dtype=dtype)
        for seg in self.segments:
            part = out[seg.start:seg.stop]
            if seg.dense is not None:
                part.copy_(seg.dense)
            elif ops is not None:
                ops.quant_dequantize(part, seg.packed, seg.qtype, self.cols, None)  # rows 0 .. n - 1
            else:
                part.copy_(dequantize_packed(seg.packed, seg.qtype, seg.stop - seg.start, self.cols))
        return out


# ---- packing ---------------------------------------------------------------------------------------------

def pack(qt: QuantTensor) -> torch.Tensor:
    """``qt`` in the packed layout (flotilla/csrc/quant.h); needs the kernel library."""
    ops = use_kernels(qt.data)
    if ops is None:
        raise RuntimeError("packing quantized weights needs flotilla's CPU kernels")
    return ops.quant_pack(qt.data.contiguous().view(-1), qt.qtype, qt.shape[0], qt.cols)


def _segments(param: nn.Parameter, staged: list[tuple[int, QuantTensor]], can_pack: bool) -> list[Segment]:
    """Row segments covering the parameter: staged shards (adjacent ones of one type merged) packed, the rows
    between them dense (copies of what the float loader wrote there)."""
    rows, cols = param.shape
    staged = sorted(staged, key=lambda s: s[0])
    merged: list[tuple[int, int, int, list[torch.Tensor], QuantTensor]] = []
    for start, qt in staged:
        stop = start + qt.shape[0]
        if merged and merged[-1][1] == start and merged[-1][2] == qt.qtype:
            merged[-1] = (merged[-1][0], stop, qt.qtype, merged[-1][3] + [qt.data], qt)
        else:
            if merged and start < merged[-1][1]:
                raise ValueError(f"quantized shards overlap at row {start}")
            merged.append((start, stop, qt.qtype, [qt.data], qt))
    segments, row = [], 0
    for start, stop, qtype, datas, proto in merged:
        if start > row:
            segments.append(Segment(row, start, dense=param.data[row:start].clone()))
        qt = QuantTensor(qtype, torch.cat(datas) if len(datas) > 1 else datas[0], cols, proto.dequantizer)
        if can_pack:
            segments.append(Segment(start, stop, qtype=qtype, packed=pack(qt)))
        else:
            segments.append(Segment(start, stop, dense=qt.dequantize(param.dtype)))
        row = stop
    if row < rows:
        segments.append(Segment(row, rows, dense=param.data[row:].clone()))
    return segments


def finalize_quantized_(model: nn.Module) -> int:
    """Turn every parameter with staged quantized shards into a ``QuantizedWeight`` on the modules that own it
    (``quant_weight``) and free the float parameter; returns how many weights were packed. Without the kernel
    library the shards are dequantized into the parameter instead (a warning)."""
    can_pack = use_kernels(torch.empty(0)) is not None
    built: dict[int, QuantizedWeight] = {}
    for module in model.modules():
        param = module._parameters.get("weight")
        if param is None:
            continue
        staged = getattr(param, "quant_staged", None)
        if not staged and id(param) not in built:
            continue
        if id(param) not in built:
            segments = _segments(param, staged, can_pack)
            del param.quant_staged
            if not can_pack:
                param.data.copy_(torch.cat([s.dense for s in segments]))
                logger.warning("flotilla's CPU kernels are unavailable: quantized weights are dequantized")
                built[id(param)] = None
                continue
            built[id(param)] = QuantizedWeight(param.shape[0], param.shape[1], segments, param.dtype)
            param.data = torch.empty(0, dtype=param.dtype)
        if built[id(param)] is not None:
            module.quant_weight = built[id(param)]
    return sum(1 for w in built.values() if w is not None)


# Steps of at least this many tokens multiply the float copies by default (``auto_dense_min_rows``): where the
# int8 kernels (two activation levels per token) stop beating oneDNN's bfloat16 matmul. Measured on an AMD EPYC
# with AVX-512 VNNI + BF16 (benchmarks/RESULTS.md, "Verification steps"): Q4_1 layers of SmolLM2 and
# Qwen2.5-1.5B, quantized/bfloat16 time 0.26-0.40 at 1 row, 0.82-0.86 at 5, 0.93-1.00 at 8, 0.90-1.14 at 12,
# 1.3-1.8 at 16 and more. CPUs without AVX512_BF16 convert bfloat16 in software, which moves the crossover up.
DENSE_MIN_ROWS_BF16 = 8
DENSE_MIN_ROWS_OTHER = 8
_ISA_AVX512_BF16 = 3  # flotilla::isa::kAvx512Bf16 (csrc/isa.h)


def auto_dense_min_rows() -> int:
    """The default step size (tokens) from which kept-quantized weights multiply their float copies on this CPU."""
    ops = use_kernels(torch.empty(0))
    level = int(ops.isa_detected()) if ops is not None else 0
    return DENSE_MIN_ROWS_BF16 if level >= _ISA_AVX512_BF16 else DENSE_MIN_ROWS_OTHER


def add_dense_copies_(model: nn.Module, min_rows: int) -> int:
    """Give every kept-quantized weight that a linear layer or the LM head multiplies a float copy for matmuls
    of at least ``min_rows`` rows (``QuantizedWeight.set_dense``); returns how many got one. An embedding-only
    weight gets none (lookups read the quantized rows)."""
    from flotilla.layers.embedding import ParallelLMHead
    from flotilla.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear
    done: set[int] = set()
    for module in model.modules():
        qw = getattr(module, "quant_weight", None)
        if qw is None or id(qw) in done or not isinstance(
                module, (ReplicatedLinear, ColumnParallelLinear, RowParallelLinear, ParallelLMHead)):
            continue
        qw.set_dense(min_rows)
        done.add(id(qw))
    return len(done)


# ---- the eager reading of the packed layout (flotilla/csrc/quant.h) ---------------------------------------

# GGML type id -> (bits, o, scheme, has_min); scheme 0: d (and m) per block, 1: K-quant d/dmin + u8 sc/mn,
# 2: Q6_K d + int8 sc per 16 values.
_TRAITS = {2: (4, 8, 0, False), 3: (4, 0, 0, True), 6: (5, 16, 0, False), 7: (5, 0, 0, True),
           8: (8, 128, 0, False), 12: (4, 0, 1, True), 13: (5, 0, 1, True), 14: (6, 32, 2, False)}


def _layout(qtype: int, cols: int) -> dict[str, int]:
    """Byte offsets of one group's parts, as quant.h's ``layout``."""
    bits, _, scheme, has_min = _TRAITS[qtype]
    nb, nsb = cols // 32, cols // 256
    vb = 512 if bits == 8 else 256 + 64 * (bits - 4)
    out = {"vb": vb, "d": nb * vb}
    pos = out["d"]
    if scheme == 0:
        pos += nb * ROWS * 2
        if has_min:
            out["m"], pos = pos, pos + nb * ROWS * 2
    elif scheme == 1:
        pos += nsb * ROWS * 2
        out["m"], pos = pos, pos + nsb * ROWS * 2
        out["sc"], pos = pos, pos + nb * ROWS
        out["mn"], pos = pos, pos + nb * ROWS
    else:
        pos += nsb * ROWS * 2
        out["sc"], pos = pos, pos + cols // 16 * ROWS
    out["group"] = -(-pos // 64) * 64
    return out


def _field(g: torch.Tensor, start: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """(groups, count, 16) of ``dtype`` at byte ``start`` of every group ``g`` (groups, group_bytes)."""
    size = torch.empty((), dtype=dtype).element_size()
    return g[:, start:start + count * ROWS * size].contiguous().view(dtype).view(g.shape[0], count, ROWS)


def _per_row(t: torch.Tensor) -> torch.Tensor:
    """(groups, count, 16) -> (groups * 16, count) float32: one row per weight row."""
    return t.permute(0, 2, 1).reshape(-1, t.shape[1]).float()


def dequantize_packed(packed: torch.Tensor, qtype: int, rows: int, cols: int) -> torch.Tensor:
    """The float32 values (rows, cols) of a packed weight, in PyTorch: quant.h's formula, op for op."""
    bits, offset, scheme, has_min = _TRAITS[qtype]
    lay = _layout(qtype, cols)
    g = packed.view(-1, lay["group"])                                    # (groups, group_bytes)
    groups, nb = g.shape[0], cols // 32
    vals = g[:, :nb * lay["vb"]].reshape(groups, nb, lay["vb"])
    if bits == 8:
        u = vals.reshape(groups, nb, 8, ROWS, 4)                          # (g, block, i, row, b): column 4 i + b
    else:
        low = vals[:, :, :256].reshape(groups, nb, 4, ROWS, 4)            # (g, block, vector, row, byte b)
        u = torch.cat([low & 0xF, low >> 4], dim=2).to(torch.int32)      # (g, block, i, row, b)
        if bits == 6:   # plane vector i // 4, bits 2 (i % 4) and up
            plane = vals[:, :, 256:384].reshape(groups, nb, 2, 1, ROWS, 4).to(torch.int32)
            hi = (plane >> torch.arange(0, 8, 2, dtype=torch.int32).view(1, 1, 1, 4, 1, 1)) & 3
            u = u | (hi.reshape(groups, nb, 8, ROWS, 4) << 4)
        elif bits == 5:  # bit i of the plane
            plane = vals[:, :, 256:320].reshape(groups, nb, 1, ROWS, 4).to(torch.int32)
            u = u | (((plane >> torch.arange(8, dtype=torch.int32).view(1, 1, 8, 1, 1)) & 1) << 4)
    u = u.permute(0, 3, 1, 2, 4)                                          # (g, row, block, i, b)
    q = (u.reshape(groups * ROWS, cols).to(torch.int32) - offset).float()  # (rows_padded, cols)
    if scheme == 2:
        d = _per_row(_field(g, lay["d"], cols // 256, torch.float16)).repeat_interleave(16, dim=1)
        s = d * _per_row(_field(g, lay["sc"], cols // 16, torch.int8))  # (rows_padded, cols / 16)
        w = (q.view(-1, cols // 16, 16) * s.unsqueeze(-1)).view(-1, cols)
        return w[:rows]
    if scheme == 0:
        s = _per_row(_field(g, lay["d"], nb, torch.float16))            # (rows_padded, blocks)
        mb = _per_row(_field(g, lay["m"], nb, torch.float16)) if has_min else None
    else:
        d = _per_row(_field(g, lay["d"], cols // 256, torch.float16)).repeat_interleave(8, dim=1)
        dmin = _per_row(_field(g, lay["m"], cols // 256, torch.float16)).repeat_interleave(8, dim=1)
        s = d * _per_row(_field(g, lay["sc"], nb, torch.uint8))
        mb = -(dmin * _per_row(_field(g, lay["mn"], nb, torch.uint8)))
    w = q.view(-1, nb, 32) * s.unsqueeze(-1)
    if mb is not None:
        w = w + mb.unsqueeze(-1)
    return w.view(-1, cols)[:rows]
