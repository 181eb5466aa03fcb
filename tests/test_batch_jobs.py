"""Batch jobs end to end: ``flotilla run-batch`` and the Batch API of ``flotilla serve``, against the online
server's own answers.

One deployment file serves the embedded SmolLM2 (greedy, 4 output tokens) and all-minilm-l6-v2 (embeddings);
one module-scoped ``flotilla serve --config`` of it answers every request online first (the reference), then
runs the Batch API tests on its ``--batch-data-dir``; ``run-batch`` runs the same file in its own processes.
The 200-line input mixes chat, completions and embeddings requests with 10 bad lines (invalid JSON, a
non-object, a missing custom_id, GET, an unknown url, a body that is not an object, stream, and three bodies
the server itself rejects).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

from held_request import wait_until_gone
from test_server_helpers import ServerProcess, child_pids, pid_alive

pytestmark = pytest.mark.slow
MAX_TOKENS = 4
NUM_GOOD = 190
# batch_invariant: a batch's answers are compared token for token with the same requests answered online, in
# other batches; with the defaults a step's size picks the kernel (int8 below --gguf-dense-min-tokens rows,
# bfloat16 copies above), so a near-tie could go either way (CI once saw "12, " against "12:1").
DEPLOY = """\
models:
  - name: smol
    model: smollm2-135m-instruct
    engine: {max_model_len: 512, max_num_seqs: 32, batch_invariant: true}
  - name: minilm
    model: all-minilm-l6-v2
"""
TOPICS = ("the sea", "a robot", "Paris", "bread", "rain", "a violin", "mountains", "coffee", "snow", "a cat", "東京",
          "naïve café", "🙂 emoji")


def good_line(i: int) -> dict:
    topic = f"{TOPICS[i % len(TOPICS)]} {i}"
    kind = i % 10
    if kind < 6:
        return {"custom_id": f"chat-{i}", "method": "POST", "url": "/v1/chat/completions",
                "body": {"model": "smol", "messages": [{"role": "user", "content": f"Say something about {topic}."}],
                         "max_tokens": MAX_TOKENS, "temperature": 0}}
    if kind < 9:
        return {"custom_id": f"cmpl-{i}", "method": "POST", "url": "/v1/completions",
                "body": {"model": "smol", "prompt": f"A short story about {topic}:", "max_tokens": MAX_TOKENS,
                         "temperature": 0}}
    return {"custom_id": f"emb-{i}", "method": "POST", "url": "/v1/embeddings",
            "body": {"model": "minilm", "input": f"A sentence about {topic}.", "encoding_format": "float"}}


CHAT = {"model": "smol", "messages": [{"role": "user", "content": "hi"}], "max_tokens": MAX_TOKENS}
# (raw line, custom_id, error code, status the server answers or None when the line is never sent)
BAD = [
    ("{this is not json", None, "invalid_json_line", None),
    ("[1, 2, 3]", None, "invalid_json_line", None),
    (json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": CHAT}), None, "invalid_request", None),
    (json.dumps({"custom_id": "bad-get", "method": "GET", "url": "/v1/chat/completions", "body": CHAT}), "bad-get",
     "invalid_method", None),
    (json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/images/generations", "body": {}}), "bad-url",
     "invalid_url", None),
    (json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/completions", "body": "hi"}), "bad-body",
     "invalid_request", None),
    (json.dumps({"custom_id": "bad-stream", "method": "POST", "url": "/v1/chat/completions",
                 "body": {**CHAT, "stream": True}}), "bad-stream", "invalid_request", None),
    (json.dumps({"custom_id": "bad-field", "method": "POST", "url": "/v1/chat/completions",
                 "body": {**CHAT, "max_tokens": "ten"}}), "bad-field", "http_400", 400),
    (json.dumps({"custom_id": "bad-model", "method": "POST", "url": "/v1/completions",
                 "body": {"model": "nope", "prompt": "hi", "max_tokens": 2}}), "bad-model", "http_404", 404),
    (json.dumps({"custom_id": "bad-kind", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": "smol", "input": "hi"}}), "bad-kind", "http_400", 400),
]
GOOD = [good_line(i) for i in range(NUM_GOOD)]


def input_lines() -> list[str]:
    """The 200 lines: the 190 good ones with a bad one every 19 lines, and a blank line."""
    lines = [json.dumps(x, ensure_ascii=False) for x in GOOD]
    for k, (raw, *_) in enumerate(BAD):
        lines.insert(k * 20 + 7, raw)
    lines.insert(100, "")
    return lines


def write_lines(path, lines) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def deploy(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("batch_deploy") / "deploy.yaml"
    path.write_text(DEPLOY)
    return str(path)


class Server:
    """The module's server; ``restart`` kills it with SIGKILL and starts another on the same data directory."""

    def __init__(self, deploy: str, data_dir: str):
        # --max-queued-requests 16: the Batch API's window is 8 requests, so batches take long enough to be
        # interrupted, and online requests still find 8 admission slots.
        self.args = ("--config", deploy, "--batch-data-dir", data_dir, "--max-queued-requests", "16")
        self.proc = ServerProcess(None, *self.args, startup_timeout=300)

    def kill_and_restart(self) -> None:
        pids = [self.proc.proc.pid] + self.proc.core_pids
        self.proc.proc.send_signal(signal.SIGKILL)
        self.proc.proc.wait()
        assert wait_until_gone(pids, pid_alive) == []
        self.proc.stop()
        self.proc = ServerProcess(None, *self.args, startup_timeout=300)


@pytest.fixture(scope="module")
def server(deploy, tmp_path_factory):
    srv = Server(deploy, str(tmp_path_factory.mktemp("batch_data")))
    yield srv
    assert srv.proc.stop() == 0, srv.proc.output()


@pytest.fixture(scope="module")
def reference(server) -> dict:
    """custom_id -> (status, body) as the online server answers each request (good lines and the bad lines
    that reach it)."""
    sent = [(x["custom_id"], x["url"], x["body"]) for x in GOOD]
    sent += [(cid, json.loads(raw)["url"], json.loads(raw)["body"]) for raw, cid, _, status in BAD if status]

    async def main():
        limit = asyncio.Semaphore(12)
        async with httpx.AsyncClient(base_url=server.proc.url, timeout=300) as client:
            async def one(cid, url, body):
                async with limit:
                    r = await client.post(url, json=body)
                    return cid, (r.status_code, r.json())
            return dict(await asyncio.gather(*(one(*x) for x in sent)))
    return asyncio.run(main())


def without_ids(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


def assert_same_answer(line: dict, ref: tuple[int, dict]) -> None:
    status, body = ref
    got = line["response"]
    assert got["status_code"] == status, line
    if body.get("object") == "list":  # embeddings: the vectors up to float rounding across batch shapes
        ours = np.array([d["embedding"] for d in got["body"]["data"]])
        theirs = np.array([d["embedding"] for d in body["data"]])
        np.testing.assert_allclose(ours, theirs, atol=1e-5)
        assert got["body"]["usage"] == body["usage"]
    else:
        assert without_ids(got["body"]) == without_ids(body), line["custom_id"]


def check_output(lines: list[dict], reference: dict) -> None:
    """Every input line exactly once: the good ones equal the online answers, the bad ones as expected."""
    by_id: dict = {}
    for out in lines:
        key = out["custom_id"] if out["custom_id"] is not None else ("line", out["error"]["line"])
        assert key not in by_id, f"{key} written twice"
        by_id[key] = out
    assert len(by_id) == NUM_GOOD + len(BAD)
    for x in GOOD:
        out = by_id[x["custom_id"]]
        assert out["error"] is None
        assert_same_answer(out, reference[x["custom_id"]])
    null_lines = [key for key in by_id if isinstance(key, tuple)]
    assert len(null_lines) == 3
    for raw, cid, code, status in BAD:
        out = by_id[cid] if cid is not None else None
        if out is None:
            assert any(by_id[key]["error"]["code"] == code for key in null_lines)
            continue
        assert out["error"]["code"] == code, out
        if status is None:
            assert out["response"] is None
        else:
            assert out["response"]["body"] == reference[cid][1]  # the server's own error, as is


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flotilla.entrypoints.cli", "run-batch", *args]


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def count_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_run_batch_killed_half_way_then_resumed_writes_each_result_once(server, reference, deploy, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", input_lines())
    out = tmp_path / "out.jsonl"
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(cli("-i", src, "-o", str(out), "--config", deploy, "--max-concurrency", "16"),
                             stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while count_lines(out) < 100:
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pids = [first.pid] + child_pids(first.pid)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert wait_until_gone(pids, pid_alive) == []  # the engine core follows its parent
    written = count_lines(out)
    assert 100 <= written < 200
    second = subprocess.run(cli("-i", src, "-o", str(out), "--config", deploy, "--resume"), capture_output=True,
                            text=True, timeout=600)
    summary = second.stderr.strip().splitlines()[-1]
    assert second.returncode == 1, second.stderr  # 10 lines failed
    assert "200 requests: 190 succeeded, 10 failed" in summary and "already in" in summary, summary
    check_output(read_jsonl(out), reference)


def test_run_batch_streams_stdin_to_stdout(server, reference, deploy):
    lines = [json.dumps(x) for x in GOOD[:20]]
    r = subprocess.run(cli("-i", "-", "-o", "-", "--config", deploy), input="\n".join(lines) + "\n",
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "20 requests: 20 succeeded, 0 failed" in r.stderr.strip().splitlines()[-1]
    outputs = [json.loads(x) for x in r.stdout.splitlines()]  # nothing but result lines on stdout
    assert sorted(o["custom_id"] for o in outputs) == sorted(x["custom_id"] for x in GOOD[:20])
    for out in outputs:
        assert_same_answer(out, reference[out["custom_id"]])


def test_run_batch_refuses_duplicate_ids_before_loading_anything(deploy, tmp_path):
    src = write_lines(tmp_path / "in.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[1]), json.dumps(GOOD[0])])
    out = tmp_path / "out.jsonl"
    r = subprocess.run(cli("-i", src, "-o", str(out), "--config", deploy), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "duplicate custom_id" in r.stderr and "'chat-0' on lines 1, 3" in r.stderr
    assert "loading" not in r.stderr and not out.exists()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.proc.base_url, api_key="x", max_retries=0, timeout=120)


def wait_batch(client, batch_id, statuses, timeout=600.0, until=None):
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses or (until is not None and until(batch)):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.2)


def upload(client, tmp_path, name: str, lines: list[str]):
    with open(write_lines(tmp_path / name, lines), "rb") as f:
        return client.files.create(file=f, purpose="batch")


def test_batch_api_upload_create_poll_download(server, client, reference, tmp_path):
    with pytest.raises(openai.BadRequestError, match="line 2"):
        upload(client, tmp_path, "bad.jsonl", [json.dumps(GOOD[0]), "{oops", json.dumps(GOOD[1])])
    chat = [x for x in GOOD if x["url"] == "/v1/chat/completions"]
    file = upload(client, tmp_path, "chat.jsonl", [json.dumps(x) for x in chat])
    assert file.purpose == "batch" and client.files.retrieve(file.id).bytes == file.bytes
    assert file.id in [f.id for f in client.files.list(purpose="batch")]
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  metadata={"test": "basic"})
    assert batch.status == "validating" and batch.metadata == {"test": "basic"}
    done = wait_batch(client, batch.id, ("completed", "failed"))
    assert done.status == "completed", done
    assert done.request_counts.total == done.request_counts.completed == len(chat)
    assert done.request_counts.failed == 0 and done.error_file_id is None
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(x["custom_id"] for x in lines) == sorted(x["custom_id"] for x in chat)
    for out in lines:
        assert_same_answer(out, reference[out["custom_id"]])
    assert batch.id in [b.id for b in client.batches.list(limit=100)]
    assert client.files.delete(file.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(file.id)


def smol_metric(server, name: str) -> float:
    for line in httpx.get(server.proc.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{") and 'model_name="smol"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} for smol")


def test_online_requests_answer_while_a_batch_runs_and_cancel_stops_it(server, client, tmp_path):
    long = [{"custom_id": f"long-{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "smol", "prompt": f"Chapter {i}.", "max_tokens": 48, "ignore_eos": True,
                      "temperature": 0}} for i in range(200)]
    file = upload(client, tmp_path, "long.jsonl", [json.dumps(x) for x in long])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    wait_batch(client, batch.id, (), until=lambda b: b.status == "in_progress" and b.request_counts.completed > 0)
    with pytest.raises(openai.BadRequestError, match="has not finished"):
        client.files.delete(file.id)
    for i in range(3):  # online traffic is admitted and answered while the batch keeps running
        answer = client.chat.completions.create(model="smol", messages=[{"role": "user", "content": f"Hi {i}"}],
                                                max_tokens=MAX_TOKENS)
        assert answer.choices[0].finish_reason in ("stop", "length")
        assert client.batches.retrieve(batch.id).status == "in_progress"
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    cancelled = wait_batch(client, batch.id, ("cancelled",), timeout=120)
    counts = cancelled.request_counts
    assert 0 < counts.completed < len(long) and counts.failed == 0 and cancelled.cancelled_at
    lines = [json.loads(x) for x in client.files.content(cancelled.output_file_id).text.splitlines()]
    assert len(lines) == counts.completed == len({x["custom_id"] for x in lines})
    assert all(x["response"]["body"]["usage"]["completion_tokens"] == 48 for x in lines)  # none cut short
    deadline = time.monotonic() + 60
    while smol_metric(server, "flotilla:num_requests_running") or smol_metric(server, "flotilla:kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the cancelled batch's requests were not aborted"
        time.sleep(0.2)
    with pytest.raises(openai.BadRequestError, match="its status is cancelled"):
        client.batches.cancel(batch.id)


def test_a_server_killed_mid_batch_resumes_it_on_start(server, reference, tmp_path):
    client = openai.OpenAI(base_url=server.proc.base_url, api_key="x", max_retries=0, timeout=120)
    cmpl = [x for x in GOOD if x["url"] == "/v1/completions"]
    file = upload(client, tmp_path, "cmpl.jsonl", [json.dumps(x) for x in cmpl])
    batch = client.batches.create(input_file_id=file.id, endpoint="/v1/completions", completion_window="24h")
    before = wait_batch(client, batch.id, ("completed",),
                        until=lambda b: b.request_counts.completed >= len(cmpl) // 4)
    assert before.status == "in_progress", before  # killed mid-batch, or the test proves nothing
    server.kill_and_restart()
    client = openai.OpenAI(base_url=server.proc.base_url, api_key="x", max_retries=0, timeout=120)
    assert client.batches.retrieve(batch.id).status in ("in_progress", "finalizing", "completed")
    done = wait_batch(client, batch.id, ("completed", "failed"))
    assert done.status == "completed" and done.request_counts.completed == len(cmpl)
    lines = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
    ids = [x["custom_id"] for x in lines]
    assert len(ids) == len(set(ids)) == len(cmpl)
    for out in lines:
        assert_same_answer(out, reference[out["custom_id"]])
