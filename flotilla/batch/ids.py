"""``custom_id`` bookkeeping in bounded memory: the duplicate check and the set of ids already done.

Each id is kept as an 8-byte hash (blake2b), 8 bytes per line in a compact array, never the strings: a
million-line file costs 8 MB. Hashes are only a filter: two different ids with the same hash are told apart
by comparing the strings themselves (``find_duplicates`` rescans the input for the few hashes seen twice and
returns the hashes shared by different ids as ``colliding``; ``DoneIds`` keeps exact strings for those).
"""

from __future__ import annotations

import hashlib
from array import array
from bisect import bisect_left
from collections.abc import Callable, Iterable

import numpy as np


def id_hash(custom_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(custom_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "little")


class IdHashes:
    """An append-only list of id hashes; ``repeated()`` is the set of hashes added more than once."""

    def __init__(self) -> None:
        self._hashes = array("Q")

    def add(self, custom_id: str) -> None:
        self._hashes.append(id_hash(custom_id))

    def __len__(self) -> int:
        return len(self._hashes)

    def sorted(self) -> array:
        """The hashes in ascending order (a new compact array)."""
        out = array("Q")
        out.frombytes(np.sort(np.frombuffer(self._hashes, dtype=np.uint64)).tobytes())
        return out

    def repeated(self) -> set[int]:
        values = np.sort(np.frombuffer(self._hashes, dtype=np.uint64))
        same = values[1:] == values[:-1]
        return {int(h) for h in np.unique(values[1:][same])}


def find_duplicates(hashes: IdHashes, rescan: Callable[[], Iterable[tuple[str, int]]],
                    limit: int = 10) -> tuple[dict[str, list[int]], set[int]]:
    """``(duplicates, colliding)``: up to ``limit`` ids that occur more than once with their line numbers,
    and the hashes shared by different ids. ``rescan()`` yields ``(custom_id, line)`` again, in the order the
    ids were added; it is only called when some hash was seen twice."""
    repeated = hashes.repeated()
    if not repeated:
        return {}, set()
    lines: dict[str, list[int]] = {}
    ids_of: dict[int, set[str]] = {}
    for custom_id, line in rescan():
        h = id_hash(custom_id)
        if h in repeated:
            lines.setdefault(custom_id, []).append(line)
            ids_of.setdefault(h, set()).add(custom_id)
    duplicates = {cid: where for cid, where in lines.items() if len(where) > 1}
    colliding = {h for h, ids in ids_of.items() if len(ids) > 1}
    return dict(list(duplicates.items())[:limit]), colliding


class DoneIds:
    """The ids already written to an output (``--resume``): hashes sorted in a compact array, plus the exact
    strings for ``colliding`` hashes (so an id is never skipped because another one shares its hash) and the
    line numbers of error lines without an id."""

    def __init__(self, colliding: set[int] | None = None) -> None:
        self.colliding = colliding or set()
        self._hashes = IdHashes()
        self._exact: set[str] = set()
        self.lines: set[int] = set()
        self._sorted: array | None = None

    def add(self, custom_id: str | None, line: int | None = None) -> None:
        if custom_id is None:
            if line is not None:
                self.lines.add(line)
            return
        self._hashes.add(custom_id)
        if id_hash(custom_id) in self.colliding:
            self._exact.add(custom_id)
        self._sorted = None

    def __len__(self) -> int:
        return len(self._hashes) + len(self.lines)

    def contains(self, custom_id: str | None, line: int) -> bool:
        """Whether the input line ``line`` with ``custom_id`` (None: unreadable) is already done."""
        if custom_id is None:
            return line in self.lines
        h = id_hash(custom_id)
        if h in self.colliding:
            return custom_id in self._exact
        if self._sorted is None:
            self._sorted = self._hashes.sorted()
        i = bisect_left(self._sorted, h)
        return i < len(self._sorted) and self._sorted[i] == h
