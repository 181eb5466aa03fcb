#!/usr/bin/env bash
# Wheels for the GPU device check (benchmarks/gpu_check.py): what `from flotilla import LLM` imports that the
# device image (Python 3.12 with torch, triton, transformers; no registry access there) lacks, downloaded here
# into .device-wheels (git-ignored) to be carried: run(carry=[".device-wheels"], command="python3 -m pip install
# -q --no-deps .device-wheels/*.whl && python3 -m pip install -q --no-deps --no-build-isolation -e . && ...").
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device-wheels
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d .device-wheels gguf msgspec pyzmq
ls -la .device-wheels
