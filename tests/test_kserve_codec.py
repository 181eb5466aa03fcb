"""KServe v2 codecs (pure functions) against tritonclient's own encoders and decoders (issue 14, item 5).

Oracles: ``tritonclient.http.InferenceServerClient.generate_request_body`` / ``parse_response_body``,
``tritonclient.utils.serialize_byte_tensor`` / ``deserialize_bytes_tensor``, tritonclient.grpc's request
builder and ``InferResult``. Every datatype, binary and JSON, flat and nested; bad input gets Triton's
messages. No server here (see test_kserve_http.py / test_kserve_grpc.py).
"""

from __future__ import annotations

import gzip
import json
import struct
import zlib

import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2
from tritonclient.utils import deserialize_bytes_tensor, np_to_triton_dtype, serialize_byte_tensor

from flotilla.entrypoints.kserve import compression, grpc_codec, http_codec, messages, tensors
from flotilla.entrypoints.kserve.infer_call import InferCall, generation_arguments, parse_version, to_infer_error
from flotilla.repository.errors import InferError
from flotilla.repository.service import InferOutcome, RepositoryEntry


def sample_arrays(rows: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "BOOL": rng.integers(0, 2, (rows, 3)).astype(bool),
        "FP16": rng.standard_normal((rows, 3)).astype(np.float16),
        "FP32": rng.standard_normal((rows, 3)).astype(np.float32),
        "FP64": rng.standard_normal((rows, 3)),
        "BF16": rng.standard_normal((rows, 3)).astype(ml_dtypes.bfloat16),
        "BYTES": np.array([["a", "", "héllo \u4e16\u754c"]] * rows, dtype=object),
    }
    for name, dtype in (("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
                        ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64)):
        info = np.iinfo(dtype)
        arrays[name] = np.array([[info.min, 1, info.max]] * rows, dtype=dtype)
    return arrays


def http_inputs(arrays, binary: bool):
    out = []
    for name, array in arrays.items():
        tensor = th.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary or name == "BF16")   # tritonclient: BF16 is binary-only
        out.append(tensor)
    return out


def expected(array: np.ndarray) -> np.ndarray:
    """An array as the server decodes it (BYTES: object array of utf-8 bytes)."""
    if array.dtype == object:
        return np.vectorize(lambda s: s.encode() if isinstance(s, str) else s, otypes=[object])(array)
    return array


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind in "fV":
        np.testing.assert_array_equal(got.astype(np.float64), want.astype(np.float64))
    else:
        assert got.tolist() == want.tolist()


# ----------------------------------------------------------------------------------------- HTTP requests

@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_request_of_every_datatype_decodes_to_the_client_arrays(binary):
    arrays = sample_arrays()
    body, header = th.InferenceServerClient.generate_request_body(
        http_inputs(arrays, binary), outputs=[th.InferRequestedOutput("FP32", binary_data=True),
                                              th.InferRequestedOutput("BYTES", binary_data=False)],
        request_id="req-1", priority=3, timeout=2000, parameters={"custom": "x", "flag": True, "n": 2, "f": 0.5})
    call = http_codec.decode_infer_request(body, None if header is None else str(header), "m")
    assert call.id == "req-1" and call.priority == 3 and call.timeout_us == 2000
    assert call.parameters == {"custom": "x", "flag": True, "n": 2, "f": 0.5}
    assert call.outputs == ["FP32", "BYTES"] and call.binary == {"FP32": True, "BYTES": False}
    for name, array in arrays.items():
        assert_same(call.inputs[name], expected(array))


def test_http_request_without_outputs_asks_for_binary_outputs_and_nested_data_is_accepted():
    body, header = th.InferenceServerClient.generate_request_body(http_inputs({"x": np.ones((2, 2), np.int32)}, True))
    call = http_codec.decode_infer_request(body, str(header), "m")
    assert call.default_binary and call.outputs == []
    nested = {"inputs": [{"name": "x", "shape": [2, 2, 1], "datatype": "INT64", "data": [[[1], [2]], [[3], [4]]]}]}
    call = http_codec.decode_infer_request(json.dumps(nested).encode(), None, "m")
    assert call.inputs["x"].tolist() == [[[1], [2]], [[3], [4]]] and call.inputs["x"].dtype == np.int64


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_http_response_of_every_datatype_parses_with_tritonclient(binary):
    arrays = {name: expected(a) for name, a in sample_arrays(3).items()}
    call = InferCall(id="r9", default_binary=binary)
    body, header = http_codec.encode_infer_response(call, "m", "2", InferOutcome(arrays, {"rows": 3, "ok": True}))
    assert (header is not None) == binary
    result = th.InferenceServerClient.parse_response_body(body, header_length=header)
    response = result.get_response()
    assert response["id"] == "r9" and response["model_name"] == "m" and response["model_version"] == "2"
    assert response["parameters"] == {"rows": 3, "ok": True}
    for name, array in arrays.items():
        got = result.as_numpy(name)
        if name in ("FP16", "BF16") and not binary:     # JSON numbers come back as tritonclient's dtype
            np.testing.assert_array_equal(got.astype(np.float64), array.astype(np.float64))
        elif name == "BYTES" and not binary:            # tritonclient decodes JSON strings as str
            assert got.tolist() == [[b.decode() for b in row] for row in array.tolist()]
        else:
            assert_same(got, array)


def test_http_response_mixes_binary_and_json_outputs_and_empty_binary_outputs():
    call = InferCall(binary={"a": True, "b": False, "e": True}, outputs=["a", "b", "e"])
    outcome = InferOutcome({"a": np.arange(4, dtype=np.int32), "b": np.array([1.5], np.float32),
                            "e": np.zeros((0, 3), np.float32)})
    body, header = http_codec.encode_infer_response(call, "m", "1", outcome)
    result = th.InferenceServerClient.parse_response_body(body, header_length=header)
    assert result.as_numpy("a").tolist() == [0, 1, 2, 3] and result.as_numpy("b").tolist() == [1.5]
    assert result.as_numpy("e").shape == (0, 3)
    doc = json.loads(body[:header])
    assert doc["outputs"][2]["parameters"] == {"binary_data_size": 0} and "data" in doc["outputs"][1]
    body, header = http_codec.encode_infer_response(InferCall(default_binary=True), "m", "1",
                                                    InferOutcome({"e": np.zeros(0, np.float32)}))
    assert header is None and json.loads(body)["outputs"][0]["parameters"] == {"binary_data_size": 0}


def test_bytes_serialization_matches_tritonclient():
    array = np.array([[b"", b"a\x00b", "\u00e9".encode()], [b"x" * 300, b"\xff\xfe", b"z"]], dtype=object)
    ours = tensors.serialize_bytes(array)
    assert ours == serialize_byte_tensor(array).item()
    assert tensors.deserialize_bytes(ours, "t", "m") == deserialize_bytes_tensor(ours).tolist()
    assert tensors.from_raw(ours, "BYTES", (2, 3), "t", "m").tolist() == array.tolist()


def request(inputs, outputs=None, parameters=None, **extra) -> bytes:
    doc = {"inputs": inputs, **extra}
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters is not None:
        doc["parameters"] = parameters
    return json.dumps(doc).encode()


def fp32(name="x", shape=(1, 2), data=(1.0, 2.0), **extra) -> dict:
    return {"name": name, "shape": list(shape), "datatype": "FP32", "data": list(data), **extra}


@pytest.mark.parametrize("body, header, code, message", [
    (b"{not json", None, "INVALID_ARG", "failed to parse the request JSON buffer"),
    (b"[1, 2]", None, "INVALID_ARG", "expected a JSON object, got list"),
    (request([fp32()]), "999", "INVALID_ARG", "inference header size should be in range (0, "),
    (request([fp32()]), "abc", "INVALID_ARG", "Unable to parse Inference-Header-Content-Length, got: abc"),
    (request([fp32()]), "0", "UNSUPPORTED", "raw binary requests"),
    (json.dumps({"inputs": {}}).encode(), None, "INVALID_ARG", "Unable to parse 'inputs'"),
    (request([fp32(), fp32()]), None, "INVALID_ARG", "input 'x' already exists in request"),
    (request([fp32(data=(1.0,))]), None, "INVALID_ARG", "shape [1, 2] holds 2 elements, got 1"),
    (request([{"name": "x", "shape": [1], "datatype": "FP32"}]), None, "INVALID_ARG",
     "Input must set only one of the following fields: 'data', 'binary_data_size' in 'parameters', "
     "'shared_memory_region' in 'parameters'. But no field is set"),
    (request([fp32(parameters={"binary_data_size": 8})]), None, "INVALID_ARG",
     "But set 'data' 'binary_data_size'"),
    (request([{"name": "x", "shape": [2], "datatype": "FP32", "parameters": {"binary_data_size": 8}}]), None,
     "INVALID_ARG", "must specify valid 'Inference-Header-Content-Length'"),
    (request([fp32(shape=(1, -2))]), None, "INVALID_ARG", "Unable to parse 'shape' of input 'x'"),
    (request([fp32(datatype="FLOAT")]), None, "INVALID_ARG", "invalid datatype 'FLOAT' for input 'x'"),
    (request([{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, 2.5]}]), None, "INVALID_ARG",
     "2.5 (float) is not a valid INT32 element"),
    (request([{"name": "x", "shape": [2], "datatype": "INT32", "data": [1, True]}]), None, "INVALID_ARG",
     "True (bool) is not a valid INT32 element"),
    (request([{"name": "x", "shape": [1], "datatype": "UINT8", "data": [256]}]), None, "INVALID_ARG",
     "256 is out of the range of UINT8 [0, 255]"),
    (request([{"name": "x", "shape": [1], "datatype": "BOOL", "data": [1]}]), None, "INVALID_ARG",
     "1 (int) is not a valid BOOL element"),
    (request([{"name": "x", "shape": [1], "datatype": "BYTES", "data": [1]}]), None, "INVALID_ARG",
     "1 (int) is not a valid BYTES element"),
    (request([fp32()], outputs=[{"name": "y", "parameters": {"classification": 2}}]), None, "UNSUPPORTED",
     "classification extension is not supported"),
    (request([fp32(parameters={"shared_memory_region": "r"})]), None, "UNSUPPORTED", "shared memory inputs"),
    (request([fp32()], outputs=[{"name": "y"}, {"name": "y"}]), None, "INVALID_ARG", "requested more than once"),
    (request([fp32()], parameters={"triton_x": 1}), None, "INVALID_ARG",
     "parameter keys starting with 'triton_' are reserved for Triton usage and should not be specified."),
    (request([fp32()], parameters={"sequence_id": 7}), None, "INVALID_ARG", "stateful models"),
    (request([fp32()], parameters={"priority": -1}), None, "INVALID_ARG", "Unable to parse 'priority'"),
    (request([fp32()], parameters={"binary_data_output": "yes"}), None, "INVALID_ARG",
     "Unable to parse 'binary_data_output'"),
    (request([fp32()], parameters={"obj": {"a": 1}}), None, "INVALID_ARG", "parameter 'obj' has invalid type"),
    (request([fp32()], model_name="m"), None, "INVALID_ARG", "unexpected field 'model_name' in the inference request"),
    (request([fp32(content_type="x")]), None, "INVALID_ARG", "unexpected field 'content_type' in input 'x'"),
])
def test_bad_http_requests_get_triton_s_errors(body, header, code, message):
    with pytest.raises(InferError) as info:
        http_codec.decode_infer_request(body, header, "m")
    assert info.value.code == code and message in info.value.message


def test_bad_binary_data_gets_triton_s_errors():
    header = json.dumps({"inputs": [{"name": "x", "shape": [2], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 8}}]}).encode()
    for tail, message in ((b"\0" * 4, "unexpected size for input 'x', expecting 4 additional bytes for model 'm'"),
                          (b"\0" * 12, "the request body holds 4 bytes after the binary data of its inputs")):
        with pytest.raises(InferError, match=message.replace("(", r"\(").replace(")", r"\)")):
            http_codec.decode_infer_request(header + tail, str(len(header)), "m")
    with pytest.raises(InferError, match=r"input byte size mismatch for input 'x' for model 'm'. Expected 12, got 8"):
        tensors.from_raw(b"\0" * 8, "FP32", (3,), "x", "m")
    with pytest.raises(InferError, match="expected 3 string elements for inference input 'x' for model 'm', got 2"):
        tensors.from_raw(serialize_byte_tensor(np.array([b"a", b"b"], dtype=object)).item(), "BYTES", (3,), "x", "m")
    with pytest.raises(InferError, match="element byte size indicator exceeds the end of the buffer"):
        tensors.from_raw(struct.pack("<I", 10) + b"abc", "BYTES", (1,), "x", "m")


def test_non_utf8_bytes_cannot_be_json_outputs():
    call = InferCall(default_binary=False)
    with pytest.raises(InferError, match="not valid UTF-8.*binary_data: true"):
        http_codec.encode_infer_response(call, "m", "1", InferOutcome({"s": np.array([b"\xff"], dtype=object)}))


# ----------------------------------------------------------------------------------------------- gRPC

def grpc_request(arrays, **kwargs) -> service_pb2.ModelInferRequest:
    from tritonclient.grpc._utils import _get_inference_request
    inputs = []
    for name, array in arrays.items():
        tensor = tg.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    defaults = dict(model_version="", request_id="", outputs=None, sequence_id=0, sequence_start=False,
                    sequence_end=False, priority=0, timeout=None, parameters=None)
    defaults.update(kwargs)
    return _get_inference_request(model_name="m", inputs=inputs, **defaults)


def test_grpc_request_of_every_datatype_decodes_to_the_client_arrays():
    arrays = sample_arrays()
    pb = grpc_request(arrays, request_id="g1", priority=2, timeout=100, parameters={"s": "v", "b": False, "d": 0.25},
                      outputs=[tg.InferRequestedOutput("FP32")])
    call = grpc_codec.decode_infer_request(pb)
    assert (call.id, call.priority, call.timeout_us, call.outputs) == ("g1", 2, 100, ["FP32"])
    assert call.parameters == {"s": "v", "b": False, "d": 0.25}
    for name, array in arrays.items():
        assert_same(call.inputs[name], expected(array))


def test_grpc_typed_contents_decode_and_are_checked():
    pb = service_pb2.ModelInferRequest(model_name="m")
    pb.inputs.add(name="f", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.5, 2.5])
    pb.inputs.add(name="i8", datatype="INT8", shape=[1, 2]).contents.int_contents.extend([-128, 127])
    pb.inputs.add(name="u16", datatype="UINT16", shape=[1]).contents.uint_contents.append(65535)
    pb.inputs.add(name="b", datatype="BOOL", shape=[1]).contents.bool_contents.append(True)
    pb.inputs.add(name="s", datatype="BYTES", shape=[2]).contents.bytes_contents.extend([b"x", b"\xff"])
    pb.inputs.add(name="i64", datatype="INT64", shape=[0]).contents.SetInParent()
    call = grpc_codec.decode_infer_request(pb)
    assert call.inputs["f"].tolist() == [1.5, 2.5] and call.inputs["f"].dtype == np.float32
    assert call.inputs["i8"].tolist() == [[-128, 127]] and call.inputs["i8"].dtype == np.int8
    assert call.inputs["u16"].dtype == np.uint16 and call.inputs["b"].tolist() == [True]
    assert call.inputs["s"].tolist() == [b"x", b"\xff"] and call.inputs["i64"].shape == (0,)

    def error(mutate) -> str:
        bad = service_pb2.ModelInferRequest(model_name="m")
        mutate(bad)
        with pytest.raises(InferError) as info:
            grpc_codec.decode_infer_request(bad)
        return info.value.message

    assert error(lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.int_contents.append(1)) == (
        "unexpected explicit tensor data for input tensor 'x' for model 'm' of type 'INT32', expected datatype 'FP32'")
    assert "out of the range of INT8" in error(
        lambda r: r.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300))
    assert error(lambda r: r.inputs.add(name="x", datatype="FP32", shape=[1])) == (
        "unable to find data for input tensor 'x' for model 'm' in request.")

    def both(r):
        r.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.0)
        r.raw_input_contents.append(b"\0" * 4)
    assert error(both) == "contents field must not be specified when using raw_input_contents for 'x' for model 'm'"

    def extra_raw(r):
        r.inputs.add(name="x", datatype="FP32", shape=[1])
        r.raw_input_contents.extend([b"\0" * 4, b"\0" * 4])
    assert "2 raw_input_contents but 1 inputs" in error(extra_raw)

    def reserved(r):
        r.parameters["triton_other"].bool_param = True
    assert "Only the following keys starting with 'triton_' are allowed: triton_enable_empty_final_response" in (
        error(reserved))


def test_grpc_response_parses_with_tritonclient():
    arrays = {name: expected(a) for name, a in sample_arrays(2).items()}
    pb = grpc_codec.encode_infer_response(InferCall(id="x"), "m", "3", InferOutcome(arrays, {"p": 1, "q": "s"}))
    assert len(pb.raw_output_contents) == len(arrays) and pb.id == "x" and pb.model_version == "3"
    assert pb.parameters["p"].int64_param == 1 and pb.parameters["q"].string_param == "s"
    result = tg.InferResult(pb)
    for name, array in arrays.items():
        assert_same(result.as_numpy(name), array)


def test_generation_arguments_follow_the_vllm_backend_convention():
    call = InferCall(inputs={"text_input": np.array([b"Hello"], dtype=object), "stream": np.array([True]),
                             "sampling_parameters": np.array([b'{"temperature": 0, "max_tokens": 4}'], dtype=object)},
                     parameters={"seed": 1})
    text, params = generation_arguments(call.inputs, call.parameters)
    assert text == "Hello" and params == {"seed": 1, "stream": True, "temperature": 0, "max_tokens": 4}
    with pytest.raises(InferError, match="needs the input 'text_input'"):
        generation_arguments({"prompt": np.array([b"x"], dtype=object)}, {})
    response = grpc_codec.generate_response(call, "llm", "1", {"text_output": "wor", "model_name": "llm"}, final=False)
    assert tg.InferResult(response).as_numpy("text_output").tolist() == [b"wor"]
    assert response.parameters["triton_final_response"].bool_param is False


# ------------------------------------------------------------------------------------- messages & misc

def test_config_json_prints_int64_as_numbers_and_every_field():
    config = text_format.Parse('name: "m" max_batch_size: 4 input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 3] }] '
                               'dynamic_batching { max_queue_delay_microseconds: 100 }',
                               model_config_pb2.ModelConfig())
    data = messages.config_json(config)
    assert data["input"][0]["dims"] == [-1, 3] and data["dynamic_batching"]["max_queue_delay_microseconds"] == 100
    assert data["input"][0]["is_shape_tensor"] is False and data["max_batch_size"] == 4


def test_statistics_and_index_messages():
    stats = [{"name": "m", "version": "1", "last_inference": 5, "inference_count": 3, "execution_count": 1,
              "inference_stats": {"success": {"count": 3, "ns": 900}}, "batch_stats": [
                  {"batch_size": 3, "compute_infer": {"count": 1, "ns": 500}}]}]
    pb = messages.statistics_pb(stats)
    assert pb.model_stats[0].inference_stats.success.ns == 900 and pb.model_stats[0].batch_stats[0].batch_size == 3
    entries = [RepositoryEntry("a", "1", "READY"), RepositoryEntry("b", "", "UNAVAILABLE", "unloaded")]
    assert messages.index_json(entries) == [{"name": "a", "version": "1", "state": "READY"},
                                            {"name": "b", "state": "UNAVAILABLE", "reason": "unloaded"}]
    assert [m.name for m in messages.index_pb(entries).models] == ["a", "b"]


def test_versions_and_error_conversion():
    assert parse_version("") is None and parse_version("007") == "7"
    with pytest.raises(InferError, match="failed to get model version from specified version string 'x'"):
        parse_version("x")
    with pytest.raises(InferError, match="invalid model version specified '-1'"):
        parse_version("-1")
    err = to_infer_error(RuntimeError("secret path /x"))
    assert err.code == "INTERNAL" and "secret" not in err.message
    assert InferError("UNSUPPORTED", "x").http_status == 501


def test_compression_is_bounded_and_round_trips():
    body = b'{"inputs": []}' * 10
    assert compression.decompress(gzip.compress(body), "gzip", 1000) == body
    assert compression.decompress(zlib.compress(body), "deflate", 1000) == body
    with pytest.raises(compression.InflatedTooLarge):
        compression.decompress(gzip.compress(b"\0" * 10_000_000), "gzip", 1_000_000)
    with pytest.raises(InferError, match="Unsupported compression type 'br'"):
        compression.decompress(body, "br", 1000)
    with pytest.raises(InferError, match="truncated"):
        compression.decompress(gzip.compress(body)[:-12], "gzip", 1000)
    assert compression.response_encoding("br, deflate;q=0.5, gzip") == "deflate"
    assert compression.response_encoding("gzip;q=0, identity") is None


def test_triton_metrics_are_valid_exposition_text_with_triton_s_names():
    from prometheus_client.parser import text_string_to_metric_families

    from flotilla.entrypoints.kserve.metrics import TritonMetrics

    class Model:
        def statistics(self):
            return {"name": 'm"1', "version": "2", "inference_count": 5, "execution_count": 2,
                    "inference_stats": {"success": {"count": 3, "ns": 7000}, "queue": {"count": 3, "ns": 2000}},
                    "batch_stats": [{"batch_size": 1, "compute_infer": {"count": 1, "ns": 1}},
                                    {"batch_size": 4, "compute_infer": {"count": 1, "ns": 1}}]}

    class Service:
        def index(self, ready_only=False):
            return [RepositoryEntry('m"1', "2", "READY")]

        def model(self, name, version=None):
            return Model()

    text = TritonMetrics(Service(), ("flotilla", "vllm")).render()
    samples = {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert 'nv_inference_request_success{model="m\\"1",version="2"} 3' in text
    # (prometheus_client's parser names counter samples <name>_total; the text has Triton's names)
    assert samples[("nv_inference_request_duration_us_total", None)] == 7
    assert samples[("nv_inference_count_total", None)] == 5
    assert samples[("nv_inference_queue_duration_us_total", None)] == 2
    for prefix in ("flotilla", "vllm"):
        assert samples[(f"{prefix}:inference_batch_size_bucket", "2.0")] == 1
        assert samples[(f"{prefix}:inference_batch_size_count", None)] == 2
        assert samples[(f"{prefix}:inference_batch_size_sum", None)] == 5
