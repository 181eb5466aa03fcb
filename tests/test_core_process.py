"""The engine core in its own process: the RELIABILITY.md fault cases that apply to one engine.

- The core process dies while requests stream: every in-flight ``generate`` raises ``EngineDeadError``
  promptly, the engine reports ``is_dead``, refuses new work and shuts down quickly.
- A startup failure in the core raises a clear ``FlotillaError`` from the constructor, leaving no child.
- The frontend process dies: the core notices and exits by itself.
(Its messages are tested with every other wire type in ``test_wire.py``.)

Timeouts are generous bounds against hangs on a shared machine, never speed requirements.
"""

from __future__ import annotations

import asyncio
import os
import select
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import defaultdict

import pytest

from flotilla import SamplingParams
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.async_llm import AsyncLLM
from flotilla.errors import EngineDeadError, FlotillaError, ModelLoadError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HANG = 60.0  # seconds after which something that should be prompt counts as hung


def long_params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True, **kw)


def make_engine(path: str, **kw) -> AsyncLLM:
    return AsyncLLM(EngineArgs(model=path, max_model_len=256, num_kv_blocks=64, **kw))


# ---------------------------------------------------------------------------------------------- processes
def child_pids(pid: int | None = None) -> set[int]:
    """Live (or unreaped) child processes of ``pid`` (default: this process)."""
    pid = os.getpid() if pid is None else pid
    try:
        import psutil
    except ImportError:
        found = set()
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == pid:  # fields: state, ppid, ...
                    found.add(int(entry))
        return found
    try:
        return {p.pid for p in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return set()


def process_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (an orphan's zombie may wait for a lax init)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def run_bounded(make_coro, timeout: float = 3 * HANG):
    """``asyncio.run(make_coro())`` in a daemon thread: a call that blocks the event loop itself (which
    ``asyncio.wait_for`` cannot interrupt) fails the test instead of hanging the suite."""
    box: dict = {}

    def target():
        try:
            box["result"] = asyncio.run(make_coro())
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), f"the event loop was still blocked after {timeout:.0f} s"
    if "error" in box:
        raise box["error"]
    return box["result"]


def wait_until(condition, timeout: float = HANG, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


# ---------------------------------------------------------------------------------------------- core dies
def test_killing_the_core_fails_every_stream(tiny_llama):
    path, _ = tiny_llama
    engine = make_engine(path, max_num_seqs=3)  # "a" and the two samples of "b" run, "q" waits
    seen: dict[str, list] = defaultdict(list)
    try:
        async def stream(rid: str, params: SamplingParams):
            async for out in engine.generate("Hello, my name is", params, rid):
                seen[rid].append(out)

        async def main():
            tasks = [asyncio.create_task(stream("a", long_params())),
                     asyncio.create_task(stream("b", long_params(n=2, seed=5))),
                     asyncio.create_task(stream("q", long_params()))]
            deadline = time.monotonic() + HANG
            while not (seen["a"] and seen["b"] and engine.latest_stats.num_waiting == 1):
                assert time.monotonic() < deadline, "the streams never started"
                await asyncio.sleep(0.005)
            assert engine.num_queued_requests == 1
            engine._client.proc.kill()
            engine._client.proc.wait()
            # Racing the output thread's detection: a new request is refused, never left waiting forever, and
            # never blocks the event loop (a ZMQ send to a dead peer would wait forever).
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(stream("late", long_params()), HANG)
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), HANG)

        results = run_bounded(main)
        assert [type(r) for r in results] == [EngineDeadError] * 3
        assert all(not out.finished for outs in seen.values() for out in outs)
        assert seen["q"] == []
        assert engine.is_dead
        assert engine.num_unfinished_requests == 0 and engine.num_queued_requests == 0

        async def after():
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(stream("after", long_params()), HANG)

        run_bounded(after)
        engine.abort("a")  # harmless on a dead engine
        start = time.monotonic()
        engine.shutdown()
        took = time.monotonic() - start
        assert took < HANG, f"shutdown of a dead engine took {took:.1f} s"
        assert not engine._thread.is_alive()
    finally:
        if engine._client.proc.poll() is None:  # a failure above left the core running
            engine.shutdown()


def test_shutdown_ends_open_streams(tiny_llama):
    path, _ = tiny_llama
    engine = make_engine(path)
    got = []

    async def main():
        async def stream():
            async for out in engine.generate("Hello", long_params(), "open"):
                got.append(out)

        task = asyncio.create_task(stream())
        while not got:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(task, HANG)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream(), HANG)

    try:
        asyncio.run(asyncio.wait_for(main(), 2 * HANG))
    finally:
        engine.shutdown()  # idempotent
    assert engine.is_dead and not engine._thread.is_alive()
    assert engine._client.proc.returncode == 0  # a clean exit on SHUTDOWN, not a kill


def test_engine_built_in_a_short_lived_thread(tiny_llama):
    """The core watches its parent *process*: the thread that started it may exit (e.g. a startup
    helper thread) without taking the core down (PR_SET_PDEATHSIG would)."""
    path, _ = tiny_llama
    box: dict = {}
    builder = threading.Thread(target=lambda: box.setdefault("engine", make_engine(path)))
    builder.start()
    builder.join()
    engine = box["engine"]
    try:
        pid = engine._client.proc.pid
        # Past the core's parent checks (about a second apart), it is still there and serving.
        assert not wait_until(lambda: not process_running(pid), timeout=3.0)

        async def main():
            return [o async for o in engine.generate("Hello", SamplingParams(temperature=0.0, max_tokens=4), "t")]

        outs = asyncio.run(asyncio.wait_for(main(), HANG))
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 4
        assert not engine.is_dead
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------- startup
def _assert_no_new_children(before: set[int]) -> None:
    # The constructor has already reaped the core; allow a moment in case a process is still unwinding.
    assert wait_until(lambda: not (child_pids() - before), timeout=10.0), child_pids() - before


def test_startup_failure_kv_cache_too_small(tiny_llama):
    path, _ = tiny_llama
    before = child_pids()
    with pytest.raises(ModelLoadError) as info:
        AsyncLLM(EngineArgs(model=path, max_model_len=256, num_kv_blocks=4))
    assert isinstance(info.value, FlotillaError)
    msg = str(info.value)
    assert "4 blocks" in msg and "256" in msg and "max_model_len" in msg
    _assert_no_new_children(before)


def test_startup_failure_truncated_weights(tmp_path, tiny_llama):
    path, _ = tiny_llama
    broken = tmp_path / "truncated"
    shutil.copytree(path, broken)
    weights = broken / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    before = child_pids()
    with pytest.raises(ModelLoadError) as info:
        AsyncLLM(EngineArgs(model=str(broken), max_model_len=256, num_kv_blocks=64))
    msg = str(info.value)
    assert "truncated" in msg and "model.safetensors" in msg
    _assert_no_new_children(before)


# ---------------------------------------------------------------------------------------------- frontend dies
FRONTEND_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    from flotilla import SamplingParams
    from flotilla.engine.arg_utils import EngineArgs
    from flotilla.engine.async_llm import AsyncLLM

    engine = AsyncLLM(EngineArgs(model=sys.argv[1], max_model_len=256, num_kv_blocks=64))

    async def main():
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        i = 0
        while True:  # keep the core busy until this process is killed
            async for _ in engine.generate("Hello", params, f"r{i}"):
                if i == 0:
                    print(engine._client.proc.pid, engine._client._dir, flush=True)
                    i = 1
            i += 1

    asyncio.run(main())
""")


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            return proc.stdout.readline()
    return ""


def test_core_exits_when_the_frontend_is_killed(tmp_path, tiny_llama):
    """SIGKILL of the frontend: the core exits by itself and removes the IPC socket folder the frontend
    can no longer remove (named after its owner's pid)."""
    from flotilla.engine.core_proc import ipc_dir_owner
    path, _ = tiny_llama
    script = tmp_path / "frontend.py"
    script.write_text(FRONTEND_SCRIPT)
    log = tmp_path / "frontend.log"
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "w") as err:
        frontend = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE, stderr=err,
                                    text=True, env=env, cwd=REPO_ROOT)
    core_pid = None
    try:
        line = _read_line(frontend, timeout=300.0).split()
        assert len(line) == 2 and line[0].isdigit(), f"the frontend never streamed: {log.read_text()[-3000:]}"
        core_pid, ipc_dir = int(line[0]), line[1]
        assert core_pid in child_pids(frontend.pid) and process_running(core_pid)
        assert os.path.isdir(ipc_dir) and ipc_dir_owner(os.path.basename(ipc_dir)) == frontend.pid
        frontend.send_signal(signal.SIGKILL)  # no cleanup runs in the frontend
        frontend.wait(timeout=HANG)
        assert wait_until(lambda: not process_running(core_pid), timeout=HANG), \
            "the core outlived its frontend"
        assert not os.path.exists(ipc_dir), os.listdir(ipc_dir)
    finally:
        if frontend.poll() is None:
            frontend.kill()
            frontend.wait()
        frontend.stdout.close()
        if core_pid is not None and process_running(core_pid):
            os.kill(core_pid, signal.SIGKILL)


def test_stale_ipc_folders_of_dead_frontends_are_removed(tmp_path):
    """A frontend killed together with its core leaves its socket folder; the next engine start removes the
    folders whose owner (the pid in the name) is gone, and nothing else."""
    from flotilla.engine.core_proc import IPC_DIR_PREFIX, remove_stale_ipc_dirs
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs
    stale = tmp_path / f"{IPC_DIR_PREFIX}{gone.pid}-abc"
    alive = tmp_path / f"{IPC_DIR_PREFIX}{os.getppid()}-def"
    mine = tmp_path / f"{IPC_DIR_PREFIX}{os.getpid()}-ghi"
    other = tmp_path / f"flotilla-{gone.pid}-jkl"  # not an engine socket folder
    for d in (stale, alive, mine, other):
        d.mkdir()
        (d / "in.sock").write_text("")
    assert remove_stale_ipc_dirs(str(tmp_path)) == [str(stale)]
    assert not stale.exists() and alive.exists() and mine.exists() and other.exists()
