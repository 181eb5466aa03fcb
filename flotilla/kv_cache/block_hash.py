"""Content hashes of KV cache blocks: a sha256 chain over full blocks of token ids (pure Python, no torch).

A block's hash covers its parent block's hash, its own token ids and an optional salt, so two blocks with
the same tokens but different prefixes (or different tenants' salts) never share a hash. Python's
``hash()`` is never used: it is randomized per process and would differ between ranks and restarts.
"""

from __future__ import annotations

import hashlib
import struct
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    from flotilla.request import Request

BlockHash = bytes

# Domain tags keep the encoding unambiguous (a missing parent never collides with an empty one, etc.).
_NO_PARENT = b"\x00"
_PARENT = b"\x01"
_NO_EXTRA = b"\x00"
_EXTRA_BYTES = b"\x01"
_EXTRA_STR = b"\x02"


def hash_block_tokens(parent_hash: bytes | None, token_ids: Sequence[int],
                      extra: bytes | str | None = None) -> BlockHash:
    """Return the 32-byte sha256 of (parent hash, token ids, extra), encoded unambiguously.

    Token ids are packed as little-endian int64 after their count; ``extra`` (a salt) is length-prefixed
    and tagged by type, so ``b"a"`` and ``"a"`` give different hashes. Deterministic across processes.
    """
    h = hashlib.sha256()
    if parent_hash is None:
        h.update(_NO_PARENT)
    else:
        h.update(_PARENT + struct.pack("<Q", len(parent_hash)) + parent_hash)
    n = len(token_ids)
    h.update(struct.pack(f"<Q{n}q", n, *token_ids))
    if extra is None:
        h.update(_NO_EXTRA)
    else:
        tag, data = (_EXTRA_STR, extra.encode("utf-8")) if isinstance(extra, str) else (_EXTRA_BYTES, bytes(extra))
        h.update(tag + struct.pack("<Q", len(data)) + data)
    return h.digest()


def extend_block_hashes(request: "Request", block_size: int) -> list[BlockHash]:
    """Append to ``request.block_hashes`` the hashes of the full blocks of ``request.all_token_ids`` not
    hashed yet, and return the newly added hashes.

    The first block is salted with ``request.cache_salt``; later blocks inherit it through the chain.
    A trailing partial block is never hashed (its contents may still change).
    """
    hashes = request.block_hashes
    num_full = len(request.all_token_ids) // block_size
    start = len(hashes)
    tokens = request.all_token_ids
    for i in range(start, num_full):
        parent = hashes[i - 1] if i > 0 else None
        extra = request.cache_salt if i == 0 else None
        hashes.append(hash_block_tokens(parent, tokens[i * block_size:(i + 1) * block_size], extra))
    return hashes[start:]
