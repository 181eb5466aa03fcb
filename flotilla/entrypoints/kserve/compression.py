"""HTTP body compression as Triton does it: ``Content-Encoding: gzip|deflate`` requests are inflated (bounded
by the body limit, so a small compressed body can never expand past it), and a response is compressed with the
first of gzip/deflate that ``Accept-Encoding`` allows."""

from __future__ import annotations

import gzip
import zlib

from flotilla.entrypoints.kserve.infer_call import unsupported
from flotilla.repository.errors import invalid_arg

ENCODINGS = ("gzip", "deflate")


class InflatedTooLarge(Exception):
    """The request body inflates past ``limit`` bytes (the server answers 413)."""

    def __init__(self, limit: int):
        super().__init__(f"the decompressed request body exceeds the limit of {limit} bytes")


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """``body`` inflated per its Content-Encoding (identity/None: as is); UNSUPPORTED for other encodings,
    INVALID_ARG for a corrupt body, InflatedTooLarge past ``limit``."""
    encoding = (encoding or "identity").strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding not in ENCODINGS:
        raise unsupported(f"Unsupported compression type '{encoding}' (supported: gzip, deflate)")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise invalid_arg(f"cannot decompress the {encoding} request body: {e}") from None
    if len(out) > limit:
        raise InflatedTooLarge(limit)
    if not inflater.eof:
        raise invalid_arg(f"the {encoding} request body is truncated")
    return out


def response_encoding(accept_encoding: str | None) -> str | None:
    """The first of gzip/deflate that the Accept-Encoding header lists with a non-zero q, else None."""
    for token in (accept_encoding or "").split(","):
        name, _, params = token.strip().partition(";")
        name = name.strip().lower()
        if name not in ENCODINGS:
            continue
        q = params.strip()
        if q.startswith("q="):
            try:
                if float(q[2:]) == 0:
                    continue
            except ValueError:
                continue
        return name
    return None


def compress(body: bytes, encoding: str) -> bytes:
    return gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
