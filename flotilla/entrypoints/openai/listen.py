"""The listening socket of ``flotilla serve``: bound before any model loads, so a port in use fails fast."""

from __future__ import annotations

import socket


def bind_socket(host: str, port: int) -> socket.socket:
    """A bound TCP socket for ``host:port`` (IPv4 or IPv6); OSError if the address is unavailable.

    Its protocol is ``IPPROTO_TCP`` (not 0): asyncio, under uvicorn, turns on ``TCP_NODELAY`` only for sockets
    that say so, and without it a keep-alive client (requests.Session, aiohttp, httpx, the openai SDK) waits
    about 40 ms on every response after the first (Nagle's algorithm against the client's delayed ACK, as the
    response goes out in two writes)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def url(host: str, port: int) -> str:
    """``http://host:port`` with an IPv6 host in brackets."""
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
