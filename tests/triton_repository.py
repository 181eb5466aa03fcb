"""Triton-layout model repositories written by tests (issue 14): an ONNX encoder exported in-test from a small
torch module, Python models (a tokenizer, a pooling step, a scaler) and an ensemble chaining them, each with the
config.pbtxt Triton itself would load. ``reference_embedding`` computes what the ensemble must return with the
same functions in numpy/torch directly (the oracle)."""

from __future__ import annotations

import asyncio
import time
import warnings
from pathlib import Path

import numpy as np
import torch

VOCAB, WIDTH = 97, 8
WAIT_S = 30.0   # generous bound of every condition a test waits on


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.002)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


# ------------------------------------------------------------------------------------------- tokenizer

def word_id(word: str) -> int:
    """The tokenizer's id of one word (what TOKENIZER_PY computes)."""
    return 1 + sum(word.encode()) % (VOCAB - 1)


def tokenize(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask), each (len(texts), longest): lower-cased words, padded with 0."""
    words = [t.lower().split() for t in texts]
    length = max(1, max(len(w) for w in words))
    ids = np.zeros((len(texts), length), np.int64)
    mask = np.zeros((len(texts), length), np.int64)
    for i, ws in enumerate(words):
        ids[i, :len(ws)] = [word_id(w) for w in ws]
        mask[i, :len(ws)] = 1
    return ids, mask


TOKENIZER_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils

VOCAB = %d


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()     # (batch, 1) bytes
            words = [t.decode("utf-8").lower().split() for t in text[:, 0]]
            if any("boom" in w for w in words):
                error = pb_utils.TritonError("cannot tokenize 'boom'", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            length = max(1, max(len(w) for w in words))
            ids = np.zeros((len(words), length), np.int64)
            mask = np.zeros((len(words), length), np.int64)
            for i, ws in enumerate(words):
                ids[i, :len(ws)] = [1 + sum(w.encode()) %% (VOCAB - 1) for w in ws]
                mask[i, :len(ws)] = 1
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("INPUT_IDS", ids), pb_utils.Tensor("ATTENTION_MASK", mask)]))
        return responses
''' % VOCAB

TOKENIZER_PBTXT = '''
name: "tokenizer" backend: "python" max_batch_size: 8
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ] },
         { name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ -1 ] } ]
dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 100000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
'''


# --------------------------------------------------------------------------------------------- encoder

class TinyEncoder(torch.nn.Module):
    """Embedding -> Linear -> tanh, zeroed where the mask is 0: each token's vector depends on it alone."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, WIDTH)
        self.proj = torch.nn.Linear(WIDTH, WIDTH)

    def forward(self, input_ids, attention_mask):
        hidden = torch.tanh(self.proj(self.embed(input_ids)))          # (batch, seq, WIDTH)
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)


def make_encoder(seed: int) -> TinyEncoder:
    torch.manual_seed(seed)
    return TinyEncoder().eval()


def export_encoder(module: TinyEncoder, path: Path) -> None:
    """model.onnx with dynamic batch and sequence dims (torch's TorchScript-based exporter: fast)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.ones(2, 3, dtype=torch.long)
    axes = {0: "batch", 1: "seq"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, torch.ones_like(ids)), str(path), input_names=["INPUT_IDS", "ATTENTION_MASK"],
                          output_names=["HIDDEN"], dynamo=False,
                          dynamic_axes={"INPUT_IDS": axes, "ATTENTION_MASK": axes, "HIDDEN": axes})


ENCODER_PBTXT = '''
name: "encoder" platform: "onnxruntime_onnx" max_batch_size: 8
input [ { name: "INPUT_IDS" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true },
        { name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true } ]
output [ { name: "HIDDEN" data_type: TYPE_FP32 dims: [ -1, %d ] } ]
batch_output [ { target_name: "HIDDEN" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "INPUT_IDS" } ]
dynamic_batching { preferred_batch_size: [ 8 ] max_queue_delay_microseconds: 100000 }
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters [ { key: "intra_op_thread_count" value { string_value: "1" } } ]
''' % WIDTH


# ----------------------------------------------------------------------------------------------- pooling

POOLING_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            hidden = pb_utils.get_input_tensor_by_name(request, "HIDDEN").as_numpy()        # (batch, seq, W)
            mask = pb_utils.get_input_tensor_by_name(request, "ATTENTION_MASK").as_numpy()  # (batch, seq)
            m = mask[:, :, None].astype(np.float32)
            pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
            norm = np.linalg.norm(pooled, axis=1, keepdims=True)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor("EMBEDDING", (pooled / np.maximum(norm, 1e-12)).astype(np.float32))]))
        return responses
'''

POOLING_PBTXT = '''
name: "pooling" backend: "python" max_batch_size: 8
input [ { name: "HIDDEN" data_type: TYPE_FP32 dims: [ -1, %d ] allow_ragged_batch: true },
        { name: "ATTENTION_MASK" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true } ]
output [ { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ %d ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
''' % (WIDTH, WIDTH)


# ---------------------------------------------------------------------------------------------- ensemble

ENSEMBLE_PBTXT = '''
name: "embed" platform: "ensemble" max_batch_size: 8
input [ { name: "TEXT" data_type: TYPE_STRING dims: [ 1 ] } ]
output [ { name: "EMBEDDING" data_type: TYPE_FP32 dims: [ %d ] } ]
ensemble_scheduling { step [
  { model_name: "tokenizer" model_version: -1
    input_map { key: "TEXT" value: "TEXT" }
    output_map [ { key: "INPUT_IDS" value: "ids" }, { key: "ATTENTION_MASK" value: "mask" } ] },
  { model_name: "encoder" model_version: -1
    input_map [ { key: "INPUT_IDS" value: "ids" }, { key: "ATTENTION_MASK" value: "mask" } ]
    output_map { key: "HIDDEN" value: "hidden" } },
  { model_name: "pooling" model_version: -1
    input_map [ { key: "HIDDEN" value: "hidden" }, { key: "ATTENTION_MASK" value: "mask" } ]
    output_map { key: "EMBEDDING" value: "EMBEDDING" } } ] }
''' % WIDTH


# ------------------------------------------------------------------------------------------------ scaler

SCALE_PY = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils

FACTOR = %r
DELAY_S = %r


class TritonPythonModel:
    def initialize(self, args):
        self.version = args["model_version"]

    def execute(self, requests):
        time.sleep(DELAY_S)            # a model that takes a while, so requests are in flight during reloads
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("Y", (x * FACTOR).astype(np.float32))],
                                                        parameters={"served_by": self.version}))
        return responses
'''

SCALE_PBTXT = '''
name: "scale" backend: "python" max_batch_size: 16
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
dynamic_batching { max_queue_delay_microseconds: 1000 }
instance_group [ { count: 2 kind: KIND_CPU } ]
'''


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_scale(repo: Path, version: int, factor: float, delay_s: float = 0.002, name: str = "scale") -> None:
    write(repo / name / "config.pbtxt", SCALE_PBTXT.replace('"scale"', f'"{name}"'))
    write(repo / name / str(version) / "model.py", SCALE_PY % (factor, delay_s))


def write_embedding_repository(repo: Path, encoder: TinyEncoder) -> None:
    """tokenizer (python) -> encoder (ONNX from ``encoder``) -> pooling (python), and the ensemble "embed"."""
    write(repo / "tokenizer" / "config.pbtxt", TOKENIZER_PBTXT)
    write(repo / "tokenizer" / "1" / "model.py", TOKENIZER_PY)
    write(repo / "encoder" / "config.pbtxt", ENCODER_PBTXT)
    export_encoder(encoder, repo / "encoder" / "1" / "model.onnx")
    write(repo / "pooling" / "config.pbtxt", POOLING_PBTXT)
    write(repo / "pooling" / "1" / "model.py", POOLING_PY)
    write(repo / "embed" / "config.pbtxt", ENSEMBLE_PBTXT)
    (repo / "embed" / "1").mkdir(parents=True, exist_ok=True)


def reference_embedding(encoder: TinyEncoder, texts: list[str]) -> np.ndarray:
    """What the ensemble computes, directly: tokenize, run the torch module, masked mean, L2 normalise."""
    ids, mask = tokenize(texts)
    with torch.no_grad():
        hidden = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()   # (batch, seq, WIDTH)
    m = mask[:, :, None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1.0)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


def texts_array(texts: list[str]) -> np.ndarray:
    return np.array([[t.encode()] for t in texts], dtype=np.object_)     # (batch, 1) BYTES
