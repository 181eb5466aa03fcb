"""Sampling extras and chat templates (issue 13 item 6) against a real ``flotilla serve``: ``logit_bias``,
``allowed_token_ids``, ``bad_words``, ``best_of``, ``--chat-template`` (a file), a request's ``chat_template``
(with ``--trust-request-chat-template``), ``chat_template_kwargs`` and ``continue_final_message``; plus the
parts that need no server (template loading, bad-word tokenization, field rules).
"""

from __future__ import annotations

import argparse

import httpx
import pytest
from transformers import AutoTokenizer

from flotilla.engine.input_processor import InputProcessor
from flotilla.entrypoints.openai.chat_templates import ChatTemplateFields, load_chat_template
from flotilla.errors import InvalidRequestError
from flotilla.tokenizer import Tokenizer
from test_server_helpers import ServerProcess

SERVER_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}:{{ m.content }}<|im_end|>\n{% endfor %}"
                   "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
                   "{% if enable_thinking %}<think>{% endif %}")
REQUEST_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
M = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def template_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "chat.jinja"
    path.write_text(SERVER_TEMPLATE)
    return str(path)


@pytest.fixture(scope="module")
def server(tiny_llama, template_file):
    srv = ServerProcess(tiny_llama[0], "--max-model-len", "256", "--num-kv-blocks", "64",
                        "--served-model-name", "tiny", "--chat-template", template_file,
                        "--trust-request-chat-template")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama[0])


def post(server, path, body) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=60)


def complete(server, **fields) -> dict:
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def error_param(r: httpx.Response) -> str:
    assert r.status_code == 400, r.text
    return r.json()["error"]["param"]


def single_token(tok, text: str) -> int:
    """The one token id whose text is ``text`` (asserts it round-trips)."""
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1 and tok.decode(ids) == text, (text, ids)
    return ids[0]


# ---- logit_bias ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_logit_bias_minus_100_on_the_greedy_token_changes_the_output(server, tok):
    first = complete(server, max_tokens=1, logprobs=0)["choices"][0]
    greedy = single_token(tok, first["logprobs"]["tokens"][0])
    again = complete(server, max_tokens=1, logprobs=0)["choices"][0]
    assert again["text"] == first["text"]
    biased = complete(server, max_tokens=1, logprobs=0, logit_bias={str(greedy): -100})["choices"][0]
    assert biased["text"] != first["text"]
    # logprobs stay the model's: the sampled token is now the runner-up of the unbiased distribution
    assert biased["logprobs"]["token_logprobs"][0] < first["logprobs"]["token_logprobs"][0]


@pytest.mark.slow
def test_logit_bias_plus_100_forces_a_token_in_both_apis(server, tok):
    forced = single_token(tok, " blue")
    out = complete(server, logit_bias={str(forced): 100})["choices"][0]
    assert out["text"] == " blue" * 4
    r = post(server, "/v1/chat/completions", {"messages": M, "max_tokens": 3, "temperature": 0.9, "seed": 3,
                                              "logit_bias": {str(forced): 100.0}})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == " blue" * 3


@pytest.mark.slow
@pytest.mark.parametrize("bias, needle", [({"5": 100.5}, "[-100, 100]"), ({"5": -101}, "[-100, 100]"),
                                          ({"49152": 1}, "outside the vocabulary"), ({"abc": 1}, "token ids"),
                                          ({"-3": 1}, "token ids")])
def test_bad_logit_bias_is_400_naming_it(server, bias, needle):
    r = post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "logit_bias": bias})
    assert error_param(r) == "logit_bias" and needle in r.json()["error"]["message"], r.text


# ---- allowed_token_ids, bad_words ------------------------------------------------------------------------------
@pytest.mark.slow
def test_allowed_token_ids_limit_every_token(server, tok):
    allowed = {single_token(tok, t): t for t in (" red", " green", " blue")}
    for temperature in (0, 1.0):
        out = complete(server, max_tokens=6, logprobs=0, temperature=temperature, seed=7,
                       allowed_token_ids=list(allowed))["choices"][0]
        assert out["logprobs"]["tokens"] and set(out["logprobs"]["tokens"]) <= set(allowed.values()), out
    r = post(server, "/v1/completions", {"prompt": PROMPT, "allowed_token_ids": [49152]})
    assert error_param(r) == "allowed_token_ids"
    r = post(server, "/v1/completions", {"prompt": PROMPT, "allowed_token_ids": []})
    assert error_param(r) == "allowed_token_ids"


@pytest.mark.slow
def test_bad_words_are_never_generated(server, tok):
    tokens = complete(server, max_tokens=6, logprobs=0)["choices"][0]["logprobs"]["tokens"]
    word = next(t for t in tokens if t.strip() and len(tok.encode(t.strip(), add_special_tokens=False)) == 1)
    banned = complete(server, max_tokens=6, logprobs=0, bad_words=[word.strip()])["choices"][0]
    assert all(t.strip() != word.strip() for t in banned["logprobs"]["tokens"]), (word, banned)
    assert banned["logprobs"]["tokens"] != tokens
    assert error_param(post(server, "/v1/completions", {"prompt": PROMPT, "bad_words": [" "]})) == "bad_words"


def test_bad_words_tokenization_is_vllms(tiny_llama):
    tokenizer = Tokenizer.from_pretrained(tiny_llama[0])
    processor = InputProcessor(tokenizer, tokenizer.vocab_size, 256)
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    assert processor.bad_words_token_ids(["hello"]) == [enc("hello"), enc(" hello")]
    assert processor.bad_words_token_ids(["  hello"]) == [enc("hello"), enc(" hello")]
    multi = "antidisestablishment"
    assert len(enc(multi)) > 1 and processor.bad_words_token_ids([multi])[0] == enc(multi)


# ---- best_of ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_best_of_returns_the_most_likely_samples(server, route):
    body = {"max_tokens": 5, "temperature": 1.0, "seed": 11}
    body.update({"prompt": PROMPT, "logprobs": 0} if route == "/v1/completions" else {"messages": M, "logprobs": True})

    def cumulative(choice) -> float:
        lp = choice["logprobs"]
        return sum(lp["token_logprobs"]) if "token_logprobs" in lp else sum(c["logprob"] for c in lp["content"])
    all_four = post(server, route, {**body, "n": 4}).json()  # seeded samples: seed + i, as best_of draws them
    scores = sorted((cumulative(c) for c in all_four["choices"]), reverse=True)
    assert len(set(scores)) > 1, "the samples must differ for this test to mean anything"
    r = post(server, route, {**body, "n": 2, "best_of": 4})
    assert r.status_code == 200, r.text
    best = r.json()
    assert [c["index"] for c in best["choices"]] == [0, 1]
    assert [cumulative(c) for c in best["choices"]] == pytest.approx(scores[:2], abs=1e-5)
    assert best["usage"]["completion_tokens"] == all_four["usage"]["completion_tokens"]  # every sample counts
    no_lp = {k: v for k, v in body.items() if k != "logprobs"}
    plain = post(server, route, {**no_lp, "best_of": 4}).json()["choices"]
    assert len(plain) == 1 and plain[0]["logprobs"] is None  # not asked for: not returned


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"n": 3, "best_of": 2}, {"best_of": 3, "stream": True}, {"best_of": 129},
                                   {"best_of": 0}])
def test_bad_best_of_is_400_naming_it(server, extra):
    assert error_param(post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 2, **extra})) == "best_of"


# ---- chat templates --------------------------------------------------------------------------------------------
def rendered(server, tok, body) -> str:
    r = post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    return tok.decode(r.json()["tokens"])


@pytest.mark.slow
def test_server_chat_template_file_is_used_by_chat_and_tokenize(server, tok):
    text = rendered(server, tok, {"messages": M})
    assert text == "<|im_start|>user:Name three colors.<|im_end|>\n<|im_start|>assistant:"
    r = post(server, "/v1/chat/completions", {"messages": M, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))


@pytest.mark.slow
def test_request_chat_template_and_kwargs(server, tok):
    assert rendered(server, tok, {"messages": M, "chat_template": REQUEST_TEMPLATE}) == "[user] Name three colors.\n"
    thinking = rendered(server, tok, {"messages": M, "chat_template_kwargs": {"enable_thinking": True}})
    assert thinking.endswith("<|im_start|>assistant:<think>")
    r = post(server, "/v1/chat/completions", {"messages": M, "max_tokens": 2, "chat_template": REQUEST_TEMPLATE,
                                              "chat_template_kwargs": {"enable_thinking": True}})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode("[user] Name three colors.\n",
                                                                add_special_tokens=False))
    r = post(server, "/v1/chat/completions", {"messages": M, "chat_template": "{% for m in messages %}"})
    assert error_param(r) == "chat_template"
    r = post(server, "/v1/chat/completions", {"messages": M, "chat_template_kwargs": {"tokenize": True}})
    assert error_param(r) == "chat_template_kwargs"


@pytest.mark.slow
def test_continue_final_message(server, tok):
    messages = M + [{"role": "assistant", "content": "Red, green and"}]
    text = rendered(server, tok, {"messages": messages, "continue_final_message": True,
                                  "add_generation_prompt": False})
    assert text == "<|im_start|>user:Name three colors.<|im_end|>\n<|im_start|>assistant:Red, green and"
    r = post(server, "/v1/chat/completions", {"messages": messages, "continue_final_message": True,
                                              "add_generation_prompt": False, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok.encode(text, add_special_tokens=False))
    r = post(server, "/v1/chat/completions", {"messages": messages, "continue_final_message": True})
    assert error_param(r) == "continue_final_message"  # add_generation_prompt defaults to true


def test_load_chat_template(tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(REQUEST_TEMPLATE)
    assert load_chat_template(str(path)) == REQUEST_TEMPLATE
    assert load_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"  # inline
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="cannot be read"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_request_chat_template_needs_the_trust_flag():
    fields = ChatTemplateFields(chat_template=REQUEST_TEMPLATE)
    with pytest.raises(InvalidRequestError) as e:
        fields.template_options(True, None, trust_request_template=False)
    assert e.value.param == "chat_template"
    assert fields.template_options(True, "server", True)["chat_template"] == REQUEST_TEMPLATE
    assert ChatTemplateFields().template_options(None, "server", False) == {"add_generation_prompt": True,
                                                                           "chat_template": "server"}


def test_serve_flags_resolve_the_template(template_file):
    from flotilla.entrypoints.openai.cli_args import add_serve_args, server_config_from
    p = argparse.ArgumentParser()
    add_serve_args(p)
    config = server_config_from(p.parse_args(["--chat-template", template_file]), "m")
    assert config.chat_template == SERVER_TEMPLATE and not config.trust_request_chat_template
    with pytest.raises(ValueError, match="--chat-template"):
        server_config_from(p.parse_args(["--chat-template", "no/such/file.jinja"]), "m")


# ---- the offline LLM API (the engine end to end, no server) ----------------------------------------------------
def test_engine_applies_the_token_extras(tiny_llama_engine, tok):
    from flotilla import SamplingParams
    llm = tiny_llama_engine
    red, blue = single_token(tok, " red"), single_token(tok, " blue")

    def text(**extras) -> str:
        (out,) = llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=4, **extras))
        return out.outputs[0].text
    assert text(logit_bias={blue: 100.0}) == " blue" * 4
    assert text(allowed_token_ids=[red, blue], logit_bias={blue: 100.0}) == " blue" * 4
    # "blue blue" tokenizes to [" blue", " blue"] (with its leading space): after " blue", " blue" is banned
    assert text(allowed_token_ids=[red, blue], logit_bias={blue: 100.0}, bad_words=["blue blue"]) == \
        " blue red blue red"
    assert text(allowed_token_ids=[red, blue], logit_bias={blue: 100.0}, bad_words=["blue"]) == " red" * 4
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(PROMPT, SamplingParams(allowed_token_ids=[tok.vocab_size + 5]))
    assert e.value.param == "allowed_token_ids"
    with pytest.raises(InvalidRequestError) as e:
        llm.generate(PROMPT, SamplingParams(logit_bias={3: float("nan")}))
    assert e.value.param == "logit_bias"
