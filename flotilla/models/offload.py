"""Weight offload: decoder layers whose weights are not resident all the time, streamed in ahead of use.

Two modes (``OffloadConfig``) share one mechanism, ``LayerStream``:

- ``max_resident_weights`` (GiB, CPU; ``--max-resident-weights``): the streamed layers' weights stay in the model
  file, memory-mapped (safetensors' ``safe_open``, GGUF's map; ``loader.layer_reader``). Ahead of use a layer
  is *materialised* into a slot buffer: read, converted to the model's dtype (a GGUF tensor dequantized), fused
  by the same weight loaders as at start-up, so it computes exactly what the resident model computes. After use
  its parameters are dropped again. At most ``fixed + slots * layer`` bytes of weights exist at once (the
  file's bytes are in the page cache, which the kernel reclaims: a model larger than RAM still serves).
- ``cpu_offload_gb`` (GiB, vLLM's ``--cpu-offload-gb``): that many GiB of the weights (whole decoder layers,
  the first ones, as vLLM) live in a host copy, pinned on CUDA, and are copied into a slot on the device ahead
  of use: on CUDA by ``non_blocking`` copies on a side stream, ordered by events (a slot is refilled only after
  the compute stream is done with it); on the CPU by a background thread (the host copy is a separate tensor).

Order: the streamed layers are the first K of the model. With S slots (2, or 1 where only one fits), while a
layer runs the next streamed layer is being filled; after the last streamed layer of a forward pass the first
is filled for the next pass (cyclic), overlapping the resident layers, the sampler and the scheduler.

A streamed layer is replaced in ``model.model.layers`` by a ``StreamedLayer`` proxy that holds the real layer
unregistered, so ``model.parameters()``, prepacking, quantization and the fused decode path
(``enable_fused_decode``) never see its weights; it runs the layer's own modules (the fused one-op decode layer is
not used for streamed layers). Tensor/pipeline parallelism, quantization, batch-invariant mode and a draft model
are refused with offload by ``EngineArgs``.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from flotilla.config import OffloadConfig
from flotilla.errors import ModelLoadError
from flotilla.models.loader.layer_reader import LayerReader, layer_of
from flotilla.models.weights import load_named_weights

logger = logging.getLogger(__name__)

GiB = 1 << 30


@dataclass(frozen=True)
class OffloadPlan:
    """Which decoder layers are streamed (global indices, in run order) through how many slots.

    ``from_file``: layers are materialised from the model file (``max_resident_weights``), else copied from a
    host copy (``cpu_offload_gb``). ``layer_bytes``: one decoder layer's weights; ``fixed_bytes``: every weight
    that is always resident (embeddings, head, final norm, the layers not streamed).
    """

    streamed: tuple[int, ...]
    num_slots: int
    layer_bytes: int
    fixed_bytes: int
    from_file: bool

    @property
    def resident_bytes(self) -> int:
        """The most weight bytes that exist at once (outside the file / host copy)."""
        return self.fixed_bytes + self.num_slots * self.layer_bytes


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def plan_offload(model: nn.Module, config: OffloadConfig) -> OffloadPlan | None:
    """The plan for ``model`` (a Llama-family ``*ForCausalLM``, freshly built) under ``config``; None when
    nothing is offloaded (off, or the budget holds every weight). ModelLoadError when the budget cannot hold the
    always-resident weights plus one layer (the message names the minimum)."""
    if not config.enabled:
        return None
    if not hasattr(model, "local_layer_indices") or not hasattr(model, "stacked_params"):
        raise ModelLoadError(f"weight offload supports the Llama-family decoders, not {type(model).__name__}")
    local = list(model.local_layer_indices)
    layers = [model.model.layers[i] for i in local]
    shapes = [[(n, p.shape, p.dtype) for n, p in layer.named_parameters()] for layer in layers]
    if any(s != shapes[0] for s in shapes):
        raise ModelLoadError("weight offload needs decoder layers of one shape; this model's layers differ")
    layer_bytes = _param_bytes(layers[0])
    other_bytes = _param_bytes(model) - len(layers) * layer_bytes  # embeddings, head, final norm (tied once)
    if config.max_resident_weights is not None:
        budget = int(config.max_resident_weights * GiB)
        if budget >= other_bytes + len(layers) * layer_bytes:
            logger.info("max_resident_weights %.3g GiB holds every weight (%.3g GiB): nothing is offloaded",
                        config.max_resident_weights, (other_bytes + len(layers) * layer_bytes) / GiB)
            return None
        fit = (budget - other_bytes) // layer_bytes if budget > other_bytes else 0
        if fit < 1:
            need = (other_bytes + layer_bytes) / GiB
            raise ModelLoadError(f"max_resident_weights {config.max_resident_weights:g} GiB cannot hold this model's "
                                 f"embeddings, head and norm ({other_bytes / GiB:.3g} GiB) plus one decoder layer "
                                 f"({layer_bytes / GiB:.3g} GiB): give at least {math.ceil(need * 1000) / 1000:g} GiB")
        slots = 1 if fit == 1 else 2
        num_streamed = len(layers) - (fit - slots)
        from_file = True
    else:
        num_streamed = min(len(layers), math.ceil(config.cpu_offload_gb * GiB / layer_bytes))
        slots = 2 if num_streamed > 2 else 1
        from_file = False
    streamed = tuple(local[:num_streamed])
    fixed = other_bytes + (len(layers) - num_streamed) * layer_bytes
    return OffloadPlan(streamed, slots, layer_bytes, fixed, from_file)


def build_device(config: OffloadConfig, device: torch.device) -> torch.device:
    """Where to build the model: on the CPU when layers are offloaded from an accelerator (the host copy is
    made from the loaded CPU weights, then the rest moves to ``device`` in ``WeightOffloader.attach``)."""
    return torch.device("cpu") if config.cpu_offload_gb > 0 and device.type != "cpu" else device


class StreamedLayer(nn.Module):
    """Stands in ``model.model.layers[i]`` for a streamed decoder layer: ``forward`` acquires the layer's weights
    from the stream (waiting for their prefetch), runs the real layer and releases them."""

    def __init__(self, stream: LayerStream, index: int, layer: nn.Module):
        super().__init__()
        self.index = index
        self.stream = stream  # set by WeightOffloader.attach
        object.__setattr__(self, "layer", layer)  # unregistered: not in model.parameters()

    def forward(self, positions, hidden, residual, ctx):
        self.stream.acquire(self.index)
        try:
            return self.layer(positions, hidden, residual, ctx)
        finally:
            self.stream.release(self.index)


class LayerStream:
    """Streams the weights of ``layers`` (global index -> real layer, run in ``order``) through ``slots``.

    Contract: ``acquire(i)`` returns once layer ``i``'s parameters hold its weights (on the slot it was filled
    into); ``release(i)`` drops them and starts filling the next layer of the cyclic order into the freed slot.
    Layers may be acquired in any order (out-of-order use waits for what is in flight and refills); in order,
    the fill of the next layer overlaps the current layer's compute. ``fill(i, slot)`` writes layer ``i``'s
    weights into the slot's tensors (its parameters are bound to them first). On CUDA, fills are queued on a side
    stream; elsewhere they run on one background thread.
    """

    def __init__(self, layers: dict[int, nn.Module], order: list[int], shapes: dict[str, tuple[torch.Size, torch.dtype]],
                 num_slots: int, fill: Callable[[int, dict[str, torch.Tensor]], None], device: torch.device):
        self._layers, self._order, self._fill = layers, list(order), fill
        self._device = device
        self._cuda = device.type == "cuda"
        self._params = {i: dict(layers[i].named_parameters()) for i in order}
        # Each slot: parameter name -> a tensor of the parameter's shape and dtype (``shapes``) on the device.
        self.slots = [{n: torch.empty(shape, dtype=dtype, device=device) for n, (shape, dtype) in shapes.items()}
                      for _ in range(num_slots)]
        self._placeholder = {n: torch.empty(0, dtype=dtype, device=device) for n, (_, dtype) in shapes.items()}
        self._free = list(range(num_slots))
        self._inflight: OrderedDict[int, tuple[int, object]] = OrderedDict()  # layer -> (slot, future or event)
        self._cursor = 0
        self._slot_done: list = [None] * num_slots  # CUDA: compute-stream event after the slot's last use
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(device=device)
        else:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flotilla-offload")
        self.audit = False  # when True, acquire() counts the streamed layers that hold weights (tests)
        self.peak_layers_materialised = 0
        self.fills = 0
        # Profile (CPU fills): seconds spent filling, and seconds acquire() waited for a fill (compute stalled).
        self.fill_seconds = 0.0
        self.wait_seconds = 0.0
        for i in order:
            self._unbind(i)
        self._schedule()

    # ---- binding --------------------------------------------------------------------------------------
    def _bind(self, layer: int, slot: int) -> None:
        for name, p in self._params[layer].items():
            p.data = self.slots[slot][name]

    def _unbind(self, layer: int) -> None:
        for name, p in self._params[layer].items():
            p.data = self._placeholder[name]

    def in_flight(self) -> list[int]:
        """The layers filled or being filled, oldest first (the one running, then those prefetched)."""
        return list(self._inflight)

    def wait_for_fills(self) -> None:
        """Wait until every fill in flight is done (their layers then hold weights)."""
        for _, handle in list(self._inflight.values()):
            if isinstance(handle, Future):
                handle.exception()
            else:
                handle.synchronize()

    def materialised_layers(self) -> int:
        """How many streamed layers hold weights right now (parameters with storage), counted from the tensors."""
        return sum(any(p.numel() for p in params.values()) for params in self._params.values())

    # ---- filling --------------------------------------------------------------------------------------
    def _submit(self, layer: int, slot: int):
        self.fills += 1
        if not self._cuda:
            return self._executor.submit(self._run_fill, layer, slot)
        with torch.cuda.stream(self._copy_stream):
            if self._slot_done[slot] is not None:
                self._copy_stream.wait_event(self._slot_done[slot])  # compute is done with the slot's old layer
            self._run_fill(layer, slot)
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
        return ready

    def _run_fill(self, layer: int, slot: int) -> None:
        start = time.perf_counter()
        self._bind(layer, slot)
        self._fill(layer, self.slots[slot])
        self.fill_seconds += time.perf_counter() - start

    def _wait(self, handle) -> None:
        if isinstance(handle, Future):
            handle.result()
        else:
            torch.cuda.current_stream(self._device).wait_event(handle)

    def _schedule(self) -> None:
        """Fill the next layers of the cyclic order into the free slots."""
        while self._free:
            layer = self._order[self._cursor]
            if layer in self._inflight:
                return
            self._cursor = (self._cursor + 1) % len(self._order)
            slot = self._free.pop(0)
            self._inflight[layer] = (slot, self._submit(layer, slot))

    def _retire_oldest(self) -> None:
        layer, (slot, handle) = self._inflight.popitem(last=False)
        try:
            self._wait(handle)
        finally:
            self._unbind(layer)
            self._free.append(slot)

    # ---- use ------------------------------------------------------------------------------------------
    def acquire(self, layer: int) -> None:
        if layer not in self._inflight:  # out of order (first use after an error): restart the cycle here
            while self._inflight:
                self._retire_oldest()
            self._cursor = self._order.index(layer)
            self._schedule()
        while next(iter(self._inflight)) != layer:
            self._retire_oldest()
            self._schedule()
        slot, handle = self._inflight[layer]
        start = time.perf_counter()
        try:
            self._wait(handle)
        except BaseException:
            self._inflight.pop(layer)
            self._unbind(layer)
            self._free.append(slot)
            raise
        self.wait_seconds += time.perf_counter() - start
        if self.audit:
            self.peak_layers_materialised = max(self.peak_layers_materialised, self.materialised_layers())

    def release(self, layer: int) -> None:
        slot, _ = self._inflight.pop(layer)
        if self._cuda:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self._device))
            self._slot_done[slot] = done
        self._unbind(layer)
        self._free.append(slot)
        self._schedule()

    def close(self) -> None:
        """Wait for the fills in flight and stop the fill thread."""
        while self._inflight:
            try:
                self._retire_oldest()
            except Exception:  # noqa: BLE001 - closing: a failed prefetch has nobody to report to
                pass
        if not self._cuda:
            self._executor.shutdown(wait=True)


class WeightOffloader:
    """Sets a model up for offload around its weight loading (``Worker.load_model``):

        offloader = WeightOffloader.create(model, config.offload, resolved, hf_config, dtype, device)
        model.load_weights(iterate_weights_filtered(..., wanted=offloader.wants_weight if offloader else ...))
        offloader.attach()   # from here on the streamed layers run through the LayerStream

    ``create`` returns None when nothing is offloaded. With ``max_resident_weights`` the streamed layers are
    swapped out of the model before loading (so their weights are never read at start-up: ``wants_weight``
    rejects them); with ``cpu_offload_gb`` everything is loaded, then the streamed layers' weights become the
    host copy (pinned on CUDA) and the rest of the model moves to ``device``.
    """

    def __init__(self, model: nn.Module, plan: OffloadPlan, reader: LayerReader | None, device: torch.device):
        self.model, self.plan, self.device = model, plan, device
        self._reader = reader
        self._layers = {i: model.model.layers[i] for i in plan.streamed}
        self._shapes = {n: (p.shape, p.dtype) for n, p in self._layers[plan.streamed[0]].named_parameters()}
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        self.stream: LayerStream | None = None
        if plan.from_file:
            self._swap_out()
            for i in plan.streamed:  # release the (never touched) storage the constructor allocated
                for p in self._layers[i].parameters():
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    @classmethod
    def create(cls, model: nn.Module, config: OffloadConfig, resolved, hf_config, dtype: torch.dtype,
               device: torch.device) -> WeightOffloader | None:
        plan = plan_offload(model, config)
        if plan is None:
            return None
        reader = LayerReader(resolved, hf_config, dtype) if plan.from_file else None
        logger.info("weight offload (%s): %d of %d decoder layers streamed through %d slot(s); at most %.3f GiB of "
                    "weights resident (one layer %.1f MiB)", "from the model file" if plan.from_file else
                    f"host copy -> {device}", len(plan.streamed), len(list(model.local_layer_indices)),
                    plan.num_slots, plan.resident_bytes / GiB, plan.layer_bytes / (1 << 20))
        return cls(model, plan, reader, device)

    def wants_weight(self, name: str) -> bool:
        """``model.wants_weight``, minus the streamed layers' tensors when they stay in the file."""
        if self.plan.from_file and layer_of(name) in self._layers:
            return False
        return self.model.wants_weight(name)

    def _swap_out(self) -> None:
        """Put a ``StreamedLayer`` proxy in place of each streamed layer (the stream is bound in ``attach``)."""
        for i, layer in self._layers.items():
            self.model.model.layers[i] = StreamedLayer(None, i, layer)

    def attach(self) -> LayerStream:
        """Start streaming (after the resident weights are loaded); returns the stream."""
        if not self.plan.from_file:
            self._make_host_copy()
            self._swap_out()
            self.model.to(self.device)  # the resident weights; streamed layers' parameters are empty placeholders
            for layer in self._layers.values():
                layer.to(self.device)  # their buffers (none in Llama layers besides the shared rotary tables)
        fill = self._fill_from_file if self.plan.from_file else self._fill_from_host
        self.stream = LayerStream(self._layers, list(self.plan.streamed), self._shapes, self.plan.num_slots, fill,
                                  self.device)
        for i in self.plan.streamed:
            self.model.model.layers[i].stream = self.stream
        self.model.offload_stream = self.stream
        return self.stream

    def _make_host_copy(self) -> None:
        pin = self.device.type == "cuda"
        for i, layer in self._layers.items():
            host = {}
            for name, p in layer.named_parameters():
                t = p.data.to("cpu")
                host[name] = t.pin_memory() if pin else t  # on the CPU: the loaded tensor itself, copied into slots
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
            self._host[i] = host

    def _fill_from_file(self, layer: int, slot: dict[str, torch.Tensor]) -> None:
        prefix = f"model.layers.{layer}."
        weights = ((name.removeprefix(prefix), t) for name, t in self._reader.read(layer))
        load_named_weights(self._layers[layer], weights, self.model.stacked_params)

    def _fill_from_host(self, layer: int, slot: dict[str, torch.Tensor]) -> None:
        non_blocking = self.device.type == "cuda"
        for name, t in self._host[layer].items():
            slot[name].copy_(t, non_blocking=non_blocking)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self._reader is not None:
            self._reader.close()
