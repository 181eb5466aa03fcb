"""flotilla's fused CPU kernels (``flotilla/csrc/*.cpp``), compiled on first use and cached.

``cpu_kernels()`` returns ``torch.ops.flotilla`` once the library is loaded, or None when the kernels are off
(``FLOTILLA_CPU_KERNELS=0``, or ``set_kernels_enabled(False)`` in this process) or cannot be built here (no C++
compiler, a build past its deadline); callers then run their eager PyTorch path, which the kernels reproduce
(tests/test_cpu_ops.py compares the two). The build (flotilla/kernel_build.py) takes about 10-30 s on 2 cores,
is cached under ``~/.cache/flotilla/cpu_kernels`` (``FLOTILLA_CACHE_DIR``) and never holds a start longer than
``FLOTILLA_KERNEL_BUILD_TIMEOUT`` seconds: past it the process runs eager PyTorch ops (one warning).

The library is compiled at a portable baseline (``-march=x86-64-v3`` where the CPU has it) and chooses its
wider paths (AVX-512) at run time from the CPU's instruction-set level (``isa_level()``, one of
``ISA_LEVELS``); ``isa_cap(level)`` lowers that level in this process, so tests run every path a machine has.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

import torch

from flotilla import envs, kernel_build

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {}  # "ops": the library or None once tried; "error": why not; "build": the BuildResult
_switch: list = [None]  # in-process override of FLOTILLA_CPU_KERNELS (None: follow the environment)
# The instruction-set levels of flotilla/csrc/isa.h, by value.
ISA_LEVELS = ("scalar", "avx2", "avx512", "avx512_bf16")
# Linux's /proc/cpuinfo flags of a CPU that multiplies bfloat16 natively.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def kernels_enabled() -> bool:
    """Whether the fused kernels are switched on (``set_kernels_enabled``, else FLOTILLA_CPU_KERNELS)."""
    switch = _switch[0]
    return envs.cpu_kernels_enabled() if switch is None else switch


def switched_off() -> bool:
    """Whether ``set_kernels_enabled(False)`` is in force in this process (a list read: cheap enough for a
    check per matmul, where ``kernels_enabled`` reads the environment)."""
    return _switch[0] is False


def set_kernels_enabled(enabled: bool | None) -> bool | None:
    """Switch the kernels on or off in this process (None: follow FLOTILLA_CPU_KERNELS again); returns the
    previous switch. Child processes follow the environment variable."""
    previous = _switch[0]
    _switch[0] = enabled
    return previous


@contextlib.contextmanager
def switch_kernels(enabled: bool):
    """``set_kernels_enabled(enabled)`` inside the block, the previous switch after it."""
    previous = set_kernels_enabled(enabled)
    try:
        yield
    finally:
        set_kernels_enabled(previous)


def load_cpu_kernels():
    """Build (if needed, within the deadline) and load the library; raises when it cannot."""
    result = kernel_build.ensure_library(envs.kernel_build_timeout(), envs.cxx_compiler(), envs.kernel_march(),
                                         Path(envs.cache_dir()))
    torch.ops.load_library(str(result.library))
    _state["build"] = result
    return torch.ops.flotilla


def cpu_kernels():
    """``torch.ops.flotilla`` when the fused kernels are on and built, else None (logged once)."""
    if not kernels_enabled():
        return None
    if "ops" in _state:  # loaded (or failed) already: no lock on the hot path
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            try:
                _state["ops"] = load_cpu_kernels()
            except Exception as e:  # noqa: BLE001 - any build failure falls back to eager PyTorch
                _state["error"] = f"{type(e).__name__}: {e}"
                logger.warning("flotilla CPU kernels unavailable (%s: %s); using eager PyTorch ops",
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                _state["ops"] = None
        return _state["ops"]


def unavailable_reason() -> str | None:
    """Why ``cpu_kernels()`` is None (it is tried first), or None when the kernels are loaded."""
    if not kernels_enabled():
        return "the CPU kernels are switched off (FLOTILLA_CPU_KERNELS=0)"
    if cpu_kernels() is not None:
        return None
    return _state.get("error", "unknown")


def build_info() -> kernel_build.BuildResult | None:
    """How this process got its library (path, built here or cached, lock wait), or None when not loaded."""
    return _state.get("build")


def use_kernels(*tensors: torch.Tensor):
    """The kernel library when every tensor is on the CPU (and the kernels are available), else None."""
    for t in tensors:
        if t.device.type != "cpu":
            return None
    return cpu_kernels()


def loaded_kernels():
    """The kernel library if this process has loaded it already (never starts a build), else None."""
    return _state.get("ops")


def isa_level() -> int | None:
    """The instruction-set level the kernels dispatch on (an index into ISA_LEVELS: the CPU's, capped by
    ``isa_cap``), or None when the kernels are not available."""
    ops = cpu_kernels()
    return None if ops is None else int(ops.isa_level())


def isa_detected() -> int | None:
    """The CPU's instruction-set level as the kernel library detects it (no cap), or None without kernels."""
    ops = cpu_kernels()
    return None if ops is None else int(ops.isa_detected())


@contextlib.contextmanager
def isa_cap(level: int | str):
    """Run the kernels at most at ``level`` (an ISA_LEVELS name or index) inside the block, in this process."""
    ops = cpu_kernels()
    if ops is None:
        raise RuntimeError(f"isa_cap needs the CPU kernels: {unavailable_reason()}")
    previous = ops.set_isa_cap(ISA_LEVELS.index(level) if isinstance(level, str) else int(level))
    try:
        yield
    finally:
        ops.set_isa_cap(previous)


def native_bf16_supported() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512_BF16 or AMX-BF16): the kernel library's detected
    level when this process has loaded it (never starts a build), else the CPU flags Linux reports in
    /proc/cpuinfo; False where neither is known."""
    ops = loaded_kernels()
    if ops is not None and int(ops.isa_detected()) >= ISA_LEVELS.index("avx512_bf16"):
        return True
    return bool(NATIVE_BF16_FLAGS & kernel_build.cpu_flags())
