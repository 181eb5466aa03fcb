"""The driver <-> worker control plane: ZMQ queues carrying encoded messages (bytes; never pickle).

Rank 0 binds one PUSH socket per worker rank and one PULL socket for replies, on loopback for local
ranks or on the interface of the launcher's master address for multi-node runs, and announces the
endpoints once over the world CPU group (an ``Endpoints`` wire struct). Queues (not collectives) let the
driver send step N+1 while a later pipeline stage still computes step N. While idle the driver sends a
heartbeat (an empty frame), so a worker whose driver is gone exits instead of waiting forever. The channels
move opaque bytes: the messages themselves are ``flotilla.scheduler.wire``'s, decoded by the caller.
"""

from __future__ import annotations

import threading
import time

import zmq

from flotilla.distributed.parallel_state import GroupCoordinator
from flotilla.errors import EngineDeadError
from flotilla.wire import Codec, WireStruct

HEARTBEAT_S = 2.0
WORKER_GIVE_UP_S = 30.0
_HEARTBEAT = b""  # no message is empty, so an empty frame is the heartbeat


class Endpoints(WireStruct):
    """Where rank 0's queues listen: ``workers[r - 1]`` is rank r's inbox, ``reply`` the driver's inbox."""

    workers: list[str]
    reply: str


_ENDPOINTS: Codec[Endpoints] = Codec(Endpoints, "control endpoints")


class DriverChannel:
    """Rank 0's side. Contract: ``send_all`` delivers each message (non-empty bytes) to every worker in
    order; ``recv`` returns the next reply's bytes or raises EngineDeadError after ``timeout_s`` or when
    ``alive()`` says a worker is gone."""

    def __init__(self, world: GroupCoordinator, host: str):
        self._ctx = zmq.Context()
        self._lock = threading.Lock()
        self._pushes: list[zmq.Socket] = []
        endpoints = []
        for _ in range(1, world.world_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(f"tcp://{host}:0")
            self._pushes.append(sock)
            endpoints.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(f"tcp://{host}:0")
        reply = self._pull.getsockopt_string(zmq.LAST_ENDPOINT)
        world.broadcast_bytes(_ENDPOINTS.encode(Endpoints(endpoints, reply)), src=0)
        self._last_send = time.monotonic()
        self._closed = threading.Event()
        threading.Thread(target=self._heartbeat, name="flotilla-heartbeat", daemon=True).start()

    def send_all(self, data: bytes) -> None:
        if not data:
            raise ValueError("an empty message is the heartbeat; messages must not be empty")
        self._send(data)

    def _send(self, data: bytes) -> None:
        with self._lock:
            for sock in self._pushes:
                sock.send(data)
            self._last_send = time.monotonic()

    def recv(self, timeout_s: float, alive=lambda: True) -> bytes:
        deadline = time.monotonic() + timeout_s
        while True:
            if self._pull.poll(100):
                return self._pull.recv()
            if not alive():
                raise EngineDeadError("a worker rank exited")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"no reply from the workers within {timeout_s:.0f} s")

    def _heartbeat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S / 2):
            if time.monotonic() - self._last_send >= HEARTBEAT_S:
                try:
                    self._send(_HEARTBEAT)
                except zmq.ZMQError:
                    return

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            for sock in self._pushes:
                sock.close(linger=2000)  # let a final "shutdown" reach the workers
            self._pull.close(linger=0)
        self._ctx.term()


class WorkerChannel:
    """A worker rank's side: ``recv`` the driver's next message (bytes), ``send`` a reply (bytes)."""

    def __init__(self, world: GroupCoordinator):
        info = _ENDPOINTS.decode(world.broadcast_bytes(None, src=0))
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.connect(info.workers[world.rank_in_group - 1])
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 5000)
        self._push.connect(info.reply)

    def recv(self) -> bytes:
        """The next non-heartbeat message; raises EngineDeadError when the driver has gone quiet."""
        while True:
            if not self._pull.poll(int(WORKER_GIVE_UP_S * 1000)):
                raise EngineDeadError(f"no message from the driver for {WORKER_GIVE_UP_S:.0f} s")
            data = self._pull.recv()
            if data != _HEARTBEAT:
                return data

    def send(self, data: bytes) -> None:
        self._push.send(data)

    def close(self) -> None:
        self._pull.close(linger=0)
        self._push.close()
        self._ctx.term()
