"""Weights of a Hugging Face directory stored as safetensors, single file or sharded.

A directory is planned first (which tensor lives in which file, from ``model.safetensors.index.json`` or
from the file headers), then read lazily: each file is opened once with ``safetensors.safe_open`` and
tensors are materialized one at a time, so peak memory is about one tensor.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open

from flotilla.errors import ModelLoadError
from flotilla.models.loader.lazy import LazyTensor

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorsPlan:
    """Which tensors to read from which file: ``files`` is a list of ``(path, [tensor names])`` in read
    order; every name appears exactly once."""

    directory: str
    files: list[tuple[str, list[str]]]

    @property
    def names(self) -> list[str]:
        return [n for _, names in self.files for n in names]


def plan_safetensors(directory: str) -> SafetensorsPlan:
    """Plan the reads of ``directory``; raises ModelLoadError for a bad index, a missing shard, a
    corrupt or truncated header, or a tensor listed in two files."""
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.isfile(index_path):
        return _plan_from_index(directory, index_path)
    single = os.path.join(directory, SINGLE_FILE)
    files = [single] if os.path.isfile(single) else sorted(
        os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(".safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {directory} has no *.safetensors weights")
    plan, seen = [], {}
    for path in files:
        names = sorted(read_header(path))
        for n in names:
            if n in seen:
                raise ModelLoadError(f"tensor {n!r} is stored twice, in {seen[n]} and {path}")
            seen[n] = path
        plan.append((path, names))
    return SafetensorsPlan(directory, plan)


def _plan_from_index(directory: str, index_path: str) -> SafetensorsPlan:
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ModelLoadError(f"safetensors index {index_path} is unreadable or malformed: {e}") from None
    by_file: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_file.setdefault(str(shard), []).append(name)
    files = []
    for shard in sorted(by_file):
        path = os.path.join(directory, shard)
        if not os.path.isfile(path):
            raise ModelLoadError(f"safetensors index {index_path} names shard {shard!r}, which does not "
                                 f"exist (needed for e.g. tensor {by_file[shard][0]!r})")
        names = sorted(by_file[shard])
        header = read_header(path)
        missing = [n for n in names if n not in header]
        if missing:
            raise ModelLoadError(f"safetensors shard {path} lacks {len(missing)} tensor(s) that {INDEX_FILE} "
                                 f"places there, e.g. {missing[0]!r}")
        files.append((path, names))
    return SafetensorsPlan(directory, files)


def read_header(path: str) -> dict[str, dict]:
    """The tensor entries of a safetensors header (name -> dtype/shape/data_offsets), validated so that a
    truncated or garbage file is reported before any tensor is read."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ModelLoadError(f"safetensors file {path} is truncated or empty ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(size - 8, _MAX_HEADER_BYTES):
                raise ModelLoadError(f"safetensors file {path} is corrupt or truncated: header claims {n} "
                                     f"bytes but the file has {size}")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ModelLoadError(f"cannot read safetensors file {path}: {e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"safetensors file {path} has a corrupt header: {e}") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"safetensors file {path} has a corrupt header (not a JSON object)")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        try:
            end = int(entry["data_offsets"][1])
        except (KeyError, IndexError, TypeError, ValueError):
            raise ModelLoadError(f"safetensors file {path}: header entry {name!r} is malformed") from None
        if end > data_size:
            raise ModelLoadError(f"safetensors file {path} is truncated: tensor {name!r} ends at data byte "
                                 f"{end} but only {data_size} data bytes are present")
    return header


def iterate_safetensors(plan: SafetensorsPlan, dtype: torch.dtype, wanted: Callable[[str], bool] | None = None,
                        lazy: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` per the plan, converted to ``dtype``; files whose tensors are all
    rejected by ``wanted`` are never opened, rejected tensors are never read. With ``lazy`` the values
    are ``LazyTensor``s valid until the next item: loaders read only the part they narrow to."""
    for path, names in plan.files:
        selected = [n for n in names if wanted is None or wanted(n)]
        if not selected:
            continue
        try:
            with safe_open(path, framework="pt") as f:
                available = set(f.keys())
                for name in selected:
                    if name not in available:
                        raise ModelLoadError(f"safetensors file {path} lacks tensor {name!r} (listed in "
                                             f"{INDEX_FILE})")
                    if lazy:
                        yield name, LazyTensor(f.get_slice(name), dtype)
                    else:
                        yield name, _convert(f.get_tensor(name), dtype)
        except SafetensorError as e:
            raise ModelLoadError(f"safetensors file {path} is corrupt or truncated: {e}") from None


def _convert(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)
