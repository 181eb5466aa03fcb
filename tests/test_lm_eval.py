"""lm-evaluation-harness against a real ``flotilla serve``, checked against transformers.

The test writes a 20-question ``multiple_choice`` task (a JSONL file and its task YAML, ``dataset_path: json``)
into a temporary folder and runs it with lm-eval's Python API against ``flotilla serve`` of the embedded
SmolLM2-135M-Instruct in float32, dequantized (``--quantization none``): ``simple_evaluate`` with the
``local-completions`` model, the folder as include path and ``log_samples``, which is what
``lm_eval run --model local-completions --include_path DIR --log_samples`` runs. lm-eval scores each choice
with ``echo: true, logprobs: 1, max_tokens: 1`` completions and sums the echoed prompt logprobs of the choice's
tokens. The oracle is transformers loading the same GGUF file in float32: every
per-choice loglikelihood lm-eval logged must equal the oracle's within 1e-3, its ``is_greedy`` must agree with
the oracle's argmax, and the accuracy lm-eval reports must be the oracle's.

Each run is one way lm-eval talks to a server: its default tokenizer backend (``auto``: the server's
``/tokenizer_info`` and ``/tokenize``, served with ``--enable-tokenizer-info-endpoint``) with token-id prompts
batched four to a request, two requests at a time; and a local Hugging Face tokenizer with text prompts, four
to a request. ``/tokenizer_info`` itself is checked here too.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch

from conftest import smollm2_gguf_path, smollm2_hf_float32
from test_server_helpers import ServerProcess

MODEL = "smollm2-135m-instruct"
TASK = "flotilla_mc20"
TOLERANCE = 1e-3  # fp32 on both sides
QUESTIONS = [  # (question, choices, index of the right one)
    ("What is the capital of France?", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("What color is the sky on a clear day?", ["green", "red", "blue", "yellow"], 2),
    ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Saturn", "Mars"], 3),
    ("What is 2 + 2?", ["4", "3", "5", "22"], 0),
    ("Which animal is known as the king of the jungle?", ["elephant", "lion", "mouse", "dolphin"], 1),
    ("What do bees make?", ["milk", "silk", "honey", "wool"], 2),
    ("Which is the largest ocean on Earth?", ["Atlantic", "Indian", "Arctic", "Pacific"], 3),
    ("What is frozen water called?", ["ice", "steam", "sand", "glass"], 0),
    ("How many days are in a week?", ["five", "seven", "ten", "twelve"], 1),
    ("Which gas do plants take in from the air?", ["oxygen", "helium", "carbon dioxide", "neon"], 2),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "Jane Austen", "Mark Twain", "William Shakespeare"], 3),
    ("What is the opposite of hot?", ["cold", "warm", "loud", "tall"], 0),
    ("Which language is mostly spoken in Brazil?", ["Spanish", "Portuguese", "French", "German"], 1),
    ("What is the chemical symbol for gold?", ["Ag", "Fe", "Au", "Pb"], 2),
    ("How many continents are there?", ["three", "five", "six", "seven"], 3),
    ("Which instrument has 88 keys?", ["piano", "violin", "flute", "drum"], 0),
    ("What is the boiling point of water at sea level in Celsius?", ["50", "100", "150", "200"], 1),
    ("Which is the fastest land animal?", ["turtle", "horse", "cheetah", "snail"], 2),
    ("In which country are the pyramids of Giza?", ["Mexico", "India", "Greece", "Egypt"], 3),
]
TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  cache_dir: {cache}
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(None, "--dtype", "float32", "--quantization", "none", "--enable-tokenizer-info-endpoint")
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def oracle():
    """(tokenizer, model): transformers on the same GGUF file, float32."""
    from transformers import AutoTokenizer
    path = smollm2_gguf_path()
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = smollm2_hf_float32()
    return tok, model


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with the task's JSONL data and YAML (lm-eval's ``--include_path``)."""
    folder = tmp_path_factory.mktemp("lm_eval_task")
    data = folder / "questions.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    cache = json.dumps(str(folder / "datasets_cache"))  # datasets' cache stays in the test's folder
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=json.dumps(str(data)), cache=cache))
    return folder


def run_lm_eval(server: ServerProcess, task_dir, model_args: dict, batch_size: int, tokenizer_backend: str):
    """lm-eval's ``local-completions`` model against ``server`` on the task (Python API, as the ``lm_eval`` CLI
    runs it; only the task folder is indexed, not lm-eval's own tasks); (the task's results, its logged
    samples). Asserts the model resolved its tokenizer to ``tokenizer_backend``."""
    from lm_eval import simple_evaluate
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    lm = get_model("local-completions").create_from_arg_obj(
        {"model": MODEL, "base_url": f"{server.base_url}/completions", **model_args}, {"batch_size": batch_size})
    assert lm.tokenizer_backend == tokenizer_backend
    out = simple_evaluate(model=lm, tasks=[TASK], task_manager=TaskManager(include_path=str(task_dir),
                                                                          include_defaults=False),
                          log_samples=True, random_seed=None, numpy_random_seed=None, torch_random_seed=None)
    return out["results"][TASK], sorted(out["samples"][TASK], key=lambda s: s["doc_id"])


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a (context, continuation) pair into tokens for a causal model: trailing spaces of the
    context move to the continuation, the whole text is tokenized and cut after the context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    return ctx, whole[len(ctx):]


def oracle_scores(model, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, float]]:
    """For each (context tokens, continuation tokens): (loglikelihood of the continuation after the context,
    greedy margin), the margin being the smallest gap between a continuation token's logprob and the best other
    token's (negative: not greedy). One forward pass over the right-padded batch: the model is causal, so the
    padding after a sequence changes none of its logits."""
    width = max(len(ctx) + len(cont) for ctx, cont in pairs)
    ids = torch.zeros(len(pairs), width, dtype=torch.long)  # (B, T), right-padded with token 0
    for row, (ctx, cont) in enumerate(pairs):
        ids[row, :len(ctx) + len(cont)] = torch.tensor(ctx + cont)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits.float(), dim=-1)  # (B, T, vocab)
    out = []
    for row, (ctx, cont) in enumerate(pairs):
        steps = logprobs[row, len(ctx) - 1:len(ctx) + len(cont) - 1]  # (K, vocab): row t predicts cont[t]
        target = torch.tensor(cont)
        chosen = steps[torch.arange(len(cont)), target]  # (K,)
        others = steps.clone()
        others[torch.arange(len(cont)), target] = float("-inf")
        out.append((chosen.sum().item(), (chosen - others.max(dim=-1).values).min().item()))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("model_args,batch_size,backend", [
    ({"num_concurrent": 2}, 4, "remote"),  # lm-eval's default tokenizer_backend, "auto", finds /tokenizer_info
    ({"tokenizer_backend": "huggingface", "tokenizer": "{tokenizer_dir}", "tokenized_requests": False}, 4,
     "huggingface"),
], ids=["remote_tokenizer_token_ids", "hf_tokenizer_text_prompts"])
def test_lm_eval_multiple_choice_matches_transformers(server, oracle, task_dir, smollm2_tokenizer_dir, model_args,
                                                       batch_size, backend):
    tok, model = oracle
    model_args = {k: v.format(tokenizer_dir=smollm2_tokenizer_dir) if isinstance(v, str) else v
                  for k, v in model_args.items()}
    results, samples = run_lm_eval(server, task_dir, model_args, batch_size, backend)
    assert [s["doc_id"] for s in samples] == list(range(len(QUESTIONS)))
    pairs = [encode_pair(tok, f"Question: {question}\nAnswer:", f" {choice}")
             for question, choices, _ in QUESTIONS for choice in choices]
    oracle_results = iter(oracle_scores(model, pairs))
    worst, correct = 0.0, 0
    for sample, (question, choices, answer) in zip(samples, QUESTIONS):
        assert sample["doc"] == {"question": question, "choices": choices, "answer": answer}
        scores = []
        for i, choice in enumerate(choices):
            assert tuple(sample["arguments"][i]) == (f"Question: {question}\nAnswer:", f" {choice}")
            ll, greedy = sample["filtered_resps"][i]
            ref, margin = next(oracle_results)
            scores.append(ref)
            worst = max(worst, abs(ll - ref))
            assert ll == pytest.approx(ref, abs=TOLERANCE), f"doc {sample['doc_id']} choice {choice!r}"
            if abs(margin) > TOLERANCE:  # a near-tie may go either way
                assert greedy == (margin > 0), f"doc {sample['doc_id']} choice {choice!r}: is_greedy {greedy}"
        best, runner_up = sorted(scores, reverse=True)[:2]
        if best - runner_up > 2 * TOLERANCE:  # else a near-tie may pick either
            assert sample["acc"] == float(scores.index(best) == answer), f"doc {sample['doc_id']}: acc differs"
        correct += sample["acc"]
    assert results["acc,none"] == pytest.approx(correct / len(QUESTIONS))
    print(f"lm-eval acc {results['acc,none']:.3f} ({correct:g}/{len(QUESTIONS)}); max |loglikelihood - "
          f"transformers| {worst:.2e}")


@pytest.mark.slow
def test_tokenizer_info_endpoint(server, oracle):
    tok, _ = oracle
    r = httpx.get(server.url + "/tokenizer_info", timeout=30)
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["bos_token"], info["eos_token"], info["pad_token"]) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert info["chat_template"] == tok.chat_template and info["tokenizer_class"]
    assert not any(key.endswith("_file") or key == "name_or_path" for key in info)  # no server paths
    assert httpx.get(server.url + "/tokenizer_info", params={"model": MODEL}, timeout=30).json() == info
    missing = httpx.get(server.url + "/tokenizer_info", params={"model": "nope"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    odd = httpx.get(server.url + "/tokenizer_info", params={"revision": "main"}, timeout=30)
    assert odd.status_code == 400 and odd.json()["error"]["param"] == "revision"


def test_tokenizer_info_body_uses_the_servers_chat_template(smollm2_tokenizer_dir):
    from transformers import AddedToken, AutoTokenizer

    from flotilla.entrypoints.openai.serving_tokenization import tokenizer_info_body
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    own = tokenizer_info_body(tok, None)
    assert own["chat_template"] == tok.chat_template and own["eos_token"] == "<|im_end|>"
    assert tokenizer_info_body(tok, "{{ messages }}")["chat_template"] == "{{ messages }}"
    tok.init_kwargs["extra"] = {"token": AddedToken("<x>"), "ids": (1, 2), "limit": float("inf")}  # made JSON
    assert tokenizer_info_body(tok, None)["extra"] == {"token": "<x>", "ids": [1, 2], "limit": "inf"}
    json.dumps(tokenizer_info_body(tok, None), allow_nan=False)
    tok.chat_template = None
    tok.init_kwargs.pop("chat_template", None)
    assert "chat_template" not in tokenizer_info_body(tok, None)
