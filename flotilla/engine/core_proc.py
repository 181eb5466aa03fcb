"""The engine core in its own process, so a busy model never starves the HTTP event loop.

The frontend binds two ZMQ IPC sockets in a private temporary directory (local only, never a network
port), named ``flotilla-core-<frontend pid>-<random>`` so its owner is known, and starts ``python -m flotilla.engine.core_proc``; the core connects, loads the model and answers
``Ready`` (or ``Failed`` with the reason). The engine arguments arrive on stdin and every message on the
sockets is a wire type of ``flotilla.engine.messages`` (msgpack via ``flotilla.wire``), never pickle. The
core exits when told to, when its parent dies, or after reporting a failure. The folder goes with its owner:
the frontend removes it on ``close()``; a core whose frontend died (e.g. SIGKILL) removes it before exiting;
and every frontend start removes the folders of frontends that are gone (``remove_stale_ipc_dirs``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import zmq

from flotilla import envs
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.core import EngineCore, EngineCoreOutputs
from flotilla.engine.messages import (FROM_CORE, TO_CORE, AbortRequests, AddRequest, Failed, FromCore, Outputs,
                                      Ready, Shutdown, ToCore)
from flotilla.errors import EngineDeadError, FlotillaError, ModelLoadError
from flotilla.procutil import exit_with_parent, pid_alive
from flotilla.request import RequestStatus
from flotilla.wire import Codec

logger = logging.getLogger(__name__)
PARENT_CHECK_S = 1.0
IPC_DIR_PREFIX = "flotilla-core-"
# The frontend writes its EngineArgs to the core's stdin, then closes it.
ENGINE_ARGS: Codec[EngineArgs] = Codec(EngineArgs, "engine arguments")


class CoreServer:
    """The core process's loop: drain messages, step while there is work, publish outputs."""

    def __init__(self, core: EngineCore, pull: zmq.Socket, push: zmq.Socket, parent_pid: int):
        self.core, self.pull, self.push, self.parent_pid = core, pull, push, parent_pid

    def run(self) -> None:
        while True:
            busy = self.core.has_unfinished_requests()
            changed = False
            timeout = 0 if busy else int(PARENT_CHECK_S * 1000)
            while self.pull.poll(timeout):
                if not self._handle(TO_CORE.decode(self.pull.recv())):
                    return
                changed, timeout = True, 0
            if os.getppid() != self.parent_pid:
                logger.warning("engine core: parent process is gone, exiting")
                return
            if self.core.has_unfinished_requests():
                self._publish(self.core.step())
            elif changed:  # idle after aborts: publish fresh stats so the frontend sees blocks freed
                self._publish(EngineCoreOutputs(stats=self.core.scheduler.make_stats(), timestamp=time.monotonic()))

    def _handle(self, msg: ToCore) -> bool:
        if isinstance(msg, AddRequest):
            self.core.add_request(msg.request)
        elif isinstance(msg, AbortRequests):
            status = RequestStatus.FINISHED_STOPPED if msg.stopped else RequestStatus.FINISHED_ABORTED
            self.core.finish_requests(msg.ids, status)
        elif isinstance(msg, Shutdown):
            return False
        return True

    def _publish(self, outputs: EngineCoreOutputs) -> None:
        self.push.send(FROM_CORE.encode(Outputs(outputs)))


def core_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="flotilla engine core process (started by the frontend)")
    ap.add_argument("--input", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--parent-pid", type=int, required=True)
    ns = ap.parse_args(argv)
    ipc_dir = _ipc_dir(ns.input)
    exit_with_parent(ns.parent_pid, PARENT_CHECK_S, on_exit=lambda: shutil.rmtree(ipc_dir, ignore_errors=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the frontend decides when the core stops
    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s [core]: %(message)s")
    args = ENGINE_ARGS.decode(sys.stdin.buffer.read())
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(ns.input)
    push.connect(ns.output)
    try:
        import torch
        torch.manual_seed(args.seed)
        core = EngineCore(args.create_engine_config())
    except Exception as e:  # noqa: BLE001 - every startup failure is reported, then the process exits
        push.send(FROM_CORE.encode(Failed(str(e), type(e).__name__)))
        push.close(linger=2000)
        return 1
    push.send(FROM_CORE.encode(Ready(core.num_blocks)))
    try:
        CoreServer(core, pull, push, ns.parent_pid).run()
        if os.getppid() != ns.parent_pid:  # the frontend died and cannot remove its socket folder
            shutil.rmtree(ipc_dir, ignore_errors=True)
    except Exception as e:  # noqa: BLE001 - the detail is logged here; clients see a plain message
        logger.exception("engine core failed")
        public = str(e) if isinstance(e, EngineDeadError) else "the engine core failed unexpectedly"
        push.send(FROM_CORE.encode(Failed(public, type(e).__name__)))
        push.close(linger=2000)
        return 1
    finally:
        core.shutdown()
    return 0


def _ipc_dir(address: str) -> str:
    """The folder of an ``ipc://<folder>/<name>.sock`` address."""
    return os.path.dirname(address.removeprefix("ipc://"))


def ipc_dir_owner(name: str) -> int | None:
    """The frontend pid in a socket folder's name (``flotilla-core-<pid>-<random>``), else None."""
    if not name.startswith(IPC_DIR_PREFIX):
        return None
    pid, sep, _ = name[len(IPC_DIR_PREFIX):].partition("-")
    return int(pid) if sep and pid.isdigit() else None


def remove_stale_ipc_dirs(parent: str | None = None) -> list[str]:
    """Remove the socket folders under ``parent`` (default: the temporary directory) whose frontend process
    is gone (killed before it could clean up); returns the paths removed. Folders of living processes, and
    those this user may not remove, stay."""
    parent = parent or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        owner = ipc_dir_owner(name)
        if owner is None or owner == os.getpid() or pid_alive(owner):
            continue
        path = os.path.join(parent, name)
        shutil.rmtree(path, ignore_errors=True)
        if not os.path.exists(path):
            removed.append(path)
    if removed:
        logger.info("removed %d engine socket folder(s) left by processes that are gone", len(removed))
    return removed


def _error_class(name: str) -> type[Exception]:
    from flotilla import errors
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, FlotillaError) else ModelLoadError


class CoreProcessClient:
    """Frontend handle on a core process: start it, send messages (thread-safe), receive messages.

    Contract: the constructor returns once the core is READY, or raises the core's startup error
    (``ModelLoadError`` / ``FlotillaError`` carrying its message). ``close()`` stops the process.
    """

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 900.0):
        remove_stale_ipc_dirs()
        self._dir = tempfile.mkdtemp(prefix=f"{IPC_DIR_PREFIX}{os.getpid()}-")
        self._ctx = zmq.Context()
        self._push, self._pull = self._ctx.socket(zmq.PUSH), self._ctx.socket(zmq.PULL)
        in_addr, out_addr = f"ipc://{self._dir}/in.sock", f"ipc://{self._dir}/out.sock"
        self._push.bind(in_addr)
        self._pull.bind(out_addr)
        self._send_lock = threading.Lock()
        cmd = [sys.executable, "-m", "flotilla.engine.core_proc", "--input", in_addr, "--output", out_addr,
               "--parent-pid", str(os.getpid())]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE)
        self.proc.stdin.write(ENGINE_ARGS.encode(args))
        self.proc.stdin.close()
        self.num_blocks = self._await_ready(startup_timeout_s)

    def _await_ready(self, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._pull.poll(200):
                msg = FROM_CORE.decode(self._pull.recv())
                if isinstance(msg, Ready):
                    return msg.num_blocks
                if isinstance(msg, Failed):
                    self.close()
                    raise _error_class(msg.error_type)(msg.error)
            elif self.proc.poll() is not None:
                self.close()
                raise ModelLoadError(f"the engine core process exited with code {self.proc.returncode} "
                                     f"during startup")
        self.close()
        raise ModelLoadError(f"the engine core did not start within {timeout_s:.0f} s")

    def send(self, msg: ToCore) -> None:
        """Send a message; raises ``EngineDeadError`` once the core process is gone (a ZMQ PUSH socket
        without a peer would otherwise block forever)."""
        data = TO_CORE.encode(msg)
        with self._send_lock:
            while True:
                try:
                    self._push.send(data, zmq.NOBLOCK)
                    return
                except zmq.Again:
                    if not self.is_alive():
                        raise EngineDeadError(f"the engine core process exited (code {self.proc.returncode})")
                    self._push.poll(100, zmq.POLLOUT)

    def recv(self, timeout_ms: int) -> FromCore | None:
        """The next message, or None after ``timeout_ms``; ``WireError`` if the core sent a malformed one."""
        if self._pull.poll(timeout_ms):
            return FROM_CORE.decode(self._pull.recv())
        return None

    def is_alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout_s: float = 5.0) -> None:
        if self.proc.poll() is None:
            try:
                self.send(Shutdown())
                self.proc.wait(timeout_s)
            except (subprocess.TimeoutExpired, zmq.ZMQError, EngineDeadError):
                self.proc.kill()
                self.proc.wait()
        self._push.close(linger=0)
        self._pull.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(core_main())
