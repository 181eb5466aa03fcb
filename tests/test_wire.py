"""Every process boundary's wire types (``flotilla.wire``): round trips, strict decoding, no pickle.

- frontend <-> engine core (``engine/messages.py``), driver <-> worker ranks (``scheduler/wire.py``), the
  engine config a worker starts from (``worker/config_wire.py``), the engine arguments a core process starts
  from, the control endpoints, the pipeline tensor headers and the Ray Serve ingress <-> replica messages
  (``deploy/serve_wire.py``): each message kind survives a round trip.
- The config codec follows the dataclasses' fields: EngineConfigs that together set every field to a
  non-default value come back equal (a new bool field is flipped automatically, any other new field must be
  given a value in the test).
- Malformed bytes (truncated, not msgpack, pickle, a wrong tag or field type, an extra field, a message of
  the other direction, a value a config rejects) raise a clear error naming the message and the field.
"""

from __future__ import annotations

import dataclasses
import pickle
import time
import typing

import msgspec
import pytest

from flotilla.config import (CacheConfig, DeviceConfig, EngineConfig, ModelConfig, OffloadConfig, ParallelConfig,
                             SchedulerConfig, SpeculativeConfig, StructuredOutputsConfig)
from flotilla.distributed.control import _ENDPOINTS, Endpoints
from flotilla.distributed.parallel_state import _TENSOR_HEADERS, TensorHeader
from flotilla.deploy.serve_wire import (GENERATE_REQUEST, GenerateRequest, decode_output, encode_output,
                                        prompt_token_ids_of)
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.core import EngineCoreOutputs, EngineCoreRequest
from flotilla.engine.core_proc import ENGINE_ARGS
from flotilla.engine.messages import (FROM_CORE, TO_CORE, AbortRequests, AddRequest, Failed, FromCore, Outputs,
                                      Ready, Shutdown, ToCore)
from flotilla.engine.output_processor import OutputKind
from flotilla.outputs import CompletionOutput, Logprob, RequestOutput
from flotilla.sampling_params import SamplingParams, StructuredOutputsParams
from flotilla.scheduler import wire as worker_wire
from flotilla.scheduler.output import (CachedRequestData, EngineCoreOutput, ModelRunnerOutput, NewRequestData,
                                       SchedulerOutput)
from flotilla.scheduler.scheduler import SchedulerStats
from flotilla.worker.config_wire import decode_engine_config, encode_engine_config
from flotilla.wire import WireError


def _plain(value) -> bool:
    """Only msgpack's own types: nothing that would need pickle or a custom extension."""
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, bytes))


def roundtrip(codec, msg):
    data = codec.encode(msg)
    assert isinstance(data, bytes)
    assert _plain(msgspec.msgpack.decode(data))  # plain msgpack, readable without our types
    back = codec.decode(data)
    assert type(back) is type(msg)
    return back


def every_field_params() -> SamplingParams:
    params = SamplingParams(n=3, temperature=0.7, top_p=0.85, top_k=20, min_p=0.05, presence_penalty=-0.5,
                            frequency_penalty=1.5, repetition_penalty=1.3, seed=2**64 - 1, max_tokens=77,
                            min_tokens=5, stop=["\n\n", "END", "é✓"], stop_token_ids=[0, 7, 49151], ignore_eos=True,
                            include_stop_str_in_output=True, logprobs=20, prompt_logprobs=3, skip_special_tokens=False,
                            logit_bias={5: -100.0, 49151: 2.5}, allowed_token_ids=[0, 5, 49151],
                            bad_words=["é✓", "red"], bad_words_token_ids=[[17, 4], [9]],
                            eos_token_ids=(2, 49152 - 1))
    params.validate()
    # Set after validate(): ignore_eos cannot be combined with a grammar (the wire does not care).
    params.structured_outputs = StructuredOutputsParams(
        json={"type": "object", "properties": {"é": {"enum": [1, "x"]}}}, disable_any_whitespace=True,
        backend="guidance")
    defaults = SamplingParams()
    unset = [f.name for f in dataclasses.fields(SamplingParams)
             if getattr(params, f.name) == getattr(defaults, f.name)]
    assert unset == [], f"give these fields a non-default value in the test: {unset}"
    return params


def _members(union) -> set[type]:
    return set(typing.get_args(union))


# ------------------------------------------------------------------------------- frontend <-> engine core
def test_request_with_every_sampling_field_roundtrips():
    req = EngineCoreRequest("2_req-é", [1, 0, 49151, 17], every_field_params(), time.monotonic(), "tenant-✓",
                            -(2**63))
    back = roundtrip(TO_CORE, AddRequest(req)).request
    assert back == req
    assert isinstance(back.sampling_params, SamplingParams)
    assert isinstance(back.sampling_params.eos_token_ids, tuple) and isinstance(back.sampling_params.stop, list)
    assert [f for f in EngineCoreRequest.__struct_fields__ if getattr(req, f) is None] == []  # all set
    # A negative seed and defaults (None fields) survive too.
    minimal = EngineCoreRequest("r", [5], SamplingParams(seed=-(2**63), max_tokens=None), 0.0)
    assert roundtrip(TO_CORE, AddRequest(minimal)).request == minimal


def core_outputs() -> EngineCoreOutputs:
    return EngineCoreOutputs(
        outputs=[EngineCoreOutput("a", [5, 6], [([5, 9, 1], [-0.25, -1.5, -2.0], [1, 2, 3]),
                                              ([6, 2, 3], [-0.125, -0.5, -4.0], [2, 1, 3])], None, None, 16),
                 EngineCoreOutput("0_b", [2], [], "stop", 2, 0),
                 EngineCoreOutput("1_b", [], [], "stop", "END", 0),
                 EngineCoreOutput("c", [49151], [], "length", None, 32),
                 EngineCoreOutput("d", [], [], "length", None, 0, [([7, 7], [-0.5, -0.5], [1, 1]),
                                                                   ([3, 9], [-3.0, -0.25], [4, 1])])],
        scheduled_ids=["0_b", "1_b"],
        stats=SchedulerStats(num_running=3, num_waiting=1, kv_cache_usage=0.375, prefix_cache_queries=120,
                             prefix_cache_hits=64, num_preemptions=2),
        timestamp=time.monotonic())


def test_every_core_message_roundtrips():
    to_core = [AddRequest(EngineCoreRequest("r", [1], SamplingParams(), 1.0)),
               AbortRequests(["x", "0_y", "1_y"], stopped=True), Shutdown()]
    from_core = [Ready(64), Outputs(core_outputs()), Outputs(EngineCoreOutputs(stats=None, timestamp=1.5)),
                 Failed("the KV cache budget holds 4 blocks ✗", "ModelLoadError")]
    for msg in to_core:
        assert roundtrip(TO_CORE, msg) == msg
    for msg in from_core:
        assert roundtrip(FROM_CORE, msg) == msg
    assert {type(m) for m in to_core} == _members(ToCore) and {type(m) for m in from_core} == _members(FromCore)
    back = FROM_CORE.decode(FROM_CORE.encode(Outputs(core_outputs()))).outputs
    assert isinstance(back.stats, SchedulerStats) and isinstance(back.outputs[0].new_logprobs[0], tuple)


# ------------------------------------------------------------------------------- driver <-> worker ranks
def scheduler_output() -> SchedulerOutput:
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=128, stop=["\n\n"], eos_token_ids=(2,))
    new = [NewRequestData(f"new-{i}", list(range(i, i + 40)), list(range(i, i + 41)), params,
                          list(range(3 * i, 3 * i + 3)), 16) for i in range(3)]
    cached = [CachedRequestData(f"run-{i}", [100 + i], [7] if i % 2 else [], 60 + i) for i in range(5)]
    num = {r.req_id: 24 for r in new} | {r.req_id: 1 for r in cached}
    return SchedulerOutput(new, cached, num, sum(num.values()), {"done-1", "run-9"}, {"run-9"})


def test_every_worker_message_roundtrips():
    w = worker_wire
    outputs = ModelRunnerOutput({"a": 5, "b": 49151}, {"a": ([5, 1], [-0.5, -1.25], [1, 2])},
                                {"b": [([8], [-2.5], [3]), ([1], [-0.75], [1])]})
    to_worker = [w.Step(scheduler_output()), w.Step(SchedulerOutput()), w.Rpc("initialize_cache", [128]),
                 w.Shutdown()]
    from_worker = [w.StepResult(outputs), w.StepResult(ModelRunnerOutput()), w.RpcResult(2, 1234),
                   w.RpcResult(0, None), w.Ready(tp_rank=1, pp_rank=0)]
    for msg in to_worker:
        assert roundtrip(w.TO_WORKER, msg) == msg
    for msg in from_worker:
        assert roundtrip(w.FROM_WORKER, msg) == msg
    assert {type(m) for m in to_worker} == _members(w.ToWorker)
    assert {type(m) for m in from_worker} == _members(w.FromWorker)
    so = w.TO_WORKER.decode(w.TO_WORKER.encode(w.Step(scheduler_output()))).scheduler_output
    assert isinstance(so.finished_req_ids, set) and isinstance(so.scheduled_new_reqs[0].sampling_params,
                                                               SamplingParams)
    assert w.expect(w.RpcResult(1, 2), w.RpcResult).value == 2
    with pytest.raises(WireError, match="expected a StepResult message, got RpcResult"):
        w.expect(w.RpcResult(1, 2), w.StepResult)


def test_control_endpoints_and_tensor_headers_roundtrip():
    endpoints = Endpoints(["tcp://127.0.0.1:4001", "tcp://[::1]:4002"], "tcp://127.0.0.1:4000")
    assert roundtrip(_ENDPOINTS, endpoints) == endpoints
    headers = [TensorHeader("hidden_states", "bfloat16", [7, 576]), TensorHeader("residual", "float32", [0])]
    assert _TENSOR_HEADERS.decode(_TENSOR_HEADERS.encode(headers)) == headers


# ------------------------------------------------------------------------------- Ray Serve ingress <-> replica
def test_serve_request_and_output_roundtrip():
    request = GenerateRequest("cmpl-1", "héllo 😀", [1, 17, 49151], every_field_params(), OutputKind.FINAL_ONLY,
                              "tenant-✓", priority=2**63 - 1)
    back = roundtrip(GENERATE_REQUEST, request)
    assert back == request and back.output_kind is OutputKind.FINAL_ONLY and back.cache_salt == "tenant-✓"
    assert back.priority == 2**63 - 1
    assert isinstance(back.sampling_params, SamplingParams) and back.sampling_params.stop == ["\n\n", "END", "é✓"]
    assert prompt_token_ids_of(GENERATE_REQUEST.encode(request)) == [1, 17, 49151]
    assert GENERATE_REQUEST.decode(GENERATE_REQUEST.encode(
        GenerateRequest("r", None, [5], SamplingParams()))).output_kind is OutputKind.DELTA
    samples = [CompletionOutput(0, " sky ☁", [5, 6, 7], -1.5, [{5: Logprob(-0.5, 1, " sky")},
                                                               {6: Logprob(-0.75, 2, " ☁"), 8: Logprob(-0.5, 1, "!")},
                                                               {7: Logprob(-0.25, None, None)}], "stop", "END"),
               CompletionOutput(2, "", [], None, None, None, None),
               CompletionOutput(1, "x", [9], None, None, "length", 2)]
    out = RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, samples, False,
                        num_cached_tokens=16, metrics={"arrival_time": 1.5, "first_scheduled_time": None,
                                                       "first_token_time": 2.25})
    data = encode_output(out)
    assert _plain(msgspec.msgpack.decode(data))
    assert decode_output(data, request) == out
    scored = RequestOutput("cmpl-1", None, [1, 17, 49151], samples[1:2], True,
                           prompt_logprobs=[None, {17: Logprob(-3.5, 40, "é"), 4: Logprob(-0.25, 1, " a")},
                                            {49151: Logprob(-0.125, 1, "")}])
    assert decode_output(encode_output(scored), request).prompt_logprobs == scored.prompt_logprobs
    with pytest.raises(WireError, match="malformed Ray Serve generate output"):
        decode_output(GENERATE_REQUEST.encode(request), request)
    with pytest.raises(WireError, match=r"Expected `int`, got `str` - at `\$\[2\]\[0\]`"):
        GENERATE_REQUEST.decode(msgspec.msgpack.encode(["r", None, ["1"], {}, 1]))


# ------------------------------------------------------------------------------- configs and arguments
def _with_bools_flipped(cls, given: dict, flip: bool = True) -> dict:
    """``given`` plus (with ``flip``) every bool field of ``cls`` it leaves out, flipped: a new bool setting
    needs no edit here (a new field of another type is reported by ``_at_default_everywhere``)."""
    values = dict(given)
    for f in dataclasses.fields(cls):
        if flip and f.name not in values and isinstance(f.default, bool):
            values[f.name] = not f.default
    return values


def _at_default_everywhere(objs: list) -> list[str]:
    """The fields (``Class.field``, nested config dataclasses included) at their default in every one of
    ``objs`` (instances of one dataclass)."""
    found = []
    for f in dataclasses.fields(objs[0]):
        values = [getattr(o, f.name) for o in objs]
        if dataclasses.is_dataclass(values[0]) and type(values[0]).__module__.startswith("flotilla."):
            found += _at_default_everywhere(values)  # a nested config (not hf_config)
        elif f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if all(v == default for v in values):
                found.append(f"{type(objs[0]).__name__}.{f.name}")
    return found


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> str:
    """A model directory with only a config.json (decoding re-reads the HF config from the source); its
    heads, KV heads and MLP split three ways."""
    from transformers import LlamaConfig
    path = tmp_path_factory.mktemp("config_only")
    LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=3, max_position_embeddings=8192).save_pretrained(path)
    return str(path)


def every_field_config(source: str, quantization: str | None) -> EngineConfig:
    """Every field non-default (bools flipped), but ``quantization``: model settings that exclude it (a
    flipped model bool such as ``batch_invariant``) keep their defaults when it is set."""
    from flotilla.models.loader import ResolvedModel, load_hf_config
    hf = load_hf_config(ResolvedModel(source=source, kind="hf_dir"))
    model = ModelConfig(**_with_bools_flipped(ModelConfig, dict(
        model="my-llama", source=source, source_kind="hf_dir", hf_config=hf, dtype="bfloat16", max_model_len=4096,
        served_model_name="served-name", quantization=quantization, dense_min_rows=5), flip=quantization is None))
    return EngineConfig(**_with_bools_flipped(EngineConfig, dict(
        model=model,
        cache=CacheConfig(**_with_bools_flipped(CacheConfig, dict(block_size=32, kv_cache_memory=2.5,
                                                                  num_blocks=77))),
        scheduler=SchedulerConfig(**_with_bools_flipped(SchedulerConfig, dict(
            max_num_batched_tokens=8192, max_num_seqs=7, max_model_len=4096, policy="priority"))),
        parallel=ParallelConfig(**_with_bools_flipped(ParallelConfig, dict(
            tensor_parallel_size=3, pipeline_parallel_size=2, executor_backend="ray", distributed_backend="gloo",
            pipeline_partition=(1, 1), ray_address="10.0.0.1:6379", collective_timeout_s=12.5))),
        device=DeviceConfig(**_with_bools_flipped(DeviceConfig, dict(device="cuda", num_threads=3))),
        structured_outputs=StructuredOutputsConfig(backend="guidance"),
        speculative=SpeculativeConfig(method="draft_model", num_speculative_tokens=3, prompt_lookup_min=2,
                                      prompt_lookup_max=3, draft_model="draft", draft_source=source,
                                      draft_source_kind="hf_dir", draft_quantization="int4"),
        # the two offload settings exclude each other: one config sets each
        offload=OffloadConfig(cpu_offload_gb=1.5) if quantization is None else OffloadConfig(max_resident_weights=0.75))))


def test_engine_config_with_every_field_set_roundtrips(config_dir):
    configs = [every_field_config(config_dir, None), every_field_config(config_dir, "int8")]
    not_shipped = {"ModelConfig.runner", "ModelConfig.pooler"}   # pooling configs stay in the serving process
    assert [f for f in _at_default_everywhere(configs) if f not in not_shipped] == [], \
        "give these fields a non-default value in every_field_config"
    pooling = dataclasses.replace(configs[0], model=dataclasses.replace(configs[0].model, runner="pooling",
                                                                        pooler=object()))
    with pytest.raises(ValueError, match="'pooling' model's engine config is not shipped"):
        encode_engine_config(pooling)
    for config in configs:
        data = encode_engine_config(config)
        assert _plain(msgspec.msgpack.decode(data))
        back = decode_engine_config(data)
        for f in dataclasses.fields(EngineConfig):
            part, back_part = getattr(config, f.name), getattr(back, f.name)
            for g in dataclasses.fields(part):
                if g.name != "hf_config":
                    assert getattr(back_part, g.name) == getattr(part, g.name), f"{f.name}.{g.name}"
                    assert type(getattr(back_part, g.name)) is type(getattr(part, g.name)), f"{f.name}.{g.name}"
        assert back.model.hf_config.to_dict() == config.model.hf_config.to_dict()  # re-read from the source


def test_engine_config_decoding_is_strict(config_dir):
    data = msgspec.msgpack.decode(encode_engine_config(every_field_config(config_dir, None)))
    bad = [({**data, "cache": {**data["cache"], "block_size": "32"}},
            r"Expected `int`, got `str` - at `\$.cache.block_size`"),
           ({**data, "device": {k: v for k, v in data["device"].items() if k != "num_threads"}},
            "missing required field `num_threads` - at `\\$.device`"),
           ({**data, "model": {**data["model"], "hf_config": {}}}, "unknown field `hf_config`"),
           ({**data, "surprise": 1}, "unknown field `surprise`")]
    for wire, message in bad:
        with pytest.raises(WireError, match=message):
            decode_engine_config(msgspec.msgpack.encode(wire))
    with pytest.raises(ValueError, match="block_size must be >= 1"):  # the dataclass validates the value
        decode_engine_config(msgspec.msgpack.encode({**data, "cache": {**data["cache"], "block_size": 0}}))


def test_engine_args_with_every_field_set_roundtrip():
    given = dict(model="m", dtype="bfloat16", quantization="int8", gguf_dense_min_tokens=6, max_model_len=4096, kv_cache_memory=2.5,
                 num_kv_blocks=99, block_size=32, max_num_seqs=3, max_num_batched_tokens=512,
                 scheduling_policy="priority",
                 tensor_parallel_size=3, pipeline_parallel_size=2, distributed_executor_backend="ray",
                 distributed_backend="gloo", pipeline_partition=[14, 16], ray_address="head:6379", device="cuda",
                 num_threads=2, served_model_name="served", seed=7,
                 structured_outputs_config={"backend": "guidance"}, runner="pooling",
                 speculative_config={"method": "ngram", "num_speculative_tokens": 3},
                 cpu_offload_gb=1.5, max_resident_weights=0.75)
    args = EngineArgs(**_with_bools_flipped(EngineArgs, given))
    assert _at_default_everywhere([args]) == [], "give these fields a non-default value in this test"
    assert ENGINE_ARGS.decode(ENGINE_ARGS.encode(args)) == args


# ------------------------------------------------------------------------------- malformed input
def test_malformed_messages_are_clear_errors():
    good = TO_CORE.encode(AbortRequests(["a"], stopped=False))
    raw = msgspec.msgpack.decode(good)
    cases = [
        (TO_CORE, good[:-1], "malformed frontend -> engine core message: Input data was truncated"),
        (TO_CORE, b"\xc1", "malformed frontend -> engine core message"),
        (TO_CORE, msgspec.msgpack.encode(["not-a-kind"]), r"Invalid value 'not-a-kind' - at `\$\[0\]`"),
        (TO_CORE, msgspec.msgpack.encode([raw[0], "a", False]), r"Expected `array`, got `str` - at `\$\[1\]`"),
        (TO_CORE, msgspec.msgpack.encode([*raw, "extra"]), "Expected `array` of at most length"),
        (TO_CORE, FROM_CORE.encode(Ready(4)), "Invalid value 'ready'"),  # the other direction's message
        (FROM_CORE, FROM_CORE.encode(Outputs(core_outputs())).replace(b"\xa1a", b"\x05"),
         r"Expected `str`, got `int` - at `\$\[1\]\[0\]\[0\]\[0\]`"),
        (worker_wire.TO_WORKER, worker_wire.TO_WORKER.encode(worker_wire.Rpc("m", [1]))[:-1], "truncated"),
    ]
    for codec, data, message in cases:
        with pytest.raises(WireError, match=message):
            codec.decode(data)


def test_no_pickle_in_either_direction():
    """An arbitrary object is refused by the encoder (no pickle fallback), and pickle bytes by the decoder."""
    with pytest.raises(TypeError):
        worker_wire.TO_WORKER.encode(worker_wire.Rpc("m", [object()]))
    with pytest.raises(TypeError):
        TO_CORE.encode(AddRequest(EngineCoreRequest("r", [1], object(), 0.0)))  # type: ignore[arg-type]
    with pytest.raises(WireError):
        TO_CORE.decode(pickle.dumps(AbortRequests(["a"], stopped=False)))
