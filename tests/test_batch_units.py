"""The batch layer's own logic, without a model: the file format, the id bookkeeping (forced hash collisions),
torn-line repair, the runner's window and failure rules, the job plan (duplicates, --resume refusals), and the
Batch API's status machine over a real data directory (restart, cancel, a crash during finalizing).

Requests here are answered by a small async function; the real server's answers are checked end to end in
``test_batch_jobs.py``.
"""

from __future__ import annotations

import asyncio
import io
import json
import os

import pytest

from flotilla.batch import ids as ids_module
from flotilla.batch.batches import BatchManager
from flotilla.batch.format import parse_line
from flotilla.batch.ids import DoneIds, IdHashes, find_duplicates
from flotilla.batch.io import BatchIOError, InputFile, repair_torn_line, scan_output
from flotilla.batch.job import DuplicateIdsError, plan_job, run_planned
from flotilla.batch.runner import parsed_lines, run_job
from flotilla.batch.store import DataDirBusy, StoreError


def line(custom_id="a", url="/v1/completions", method="POST", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": body or {"prompt": "hi", "max_tokens": 2}})


@pytest.mark.parametrize("raw,code,param,custom_id", [
    ("{not json", "invalid_json_line", None, None),
    ("[1, 2]", "invalid_json_line", None, None),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {}}), "invalid_request", "custom_id", None),
    (json.dumps({"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {}}), "invalid_request",
     "custom_id", None),
    (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}),
     "invalid_request", "extra", "x"),
    (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": "hi"}), "invalid_request",
     "body", "x"),
    (line("x", method="GET"), "invalid_method", "method", "x"),
    (line("x", url="/v1/images/generations"), "invalid_url", "url", "x"),
    (line("x", prompt="hi", stream=True), "invalid_request", "body.stream", "x"),
    (line(""), "invalid_request", "custom_id", ""),
])
def test_a_bad_line_becomes_an_error_line(raw, code, param, custom_id):
    parsed = parse_line(raw, 7)
    assert parsed.request is None
    out = json.loads(parsed.error.to_line())
    assert set(out) == {"id", "custom_id", "response", "error"}
    assert out["response"] is None and out["custom_id"] == custom_id
    assert out["error"]["code"] == code and out["error"]["param"] == param and out["error"]["line"] == 7
    assert "line 7" in out["error"]["message"]


def test_a_good_line_parses():
    parsed = parse_line(line("req-1", url="/v1/chat/completions", messages=[{"role": "user", "content": "é"}]), 3)
    assert parsed.error is None and parsed.request.custom_id == "req-1"
    assert parsed.request.body["messages"][0]["content"] == "é"


def test_duplicates_are_confirmed_exactly_under_forced_hash_collisions(monkeypatch):
    monkeypatch.setattr(ids_module, "id_hash", lambda cid: len(cid))  # every id of one length collides
    ids = [("aa", 1), ("bb", 2), ("cc", 3), ("aa", 4), ("ddd", 5)]
    hashes = IdHashes()
    for cid, _ in ids:
        hashes.add(cid)
    duplicates, colliding = find_duplicates(hashes, lambda: iter(ids))
    assert duplicates == {"aa": [1, 4]}
    assert colliding == {2}
    done = DoneIds(colliding)
    done.add("bb")
    done.add(None, line=9)
    assert done.contains("bb", 2) and not done.contains("aa", 1) and not done.contains("cc", 3)
    assert done.contains(None, 9) and not done.contains(None, 10)
    assert not done.contains("ddd", 5)


def test_done_ids_without_collisions():
    done = DoneIds()
    for i in range(1000):
        done.add(f"id-{i}")
    assert all(done.contains(f"id-{i}", 0) for i in range(1000))
    assert not any(done.contains(f"id-{i}", 0) for i in range(1000, 1100))


def test_a_torn_last_line_is_cut_off(tmp_path):
    out = tmp_path / "out.jsonl"
    good = json.dumps({"id": "1", "custom_id": "a", "response": None, "error": None}) + "\n"
    out.write_text(good * 3 + '{"id": "2", "custom_id": "b", "resp')
    assert [cid for cid, _, _ in scan_output(str(out))] == ["a", "a", "a"]
    assert out.read_text() == good * 3
    assert repair_torn_line(str(out)) == 0
    out.write_text("no newline at all")
    assert repair_torn_line(str(out)) == len("no newline at all") and out.read_text() == ""
    out.write_text(good + "not an output line\n")
    with pytest.raises(BatchIOError, match="line 2 is not a batch output line"):
        list(scan_output(str(out)))


def test_stdin_is_spooled_and_read_twice():
    source = InputFile("-", stdin=io.BytesIO(b"one\n\n  two  \nthree"))
    assert list(source.lines()) == [(1, b"one"), (3, b"two"), (4, b"three")]
    assert list(source.lines()) == [(1, b"one"), (3, b"two"), (4, b"three")]
    spool = source._spool
    source.close()
    assert not os.path.exists(spool)


def test_the_plan_refuses_duplicates_and_unsafe_outputs(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([line("a"), line("b"), line("a"), "{bad"]) + "\n")
    with pytest.raises(DuplicateIdsError, match=r"'a' on lines 1, 3"):
        plan_job(InputFile(str(src)), str(tmp_path / "out.jsonl"), resume=False)
    src.write_text("\n".join([line("a"), line("b")]) + "\n")
    with pytest.raises(BatchIOError, match="--resume needs a local output file"):
        plan_job(InputFile(str(src)), "-", resume=True)
    with pytest.raises(BatchIOError, match="--resume needs a local output file"):
        plan_job(InputFile(str(src)), "memory://out.jsonl", resume=True)
    existing = tmp_path / "out.jsonl"
    existing.write_text(json.dumps({"id": "1", "custom_id": "a", "response": None, "error": None}) + "\n")
    with pytest.raises(BatchIOError, match="already holds results: pass --resume"):
        plan_job(InputFile(str(src)), str(existing), resume=False)
    plan = plan_job(InputFile(str(src)), str(existing), resume=True)
    assert plan.requests == 2 and plan.state.succeeded == 1
    with pytest.raises(BatchIOError, match="does not exist"):
        InputFile(str(tmp_path / "missing.jsonl"))


class Echo:
    """Answers like a server: 200 with a usage block; records the most requests it had in flight."""

    def __init__(self, delay=0.001, fail_with=None):
        self.in_flight = self.most = self.calls = 0
        self.delay, self.fail_with = delay, fail_with or {}

    async def __call__(self, url, body):
        self.calls += 1
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
            prompt = body.get("prompt")
            if prompt in self.fail_with:
                result = self.fail_with[prompt]
                return result(body) if callable(result) else result
            return 200, {"id": f"cmpl-{prompt}", "choices": [{"text": prompt, "finish_reason": "length"}],
                         "usage": {"completion_tokens": 2}}
        finally:
            self.in_flight -= 1


def numbered(lines: list[str]):
    return iter([(i + 1, raw.encode()) for i, raw in enumerate(lines)])


def test_the_runner_keeps_its_window_full_and_never_aborts_on_one_request():
    lines = [line(f"r{i}", prompt=f"p{i}") for i in range(200)] + ["{bad"]
    retried = {"n": 0}

    def busy_once(body):
        retried["n"] += 1
        return (429, {"error": {"message": "busy"}}) if retried["n"] == 1 else (200, {"choices": [], "usage": {}})
    echo = Echo(fail_with={"p3": (400, {"error": {"message": "max_tokens: bad", "param": "max_tokens"}}),
                           "p5": busy_once})

    async def raising(url, body):
        if body["prompt"] == "p7":
            raise RuntimeError("boom")
        return await echo(url, body)
    written = []
    counts = asyncio.run(run_job(parsed_lines(numbered(lines), chunk=16), raising, written.append, window=8,
                                 retry_pause_s=0.01))
    assert counts.done == 201 and counts.failed == 3 and counts.interrupted is None
    assert echo.most == 8  # the window, kept full
    by_id = {o.custom_id: o for o in written}
    assert by_id["r3"].response.status_code == 400 and by_id["r3"].error.code == "http_400"
    assert by_id["r3"].error.param == "max_tokens" and by_id["r3"].error.line == 4
    assert by_id["r5"].error is None and retried["n"] == 2
    assert by_id["r7"].error.code == "internal_error"
    assert by_id[None].error.code == "invalid_json_line" and by_id[None].error.line == 201
    assert by_id["r0"].response.request_id == "cmpl-p0" and counts.output_tokens == 2 * 197


@pytest.mark.parametrize("answer", [(503, {"error": {"message": "shutting down"}}),
                                    (200, {"choices": [{"text": "", "finish_reason": "abort"}]})])
def test_an_interrupting_answer_stops_the_job_without_writing_it(answer):
    lines = [line(f"r{i}", prompt=f"p{i}") for i in range(100)]
    echo = Echo(fail_with={"p20": answer})
    written = []
    counts = asyncio.run(run_job(parsed_lines(numbered(lines)), echo, written.append, window=4))
    assert counts.interrupted is not None
    assert "r20" not in {o.custom_id for o in written}
    assert 20 <= len(written) < 30 and echo.calls < 30


def test_a_resumed_file_job_writes_every_id_once(tmp_path):
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join([line(f"r{i}", prompt=f"p{i}") for i in range(50)] + ["{bad", ""]) + "\n")
    stop_at = Echo(fail_with={"p30": (503, {"error": {"message": "engine gone"}})})
    plan = plan_job(InputFile(str(src)), str(out), resume=False)
    first = asyncio.run(run_planned(plan, InputFile(str(src)), stop_at, window=1))
    assert first.interrupted and not first.ok and first.written == 30
    with open(out, "ab") as f:
        f.write(b'{"id": "torn", "custom_')  # a kill in the middle of a write
    plan = plan_job(InputFile(str(src)), str(out), resume=True)
    assert plan.state.succeeded == 30
    second = asyncio.run(run_planned(plan, InputFile(str(src)), Echo(), window=4))
    assert second.written == 21 and second.succeeded == 50 and second.failed == 1 and not second.ok
    assert "50 succeeded, 1 failed" in second.line() and "30 already in" in second.line()
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids, key=str) == sorted([f"r{i}" for i in range(50)] + [None], key=str)
    plan = plan_job(InputFile(str(src)), str(out), resume=True)  # a third run has nothing left to do
    third = asyncio.run(run_planned(plan, InputFile(str(src)), Echo(), window=4))
    assert third.written == 0 and third.succeeded == 50


# ---- the Batch API's status machine -----------------------------------------------------------------------

def upload(manager: BatchManager, lines: list[str]) -> str:
    tmp = manager.files.new_upload()
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    return manager.files.add(tmp, "in.jsonl", "batch")["id"]


async def wait_status(manager, batch_id, *statuses, timeout=30.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while manager.get(batch_id)["status"] not in statuses:
        assert asyncio.get_running_loop().time() < deadline, manager.get(batch_id)
        await asyncio.sleep(0.01)
    return manager.get(batch_id)


def read_lines(manager, file_id) -> list[dict]:
    with manager.files.open(file_id) as f:
        return [json.loads(x) for x in f]


def test_a_batch_runs_to_completed_with_outputs_and_errors_split(tmp_path):
    async def main():
        manager = BatchManager(str(tmp_path), window=4)
        manager.send = Echo(fail_with={"p2": (400, {"error": {"message": "bad", "param": "prompt"}})})
        await manager.start()
        file_id = upload(manager, [line(f"r{i}", prompt=f"p{i}") for i in range(10)])
        batch = manager.create(file_id, "/v1/completions", "24h", {"team": "a"})
        assert batch["status"] == "validating" and batch["expires_at"] == batch["created_at"] + 86400
        done = await wait_status(manager, batch["id"], "completed")
        assert done["request_counts"] == {"total": 10, "completed": 9, "failed": 1}
        assert all(done[k] for k in ("in_progress_at", "finalizing_at", "completed_at"))
        assert len(read_lines(manager, done["output_file_id"])) == 9
        assert [x["custom_id"] for x in read_lines(manager, done["error_file_id"])] == ["r2"]
        assert manager.files.get(done["output_file_id"])["purpose"] == "batch_output"
        mismatched = manager.create(file_id, "/v1/chat/completions", "24h")
        failed = await wait_status(manager, mismatched["id"], "failed")
        assert failed["errors"]["data"][0]["code"] == "invalid_url" and failed["errors"]["data"][0]["line"] == 1
        for args, param in [((file_id, "/v1/images", "24h"), "endpoint"), ((file_id, "/v1/completions", "1h"),
                            "completion_window"), (("file-nope", "/v1/completions", "24h"), "input_file_id")]:
            with pytest.raises(StoreError) as e:
                manager.create(*args)
            assert e.value.param == param
        items, has_more = manager.list(limit=1)
        assert items[0]["id"] == mismatched["id"] and has_more
        with pytest.raises(DataDirBusy):
            BatchManager(str(tmp_path), window=1)
        await manager.close()
    asyncio.run(main())


def test_a_stopped_server_resumes_its_batch_and_cancel_keeps_what_finished(tmp_path):
    lines = [line(f"r{i}", prompt=f"p{i}") for i in range(40)]

    async def first_server():
        manager = BatchManager(str(tmp_path), window=2, persist_interval_s=0)
        manager.send = Echo(delay=0.02)
        await manager.start()
        batch = manager.create(upload(manager, lines), "/v1/completions", "24h")
        while manager.get(batch["id"])["request_counts"]["completed"] < 10:
            await asyncio.sleep(0.01)
        await manager.close()  # the server stops: the batch stays in_progress
        return batch["id"]
    batch_id = asyncio.run(first_server())

    async def second_server():
        manager = BatchManager(str(tmp_path), window=4)
        assert manager.get(batch_id)["status"] == "in_progress"
        echo = Echo()
        manager.send = echo
        await manager.start()
        done = await wait_status(manager, batch_id, "completed")
        assert done["request_counts"] == {"total": 40, "completed": 40, "failed": 0}
        assert echo.calls < 32  # what the first server finished did not run again
        ids = [x["custom_id"] for x in read_lines(manager, done["output_file_id"])]
        assert sorted(ids) == sorted(f"r{i}" for i in range(40))

        manager.send = Echo(delay=0.05)
        slow = manager.create(upload(manager, lines), "/v1/completions", "24h")
        while manager.get(slow["id"])["request_counts"]["completed"] < 4:
            await asyncio.sleep(0.01)
        assert (await manager.cancel(slow["id"]))["status"] == "cancelling"
        cancelled = await wait_status(manager, slow["id"], "cancelled")
        counts = cancelled["request_counts"]
        assert 4 <= counts["completed"] < 40 and cancelled["cancelled_at"]
        assert len(read_lines(manager, cancelled["output_file_id"])) == counts["completed"]
        with pytest.raises(StoreError, match="its status is cancelled"):
            await manager.cancel(slow["id"])
        await manager.close()
    asyncio.run(second_server())


def test_finalizing_again_after_a_crash_loses_nothing(tmp_path):
    async def main():
        manager = BatchManager(str(tmp_path), window=2)
        manager.send = Echo()
        await manager.start()
        batch = manager.create(upload(manager, [line(f"r{i}", prompt=f"p{i}") for i in range(6)]),
                               "/v1/completions", "24h")
        done = await wait_status(manager, batch["id"], "completed")
        await manager.close()
        return done
    done = asyncio.run(main())
    # A crash after the output moved into the store but before its file object and the batch were saved:
    os.unlink(os.path.join(tmp_path, "files", f"{done['output_file_id']}.json"))
    state = os.path.join(tmp_path, "batches", f"{done['id']}.json")
    saved = json.load(open(state))
    saved.update(status="finalizing", output_file_id=None, completed_at=None)
    json.dump(saved, open(state, "w"))

    async def restart():
        manager = BatchManager(str(tmp_path), window=2)
        manager.send = Echo()
        await manager.start()
        again = await wait_status(manager, done["id"], "completed")
        assert again["output_file_id"] == done["output_file_id"]
        assert again["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
        assert len(read_lines(manager, again["output_file_id"])) == 6
        await manager.close()
    asyncio.run(restart())


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_bar_on_a_terminal_and_log_lines_otherwise(caplog):
    from flotilla.batch.progress import Progress
    clock = Clock()
    with caplog.at_level("INFO", logger="flotilla.run_batch"):
        plain = Progress(total=100, skipped=20, stream=io.StringIO(), interval_s=10, clock=clock)
        for i in range(40):
            clock.now += 0.5
            plain.update(failed=i == 3, output_tokens=8)
    assert [r.getMessage() for r in caplog.records] == [  # one every 10 s
        "40/100 requests (40%), 1 failed, 16.0 output tok/s, ETA 0:00:30",
        "60/100 requests (60%), 1 failed, 16.0 output tok/s, ETA 0:00:20"]
    terminal = Terminal()
    bar = Progress(total=10, stream=terminal)
    bar.update(failed=False, output_tokens=4)
    bar.close()
    assert "run-batch" in terminal.getvalue() and "1/10" in terminal.getvalue()


def test_a_job_reads_and_writes_fsspec_urls():
    import fsspec
    fs = fsspec.filesystem("memory")
    with fs.open("/jobs/in.jsonl", "wb") as f:
        f.write(("\n".join(line(f"r{i}", prompt=f"p{i}") for i in range(5)) + "\n").encode())
    plan = plan_job(InputFile("memory://jobs/in.jsonl"), "memory://jobs/out.jsonl", resume=False)
    summary = asyncio.run(run_planned(plan, InputFile("memory://jobs/in.jsonl"), Echo(), window=2))
    assert summary.ok and summary.succeeded == 5
    with fs.open("/jobs/out.jsonl", "rb") as f:
        assert sorted(json.loads(x)["custom_id"] for x in f) == [f"r{i}" for i in range(5)]
    with pytest.raises(BatchIOError, match="already holds results"):
        plan_job(InputFile("memory://jobs/in.jsonl"), "memory://jobs/out.jsonl", resume=False)
    fs.rm("/jobs", recursive=True)
