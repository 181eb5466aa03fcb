"""KServe v2 gRPC (``inference.GRPCInferenceService``) with the real ``tritonclient.grpc`` (2.73) against one
``flotilla serve --config`` process on loopback (with an API key) serving everything at once: a tiny random
Llama (a decoupled v2 model; oracle: greedy ``/v1/completions`` of the same server), all-minilm-l6-v2 (oracle:
its ``/v1/embeddings``) and the model repository of ``kserve_helpers`` (an ONNX model exported in-test, Python
models, the tokenizer -> ONNX encoder -> pooling ensemble), in explicit model control.
"""

from __future__ import annotations

import json
import queue

import grpc
import ml_dtypes
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from kserve_helpers import (ALL_TYPES, ENCODER_SEED, REPOSITORY_MODELS, TEMPLATE, torch_oracle, write_llm_pipeline,
                            write_repository)
from test_server_helpers import free_port
from triton_repository import SCALE_PY, make_encoder, reference_embedding, texts_array

KEY = "kserve-grpc-key"
PIPELINE_MODELS = {"llm_pipeline", "llm_pipeline_pre", "llm_pipeline_post"}
AUTH = (("authorization", f"Bearer {KEY}"),)

pytestmark = pytest.mark.slow


def auth() -> dict:
    return {"authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    from test_server_helpers import ServerProcess
    root = tmp_path_factory.mktemp("kserve-grpc")
    repo = write_repository(root)
    write_llm_pipeline(repo, "tiny")
    deploy = root / "deploy.yaml"
    deploy.write_text(f"""\
models:
  - name: tiny
    model: {tiny_llama[0]}
    engine: {{max_model_len: 512, num_kv_blocks: 64}}
  - name: minilm
    model: all-minilm-l6-v2
model_repository:
  paths: [{repo}]
  model_control_mode: explicit
  load_models: ["*"]
""")
    grpc_port = free_port()
    srv = ServerProcess(None, "--config", str(deploy), "--grpc-port", str(grpc_port), api_key=KEY,
                        startup_timeout=300)
    srv.grpc_url, srv.repo = f"127.0.0.1:{grpc_port}", repo
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    c = tg.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def infer_input(name: str, array: np.ndarray) -> tg.InferInput:
    tensor = tg.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array)
    return tensor


def x_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def status_of(exc: InferenceServerException) -> str:
    return exc.status()


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()           # no API key needed
    meta = client.get_server_metadata(headers=auth())
    assert meta.name == "flotilla" and "binary_tensor_data" in meta.extensions
    model = client.get_model_metadata("onnx_linear", headers=auth(), as_json=True)
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "4"]}]
    assert client.is_model_ready("py_text", headers=auth()) and client.is_model_ready("py_text", "1", headers=auth())
    assert not client.is_model_ready("nope", headers=auth())
    config = client.get_model_config("onnx_linear", headers=auth()).config
    assert config.max_batch_size == 8 and list(config.input[0].dims) == [4]


def test_api_key_is_required_except_for_liveness(client, server):
    with pytest.raises(InferenceServerException) as info:
        client.get_server_metadata()
    assert status_of(info.value) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as info:
        client.infer("onnx_linear", [infer_input("x", x_rows(1))])
    assert status_of(info.value) == "StatusCode.UNAUTHENTICATED"
    with pytest.raises(InferenceServerException) as info:
        client.infer("onnx_linear", [infer_input("x", x_rows(1))], headers={"authorization": "Bearer wrong"})
    assert status_of(info.value) == "StatusCode.UNAUTHENTICATED"


def test_onnx_infer_matches_the_torch_module(client):
    x = x_rows(5, seed=1)
    result = client.infer("onnx_linear", [infer_input("x", x)], headers=auth(), request_id="g-1",
                          outputs=[tg.InferRequestedOutput("y")])
    np.testing.assert_allclose(result.as_numpy("y"), torch_oracle(x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response.id == "g-1" and response.model_name == "onnx_linear" and response.model_version == "1"
    assert len(response.raw_output_contents) == 1          # outputs in raw_output_contents, as Triton


def test_typed_contents_are_accepted(stub):
    x = x_rows(2, seed=2)
    request = service_pb2.ModelInferRequest(model_name="onnx_linear")
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4]).contents.fp32_contents.extend(x.reshape(-1).tolist())
    response = stub.ModelInfer(request, metadata=AUTH)
    y = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 3)
    np.testing.assert_allclose(y, torch_oracle(x), rtol=1e-5, atol=1e-6)


def test_python_model_and_every_datatype(client):
    text = np.array([["hello"], ["w\u00f6rld"]], dtype=object)
    result = client.infer("py_text", [infer_input("TEXT", text)], headers=auth())
    assert result.as_numpy("UPPER").reshape(-1).tolist() == [b"HELLO", "w\u00f6rld".encode().upper()]
    assert result.as_numpy("LENGTH").reshape(-1).tolist() == [5, 6]
    rng = np.random.default_rng(4)
    arrays = {}
    for t in ALL_TYPES:
        if t == "BYTES":
            arrays[t] = np.array([[b"a", b"\xff\x00"]], dtype=object)
        elif t == "BOOL":
            arrays[t] = np.array([[True, False]])
        elif t == "BF16":
            arrays[t] = rng.standard_normal((1, 2)).astype(ml_dtypes.bfloat16)
        else:
            arrays[t] = (rng.standard_normal((1, 2)) * 50).astype(np.dtype(t.lower().replace("fp", "float")))
    result = client.infer("identity_all", [infer_input(f"IN_{t}", a) for t, a in arrays.items()], headers=auth())
    for t, a in arrays.items():
        got = result.as_numpy(f"OUT_{t}")
        assert got.dtype == a.dtype and got.tolist() == a.tolist(), t


def test_bad_requests_get_grpc_codes_and_triton_s_messages(client):
    def error(model, inputs, version="") -> InferenceServerException:
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, inputs, model_version=version, headers=auth())
        return info.value

    bad_type = error("onnx_linear", [infer_input("x", np.ones((1, 4), np.int64))])
    assert status_of(bad_type) == "StatusCode.INVALID_ARGUMENT"
    assert bad_type.message() == "inference input 'x' data-type is 'INT64', but model 'onnx_linear' expects 'FP32'"
    bad_shape = error("onnx_linear", [infer_input("x", np.ones((2, 2), np.float32))])
    assert status_of(bad_shape) == "StatusCode.INVALID_ARGUMENT" and "Expected [-1,4], got [2,2]" in bad_shape.message()
    missing = error("py_text", [])
    assert status_of(missing) == "StatusCode.INVALID_ARGUMENT" and missing.message().startswith(
        "expected 1 inputs but got 0 inputs for model 'py_text'")
    unknown = error("nope", [infer_input("x", x_rows(1))])
    assert status_of(unknown) == "StatusCode.NOT_FOUND"
    assert unknown.message() == "Request for unknown model: 'nope' is not found"
    version = error("onnx_linear", [infer_input("x", x_rows(1))], version="3")
    assert status_of(version) == "StatusCode.NOT_FOUND"
    bad_version = error("onnx_linear", [infer_input("x", x_rows(1))], version="v1")
    assert status_of(bad_version) == "StatusCode.INVALID_ARGUMENT"
    assert "failed to get model version from specified version string 'v1'" in bad_version.message()
    with pytest.raises(InferenceServerException) as info:
        client.get_cuda_shared_memory_status(headers=auth())
    assert status_of(info.value) == "StatusCode.UNIMPLEMENTED" and "not supported by flotilla" in info.value.message()


def test_stream_infer_answers_every_request_and_errors_in_stream(client):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        inputs = {f"r{i}": x_rows(1 + i % 2, seed=20 + i) for i in range(10)}
        for rid, x in inputs.items():
            client.async_stream_infer("onnx_linear", [infer_input("x", x)], request_id=rid)
        client.async_stream_infer("py_text", [infer_input("TEXT", np.array([["boom"]], dtype=object))],
                                  request_id="bad")
        client.async_stream_infer("py_text", [infer_input("TEXT", np.array([["ok"]], dtype=object))],
                                  request_id="good", enable_empty_final_response=True)
        seen = {}
        for _ in range(len(inputs) + 2):
            result, error = results.get(timeout=60)
            if error is not None:
                seen["error"] = error
            else:
                seen[result.get_response().id] = result
    finally:
        client.stop_stream()
    assert "cannot upper-case 'boom'" in seen["error"].message()
    for rid, x in inputs.items():
        np.testing.assert_allclose(seen[rid].as_numpy("y"), torch_oracle(x), rtol=1e-5, atol=1e-6)
        assert seen[rid].get_response().parameters["triton_final_response"].bool_param
    assert seen["good"].as_numpy("UPPER").tolist() == [[b"OK"]]


def test_statistics_and_repository(client):
    client.infer("py_text", [infer_input("TEXT", np.array([["a"], ["b"]], dtype=object))], headers=auth())
    stats = client.get_inference_statistics("py_text", headers=auth(), as_json=True)["model_stats"][0]
    assert stats["name"] == "py_text" and int(stats["inference_count"]) >= 2
    served = REPOSITORY_MODELS | PIPELINE_MODELS | {"tiny", "minilm"}
    names = {s.name for s in client.get_inference_statistics(headers=auth()).model_stats}
    assert names == served
    index = client.get_model_repository_index(headers=auth())
    assert {(m.name, m.state) for m in index.models} == {(n, "READY") for n in served}
    client.unload_model("py_text", headers=auth())
    assert not client.is_model_ready("py_text", headers=auth())
    with pytest.raises(InferenceServerException) as info:
        client.infer("py_text", [infer_input("TEXT", np.array([["a"]], dtype=object))], headers=auth())
    assert status_of(info.value) == "StatusCode.NOT_FOUND"
    client.load_model("py_text", headers=auth())
    assert client.is_model_ready("py_text", headers=auth())
    # Triton's load API with model files: a new scale model.py (factor 3) under the current config
    config = client.get_model_config("scale", headers=auth(), as_json=True)["config"]
    client.load_model("scale", headers=auth(), config=json.dumps(config),
                      files={"file:1/model.py": (SCALE_PY % (3.0, 0.0)).encode()})
    result = client.infer("scale", [infer_input("X", np.ones((1, 2), np.float32))], headers=auth())
    assert result.as_numpy("Y").tolist() == [[3.0, 3.0]]
    assert result.get_response().parameters["served_by"].string_param == "1"
    for name in ("tiny", "minilm"):
        with pytest.raises(InferenceServerException) as info:
            client.unload_model(name, headers=auth())
        assert status_of(info.value) == "StatusCode.UNIMPLEMENTED"


def test_ensemble_over_grpc(client):
    texts = ["grpc ensemble", "x y z", "Hello"]
    result = client.infer("embed", [infer_input("TEXT", texts_array(texts))], headers=auth())
    np.testing.assert_allclose(result.as_numpy("EMBEDDING"), reference_embedding(make_encoder(ENCODER_SEED), texts),
                               rtol=1e-5, atol=1e-6)


def test_embedding_model_matches_v1_embeddings(client, server):
    import httpx
    texts = ["A man is eating food.", "A man is riding a horse.", "caf\u00e9 \u4e16\u754c"]
    r = httpx.post(server.url + "/v1/embeddings", headers=server.headers, timeout=60,
                   json={"model": "minilm", "input": texts, "encoding_format": "float"})
    assert r.status_code == 200, r.text
    want = np.array([d["embedding"] for d in r.json()["data"]], np.float32)
    result = client.infer("minilm", [infer_input("text_input", np.array([[t.encode()] for t in texts], dtype=object))],
                          headers=auth())
    np.testing.assert_allclose(result.as_numpy("embedding"), want, rtol=1e-5, atol=1e-6)
    meta = client.get_model_metadata("minilm", headers=auth(), as_json=True)
    assert meta["outputs"] == [{"name": "embedding", "datatype": "FP32", "shape": ["-1", "384"]}]
    for binary in (True, False):
        body = {"inputs": [{"name": "text_input", "shape": [len(texts), 1], "datatype": "BYTES", "data": texts}],
                "outputs": [{"name": "embedding", "parameters": {"binary_data": binary}}]}
        r = httpx.post(server.url + "/v2/models/minilm/infer", json=body, headers=server.headers, timeout=60)
        assert r.status_code == 200, r.text
        if binary:
            header = int(r.headers["Inference-Header-Content-Length"])
            got = np.frombuffer(r.content[header:], np.float32).reshape(len(texts), 384)
        else:
            got = np.array(r.json()["outputs"][0]["data"], np.float32).reshape(len(texts), 384)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InferenceServerException) as info:
        client.infer("minilm", [infer_input("text_input", np.array([[b"x"]], dtype=object))], headers=auth(),
                     parameters={"pooling": "cls"})
    assert status_of(info.value) == "StatusCode.INVALID_ARGUMENT" and "'pooling'" in info.value.message()


# ------------------------------------------------------------------ LLMs: ``flotilla serve MODEL --grpc-port``

PROMPT = "The capital of France is"


def greedy_completion(server, max_tokens: int, prompt: str = PROMPT) -> str:
    import httpx
    r = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=60,
                   json={"model": "tiny", "prompt": prompt, "temperature": 0, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def text_inputs(prompt: str, **flags) -> list:
    inputs = [infer_input("text_input", np.array([prompt.encode()], dtype=object))]
    for name, value in flags.items():
        array = np.array([json.dumps(value).encode()], dtype=object) if isinstance(value, dict) else np.array([value])
        inputs.append(infer_input(name, array))
    return inputs


def test_llm_stream_returns_the_tokens_of_greedy_completions(server):
    expected = greedy_completion(server, 12)
    client = tg.InferenceServerClient(server.grpc_url)
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        client.async_stream_infer("tiny", text_inputs(PROMPT, stream=True,
                                                      sampling_parameters={"temperature": 0, "max_tokens": 12}),
                                  request_id="gen-1", enable_empty_final_response=True)
        pieces = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            assert response.id == "gen-1" and response.model_name == "tiny"
            if response.parameters["triton_final_response"].bool_param:
                assert len(response.outputs) == 0
                break
            pieces.append(result.as_numpy("text_output")[0].decode())
    finally:
        client.stop_stream()
        client.close()
    assert len(pieces) > 1 and "".join(pieces) == expected


def test_llm_infer_over_grpc_and_http_and_its_metadata(server):
    import httpx
    expected = greedy_completion(server, 8)
    client = tg.InferenceServerClient(server.grpc_url)
    try:
        result = client.infer("tiny", text_inputs(PROMPT), headers=auth(),
                              parameters={"temperature": 0, "max_tokens": 8})
        assert result.as_numpy("text_output")[0].decode() == PROMPT + expected     # the vLLM backend's default
        config = client.get_model_config("tiny", headers=auth()).config
        assert config.model_transaction_policy.decoupled and config.input[0].name == "text_input"
        assert client.is_model_ready("tiny", headers=auth())
        with pytest.raises(InferenceServerException) as info:
            client.infer("tiny", text_inputs(PROMPT, sampling_parameters={"bogus": 1}), headers=auth())
        assert status_of(info.value) == "StatusCode.INVALID_ARGUMENT" and "'bogus'" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.unload_model("tiny", headers=auth())
        assert status_of(info.value) == "StatusCode.UNIMPLEMENTED"
    finally:
        client.close()
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]},
                       {"name": "exclude_input_in_output", "shape": [1], "datatype": "BOOL", "data": [True]}],
            "parameters": {"temperature": 0, "max_tokens": 8}}
    r = httpx.post(server.url + "/v2/models/tiny/infer", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [expected], r.text
    assert httpx.get(server.url + "/v2/health/ready").status_code == 200
    metrics = httpx.get(server.url + "/metrics").text
    assert 'nv_inference_request_success{model="tiny",version="1"}' in metrics


def test_triton_generate_extension_over_http(server):
    import httpx
    from test_server_helpers import sse_events
    expected = greedy_completion(server, 10)
    body = {"text_input": PROMPT, "id": "g7", "parameters": {"temperature": 0, "max_tokens": 10},
            "exclude_input_in_output": True}
    r = httpx.post(server.url + "/v2/models/tiny/generate", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json() == {"id": "g7", "model_name": "tiny", "model_version": "1", "text_output": expected}
    with httpx.stream("POST", server.url + "/v2/models/tiny/generate_stream", headers=server.headers, timeout=60,
                      json={"text_input": PROMPT, "max_tokens": 10, "stream": True,
                            "sampling_parameters": json.dumps({"temperature": 0})}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response.iter_lines())
    assert len(events) > 1 and all(e["model_name"] == "tiny" for e in events)
    assert "".join(e["text_output"] for e in events) == expected
    r = httpx.post(server.url + "/v2/models/tiny/generate", headers=server.headers, timeout=60,
                   json={"text_input": PROMPT, "parameters": {"top_q": 1}})
    assert r.status_code == 400 and "'top_q'" in r.json()["error"]
    r = httpx.post(server.url + "/v2/models/onnx_linear/generate", headers=server.headers, timeout=60,
                   json={"text_input": PROMPT})
    assert r.status_code == 501 and r.json()["error"]


def test_llm_pipeline_ensemble_streams_every_token_through_post_processing(server):
    """pre-process -> the server's LLM -> post-process (Triton's LLM ensemble), streamed over gRPC: one
    response per LLM response, each upper-cased by the post-processing model; not streamed: one response."""
    import httpx
    prompt = "Name a city"
    expected = greedy_completion(server, 12, TEMPLATE.format(prompt))
    client = tg.InferenceServerClient(server.grpc_url)
    config = client.get_model_config("llm_pipeline", headers=auth()).config
    assert config.model_transaction_policy.decoupled            # auto-completed: a step streams
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)), headers=auth())
    try:
        inputs = [infer_input("PROMPT", np.array([prompt.encode()], dtype=object)),
                  infer_input("stream", np.array([True]))]
        client.async_stream_infer("llm_pipeline", inputs, request_id="pipe-1", enable_empty_final_response=True,
                                  parameters={"temperature": 0, "max_tokens": 12})
        pieces = []
        while True:
            result, error = results.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            assert response.id == "pipe-1" and response.model_name == "llm_pipeline"
            if response.parameters["triton_final_response"].bool_param:
                break
            pieces.append(result.as_numpy("RESPONSE")[0].decode())
    finally:
        client.stop_stream()
        client.close()
    assert len(pieces) > 1 and "".join(pieces) == expected.upper()
    body = {"inputs": [{"name": "PROMPT", "shape": [1], "datatype": "BYTES", "data": [prompt]},
                       {"name": "exclude_input_in_output", "shape": [1], "datatype": "BOOL", "data": [True]}],
            "parameters": {"temperature": 0, "max_tokens": 12}}
    r = httpx.post(server.url + "/v2/models/llm_pipeline/infer", json=body, headers=server.headers, timeout=60)
    assert r.status_code == 200 and r.json()["outputs"][0]["data"] == [expected.upper()], r.text
    # Triton's generate extension on the ensemble: JSON fields named like its inputs become those inputs.
    from test_server_helpers import sse_events
    with httpx.stream("POST", server.url + "/v2/models/llm_pipeline/generate_stream", headers=server.headers,
                      timeout=60, json={"PROMPT": prompt, "stream": True,
                                        "parameters": {"temperature": 0, "max_tokens": 12}}) as response:
        assert response.status_code == 200
        events = sse_events(response.iter_lines())
    assert len(events) > 1 and "".join(e["RESPONSE"] for e in events) == expected.upper()
    stats = httpx.get(server.url + "/v2/models/llm_pipeline/stats", headers=server.headers).json()
    assert stats["model_stats"][0]["inference_stats"]["success"]["count"] == 3


def aborted_requests(server) -> float:
    import httpx
    text = httpx.get(server.url + "/metrics", timeout=10).text
    line = next((ln for ln in text.splitlines() if ln.startswith("vllm:request_success_total{")
                 and 'finished_reason="abort"' in ln and 'model_name="tiny"' in ln), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def test_an_http_client_that_leaves_aborts_the_llm_generation(server):
    import time

    import httpx
    before = aborted_requests(server)
    body = {"inputs": [{"name": "text_input", "shape": [1], "datatype": "BYTES", "data": [PROMPT]}],
            "parameters": {"temperature": 0, "max_tokens": 480, "ignore_eos": True}}
    # 480 tokens (the model's whole context) against a 0.15 s wait, so the client leaves mid-generation: 240
    # tokens against 0.3 s once finished first, on a fast machine
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v2/models/tiny/infer", json=body, headers=server.headers, timeout=0.15)
    deadline = time.monotonic() + 60
    while aborted_requests(server) <= before:
        assert time.monotonic() < deadline, "the generation was not aborted"
        time.sleep(0.05)


def test_an_explicit_grpc_port_in_use_fails_before_loading(tiny_llama):
    import socket
    import subprocess
    import sys
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", tiny_llama[0], "--port",
                               str(free_port()), "--grpc-port", str(busy.getsockname()[1])],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "(--grpc-port)" in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", tiny_llama[0], "--ray",
                           "--grpc-port", "9001"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--grpc-port is not available with --ray" in proc.stderr, proc.stderr


def test_sigterm_drains_grpc_requests_in_flight_and_refuses_new_ones(server, client):
    """Last in this module: it stops the module's server (SIGTERM), as the fixture's teardown would."""
    import signal
    import time

    import httpx
    gate_dir = server.repo / "gate"
    results: queue.Queue = queue.Queue()
    client.async_infer("gate", [infer_input("X", np.array([4.0], np.float32))], headers=auth(),
                       callback=lambda result, error: results.put((result, error)))
    deadline = time.monotonic() + 60
    while not (gate_dir / "started").exists():
        assert time.monotonic() < deadline, "the request never reached the model"
        time.sleep(0.01)
    # A second request waits behind the first (one instance, no batching): Triton's pending-request gauge.
    client.async_infer("gate", [infer_input("X", np.array([5.0], np.float32))], headers=auth(),
                       callback=lambda result, error: results.put((result, error)))
    pending = 'nv_inference_pending_request_count{model="gate",version="1"} 1'
    while pending not in httpx.get(server.url + "/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "the queued request never showed in nv_inference_pending_request_count"
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 60
    while client.is_server_ready():          # draining: not ready, and new inferences are refused
        assert time.monotonic() < deadline, "the server never started draining"
        time.sleep(0.01)
    with pytest.raises(InferenceServerException) as info:
        client.infer("onnx_linear", [infer_input("x", x_rows(1))], headers=auth())
    assert status_of(info.value) == "StatusCode.UNAVAILABLE" and "shutting down" in info.value.message()
    (gate_dir / "release").touch()
    answers = [results.get(timeout=60) for _ in range(2)]
    assert all(error is None for _, error in answers), answers
    assert sorted(result.as_numpy("Y").tolist()[0] for result, _ in answers) == [4.0, 5.0]
    assert server.proc.wait(timeout=60) == 0, server.output()
