"""flotilla's fused CPU kernels (``flotilla/csrc/cpu_ops.cpp``), compiled on first use and cached.

``cpu_kernels()`` returns ``torch.ops.flotilla`` once the library is loaded, or None when the kernels are off
(``FLOTILLA_CPU_KERNELS=0``) or cannot be built here (no C++ compiler, say); callers then run their eager
PyTorch path, which the kernels reproduce (tests/test_cpu_ops.py compares the two). The build takes about
10 s on 2 cores and is cached under ``~/.cache/flotilla/torch_extensions`` (``FLOTILLA_CACHE_DIR``), keyed by
the source, the torch version and the CPU; concurrent processes wait on the build's lock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_ops.cpp"
_SOURCES = [_SOURCE, _SOURCE.parent / "batch_invariant.cpp"]  # one library; isa.h is included by both
_lock = threading.Lock()
_state: dict = {}


def kernels_enabled() -> bool:
    return os.environ.get("FLOTILLA_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_directory() -> Path:
    """Where this source, torch version and CPU's build lives."""
    sources = b"".join(p.read_bytes() for p in [*_SOURCES, _SOURCE.parent / "isa.h"])
    key = hashlib.sha256(sources + torch.__version__.encode() + _cpu_signature().encode())
    base = Path(os.environ.get("FLOTILLA_CACHE_DIR", Path.home() / ".cache" / "flotilla"))
    return base / "torch_extensions" / f"cpu_ops_{key.hexdigest()[:16]}"


def load_cpu_kernels():
    """Build (if needed) and load the library; raises when it cannot be built."""
    from torch.utils import cpp_extension
    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name="flotilla_cpu_ops", sources=[str(p) for p in _SOURCES], build_directory=str(directory),
        is_python_module=False,
        extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"], extra_ldflags=["-fopenmp"],
        verbose=False)
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
                logger.warning("flotilla CPU kernels unavailable (%s: %s); using eager PyTorch ops",
                               type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                _state["ops"] = None
        return _state["ops"]


def use_kernels(*tensors: torch.Tensor):
    """The kernel library when every tensor is on the CPU (and the kernels are available), else None."""
    for t in tensors:
        if t.device.type != "cpu":
            return None
    return cpu_kernels()
