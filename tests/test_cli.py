"""The ``flotilla`` command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import smollm2_gguf_path


def flotilla(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert proc.stderr.startswith("error:") or "\nerror:" in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr


def test_models_lists_the_embedded_model():
    proc = flotilla("models")
    assert proc.returncode == 0, proc.stderr
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("smollm2-135m-instruct"))
    assert "installed at" in line and "not installed" not in line
    assert smollm2_gguf_path() in line


def test_console_script_is_installed():
    script = os.path.join(os.path.dirname(sys.executable), "flotilla")
    if not os.path.exists(script):
        pytest.skip("no flotilla console script next to this interpreter")
    proc = subprocess.run([script, "models"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "smollm2-135m-instruct" in proc.stdout


def test_generate_with_a_tiny_model(tiny_llama, tiny_llama_engine):
    from flotilla import SamplingParams
    path, _ = tiny_llama
    (ref,) = tiny_llama_engine.generate("Hello, my name is", SamplingParams(temperature=0.0, max_tokens=5))
    proc = flotilla("generate", "--model", path, "--max-model-len", "256", "--num-kv-blocks", "32",
                    "--prompt", "Hello, my name is", "--max-tokens", "5")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ref.outputs[0].text + "\n"


def test_generate_unknown_model_fails_cleanly():
    proc = flotilla("generate", "--model", "/nonexistent", "--prompt", "x")
    assert_clean_failure(proc, "/nonexistent")


def test_generate_bad_request_fails_cleanly(tiny_llama):
    path, _ = tiny_llama
    proc = flotilla("generate", "--model", path, "--max-model-len", "256", "--num-kv-blocks", "32",
                    "--prompt", "x", "--max-tokens", "-1")
    assert_clean_failure(proc, "max_tokens")
    proc = flotilla("generate", "--model", path, "--max-model-len", "256", "--num-kv-blocks", "2",
                    "--prompt", "x")
    assert_clean_failure(proc, "max_model_len")


def test_bad_arguments_are_usage_errors():
    proc = flotilla("generate", "--prompt", "x", "--max-tokens", "ten")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "--max-tokens" in proc.stderr
    proc = flotilla()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_generate_chat_with_the_embedded_model():
    proc = flotilla("generate", "--chat", "--prompt", "What is the capital of France?", "--max-tokens", "20")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout
