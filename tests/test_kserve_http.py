"""KServe v2 REST with the real ``tritonclient.http`` (2.73) against ``flotilla serve --model-repository`` on
loopback (one server per module, with an API key).

The repository is written in-test (``kserve_helpers``: an ONNX model exported from a small torch module,
Python models, the tokenizer -> ONNX encoder -> pooling ensemble). Oracles: the torch modules (ONNX model,
ensemble: ``triton_repository.reference_embedding``), the inputs themselves for the identity model.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import json

import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as th
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from kserve_helpers import ALL_TYPES, ENCODER_SEED, REPOSITORY_MODELS, repository_server, torch_oracle, write_repository
from triton_repository import make_encoder, reference_embedding, texts_array

KEY = "kserve-test-key"


def auth() -> dict:
    """Fresh headers per call: tritonclient.http adds Inference-Header-Content-Length to the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = repository_server(write_repository(tmp_path_factory.mktemp("kserve-http")), KEY)
    # Every model loaded at start: if one did not, fail here with the server's reasons (a CI run once had the
    # ONNX encoder UNAVAILABLE and five tests failing without them).
    index = httpx.post(f"{srv.url}/v2/repository/index", headers=auth(), json={}).json()
    failed = [row for row in index if row.get("state") != "READY"]
    assert not failed, (failed, srv.output()[-4000:])
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    c = th.InferenceServerClient(server.http_url, concurrency=8, network_timeout=60)
    yield c
    c.close()


def infer_input(name: str, array: np.ndarray, binary: bool = True) -> th.InferInput:
    tensor = th.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def x_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


def test_health_and_metadata(client, server):
    assert client.is_server_live() and client.is_server_ready()   # health needs no API key
    meta = client.get_server_metadata(headers=auth())
    assert meta["name"] == "flotilla" and "binary_tensor_data" in meta["extensions"]
    model = client.get_model_metadata("onnx_linear", headers=auth())
    assert model == {"name": "onnx_linear", "versions": ["1"], "platform": "onnxruntime_onnx",
                     "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                     "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}]}
    assert client.get_model_metadata("onnx_linear", "1", headers=auth())["name"] == "onnx_linear"
    assert client.is_model_ready("py_text", headers=auth()) and client.is_model_ready("py_text", "1", headers=auth())
    assert not client.is_model_ready("nope", headers=auth())
    assert not client.is_model_ready("py_text", "9", headers=auth())
    r = httpx.get(f"{server.url}/v2/models/nope/ready", headers=auth())
    assert r.status_code == 400 and r.json() == {"error": "Model version not ready"}
    config = client.get_model_config("onnx_linear", headers=auth())
    assert config["max_batch_size"] == 8 and config["input"][0]["dims"] == [4]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000


def test_api_key_is_required_except_for_health(server):
    base = f"{server.url}"
    for path in ("/v2", "/v2/models/onnx_linear", "/v2/models/stats"):
        r = httpx.get(base + path)
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
    with pytest.raises(InferenceServerException) as info:
        th.InferenceServerClient(server.http_url).infer("onnx_linear", [infer_input("x", x_rows(1))])
    assert info.value.status() == "401" and "API key" in info.value.message()
    assert httpx.get(base + "/v2/health/live").status_code == 200
    assert httpx.get(base + "/v2/health/ready").status_code == 200


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_onnx_infer_matches_the_torch_module(client, binary):
    x = x_rows(3, seed=1)
    result = client.infer("onnx_linear", [infer_input("x", x, binary)], headers=auth(), request_id="abc",
                          outputs=[th.InferRequestedOutput("y", binary_data=binary)])
    np.testing.assert_allclose(result.as_numpy("y"), torch_oracle(x), rtol=1e-5, atol=1e-6)
    response = result.get_response()
    assert response["id"] == "abc" and response["model_name"] == "onnx_linear" and response["model_version"] == "1"
    assert ("data" in response["outputs"][0]) == (not binary)


def test_concurrent_requests_are_batched_and_each_gets_its_rows(client, server):
    before = client.get_inference_statistics("onnx_linear", headers=auth())["model_stats"][0]
    inputs = [x_rows(1 + i % 3, seed=10 + i) for i in range(24)]
    pending = [client.async_infer("onnx_linear", [infer_input("x", x)], headers=auth()) for x in inputs]
    for x, request in zip(inputs, pending):
        np.testing.assert_allclose(request.get_result().as_numpy("y"), torch_oracle(x), rtol=1e-5, atol=1e-6)
    after = client.get_inference_statistics("onnx_linear", "1", headers=auth())["model_stats"][0]
    rows = sum(len(x) for x in inputs)
    assert after["inference_count"] - before["inference_count"] == rows
    assert after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"] == 24
    assert 1 <= after["execution_count"] - before["execution_count"] <= 24
    text = httpx.get(f"{server.url}/metrics").text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nv_")}
    assert samples['nv_inference_count{model="onnx_linear",version="1"}'] >= rows
    assert samples['nv_inference_request_success{model="onnx_linear",version="1"}'] >= 24
    assert samples['nv_inference_exec_count{model="onnx_linear",version="1"}'] == after["execution_count"]
    assert samples['nv_inference_queue_duration_us{model="onnx_linear",version="1"}'] > 0
    assert samples['nv_inference_compute_infer_duration_us{model="onnx_linear",version="1"}'] > 0
    all_stats = client.get_inference_statistics(headers=auth())["model_stats"]
    assert {s["name"] for s in all_stats} == REPOSITORY_MODELS


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_python_model_bytes_in_and_out(client, binary):
    text = np.array([["hello"], ["w\u00f6rld \u4e16"]], dtype=object)
    result = client.infer("py_text", [infer_input("TEXT", text, binary)], headers=auth(),
                          outputs=[th.InferRequestedOutput("UPPER", binary_data=binary),
                                   th.InferRequestedOutput("LENGTH", binary_data=binary)])
    upper = result.as_numpy("UPPER").reshape(-1).tolist()
    decoded = [u.decode() if isinstance(u, bytes) else u for u in upper]
    assert decoded == [t.encode().upper().decode() for t in text.reshape(-1)]    # the model: bytes.upper()
    assert result.as_numpy("LENGTH").reshape(-1).tolist() == [5, len("w\u00f6rld \u4e16".encode())]


def test_every_datatype_round_trips(client, server):
    rng = np.random.default_rng(3)
    arrays = {}
    for t in ALL_TYPES:
        if t == "BYTES":
            arrays[t] = np.array([[b"a", b"\xff\x00"], [b"", "\u00e9".encode()]], dtype=object)
        elif t == "BOOL":
            arrays[t] = np.array([[True, False], [False, True]])
        elif t == "BF16":
            arrays[t] = rng.standard_normal((2, 2)).astype(ml_dtypes.bfloat16)
        elif t.startswith("FP"):
            arrays[t] = rng.standard_normal((2, 2)).astype(np.dtype(t.lower().replace("fp", "float")))
        else:
            dtype = np.dtype(t.lower())
            arrays[t] = np.array([[np.iinfo(dtype).min, 0], [1, np.iinfo(dtype).max]], dtype=dtype)
    inputs = [infer_input(f"IN_{t}", a) for t, a in arrays.items()]
    result = client.infer("identity_all", inputs, headers=auth())
    for t, a in arrays.items():
        got = result.as_numpy(f"OUT_{t}")
        assert got.dtype == a.dtype and got.tolist() == a.tolist(), t
    # JSON tensors (nested data; BF16 and FP16 as numbers), with no Content-Type header
    def json_data(t: str, a: np.ndarray) -> list:
        if t in ("BF16", "FP16"):
            return a.astype(np.float32).tolist()
        return [[s.decode("latin-1") for s in row] for row in a.tolist()] if t == "BYTES" else a.tolist()

    doc = {"inputs": [{"name": f"IN_{t}", "shape": [2, 2], "datatype": t, "data": json_data(t, a)}
                      for t, a in arrays.items()]}
    r = httpx.post(f"{server.url}/v2/models/identity_all/infer", content=json.dumps(doc).encode(),
                   headers=auth())
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    for t, a in arrays.items():
        out = outputs[f"OUT_{t}"]
        assert out["datatype"] == t and out["shape"] == [2, 2]
        if t == "BYTES":
            assert out["data"] == [s.decode("latin-1") for s in a.reshape(-1).tolist()]
        else:
            np.testing.assert_array_equal(np.array(out["data"], dtype=np.float64), a.reshape(-1).astype(np.float64))


def test_compressed_requests_and_responses(client):
    x = x_rows(2, seed=5)
    result = client.infer("onnx_linear", [infer_input("x", x)], headers=auth(), request_compression_algorithm="gzip",
                          response_compression_algorithm="deflate")
    np.testing.assert_allclose(result.as_numpy("y"), torch_oracle(x), rtol=1e-5, atol=1e-6)


def test_compressed_body_inflating_past_the_limit_is_413(server):
    body = gzip.compress(b" " * (40 * 1024 * 1024))      # 40 MiB of spaces, over the 32 MiB body limit
    r = httpx.post(f"{server.url}/v2/models/onnx_linear/infer", content=body,
                   headers={**auth(), "Content-Encoding": "gzip"})
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]


def error_of(client, model: str, inputs, version: str = "", **kw) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        client.infer(model, inputs, model_version=version, headers=auth(), **kw)
    return info.value


def test_bad_requests_get_triton_s_status_and_message(client, server):
    bad_type = error_of(client, "onnx_linear", [infer_input("x", np.ones((1, 4), np.int32))])
    assert bad_type.status() == "400"
    assert bad_type.message() == "inference input 'x' data-type is 'INT32', but model 'onnx_linear' expects 'FP32'"
    bad_shape = error_of(client, "onnx_linear", [infer_input("x", np.ones((1, 5), np.float32))])
    assert bad_shape.status() == "400" and bad_shape.message().startswith(
        "unexpected shape for input 'x' for model 'onnx_linear'. Expected [-1,4], got [1,5]")
    missing = error_of(client, "onnx_linear", [infer_input("z", np.ones((1, 4), np.float32))])
    assert missing.status() == "400" and missing.message() == "unexpected inference input 'z' for model 'onnx_linear'"
    too_big = error_of(client, "onnx_linear", [infer_input("x", x_rows(9))])
    assert too_big.message() == "inference request batch-size must be <= 8 for 'onnx_linear'"
    unknown = error_of(client, "nope", [infer_input("x", x_rows(1))])
    assert unknown.status() == "404" and unknown.message() == "Request for unknown model: 'nope' is not found"
    version = error_of(client, "onnx_linear", [infer_input("x", x_rows(1))], version="7")
    assert version.status() == "404" and "version 7 is not found" in version.message()
    classification = error_of(client, "onnx_linear", [infer_input("x", x_rows(1))],
                              outputs=[th.InferRequestedOutput("y", class_count=2)])
    assert classification.status() == "501" and "classification" in classification.message()
    base = f"{server.url}"
    for r, status, message in (
            (httpx.post(base + "/v2/models/onnx_linear/infer", content=b"{", headers=auth()), 400,
             "failed to parse the request JSON buffer"),
            (httpx.get(base + "/v2/models/onnx_linear/infer", headers=auth()), 405, "Method Not Allowed"),
            (httpx.get(base + "/v2/nothing/here", headers=auth()), 404, "Not Found"),
            (httpx.get(base + "/v2/models/onnx_linear/versions/x1", headers=auth()), 404, "Not Found")):
        assert r.status_code == status and message in r.json()["error"], r.text


def test_a_bad_request_in_a_batch_fails_alone(client):
    texts = [f"row {i}" for i in range(12)]
    texts[5] = "boom"
    requests = [client.async_infer("py_text", [infer_input("TEXT", np.array([[t]], dtype=object))], headers=auth())
                for t in texts]
    for text, request in zip(texts, requests):
        if text == "boom":
            with pytest.raises(InferenceServerException) as info:
                request.get_result()
            assert info.value.status() == "400" and info.value.message() == "cannot upper-case 'boom'"
        else:
            assert request.get_result().as_numpy("UPPER").tolist() == [[text.upper().encode()]]


def test_repository_index_unload_and_load(client):
    index = client.get_model_repository_index(headers=auth())
    assert {(m["name"], m["state"]) for m in index} == {(name, "READY") for name in REPOSITORY_MODELS}
    client.unload_model("identity_all", headers=auth(), unload_dependents=False)
    assert not client.is_model_ready("identity_all", headers=auth())
    index = {m["name"]: m for m in client.get_model_repository_index(headers=auth())}
    assert index["identity_all"]["state"] == "UNAVAILABLE"
    with pytest.raises(InferenceServerException) as info:
        client.infer("identity_all", [infer_input("IN_BOOL", np.array([[True]]))], headers=auth())
    assert info.value.status() == "404"
    client.load_model("identity_all", headers=auth())
    assert client.is_model_ready("identity_all", headers=auth())
    config = client.get_model_config("scale", headers=auth())
    config["max_batch_size"] = 4               # Triton's load API with a config override (JSON)
    with pytest.raises(InferenceServerException) as info:         # its preferred size 16 no longer fits
        client.load_model("scale", headers=auth(), config=json.dumps(config))
    assert info.value.status() == "400" and "preferred size must be <= max batch size" in info.value.message()
    config["dynamic_batching"]["preferred_batch_size"] = [4]
    client.load_model("scale", headers=auth(), config=json.dumps(config))
    assert client.get_model_config("scale", headers=auth())["max_batch_size"] == 4
    with pytest.raises(InferenceServerException) as info:
        client.load_model("scale", headers=auth(), config="{not json")
    assert info.value.status() == "400"


def test_ensemble_and_response_parameters(client):
    texts = ["Hello world", "a b c d e", "one"]
    want = reference_embedding(make_encoder(ENCODER_SEED), texts)
    for binary in (True, False):
        result = client.infer("embed", [infer_input("TEXT", texts_array(texts), binary)], headers=auth(),
                              outputs=[th.InferRequestedOutput("EMBEDDING", binary_data=binary)])
        np.testing.assert_allclose(result.as_numpy("EMBEDDING"), want, rtol=1e-5, atol=1e-6)
    result = client.infer("scale", [infer_input("X", np.ones((2, 2), np.float32))], headers=auth())
    assert result.as_numpy("Y").tolist() == [[2.0, 2.0], [2.0, 2.0]]
    assert result.get_response()["parameters"] == {"served_by": "1"}


def test_many_parallel_clients_do_not_interfere(server):
    inputs = [x_rows(1, seed=100 + i) for i in range(16)]
    oracle = [torch_oracle(x) for x in inputs]          # in this thread: building the module seeds torch

    def one(i: int) -> np.ndarray:
        c = th.InferenceServerClient(server.http_url)
        try:
            return c.infer("onnx_linear", [infer_input("x", inputs[i], binary=i % 2 == 0)],
                           headers=auth()).as_numpy("y")
        finally:
            c.close()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for got, want in zip(pool.map(one, range(16)), oracle):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
