"""Helpers to run a real ``flotilla serve`` process in tests, and unit tests of the server's pure parts.

``ServerProcess`` starts ``python -m flotilla.entrypoints.cli serve MODEL --port <free port> ...``, waits
for ``/health`` and stops it (SIGTERM, then SIGKILL) at teardown, checking no engine core is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    pids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(x) for x in f.read().split())
    except FileNotFoundError:
        pass
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ServerProcess:
    """A ``flotilla serve`` subprocess on a free port (output in a temporary log file)."""

    def __init__(self, model: str | None, *args: str, api_key: str | None = None, startup_timeout: float = 180.0):
        self.port = free_port()
        self.api_key = api_key
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "flotilla.entrypoints.cli", "serve", *([model] if model else []),
               "--port", str(self.port), *args]
        if api_key:
            cmd += ["--api-key", api_key]
        self.log = tempfile.NamedTemporaryFile(prefix="flotilla-serve-", suffix=".log", delete=False)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.core_pids: list[int] = []
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def output(self) -> str:
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    self.core_pids = child_pids(self.proc.pid)
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not healthy after {timeout} s:\n{self.output()}")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples as {"name{labels}": value} (labels without model_name)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        return parse_metrics(text)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.core_pids:  # never leave an engine core behind, even if a test failed
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()
        return self.proc.returncode


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        name = re.sub(r'model_name="[^"]*",?', "", name).replace(",}", "}").replace("{}", "")
        out[name] = float(value)
    return out


def sse_events(lines) -> list:
    """Decoded ``data:`` payloads of an SSE stream (JSON objects, or the string "[DONE]")."""
    events = []
    for line in lines:
        if isinstance(line, bytes):
            line = line.decode("utf-8")  # strict: a chunk that is not UTF-8 fails the test
        if not line.startswith("data: "):
            assert line.strip() == "", f"unexpected SSE line {line!r}"
            continue
        payload = line[len("data: "):]
        events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
    return events


# ---------------------------------------------------------------- unit tests of the pure parts

def test_admission_decision():
    from flotilla.entrypoints.openai.admission import decide
    assert decide(draining=False, engine_dead=False, num_waiting=1, max_waiting=2).admitted
    full = decide(draining=False, engine_dead=False, num_waiting=2, max_waiting=2, retry_after_s=3)
    assert full.status == 429 and full.retry_after_s == 3
    assert decide(draining=True, engine_dead=False, num_waiting=0, max_waiting=2).status == 503
    assert decide(draining=False, engine_dead=True, num_waiting=0, max_waiting=2).status == 503
    assert decide(draining=False, engine_dead=False, num_waiting=0, max_waiting=0).status == 429


@pytest.mark.parametrize("raw, needle", [(b"", "empty"), (b"{", "not valid JSON"), (b"[1]", "got list"),
                                         (b'"x"', "got str"), (b"3", "got int"), (b"null", "got null"),
                                         (b'{"a": NaN}', "NaN"), (b"\xff\xfe", "UTF-8")])
def test_decode_json_object_rejects(raw, needle):
    from flotilla.entrypoints.openai.body import decode_json_object
    from flotilla.entrypoints.openai.errors import APIError
    with pytest.raises(APIError) as e:
        decode_json_object(raw)
    assert e.value.status == 400 and needle in e.value.message


def test_validation_error_names_the_field():
    from pydantic import ValidationError

    from flotilla.entrypoints.openai.body import validation_error
    from flotilla.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    for model, data, param in [(CompletionRequest, {"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
                               (CompletionRequest, {"prompt": [1, "a"]}, "prompt"),
                               (CompletionRequest, {}, "prompt"),
                               (CompletionRequest, {"prompt": "x", "temperature": True}, "temperature"),
                               (ChatCompletionRequest, {"messages": [{"content": "hi"}]}, "messages")]:
        with pytest.raises(ValidationError) as e:
            model.model_validate(data)
        err = validation_error(e.value)
        assert err.status == 400 and err.param == param, err.message


def test_sampling_params_from_requests():
    from flotilla.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
    from flotilla.errors import InvalidRequestError
    req = CompletionRequest.model_validate({"prompt": ["a", "b"], "n": 2, "stop": "x", "top_k": 5})
    params = req.to_sampling_params()
    assert req.prompts() == ["a", "b"] and params.n == 2 and params.stop == ["x"] and params.top_k == 5
    assert params.max_tokens == 16 and params.temperature == 1.0
    assert CompletionRequest.model_validate({"prompt": [1, 2]}).prompts() == [[1, 2]]
    chat = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                 "max_tokens": 5, "max_completion_tokens": 7,
                                                 "logprobs": True, "top_logprobs": 3})
    cp = chat.to_sampling_params()
    assert cp.max_tokens == 7 and cp.logprobs == 3
    with pytest.raises(InvalidRequestError):
        ChatCompletionRequest.model_validate({"messages": [], "top_logprobs": 2}).to_sampling_params()
    echo = CompletionRequest.model_validate({"prompt": "a", "echo": True, "logprobs": 2, "max_tokens": 0})
    assert echo.to_sampling_params().prompt_logprobs == 2 and echo.to_sampling_params().max_tokens == 0
    both = CompletionRequest.model_validate({"prompt": "a", "echo": True, "logprobs": 2, "prompt_logprobs": 4})
    assert both.to_sampling_params().prompt_logprobs == 4
    assert CompletionRequest.model_validate({"prompt": "a", "logprobs": 2}).to_sampling_params().prompt_logprobs is None
    with pytest.raises(InvalidRequestError, match="only with echo"):
        CompletionRequest.model_validate({"prompt": "a", "max_tokens": 0}).to_sampling_params()
