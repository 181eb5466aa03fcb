"""Test helpers for server shutdown paths: a request held in flight, and waiting for processes to go.

``hold_request_open`` sends a completion request's headers and only part of its body: the server counts it
in flight until the body completes or the connection closes, so a drain (SIGTERM, or an engine death) keeps
the server up, answering 503, until the test closes it. That makes the draining state observable without
racing the server's exit.
"""

from __future__ import annotations

import json
import socket
import time


def hold_request_open(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A POST /v1/completions whose body is only partly sent; close the socket to end it."""
    body = json.dumps({"prompt": "held", "max_tokens": 2}).encode()
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % (host.encode(), len(body)) + body[:10])
    return sock


def wait_until_gone(pids, alive, timeout: float = 30.0) -> list[int]:
    """Poll until ``alive(pid)`` is false for every pid or ``timeout`` passes; returns those still alive."""
    deadline = time.monotonic() + timeout
    while True:
        left = [p for p in pids if alive(p)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.05)
