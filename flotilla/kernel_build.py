"""Builds flotilla's CPU kernel library: every ``flotilla/csrc/*.cpp`` compiled into one shared object, cached.

Contract (``ensure_library``):
- The cache folder is ``<cache>/cpu_kernels/<march>-<key>/``; ``key`` hashes every csrc source and header, the
  torch version, the compile flags (C++ ABI and ``-march`` included) and, for ``-march=native`` only, the CPU's
  feature flags. The library's file name adds a hash of the compiler's version
  (``libflotilla_cpu_ops-<hash>.so``). Without a compiler, a library built earlier for the same key (by any
  compiler) still loads.
- The portable baseline (``march="auto"``) is ``-march=x86-64-v3`` on x86-64 CPUs with all of its features,
  the compiler's default elsewhere, so one build serves every machine of a kind (a shared home directory, a
  container image); wider paths are chosen at run time inside the library (``flotilla/csrc/isa.h``).
- Builds are atomic: objects and the library are written in a private ``tmp-*`` folder and the library is
  ``os.replace``d into place, so the library file is always whole. Builders serialize on an ``fcntl.flock`` of
  ``build.lock``, which the kernel releases when its holder dies: a killed builder never blocks the next
  start, and the next builder removes its leftover ``tmp-*`` folders.
- It returns within ``timeout`` seconds (waiting for another process's build, then compiling under the same
  deadline; the compiler is killed when it runs past it) or raises ``BuildError``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flotilla.file_lock import lock_or_result

CSRC = Path(__file__).parent / "csrc"
LIB_STEM = "libflotilla_cpu_ops"
TMP_PREFIX = "tmp-"
LOCK_NAME = "build.lock"
_POLL_S = 0.05
# x86-64-v3 (psABI): AVX, AVX2, BMI1/2, F16C, FMA, LZCNT (Linux calls it "abm"), MOVBE, XSAVE, plus x86-64-v2.
X86_64_V3_FLAGS = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "cx16",
                             "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})


class BuildError(RuntimeError):
    """The library could not be built or found (the message says why)."""


class CompilerNotFound(BuildError):
    """No working C++ compiler (and no library built earlier for this key)."""


class BuildTimeout(BuildError):
    """The build (or the wait for another process's build) ran past its deadline."""


@dataclass(frozen=True)
class BuildResult:
    library: Path
    built: bool  # compiled by this call (False: found in the cache)
    lock_wait_s: float  # time spent waiting for another builder's lock
    march: str | None  # the -march the library was compiled with (None: the compiler's default)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them in /proc/cpuinfo; empty where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def portable_march(machine: str, flags: frozenset[str]) -> str | None:
    """The baseline ``-march`` for a CPU: x86-64-v3 where it has all of its features, else None (the
    compiler's default; always on other architectures)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return None
    return "x86-64-v3" if X86_64_V3_FLAGS <= flags else None


def resolve_march(setting: str) -> str | None:
    """``auto`` -> the portable baseline of this CPU; any other setting is used as is."""
    if setting == "auto":
        return portable_march(platform.machine(), cpu_flags())
    return setting


def source_files() -> list[Path]:
    """Every source and header of the library, in a fixed order."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".cpp", ".h", ".hpp"))


def compile_flags(march: str | None) -> list[str]:
    # -ffp-contract=off: no fused multiply-adds, so every path (and eager PyTorch) rounds alike;
    # -fno-trapping-math: lets loops with float selects (clamps) vectorize without AVX-512 masks.
    flags = ["-O3", "-std=c++20", "-fPIC", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"]
    if march:
        flags.append(f"-march={march}")
    return flags


def cache_folder(cache_root: Path, march: str | None) -> Path:
    """The folder of this source tree, torch version, flag set (and, for native builds, CPU)."""
    h = hashlib.sha256()
    for path in source_files():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(f"{torch.__version__}\0{platform.machine()}\0{' '.join(compile_flags(march))}".encode())
    if march == "native":
        h.update(" ".join(sorted(cpu_flags())).encode())
    return cache_root / "cpu_kernels" / f"{march or 'default'}-{h.hexdigest()[:16]}"


def compiler_version(compiler: list[str], timeout: float) -> str | None:
    """The compiler's ``--version`` text, or None when it cannot be run."""
    try:
        done = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def ensure_library(timeout: float, cxx: str, march_setting: str, cache_root: Path) -> BuildResult:
    """The path of a built library (building it when needed), within ``timeout`` seconds; see the module doc."""
    deadline = time.monotonic() + timeout
    march = resolve_march(march_setting)
    folder = cache_folder(cache_root, march)
    compiler = shlex.split(cxx)
    version = compiler_version(compiler, timeout=max(1.0, min(30.0, deadline - time.monotonic()))) \
        if compiler else None
    if version is None:
        built = sorted(folder.glob(f"{LIB_STEM}-*.so"), key=lambda p: p.stat().st_mtime)
        if built:
            return BuildResult(built[-1], False, 0.0, march)
        raise CompilerNotFound(f"no working C++ compiler ({cxx!r}; set CXX) to build the kernels into {folder}")
    tag = hashlib.sha256(f"{shlex.join(compiler)}\0{version}".encode()).hexdigest()[:12]
    library = folder / f"{LIB_STEM}-{tag}.so"
    if library.exists():
        return BuildResult(library, False, 0.0, march)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    fd = _acquire_lock(folder / LOCK_NAME, library, deadline)
    waited = time.monotonic() - start
    if fd is None:  # another process finished the build while this one waited
        return BuildResult(library, False, waited, march)
    try:
        if library.exists():
            return BuildResult(library, False, waited, march)
        _remove_leftovers(folder)
        _compile(compiler, march, library, deadline)
        return BuildResult(library, True, waited, march)
    finally:
        os.close(fd)  # releases the flock


def _acquire_lock(path: Path, library: Path, deadline: float) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when ``library`` appeared while waiting
    (BuildTimeout past ``deadline``)."""
    return lock_or_result(str(path), library.exists, deadline, lambda: BuildTimeout(
        f"another process has held the kernel build lock {path} past the deadline (FLOTILLA_KERNEL_BUILD_TIMEOUT)"),
        poll_s=_POLL_S)


def _remove_leftovers(folder: Path) -> None:
    """Remove what builders that died left behind (called with the lock held, so none of it is live)."""
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _compile(compiler: list[str], march: str | None, library: Path, deadline: float) -> None:
    """Compile each .cpp (in parallel), link them into a private temporary folder, then rename into place."""
    from torch.utils import cpp_extension
    work = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=library.parent))
    try:
        flags = compile_flags(march)
        for inc in cpp_extension.include_paths():
            flags += ["-isystem", inc]
        sources = [p for p in source_files() if p.suffix == ".cpp"]
        objects = [work / f"{p.stem}.o" for p in sources]
        _run_all([[*compiler, *flags, "-c", str(src), "-o", str(obj)] for src, obj in zip(sources, objects)],
                 work, deadline)
        lib_dirs = cpp_extension.library_paths()
        linked = work / library.name
        _run_all([[*compiler, "-shared", "-fopenmp", *map(str, objects), "-o", str(linked),
                   *(f"-L{d}" for d in lib_dirs), *(f"-Wl,-rpath,{d}" for d in lib_dirs),
                   "-lc10", "-ltorch_cpu", "-ltorch"]], work, deadline)
        os.replace(linked, library)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run_all(commands: list[list[str]], work: Path, deadline: float) -> None:
    """Run the commands, at most one per CPU at a time, each in its own process group; kill them all at
    ``deadline`` (BuildTimeout) and raise BuildError with the compiler's output when one fails."""
    width = max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
    pending = list(enumerate(commands))
    running: list[tuple[int, subprocess.Popen, Path]] = []
    try:
        while pending or running:
            while pending and len(running) < width:
                i, cmd = pending.pop(0)
                log = work / f"cmd{i}.log"
                with open(log, "wb") as out:
                    running.append((i, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                        stdin=subprocess.DEVNULL, start_new_session=True), log))
            for item in list(running):
                i, proc, log = item
                if proc.poll() is None:
                    continue
                running.remove(item)
                if proc.returncode != 0:
                    output = log.read_text(errors="replace").strip()[-3000:]
                    raise BuildError(f"the C++ compiler failed (exit {proc.returncode}): "
                                     f"{shlex.join(commands[i])}\n{output}")
            if running and time.monotonic() >= deadline:
                raise BuildTimeout("the kernel build ran past its deadline (raise FLOTILLA_KERNEL_BUILD_TIMEOUT, or "
                                   "build once with scripts/setup.sh)")
            if running:
                time.sleep(_POLL_S)
    finally:
        for _, proc, _ in running:
            _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
