"""Helpers of the KServe v2 tests: a Triton-layout repository written in-test (an ONNX model exported from a
torch module, Python models of every datatype, and ``triton_repository``'s tokenizer -> ONNX encoder ->
pooling ensemble ``embed`` and ``scale``), and ``flotilla serve --model-repository`` on loopback ports.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ONNX_CONFIG = """
name: "onnx_linear" platform: "onnxruntime_onnx" max_batch_size: 8
input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [3] }]
dynamic_batching { max_queue_delay_microseconds: 2000 }
instance_group [{ count: 1 kind: KIND_CPU }]
"""

TEXT_CONFIG = """
name: "py_text" backend: "python" max_batch_size: 8
input [{ name: "TEXT" data_type: TYPE_STRING dims: [1] }]
output [{ name: "UPPER" data_type: TYPE_STRING dims: [1] }, { name: "LENGTH" data_type: TYPE_INT32 dims: [1] }]
dynamic_batching { }
"""

TEXT_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()      # (batch, 1) bytes
            if any(t == b"boom" for t in text.reshape(-1)):
                error = pb_utils.TritonError("cannot upper-case 'boom'", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            upper = np.array([[t.upper()] for t in text[:, 0]], dtype=np.object_)
            length = np.array([[len(t)] for t in text[:, 0]], dtype=np.int32)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("UPPER", upper), pb_utils.Tensor("LENGTH", length)]))
        return responses
'''

# Every v2 datatype: an identity model without batching (Triton's TYPE_* names).
ALL_TYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BYTES", "BF16")


def _config_type(v2: str) -> str:
    return "TYPE_STRING" if v2 == "BYTES" else f"TYPE_{v2}"


IDENTITY_CONFIG = 'name: "identity_all" backend: "python" max_batch_size: 0\n' + "".join(
    f'input {{ name: "IN_{t}" data_type: {_config_type(t)} dims: [-1, -1] }}\n'
    f'output {{ name: "OUT_{t}" data_type: {_config_type(t)} dims: [-1, -1] }}\n' for t in ALL_TYPES)

IDENTITY_MODEL = '''
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            outputs = [pb_utils.Tensor("OUT_" + t.name()[3:], t.as_numpy()) for t in request.inputs()]
            responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses
'''


ENCODER_SEED = 7
REPOSITORY_MODELS = {"onnx_linear", "py_text", "identity_all", "embed", "tokenizer", "encoder", "pooling", "scale",
                     "gate"}


# A model that holds each request until the test lets it go: execute writes <model dir>/started, then waits (up
# to 60 s) for <model dir>/release, so a test can act while a request is provably inside the model.
GATE_CONFIG = """
name: "gate" backend: "python" max_batch_size: 0
input [{ name: "X" data_type: TYPE_FP32 dims: [1] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [1] }]
"""

GATE_MODEL = '''
import os
import time
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.dir = args["model_repository"]

    def execute(self, requests):
        open(os.path.join(self.dir, "started"), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(self.dir, "release")) and time.monotonic() < deadline:
            time.sleep(0.01)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X").as_numpy())])
                for r in requests]
'''


class LinearRelu:
    """The torch module of the ONNX model (built lazily so importing this module needs no torch)."""

    @staticmethod
    def build(seed: int = 0):
        import torch
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()).eval()


def write_repository(root: Path) -> Path:
    """A Triton-layout repository: onnx_linear (exported here from a torch module), py_text, identity_all, gate,
    the ensemble embed (with tokenizer, encoder, pooling; ``ENCODER_SEED``) and scale (factor 2)."""
    import torch
    from triton_repository import make_encoder, write_embedding_repository, write_scale
    repo = Path(root) / "models"
    onnx_version = repo / "onnx_linear" / "1"
    onnx_version.mkdir(parents=True)
    module = LinearRelu.build()
    torch.onnx.export(module, (torch.randn(2, 4),), str(onnx_version / "model.onnx"), input_names=["x"],
                      output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                      verbose=False)
    (repo / "onnx_linear" / "config.pbtxt").write_text(ONNX_CONFIG)
    for name, config, code in (("py_text", TEXT_CONFIG, TEXT_MODEL), ("identity_all", IDENTITY_CONFIG, IDENTITY_MODEL),
                               ("gate", GATE_CONFIG, GATE_MODEL)):
        (repo / name / "1").mkdir(parents=True)
        (repo / name / "config.pbtxt").write_text(config)
        (repo / name / "1" / "model.py").write_text(code)
    write_embedding_repository(repo, make_encoder(ENCODER_SEED))
    write_scale(repo, 1, 2.0)
    return repo


def torch_oracle(x: np.ndarray, seed: int = 0) -> np.ndarray:
    import torch
    with torch.no_grad():
        return LinearRelu.build(seed)(torch.from_numpy(x)).numpy()


# ------------------------------------------------------------------------------------------ the server

def repository_server(repo: Path, api_key: str, *args: str):
    """``flotilla serve --model-repository REPO`` (explicit model control, every model loaded at start, so the
    repository API works) with HTTP and gRPC on free ports: a ``ServerProcess`` with ``http_url`` and
    ``grpc_url`` (host:port, as tritonclient takes them)."""
    from test_server_helpers import ServerProcess, free_port
    grpc_port = free_port()
    srv = ServerProcess(None, "--model-repository", str(repo), "--model-control-mode", "explicit", "--load-model",
                        "*", "--grpc-port", str(grpc_port), *args, api_key=api_key)
    srv.http_url, srv.grpc_url = f"127.0.0.1:{srv.port}", f"127.0.0.1:{grpc_port}"
    return srv


# An LLM pipeline (Triton's pre-process -> LLM -> post-process ensemble): a Python model writes the prompt into
# a template, the server's LLM (named by the step, not a repository model) generates, a Python model
# upper-cases every response. Streamed, each LLM response flows through the post-processing step.
TEMPLATE = "Question: {}\nAnswer:"

PIPELINE_PRE = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "PROMPT").as_numpy().reshape(-1)[0].decode()
            text = np.array([("Question: " + prompt + "\\nAnswer:").encode()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("TEXT", text)]))
        return responses
'''

PIPELINE_POST = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)[0]
            upper = np.array([text.upper()], dtype=np.object_)
            responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("RESPONSE", upper)]))
        return responses
'''


def write_llm_pipeline(repo: Path, llm: str, name: str = "llm_pipeline") -> None:
    """Models ``<name>_pre``, ``<name>_post`` and the ensemble ``name`` (inputs PROMPT, optional stream and
    max_tokens; output RESPONSE) around the server's LLM ``llm``."""
    for suffix, code, io in (("pre", PIPELINE_PRE, ('PROMPT', 'TEXT')), ("post", PIPELINE_POST, ('TEXT', 'RESPONSE'))):
        model = f"{name}_{suffix}"
        (repo / model / "1").mkdir(parents=True)
        (repo / model / "1" / "model.py").write_text(code)
        (repo / model / "config.pbtxt").write_text(
            f'name: "{model}" backend: "python" max_batch_size: 0\n'
            f'input [{{ name: "{io[0]}" data_type: TYPE_STRING dims: [1] }}]\n'
            f'output [{{ name: "{io[1]}" data_type: TYPE_STRING dims: [1] }}]\n')
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(f"""
name: "{name}" platform: "ensemble" max_batch_size: 0
input [{{ name: "PROMPT" data_type: TYPE_STRING dims: [1] }},
       {{ name: "stream" data_type: TYPE_BOOL dims: [1] optional: true }},
       {{ name: "exclude_input_in_output" data_type: TYPE_BOOL dims: [1] optional: true }}]
output [{{ name: "RESPONSE" data_type: TYPE_STRING dims: [1] }}]
ensemble_scheduling {{ step [
  {{ model_name: "{name}_post" model_version: -1 input_map {{ key: "TEXT" value: "generated" }}
    output_map {{ key: "RESPONSE" value: "RESPONSE" }} }},
  {{ model_name: "{llm}" model_version: -1 input_map {{ key: "text_input" value: "templated" }}
    input_map {{ key: "stream" value: "stream" }}
    input_map {{ key: "exclude_input_in_output" value: "exclude_input_in_output" }}
    output_map {{ key: "text_output" value: "generated" }} }},
  {{ model_name: "{name}_pre" model_version: -1 input_map {{ key: "PROMPT" value: "PROMPT" }}
    output_map {{ key: "TEXT" value: "templated" }} }}
] }}
""")
