"""flotilla's fused CPU kernels (``flotilla/csrc/*.cpp``), compiled on first use and cached.

``cpu_kernels()`` returns ``torch.ops.flotilla`` once the library is loaded, or None when the kernels are off
(``FLOTILLA_CPU_KERNELS=0``, or ``set_kernels_enabled(False)`` in this process) or cannot be built here (no C++
compiler, a build past its deadline); callers then run their eager PyTorch path, which the kernels reproduce
(tests/test_cpu_ops.py compares the two). The build (flotilla/kernel_build.py) takes about 10-30 s on 2 cores,
is cached under ``~/.cache/flotilla/cpu_kernels`` (``FLOTILLA_CACHE_DIR``) and never holds a start longer than
``FLOTILLA_KERNEL_BUILD_TIMEOUT`` seconds: past it the process runs eager PyTorch ops (one warning).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from flotilla import envs, kernel_build

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_state: dict = {}  # "ops": the library or None once tried; "error": why not; "build": the BuildResult
_switch: list = [None]  # in-process override of FLOTILLA_CPU_KERNELS (None: follow the environment)


def kernels_enabled() -> bool:
    """Whether the fused kernels are switched on (``set_kernels_enabled``, else FLOTILLA_CPU_KERNELS)."""
    switch = _switch[0]
    return envs.cpu_kernels_enabled() if switch is None else switch


def set_kernels_enabled(enabled: bool | None) -> bool | None:
    """Switch the kernels on or off in this process (None: follow FLOTILLA_CPU_KERNELS again); returns the
    previous switch. Child processes follow the environment variable."""
    previous = _switch[0]
    _switch[0] = enabled
    return previous


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
