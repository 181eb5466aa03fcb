"""A model repository and an embedding model on Ray Serve (issue 14), on a local two-node Ray cluster (loopback).

One application for the module, built as ``flotilla serve --config deploy.yaml --ray`` builds it
(``build_openai_ray_app``, Serve started by ``start_serve``, an API key): SmolLM2, the embedding model
all-MiniLM-L6-v2, and a Triton-layout repository written in-test (``triton_repository``: a Python tokenizer ->
ONNX encoder -> Python pooling ensemble ``embed``, the Python model ``scale``, and ``idle``) in explicit model
control mode loading ``embed`` and ``scale``: five ``repo-<model>`` deployments (the ensemble's composing
models get theirs too), ``idle`` not loaded. Oracles: the torch module the ONNX encoder was exported from, the
ensemble's numpy/torch reference, the scaler's arithmetic, and for embeddings flotilla's in-process
``LLM.embed`` on the same model (embedded mode's code).
"""

from __future__ import annotations

import time

import httpx
import numpy as np
import openai
import pytest
import torch

ray = pytest.importorskip("ray")
th = pytest.importorskip("tritonclient.http")
from ray import serve  # noqa: E402
from ray_cluster_helpers import LOOPBACK, loopback_cluster  # noqa: E402
from tritonclient.utils import np_to_triton_dtype  # noqa: E402
from triton_repository import (make_encoder, reference_embedding, texts_array, tokenize,  # noqa: E402
                               write_embedding_repository, write_scale)

from flotilla.deploy.spec import DeploymentConfig, ModelSpec, RepositorySpec  # noqa: E402

pytestmark = pytest.mark.slow

KEY = "sk-ray-repository"
ENCODER_SEED = 11
FACTOR = 3.0
TEXTS = ["Hello world", "the quick brown fox jumps", "a", "Ray Serve and Triton", "one two three four five six"]
SENTENCES = ["A cat sits on the mat.", "Distributed inference on CPUs", "naïve café – emoji 🙂 and CJK 漢字",
             " ".join(f"word{i}" for i in range(300)), "short", "What is the capital of France?"]
MIN_COSINE = 0.9999


def auth() -> dict:
    """Fresh headers per call: tritonclient.http adds Inference-Header-Content-Length to the dict it is given."""
    return {"Authorization": f"Bearer {KEY}"}


def wait_until(predicate, timeout_s: float, period_s: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period_s)
    return predicate()


def status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=10).status_code
    except httpx.HTTPError:
        return None


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-repo") / "models"
    write_embedding_repository(root, make_encoder(ENCODER_SEED))
    write_scale(root, 1, factor=FACTOR)
    write_scale(root, 1, factor=5.0, name="idle")
    return root


@pytest.fixture(scope="module")
def url(repo):
    from flotilla.deploy.ray_serve import APP_NAME, free_port
    from flotilla.entrypoints.openai.ray_ingress import build_openai_ray_app
    from flotilla.entrypoints.openai.ray_server import start_serve
    one_thread = {"num_threads": 1}
    config = DeploymentConfig(
        models=(ModelSpec(name="smol", model="smollm2-135m-instruct",
                          engine=dict(one_thread, max_model_len=256, num_kv_blocks=64, max_num_seqs=4)),
                ModelSpec(name="minilm", model="all-minilm-l6-v2", engine=dict(one_thread))),
        model_repository=RepositorySpec(paths=(str(repo),), model_control_mode="explicit",
                                        load_models=("embed", "scale")))
    with loopback_cluster(num_cpus=4) as cluster:   # 7 replicas of 1 CPU (2 models, 5 repository models)
        ray.init(address=cluster.address)
        try:
            port = free_port()
            start_serve(LOOPBACK, port)
            serve.run(build_openai_ray_app(config, api_key=KEY), name=APP_NAME, route_prefix="/")
            base = f"http://{LOOPBACK}:{port}"
            assert wait_until(lambda: status(base + "/v2/health/ready") == 200 and status(base + "/health") == 200,
                              120), (status(base + "/v2/health/ready"), status(base + "/health"))
            yield base
        finally:
            serve.shutdown()


@pytest.fixture(scope="module")
def client(url):
    c = th.InferenceServerClient(url.removeprefix("http://"), concurrency=4, network_timeout=120)
    yield c
    c.close()


def infer_input(name: str, array: np.ndarray, binary: bool) -> "th.InferInput":
    tensor = th.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def outputs(*names: str, binary: bool) -> list:
    return [th.InferRequestedOutput(n, binary_data=binary) for n in names]


@pytest.mark.parametrize("binary", [True, False])
def test_onnx_python_and_ensemble_models_equal_their_oracles(client, binary):
    encoder = make_encoder(ENCODER_SEED)
    ids, mask = tokenize(TEXTS)                                         # (5, longest) each
    result = client.infer("encoder", [infer_input("INPUT_IDS", ids, binary), infer_input("ATTENTION_MASK", mask, binary)],
                          outputs=outputs("HIDDEN", binary=binary), headers=auth())
    with torch.no_grad():
        hidden = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()   # (5, longest, WIDTH)
    np.testing.assert_allclose(result.as_numpy("HIDDEN"), hidden, atol=1e-5)
    assert result.get_response()["model_version"] == "1"

    x = np.random.default_rng(0).standard_normal((3, 2)).astype(np.float32)
    result = client.infer("scale", [infer_input("X", x, binary)], outputs=outputs("Y", binary=binary),
                          headers=auth())
    np.testing.assert_array_equal(result.as_numpy("Y"), x * np.float32(FACTOR))
    assert result.get_response()["parameters"] == {"served_by": "1"}     # the Python model's response parameter

    result = client.infer("embed", [infer_input("TEXT", texts_array(TEXTS), binary)],
                          outputs=outputs("EMBEDDING", binary=binary), headers=auth())
    np.testing.assert_allclose(result.as_numpy("EMBEDDING"), reference_embedding(encoder, TEXTS), atol=1e-5)


def test_concurrent_requests_are_counted_in_statistics(client, url):
    before = client.get_inference_statistics("scale", headers=auth())["model_stats"][0]["inference_count"]
    rows = np.arange(8, dtype=np.float32).reshape(4, 2)
    pending = [client.async_infer("scale", [infer_input("X", rows + i, True)], headers=auth()) for i in range(16)]
    for i, request in enumerate(pending):
        np.testing.assert_array_equal(request.get_result(timeout=120).as_numpy("Y"), (rows + i) * np.float32(FACTOR))
    stats = client.get_inference_statistics("scale", headers=auth())["model_stats"]   # fresh: every replica asked
    assert [s["version"] for s in stats] == ["1"]
    assert stats[0]["inference_count"] - before == 16 * 4
    assert stats[0]["inference_stats"]["success"]["count"] >= 16
    assert sum(b["compute_infer"]["count"] for b in stats[0]["batch_stats"]) == stats[0]["execution_count"]
    metrics = httpx.get(url + "/metrics", timeout=30).text                           # collected for the scrape
    assert f'nv_inference_count{{model="scale",version="1"}} {stats[0]["inference_count"]}' in metrics.splitlines()


def test_v2_health_metadata_config_and_index(client, url):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("embed", headers=auth()) and client.is_model_ready("encoder", "1", headers=auth())
    assert not client.is_model_ready("idle", headers=auth())           # in the repository, not loaded
    assert client.get_model_metadata("encoder", headers=auth()) == {
        "name": "encoder", "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": "INPUT_IDS", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "ATTENTION_MASK", "datatype": "INT64", "shape": [-1, -1]}],
        "outputs": [{"name": "HIDDEN", "datatype": "FP32", "shape": [-1, -1, 8]}]}
    config = client.get_model_config("scale", headers=auth())
    assert config["max_batch_size"] == 16 and config["instance_group"][0]["count"] == 2
    assert "binary_tensor_data" in client.get_server_metadata(headers=auth())["extensions"]
    index = {(e["name"], e.get("version", ""), e.get("state", "")) for e in client.get_model_repository_index(headers=auth())}
    loaded = {"embed", "tokenizer", "encoder", "pooling", "scale"}
    assert {(m, "1", "READY") for m in loaded} | {("idle", "", "")} <= index
    assert {"smol", "minilm"} <= {name for name, _, _ in index}     # the file's models answer v2 too


def test_errors_have_tritons_shape(url):
    body = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "FP32", "data": [1.0, 2.0]}]}
    r = httpx.post(f"{url}/v2/models/nope/infer", json=body, headers=auth(), timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Request for unknown model: 'nope' is not found"}
    r = httpx.post(f"{url}/v2/models/scale/versions/7/infer", json=body, headers=auth(), timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Request for unknown model: 'scale' version 7 is not found"}
    r = httpx.post(f"{url}/v2/models/idle/infer", json=body, headers=auth(), timeout=30)
    assert r.status_code == 404 and r.json() == {"error": "Request for unknown model: 'idle' is not found"}
    bad = {"inputs": [{"name": "X", "shape": [1, 2], "datatype": "INT32", "data": [1, 2]}]}
    r = httpx.post(f"{url}/v2/models/scale/infer", json=bad, headers=auth(), timeout=30)    # the replica's check
    assert r.status_code == 400 and "data-type is 'INT32', but model 'scale' expects 'FP32'" in r.json()["error"]
    r = httpx.post(f"{url}/v2/repository/models/idle/load", headers=auth(), timeout=30)
    assert r.status_code == 501 and "redeploy" in r.json()["error"]
    r = httpx.post(f"{url}/v2/models/scale/infer", json=body, timeout=30)                  # no API key
    assert r.status_code == 401


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    """Embedded mode's rows of ``SENTENCES`` (flotilla's in-process ``LLM.embed`` on the same model)."""
    from flotilla import LLM
    llm = LLM(model="all-minilm-l6-v2", num_threads=1)
    return np.array([o.outputs.embedding for o in llm.embed(SENTENCES)], dtype=np.float32)    # (6, 384)


def test_embeddings_on_their_own_deployment_equal_embedded_mode(url, client, reference):
    oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    response = oa.embeddings.create(model="minilm", input=SENTENCES)                   # base64, the client's default
    ours = np.array([d.embedding for d in response.data], dtype=np.float32)
    assert [d.index for d in response.data] == list(range(len(SENTENCES))) and ours.shape == reference.shape
    assert_cosine(ours, reference)
    assert response.usage.prompt_tokens > 0
    floats = oa.embeddings.create(model="minilm", input=SENTENCES[:2], encoding_format="float")
    assert_cosine(np.array([d.embedding for d in floats.data], np.float32), reference[:2])

    result = client.infer("minilm", [infer_input("text_input", texts_array(SENTENCES), True)], headers=auth())
    assert_cosine(result.as_numpy("embedding"), reference)                             # the same model over /v2

    with pytest.raises(openai.BadRequestError) as e:
        oa.embeddings.create(model="minilm", input=SENTENCES[:1], dimensions=8)         # not a Matryoshka model
    assert e.value.body["param"] == "dimensions"


def test_inputs_of_one_request_share_forward_passes_in_the_replica(url):
    handle = serve.get_deployment_handle("minilm", app_name="flotilla")

    def passes() -> int:
        return sum(sum(s["iteration_tokens"]) for s in handle.broadcast("stats").results(timeout_s=30))

    before = passes()
    oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    response = oa.embeddings.create(model="minilm", input=[f"sentence number {i}" for i in range(32)])
    assert len(response.data) == 32
    assert passes() - before < 16              # 32 inputs, batched by the replica's dynamic batcher


def test_remote_embedder_one_message_per_request(url, reference):
    """The ingress's ``RemoteEmbedder`` over the deployment handle, here in the test process: ``embed_many``
    (one request's inputs) and ``embed`` calls started together both reach one replica in one message."""
    import asyncio

    from flotilla.deploy.remote_embedder import RemoteEmbedder
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.pooling_params import PoolingParams
    handle = serve.get_deployment_handle("minilm", app_name="flotilla")

    async def run():
        engine = RemoteEmbedder("minilm", handle, EngineArgs(model="all-minilm-l6-v2", num_threads=1))
        try:
            ids = [engine.input_processor.process(t, "input") for t in SENTENCES]
            params = engine.check_params(PoolingParams())
            many = await engine.embed_many(ids, params)
            single = await asyncio.gather(*(engine.embed(i, params) for i in ids))
            with pytest.raises(Exception) as e:
                await engine.embed_many([[engine.model_config.vocab_size + 5]], params)
            return many, single, e.value
        finally:
            engine.shutdown()

    many, single, error = asyncio.run(asyncio.wait_for(run(), 120))
    assert_cosine(np.stack(many), reference)
    assert_cosine(np.stack(single), reference)
    assert type(error).__name__ == "InvalidRequestError" and "outside the vocabulary" in str(error)


def test_the_llm_serves_next_to_the_repository(url):
    oa = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    r = oa.completions.create(model="smol", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError):
        oa.completions.create(model="minilm", prompt="hi", max_tokens=2)                # an embedding model


def assert_cosine(ours: np.ndarray, reference: np.ndarray) -> None:
    ours_t, ref_t = torch.from_numpy(ours), torch.from_numpy(reference)
    cosine = torch.nn.functional.cosine_similarity(ours_t, ref_t, dim=-1)
    worst = int(cosine.argmin())
    assert float(cosine.min()) >= MIN_COSINE, f"row {worst}: cosine {float(cosine[worst])}"
