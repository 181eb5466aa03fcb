"""``flotilla serve``'s listening socket (``flotilla.entrypoints.openai.listen``).

Connections accepted on it must have ``TCP_NODELAY``: without it every keep-alive request after the first
(lm-evaluation-harness's requests.Session and aiohttp, httpx, the openai SDK) waited about 40 ms for its
response (Nagle's algorithm against the client's delayed ACK). asyncio, which uvicorn serves the socket with
(``loop.create_server(sock=...)``), sets the option only on sockets whose protocol is ``IPPROTO_TCP``.
"""

from __future__ import annotations

import asyncio
import socket

from flotilla.entrypoints.openai.listen import bind_socket


def test_bound_socket_is_tcp_and_served_connections_have_nodelay():
    async def accept_one() -> int:
        sock = bind_socket("127.0.0.1", 0)
        assert sock.proto == socket.IPPROTO_TCP
        loop = asyncio.get_running_loop()
        nodelay: asyncio.Future[int] = loop.create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                accepted = transport.get_extra_info("socket")
                nodelay.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await loop.create_server(Probe, sock=sock)  # as uvicorn.Server.serve(sockets=[sock]) does
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", sock.getsockname()[1])
            try:
                return await asyncio.wait_for(nodelay, timeout=30)
            finally:
                writer.close()

    assert asyncio.run(accept_one()) != 0
