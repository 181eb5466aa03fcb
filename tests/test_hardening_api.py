"""Bad input found by hand (issue 11): each case is a 400 naming the field, through a real ``flotilla serve``
process and real clients (httpx, openai), and the server keeps serving afterwards.

One server (tiny random Llama, ``max_model_len`` 512) is shared by the module; the offline ``LLM`` cases
use the session's ``tiny_llama_engine``.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from flotilla import SamplingParams
from flotilla.errors import InvalidRequestError
from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow
MAX_MODEL_LEN = 512
CHAT = {"messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture(scope="module")
def server(tiny_llama):
    path, _ = tiny_llama
    srv = ServerProcess(path, "--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "64")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=60)


def post(srv, path: str, body=None, raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return httpx.post(srv.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    return httpx.post(srv.url + path, json=body, timeout=60)


def error_of(r: httpx.Response, param: str) -> str:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == 400 and "Traceback" not in r.text, err
    return err["message"]


@pytest.fixture(autouse=True)
def still_serves(request):
    yield
    if "server" in request.fixturenames:
        srv = request.getfixturevalue("server")
        r = post(srv, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text


# ------------------------------------------------------------------------ item 4: min_tokens past the context
def test_chat_min_tokens_beyond_the_context_is_400(server, client):
    msg = error_of(post(server, "/v1/chat/completions", {**CHAT, "min_tokens": 600}), "min_tokens")
    assert "600" in msg and str(MAX_MODEL_LEN) in msg
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.models.list().data[0].id, extra_body={"min_tokens": 510},
                                       **CHAT)
    assert info.value.body["param"] == "min_tokens"


def test_completion_min_tokens_must_fit_the_room_left(server):
    prompt = [5] * 500  # leaves exactly 12 tokens
    msg = error_of(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": None, "min_tokens": 13}),
                   "min_tokens")
    assert "13" in msg and "500" in msg and "12" in msg
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": None, "min_tokens": 12})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 12


def test_offline_min_tokens_beyond_the_context(tiny_llama_engine):
    with pytest.raises(InvalidRequestError) as info:
        tiny_llama_engine.generate([5] * 250, SamplingParams(max_tokens=None, min_tokens=7))
    assert info.value.param == "min_tokens"
    (out,) = tiny_llama_engine.generate([5] * 250, SamplingParams(max_tokens=None, min_tokens=6, temperature=0))
    assert len(out.outputs[0].token_ids) == 6


# ------------------------------------------------------------------------ item 6: non-finite JSON numbers
NON_FINITE = [  # (path, raw body, param, path in the message)
    ("/v1/completions", b'{"prompt": "Hi", "temperature": 1e999}', "temperature", "temperature: 1e999"),
    ("/v1/completions", b'{"prompt": "Hi", "repetition_penalty": 1e999}', "repetition_penalty", None),
    ("/v1/completions", b'{"prompt": "Hi", "presence_penalty": -1e999}', "presence_penalty", None),
    ("/v1/completions", b'{"prompt": "Hi", "top_p": NaN}', "top_p", "top_p: NaN"),
    ("/v1/completions", b'{"prompt": "Hi", "min_p": Infinity}', "min_p", None),
    ("/v1/completions", b'{"prompt": "Hi", "frequency_penalty": -Infinity}', "frequency_penalty", None),
    ("/v1/completions", b'{"prompt": [1, 2, 1e999]}', "prompt", "prompt.2"),
    ("/v1/completions", b'{"prompt": "Hi", "unknown_field": {"x": [NaN]}}', "unknown_field", "unknown_field.x.0"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": 1e999}',
     "temperature", None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi", "weight": -1e400}]}', "messages",
     "messages.0.weight"),
    ("/tokenize", b'{"prompt": "Hi", "add_special_tokens": Infinity}', "add_special_tokens", None),
]


@pytest.mark.parametrize("path,raw,param,where", NON_FINITE)
def test_non_finite_numbers_are_400_naming_the_field(server, path, raw, param, where):
    msg = error_of(post(server, path, raw=raw), param)
    assert "finite" in msg and (where or param) in msg


def test_offline_non_finite_sampling_params(tiny_llama_engine):
    for field in ("temperature", "repetition_penalty", "presence_penalty", "top_p", "min_p"):
        params = SamplingParams(max_tokens=2)
        setattr(params, field, float("inf"))
        with pytest.raises(InvalidRequestError) as info:
            tiny_llama_engine.generate("Hi", params)
        assert info.value.param == field and "finite" in info.value.message


# ------------------------------------------------------------------------ item 7: unknown chat roles
def test_unknown_chat_role_is_400_naming_messages(server, client):
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Abracadabra"}]}
    msg = error_of(post(server, "/v1/chat/completions", body), "messages")
    assert "messages.1.role" in msg and "wizard" in msg and "assistant" in msg
    msg = error_of(post(server, "/tokenize", body), "messages")
    assert "wizard" in msg
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=2,
                                       messages=[{"role": "wizard", "content": "Hi"}])
    assert info.value.body["param"] == "messages"


def test_every_openai_role_is_accepted(server):
    roles = ["system", "developer", "user", "assistant", "tool", "function", "user"]
    body = {"messages": [{"role": role, "content": f"a {role} message"} for role in roles]}
    r = post(server, "/tokenize", body)
    assert r.status_code == 200 and r.json()["count"] > len(roles), r.text
    r = post(server, "/v1/chat/completions", {**body, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
