"""The kernel build never blocks a start: real processes hold, lose and race for the build lock.

Each test runs fresh Python processes over an empty cache folder (``FLOTILLA_CACHE_DIR``), so nothing here
depends on the session's own cached library.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from flotilla import envs, kernel_build

# A fresh start: load the kernels, check one op against eager PyTorch, report how it went as one JSON line.
START = textwrap.dedent("""
    import json, sys, time
    import torch
    from flotilla import ops
    t0 = time.monotonic()
    k = ops.cpu_kernels()
    k = ops.cpu_kernels()  # a second call must not retry or warn again
    elapsed = time.monotonic() - t0
    ok = None
    if k is not None:
        x, w = torch.randn(3, 64), torch.randn(64)
        out = torch.empty_like(x)
        k.rms_norm(out, x, w, 1e-6)
        want = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        ok = bool(torch.allclose(out, want, rtol=1e-5, atol=1e-5))
    info = ops.build_info()
    print(json.dumps({"loaded": k is not None, "elapsed": elapsed, "reason": ops.unavailable_reason(), "ok": ok,
                      "library": str(info.library) if info else None, "built": info.built if info else None,
                      "lock_wait": info.lock_wait_s if info else None}))
""")


def child_env(cache: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("FLOTILLA_CPU_KERNELS", "FLOTILLA_KERNEL_BUILD_TIMEOUT")}
    env.update(FLOTILLA_CACHE_DIR=str(cache), **extra)
    return env


def start(cache: Path, timeout: float = 600, **extra: str) -> tuple[dict, str]:
    """Run a fresh start to completion; (its JSON report, its stderr)."""
    done = subprocess.run([sys.executable, "-c", START], env=child_env(cache, **extra), capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def folder_for(cache: Path) -> Path:
    return kernel_build.cache_folder(cache, kernel_build.resolve_march(envs.kernel_march()))


def wait_for(condition, timeout: float = 120, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def lock_is_held(path: Path) -> bool:
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a child and every process it started (its compilers run in their own sessions)."""
    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    proc.kill()
    proc.wait()
    for p in descendants:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(descendants, timeout=30)


def test_lock_held_by_a_live_process_falls_back_within_the_bound(tmp_path):
    folder = folder_for(tmp_path)
    folder.mkdir(parents=True)
    lock = folder / kernel_build.LOCK_NAME
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("locked", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        report, stderr = start(tmp_path, timeout=120, FLOTILLA_KERNEL_BUILD_TIMEOUT="2")
        assert not report["loaded"]
        assert "lock" in report["reason"] and "BuildTimeout" in report["reason"]
        assert 2 <= report["elapsed"] < 60  # waited for the bound, then gave up instead of hanging
        assert stderr.count("flotilla CPU kernels unavailable") == 1  # one warning
        assert holder.poll() is None and lock_is_held(lock)
    finally:
        holder.kill()
        holder.wait()


def test_killed_builder_leftovers_then_concurrent_builders_end_with_one_valid_library(tmp_path):
    """A builder SIGKILLed mid-build leaves its lock file and partial files; three fresh starts then race: the
    dead builder's lock holds none of them up, one builds, the others wait for it and load its library, and
    the leftovers are gone."""
    folder = folder_for(tmp_path)
    builder = subprocess.Popen([sys.executable, "-c", "from flotilla import ops; ops.cpu_kernels()"],
                               env=child_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Mid-build: it holds the lock and its compilers write into its temporary folder.
        wait_for(lambda: folder.exists() and any(p.name.startswith(kernel_build.TMP_PREFIX) for p in folder.iterdir())
                 and lock_is_held(folder / kernel_build.LOCK_NAME), what="the builder to start compiling")
    finally:
        kill_tree(builder)
    assert (folder / kernel_build.LOCK_NAME).exists() and not lock_is_held(folder / kernel_build.LOCK_NAME)
    (folder / "tmp-partial-lib.so").write_bytes(b"\x7fELF truncated")  # a partial file of another dead builder
    assert not list(folder.glob(f"{kernel_build.LIB_STEM}-*.so"))

    procs = [subprocess.Popen([sys.executable, "-c", START], env=child_env(tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    reports = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["loaded"] and r["ok"] for r in reports), reports
    assert len({r["library"] for r in reports}) == 1
    builders = [r for r in reports if r["built"]]
    assert len(builders) == 1  # one compiled, the others waited and loaded its library
    assert builders[0]["lock_wait"] < 5  # the dead builder's lock did not hold it up
    library = Path(reports[0]["library"])
    assert sorted(p.name for p in library.parent.iterdir()) == sorted([library.name, kernel_build.LOCK_NAME])


def test_portable_march_needs_every_x86_64_v3_feature():
    flags = kernel_build.X86_64_V3_FLAGS | {"sse", "sse2", "avx512f"}
    assert kernel_build.portable_march("x86_64", flags) == "x86-64-v3"
    assert kernel_build.portable_march("x86_64", flags - {"movbe"}) is None
    assert kernel_build.portable_march("x86_64", flags - {"abm"}) is None  # LZCNT
    assert kernel_build.portable_march("aarch64", flags) is None
    assert kernel_build.resolve_march("native") == "native"


def test_cache_folder_keys_on_march_and_sources(tmp_path):
    a = kernel_build.cache_folder(tmp_path, "x86-64-v3")
    assert a == kernel_build.cache_folder(tmp_path, "x86-64-v3")
    assert a != kernel_build.cache_folder(tmp_path, None)
    assert a.name.startswith("x86-64-v3-")
    assert {p.name for p in kernel_build.source_files()} >= {"cpu_ops.cpp", "isa.h"}


def test_default_build_is_the_portable_baseline():
    from flotilla import ops
    if envs.kernel_march() != "auto":
        pytest.skip("FLOTILLA_KERNEL_MARCH is set")
    if ops.cpu_kernels() is None:
        pytest.skip(f"no kernels here: {ops.unavailable_reason()}")
    info = ops.build_info()
    assert info.march == kernel_build.portable_march(platform.machine(), kernel_build.cpu_flags())
    assert info.library.parent.name.startswith(f"{info.march or 'default'}-")


def test_no_compiler_falls_back_and_the_kernel_tests_skip(tmp_path):
    """No C++ compiler on PATH and an empty cache: ops runs eager PyTorch, and tests/test_cpu_ops.py skips
    (with the reason) instead of erroring."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    env = child_env(tmp_path / "cache", PATH=str(empty_bin), CXX="")  # CXX empty: the default c++, not on PATH
    report, _ = start(tmp_path / "cache", timeout=120, PATH=str(empty_bin), CXX="")
    assert not report["loaded"] and report["reason"].startswith("CompilerNotFound"), report
    root = Path(__file__).parent.parent
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_cpu_ops.py", "-k", "rms_norm or kernels_off or decode_attention_checks"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIPPED" in done.stdout and "cannot be built here: CompilerNotFound" in done.stdout, done.stdout
    assert " passed" not in done.stdout and "error" not in done.stdout.lower(), done.stdout


NATIVE_BF16_PROBE = ("from flotilla import ops; from flotilla.engine.arg_utils import cpu_has_native_bf16; "
                     "print(ops.loaded_kernels() is None, cpu_has_native_bf16())")


def test_native_bf16_detection_without_torch_private_apis(monkeypatch):
    """cpu_has_native_bf16: the loaded library's level, else /proc/cpuinfo's avx512_bf16 / amx_bf16 flags."""
    from flotilla import ops
    from flotilla.engine.arg_utils import cpu_has_native_bf16
    flags = kernel_build.cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo")
    want = bool({"avx512_bf16", "amx_bf16"} & flags)
    # A fresh process with the kernels off: only the CPU flags answer.
    done = subprocess.run([sys.executable, "-c", NATIVE_BF16_PROBE], env={**os.environ, "FLOTILLA_CPU_KERNELS": "0"},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["True", str(want)], done.stderr
    # With the library loaded: its detected level answers (a cap on the level used changes nothing).
    with ops.switch_kernels(True):
        if ops.cpu_kernels() is None:
            pytest.skip(f"no kernels here: {ops.unavailable_reason()}")
        assert cpu_has_native_bf16() == want
        with ops.isa_cap("scalar"):
            assert cpu_has_native_bf16() == want
    # The flags alone: either flag means native bfloat16.
    monkeypatch.setattr(ops, "loaded_kernels", lambda: None)
    for fake, expected in ((frozenset({"avx2", "amx_bf16"}), True), (frozenset({"avx512f", "avx512_bf16"}), True),
                           (frozenset({"avx512f", "avx2"}), False)):
        monkeypatch.setattr(kernel_build, "cpu_flags", lambda fake=fake: fake)
        assert cpu_has_native_bf16() is expected
