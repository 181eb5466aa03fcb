"""No silent drops (issue 13 item 1), against a real ``flotilla serve``: every request field works or is a
400 naming it; listed fields are accepted only with the value that changes nothing; the openai SDK's normal
calls still work.
"""

from __future__ import annotations

import httpx
import openai
import pytest

from flotilla.entrypoints.openai.request_fields import ACCEPTED_EXTRAS, UNIMPLEMENTED_FIELDS, UNSUPPORTED_FIELDS
from test_server_helpers import ServerProcess

pytestmark = pytest.mark.slow

M = [{"role": "user", "content": "Name three colors."}]

# A value that asks for something, for every listed field (an implementer deletes the table entry, not this).
MEANINGFUL = {
    "response_format": {"type": "json_object"}, "structured_outputs": {"regex": "[a-z]+"},
    "guided_json": {"type": "object"}, "guided_regex": "[a-z]+", "guided_choice": ["a", "b"],
    "guided_grammar": 'root ::= "a"', "guided_decoding_backend": "xgrammar", "guided_whitespace_pattern": " ",
    "prompt_logprobs": 1, "logit_bias": {"5": -100}, "best_of": 3, "allowed_token_ids": [5, 6],
    "bad_words": ["red"], "chat_template": "{{ messages }}", "chat_template_kwargs": {"enable_thinking": True},
    "continue_final_message": True,
    "suffix": "end", "store": True, "service_tier": "flex", "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low", "verbosity": "low", "web_search_options": {},
    "functions": [{"name": "f"}], "function_call": "auto", "messages[].function_call": {"name": "f"},
    "messages[].refusal": "no", "messages[].audio": {"id": "a"}, "messages[].annotations": [{"type": "x"}],
    "use_beam_search": True, "length_penalty": 0.5, "priority": 1, "truncate_prompt_tokens": 4,
    "spaces_between_special_tokens": False, "add_special_tokens": True, "return_tokens_as_token_ids": True,
    "return_token_ids": True, "logits_processors": ["x"], "documents": [{"title": "t"}],
    "mm_processor_kwargs": {"a": 1}, "request_id": "mine", "kv_transfer_params": {"a": 1},
    "vllm_xargs": {"a": 1}, "echo": True, "messages[].reasoning_content": "because",
}
COMPLETIONS_ONLY = {"suffix", "best_of"}


@pytest.fixture(scope="module")
def server(tiny_llama):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "512", "--num-kv-blocks", "64",
                        "--served-model-name", "tiny")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def error_of(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "BadRequestError" and err["code"] == 400, err
    return err


def body_with(field: str, value) -> tuple[str, dict]:
    """The route and a body that sends ``field`` (``messages[].x``: on an assistant message) = ``value``."""
    if field.startswith("messages[]."):
        key = field.split(".", 1)[1]
        return "/v1/chat/completions", {"messages": M + [{"role": "assistant", "content": "ok", key: value}],
                                        "max_tokens": 2}
    if field in COMPLETIONS_ONLY:
        return "/v1/completions", {"prompt": "hi", "max_tokens": 2, field: value}
    return "/v1/chat/completions", {"messages": M, "max_tokens": 2, field: value}


@pytest.mark.parametrize("path, body, param, where", [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "frobnicate": 1}, "frobnicate", "frobnicate"),
    ("/v1/chat/completions", {"messages": M, "temprature": 0.5}, "temprature", "temprature"),
    ("/v1/chat/completions", {"messages": M, "stream": True, "stream_options": {"include_usage": True,
                                                                                 "continuous_usage_stats": True}},
     "stream_options", "stream_options.continuous_usage_stats"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "weight": 1}]}, "messages",
     "messages.0.weight"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                                         "cache_control": {}}]}]},
     "messages", "cache_control"),
    ("/tokenize", {"prompt": "hi", "return_token_strs": True}, "return_token_strs", "return_token_strs"),
    ("/detokenize", {"tokens": [5], "extra": 1}, "extra", "extra"),
])
def test_unknown_field_is_400_naming_it(server, path, body, param, where):
    err = error_of(post(server, path, body))
    assert err["param"] == param and where in err["message"], err


def test_every_listed_field_with_a_meaningful_value_is_400(server):
    for table, verdict in ((UNSUPPORTED_FIELDS, "is not supported yet"), (UNIMPLEMENTED_FIELDS, "is not supported")):
        for field in table:
            assert field in MEANINGFUL, f"add a meaningful example value of {field} to MEANINGFUL"
            path, body = body_with(field, MEANINGFUL[field])
            err = error_of(post(server, path, body))
            name = field.split(".", 1)[1] if field.startswith("messages[].") else field
            assert err["param"] == field.split("[")[0].split(".")[0], (field, err)
            assert name in err["message"] and verdict in err["message"], (field, err)
            if table is UNIMPLEMENTED_FIELDS:
                assert "yet" not in err["message"], err


NOOP_VALUES = [
    {"tool_choice": "none"}, {"tools": [], "tool_choice": "auto", "parallel_tool_calls": True},
    {"tools": None, "tool_choice": None, "parallel_tool_calls": None}, {"logit_bias": {}}, {"logit_bias": None},
    {"response_format": {"type": "text"}}, {"best_of": 1}, {"n": 2, "best_of": 2}, {"bad_words": []},
    {"chat_template_kwargs": {}}, {"continue_final_message": False}, {"store": False},
    {"service_tier": "auto"}, {"modalities": ["text"]}, {"use_beam_search": False}, {"priority": 0},
    {"spaces_between_special_tokens": True}, {"echo": False},
    {"metadata": {"team": "a"}, "prompt_cache_key": "k", "safety_identifier": "u1", "user": "u1"},
]


@pytest.mark.parametrize("extra", NOOP_VALUES, ids=[",".join(e) for e in NOOP_VALUES])
def test_noop_values_are_accepted_and_change_nothing(server, extra):
    base = {"messages": M, "max_tokens": 4, "temperature": 0, "seed": 1}
    plain = post(server, "/v1/chat/completions", base)
    r = post(server, "/v1/chat/completions", {**base, **extra})
    assert r.status_code == 200, (extra, r.text)
    texts = [c["message"]["content"] for c in r.json()["choices"]]
    assert texts == [plain.json()["choices"][0]["message"]["content"]] * len(texts)


def test_noop_message_fields_as_the_sdk_sends_them_back(server):
    """An assistant message as SDKs serialise a previous response (null refusal, tool_calls, audio, ...)."""
    answer = {"role": "assistant", "content": "Red.", "refusal": None, "tool_calls": None, "function_call": None,
              "audio": None, "annotations": [], "reasoning_content": None}
    r = post(server, "/v1/chat/completions", {"messages": M + [answer, {"role": "user", "content": "More?"}],
                                              "max_tokens": 3})
    assert r.status_code == 200, r.text


def test_accepted_extras_are_documented_in_the_readme():
    import pathlib
    readme = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
    for field in [*UNSUPPORTED_FIELDS, *UNIMPLEMENTED_FIELDS, *ACCEPTED_EXTRAS]:
        name = field.split("[].")[-1]
        assert f"`{name}`" in readme or f"`{name}:" in readme, field


def test_openai_sdk_calls_still_work(client):
    chat = client.chat.completions.create(
        model="tiny", messages=M, max_completion_tokens=4, temperature=0.5, top_p=0.9, seed=3, stop=["\n\n"],
        n=2, logprobs=True, top_logprobs=2, presence_penalty=0.1, frequency_penalty=0.1, user="u",
        metadata={"k": "v"}, service_tier="auto", store=False, tool_choice="none", logit_bias={},
        extra_body={"top_k": 5, "ignore_eos": True})
    assert len(chat.choices) == 2 and chat.usage.completion_tokens == 8
    history = M + [chat.choices[0].message.model_dump(), {"role": "user", "content": "And?"}]
    again = client.chat.completions.create(model="tiny", messages=history, max_tokens=2)
    assert again.choices[0].finish_reason in ("length", "stop")
    chunks = list(client.chat.completions.create(model="tiny", messages=M, max_tokens=3, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 3
    comp = client.completions.create(model="tiny", prompt=["Hello", "Bye"], max_tokens=3, logprobs=2, n=1,
                                     best_of=1, user="u", stream=False)
    assert len(comp.choices) == 2 and comp.choices[0].logprobs is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=M, max_tokens=2, store=True)
    assert info.value.body["param"] == "store" and "not supported" in info.value.body["message"]


@pytest.mark.parametrize("path, body", [("/v1/completions", {"prompt": "hi", "max_tokens": 2, "priority": 1}),
                                        ("/v1/chat/completions", {"messages": M, "max_tokens": 2, "priority": -5})])
def test_nonzero_priority_without_the_priority_policy_is_400(server, path, body):
    """vLLM's ``priority`` needs ``--scheduling-policy priority`` (this server runs fcfs): 400 naming it.
    Under the priority policy it reaches the engine (``test_request_priority.py``)."""
    err = error_of(post(server, path, body))
    assert err["param"] == "priority", err
    assert "priority scheduling is not enabled" in err["message"] and "--scheduling-policy priority" in err["message"]
