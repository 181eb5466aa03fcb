"""Weight offload (flotilla/models/offload.py): --max-resident-weights streams decoder layers from the mmap'd model
file, --cpu-offload-gb from a host copy; greedy tokens equal the non-offloaded run's, and the weights that exist at
once stay within the budget (counted from the tensors themselves)."""

from __future__ import annotations

import argparse
import threading

import pytest
import torch
from torch import nn

from conftest import build_tiny_model, smollm2_gguf_path
from flotilla import LLM, SamplingParams
from flotilla.errors import InvalidRequestError, ModelLoadError

GiB = 1 << 30
PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4 5"]
GREEDY = SamplingParams(max_tokens=8, temperature=0)
ENGINE = dict(max_model_len=128, num_kv_blocks=64)


@pytest.fixture(scope="module")
def tiny4(tmp_path_factory, smollm2_tokenizer_dir):
    """(path, reference tokens, one layer's bytes, the other weights' bytes) of a 4-layer tiny Llama (float32)."""
    out = tmp_path_factory.mktemp("tiny_llama4")
    build_tiny_model(out, smollm2_tokenizer_dir, "llama", seed=3, num_hidden_layers=4)
    llm = LLM(model=str(out), **ENGINE)
    model = llm.engine.executor.worker.model
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    llm.engine.shutdown()
    return str(out), ref, layer, total - 4 * layer


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one slot count once)."""
    seen = {}
    for t in tensors:
        if t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("fit", [1, 3], ids=["one-slot", "two-slots"])
def test_max_resident_weights_same_tokens_within_budget(tiny4, fit):
    path, ref, layer, other = tiny4
    budget = other + fit * layer + 16
    llm = LLM(model=path, max_resident_weights=budget / GiB, **ENGINE)
    model = llm.engine.executor.worker.model
    stream = model.offload_stream
    stream.audit = True
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert out == ref
    slots = 1 if fit == 1 else 2
    streamed = 4 - (fit - slots)
    assert len(stream.slots) == slots and stream.fills > streamed * 8  # every step streamed them again
    assert 1 <= stream.peak_layers_materialised <= slots
    # Every weight tensor that exists: the resident ones, the slots, and whatever the streamed layers hold now.
    streamed_params = [p for i in range(4) if hasattr(model.model.layers[i], "layer")
                       for p in model.model.layers[i].layer.parameters()]
    assert len(streamed_params) == 6 * streamed
    live = _storage_bytes(list(model.parameters()) + streamed_params + [t for s in stream.slots for t in s.values()])
    assert live <= budget < other + 4 * layer


def test_cpu_offload_gb_same_tokens(tiny4):
    """vLLM's --cpu-offload-gb on the CPU: the same code path as on CUDA minus pinning and the side stream."""
    path, ref, layer, other = tiny4
    llm = LLM(model=path, cpu_offload_gb=2.5 * layer / GiB, **ENGINE)  # 3 layers offloaded, 2 slots
    model = llm.engine.executor.worker.model
    out = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert out == ref
    assert [hasattr(model.model.layers[i], "layer") for i in range(4)] == [True, True, True, False]
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == other + layer  # the rest is host-side
    assert model.offload_stream.fills > 3 * 8


def test_budget_too_small_names_the_minimum(tiny4):
    path, _, layer, other = tiny4
    with pytest.raises(ModelLoadError, match="max_resident_weights .* give at least"):
        LLM(model=path, max_resident_weights=(other + layer // 2) / GiB, **ENGINE)


class _Layer(nn.Module):
    """A decoder-layer stand-in: one weight; forward records what the stream has in flight while it computes."""

    def __init__(self, index: int, log: list):
        super().__init__()
        self.index, self.log = index, log
        self.w = nn.Parameter(torch.empty(4), requires_grad=False)

    def forward(self, positions, hidden, residual, ctx):
        self.log.append((self.index, self.stream.in_flight(), float(self.w.sum())))
        return hidden + self.w, residual


def _stream(num_layers: int, slots: int, fail_on: set | None = None):
    from flotilla.models.offload import LayerStream, StreamedLayer
    log: list = []
    layers = {i: _Layer(i, log) for i in range(num_layers)}
    host = {i: torch.full((4,), float(i)) for i in range(num_layers)}
    fill_threads = set()

    def fill(i, slot):
        fill_threads.add(threading.get_ident())
        if fail_on and i in fail_on:
            fail_on.discard(i)
            raise ModelLoadError(f"layer {i} unreadable")
        slot["w"].copy_(host[i])
    stream = LayerStream(layers, list(range(num_layers)), {"w": (torch.Size([4]), torch.float32)}, slots, fill,
                         torch.device("cpu"))
    for layer in layers.values():
        layer.stream = stream
    return stream, [StreamedLayer(stream, i, layers[i]) for i in range(num_layers)], log, fill_threads


def test_layer_stream_prefetches_next_layer_ahead_of_use():
    stream, proxies, log, threads = _stream(4, 2)
    for _ in range(2):  # two forward passes
        h = torch.zeros(4)
        for proxy in proxies:
            h, _ = proxy(None, h, None, None)
        assert torch.equal(h, torch.full((4,), 6.0))  # each layer ran with its own weights
    # While layer i computes, layer i+1 (cyclically: after the last, the first of the next pass) is being filled.
    assert [(i, inflight) for i, inflight, _ in log[:4]] == [(0, [0, 1]), (1, [1, 2]), (2, [2, 3]), (3, [3, 0])]
    assert [w for *_, w in log] == [0.0, 4.0, 8.0, 12.0] * 2
    stream.wait_for_fills()  # the prefetch runs on the background thread
    assert stream.materialised_layers() == 2 and stream.in_flight() == [0, 1]  # prefetched for the next pass
    assert threads and threading.get_ident() not in threads  # filled on the background thread
    stream.close()


def test_layer_stream_recovers_from_a_failed_fill_and_out_of_order_use():
    stream, proxies, log, _ = _stream(3, 1, fail_on={1})
    h = torch.zeros(4)
    h, _ = proxies[0](None, h, None, None)
    with pytest.raises(ModelLoadError, match="layer 1 unreadable"):
        proxies[1](None, h, None, None)
    h, _ = proxies[0](None, torch.zeros(4), None, None)  # a new pass starts over: refilled, the right weights
    assert float(h.sum()) == 0.0
    h, _ = proxies[2](None, torch.zeros(4), None, None)  # out of order
    assert float(h.sum()) == 8.0 and stream.materialised_layers() <= 1
    stream.close()


def test_layer_reader_reads_what_startup_loads_gguf():
    """A GGUF layer re-read from the map equals the start-up load (dequantized, q/k unpermuted)."""
    from flotilla.models.loader import ResolvedModel, iterate_weights_filtered, load_hf_config
    from flotilla.models.loader.layer_reader import LayerReader
    resolved = ResolvedModel(source=smollm2_gguf_path(), kind="gguf")
    hf_config = load_hf_config(resolved)
    expected = dict(iterate_weights_filtered(resolved, hf_config, torch.bfloat16,
                                             lambda n: n.startswith("model.layers.7.")))
    reader = LayerReader(resolved, hf_config, torch.bfloat16)
    got = dict(reader.read(7))
    reader.close()
    assert sorted(got) == sorted(expected) and len(got) == 9
    assert all(torch.equal(got[n], expected[n]) for n in got)


@pytest.mark.parametrize("kwargs, param, match", [
    (dict(max_resident_weights=0.5, tensor_parallel_size=2), "max_resident_weights", "tensor or pipeline"),
    (dict(cpu_offload_gb=1, quantization="int4"), "cpu_offload_gb", "--quantization int4"),
    (dict(max_resident_weights=0.5, batch_invariant=True), "max_resident_weights", "--batch-invariant"),
    (dict(max_resident_weights=0.5, device="cuda"), "max_resident_weights", "on the CPU"),
    (dict(max_resident_weights=0.5, cpu_offload_gb=1), "cpu_offload_gb", "cannot be combined"),
    (dict(max_resident_weights=0.0), "max_resident_weights", "> 0"),
    (dict(cpu_offload_gb=-1.0), "cpu_offload_gb", ">= 0"),
])
def test_unsupported_combinations_are_refused(tiny4, kwargs, param, match):
    from flotilla.engine.arg_utils import EngineArgs
    with pytest.raises(InvalidRequestError, match=match) as e:
        EngineArgs(model=tiny4[0], **kwargs).create_engine_config()
    assert e.value.param == param


def test_flags_and_deployment_file_key():
    from flotilla.deploy.config import parse_deployment_config
    from flotilla.deploy.engine_args import add_engine_args, engine_args_from
    from flotilla.deploy.spec import DeploymentConfigError
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = engine_args_from(parser.parse_args(["--max-resident-weights", "0.25", "--cpu-offload-gb", "2"]))
    assert (args.max_resident_weights, args.cpu_offload_gb) == (0.25, 2.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--max-resident-weights", "nan"])
    spec = parse_deployment_config({"models": [{"name": "m", "model": "smollm2-135m-instruct",
                                                "engine": {"max_resident_weights": 0.25}}]})
    assert spec.models[0].engine_args().max_resident_weights == 0.25
    with pytest.raises(DeploymentConfigError, match="max_resident_weights"):
        parse_deployment_config({"models": [{"name": "m", "model": "smollm2-135m-instruct",
                                             "engine": {"max_resident_weights": 0}}]})


def test_embedding_models_refuse_offload():
    from flotilla.engine.arg_utils import EngineArgs
    with pytest.raises(InvalidRequestError, match="not supported for embedding models") as e:
        EngineArgs(model="all-minilm-l6-v2", max_resident_weights=0.5).create_engine_config()
    assert e.value.param == "max_resident_weights"
