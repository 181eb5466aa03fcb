"""Model-repository backends (issue 14): onnxruntime, PyTorch programs (TorchScript, torch.export) and the
python backend with Triton's ``triton_python_backend_utils``, plus the dtype map.

Oracles: onnxruntime run directly on the same file, and the eager torch module each model was made from;
tritonclient's own dtype map, config enum and BYTES serialiser. Models are built in-test (no downloads).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import sys
import zipfile

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from flotilla.errors import InvalidRequestError, ModelLoadError
from flotilla.repository import dtypes
from flotilla.repository.backends import (BackendRequest, ModelExecutionError, auto_complete_config, backend_name,
                                          instance_specs, load_backend)
from flotilla.repository.backends.python_backend import config_dict

TINY_ONNX_CONFIG = """
name: "tiny" platform: "onnxruntime_onnx" max_batch_size: 8
input [{ name: "x" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "y" data_type: TYPE_FP32 dims: [3] }]
instance_group [{ count: 2 kind: KIND_CPU }]
"""


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


class TinyNet(torch.nn.Module):
    """Linear + ReLU, and a second output and input so name mapping is exercised."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x, scale):
        return torch.relu(self.linear(x)) * scale, x.sum(dim=1, keepdim=True)


class LinearRelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.linear(x))


@pytest.fixture(scope="module")
def linear_relu():
    torch.manual_seed(0)
    return LinearRelu().eval()


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(1)
    return TinyNet().eval()


def version_dir(root, model: str, version: int = 1) -> str:
    path = os.path.join(str(root), model, str(version))
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory, linear_relu) -> str:
    """Linear+ReLU exported in-test with torch's dynamo ONNX exporter, dynamic batch dim."""
    path = version_dir(tmp_path_factory.mktemp("repo"), "tiny")
    torch.onnx.export(linear_relu, (torch.randn(2, 4),), os.path.join(path, "model.onnx"), input_names=["x"],
                      output_names=["y"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True,
                      verbose=False)
    return path


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)


# ---------------------------------------------------------------- dtypes


def test_dtype_table_matches_tritonclient():
    from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype
    assert {t.config_name: t.config_value for t in dtypes.TYPES} == {
        k: v for k, v in model_config_pb2.DataType.items() if k != "TYPE_INVALID"}
    for t in dtypes.TYPES:
        assert np.dtype(triton_to_np_dtype(t.v2_name)) == t.numpy
        assert np_to_triton_dtype(t.numpy) == t.v2_name
        assert dtypes.from_numpy(t.numpy) is t and dtypes.from_v2(t.v2_name) is t
        assert dtypes.from_config(t.config_value) is dtypes.from_config(t.config_name) is t
        assert t.itemsize == (0 if t.is_bytes else t.numpy.itemsize)
    assert dtypes.config_to_v2("TYPE_STRING") == "BYTES" and dtypes.v2_to_config("FP16") == 10
    with pytest.raises(InvalidRequestError, match="invalid datatype 'FLOAT32'"):
        dtypes.from_v2("FLOAT32")
    with pytest.raises(ValueError, match="TYPE_INVALID"):
        dtypes.from_config(0)


def test_bytes_arrays():
    array = dtypes.as_bytes_array(np.array([["a", "é"], ["x", "y"]]))
    assert array.dtype == object and array.shape == (2, 2) and array[0, 1] == "é".encode()
    assert dtypes.as_bytes_array(np.array([b"a\x00b"], dtype=object))[0] == b"a\x00b"
    with pytest.raises(ValueError, match="data type is FP32, expected BYTES"):
        dtypes.as_type(np.zeros(2, np.float32), dtypes.from_v2("BYTES"))
    with pytest.raises(ValueError, match="must be bytes or str"):
        dtypes.as_bytes_array(np.array([1, "a"], dtype=object))


# ---------------------------------------------------------------- onnxruntime


def test_onnx_matches_onnxruntime_and_torch(onnx_dir, linear_relu):
    import onnxruntime as ort
    config = parse(TINY_ONNX_CONFIG)
    assert backend_name(config, onnx_dir) == "onnxruntime"
    backends = [load_backend(config, onnx_dir, i) for i in range(2)]
    assert [b.instance.name for b in backends] == ["tiny_0_0", "tiny_0_1"]
    assert not backends[0].receives_requests
    direct = ort.InferenceSession(os.path.join(onnx_dir, "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5, 8):
        x = rows(n, seed=n)
        expected = direct.run(["y"], {"x": x})[0]
        for backend in backends:
            y = backend.execute({"x": x})["y"]
            assert y.dtype == np.float32 and y.shape == (n, 3)
            np.testing.assert_array_equal(y, expected)
        np.testing.assert_allclose(y, linear_relu(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)
    for backend in backends:
        backend.finalize()
        backend.finalize()
    with pytest.raises(ModelExecutionError, match="finalized") as e:
        backends[0].execute({"x": rows(1)})
    assert e.value.code == "UNAVAILABLE"


def test_instances_run_concurrently(onnx_dir, py_model):
    """Each instance of an instance_group is an independent executor: threads calling different instances
    at once get exactly the results of sequential calls."""
    from concurrent.futures import ThreadPoolExecutor
    config, path, _ = py_model
    onnx = [load_backend(parse(TINY_ONNX_CONFIG), onnx_dir, i) for i in range(2)]
    python = [load_backend(config, path, i) for i in range(2)]
    inputs = [rows(1 + i % 8, seed=i) for i in range(40)]
    expected = [onnx[0].execute({"x": x})["y"] for x in inputs]
    texts = [[f"Word {i} and {i}".encode()] for i in range(40)]

    def work(k: int):
        for i in range(k % 2, len(inputs), 2):
            np.testing.assert_array_equal(onnx[k % 2].execute({"x": inputs[i]})["y"], expected[i])
            out = python[k % 2].execute_requests([py_request(texts[i], seed=i)])[0]
            assert out.outputs["NUM_TOKENS"].tolist() == [[4]]
            assert out.outputs["INSTANCE"].tolist() == [[f"pre_0_{k % 2}".encode()]]
        return k

    with ThreadPoolExecutor(4) as pool:
        assert sorted(pool.map(work, range(4))) == [0, 1, 2, 3]
    for backend in onnx + python:
        backend.finalize()


def test_onnx_auto_complete(onnx_dir, linear_relu):
    for minimal in (parse('name: "tiny" platform: "onnxruntime_onnx"'), parse('name: "tiny"')):
        completed = auto_complete_config(minimal, onnx_dir)
        assert completed.max_batch_size == 4 and completed.HasField("dynamic_batching")
        assert (completed.platform, completed.backend) == ("onnxruntime_onnx", "onnxruntime")
        fp32 = model_config_pb2.TYPE_FP32
        assert [(i.name, i.data_type, list(i.dims)) for i in completed.input] == [("x", fp32, [4])]
        assert [(o.name, o.data_type, list(o.dims)) for o in completed.output] == [("y", fp32, [3])]
        backend = load_backend(minimal, onnx_dir)
        assert backend.config == completed
        x = rows(4)
        np.testing.assert_allclose(backend.execute({"x": x})["y"], linear_relu(torch.from_numpy(x)).detach().numpy(),
                                   rtol=1e-5, atol=1e-6)
    # The config spells out the batch dim with max_batch_size 0: no batching is assumed.
    unbatched = parse('name: "tiny" input [{ name: "x" data_type: TYPE_FP32 dims: [-1, 4] }]')
    completed = auto_complete_config(unbatched, onnx_dir)
    assert completed.max_batch_size == 0 and list(completed.output[0].dims) == [-1, 3]


@pytest.mark.parametrize("change, message", [
    ('s/TYPE_FP32 dims: \\[4\\]/TYPE_INT64 dims: [4]/',
     "configuration expects datatype TYPE_INT64 for input 'x', model provides TYPE_FP32"),
    ("s/dims: \\[4\\]/dims: [5]/",
     "tensor 'x': the model expects dims \\[4\\] but the model configuration specifies dims \\[5\\]"),
    ('s/name: "y"/name: "w"/', "configuration output 'w' is not an output of the ONNX model"),
    ('s/name: "x"/name: "z"/', "the ONNX model's input\\(s\\) \\['x'\\] are not in the configuration"),
    ("s/dims: \\[3\\]/dims: [3, 1]/",
     "tensor 'y': the model expects dims \\[3\\] but the model configuration specifies dims \\[3, 1\\]"),
    ('s/$/ parameters [{ key: "intra_op_threads" value { string_value: "2" } }]/',
     "unsupported parameters \\['intra_op_threads'\\]"),
    ("s/KIND_CPU/KIND_GPU/", "KIND_GPU but onnxruntime"),
])
def test_onnx_config_mismatch_is_a_clear_load_error(onnx_dir, change, message):
    _, pattern, replacement, _ = change.split("/")
    text = re.sub(pattern, replacement, TINY_ONNX_CONFIG.strip(), count=1)
    with pytest.raises(ModelLoadError, match=message):
        load_backend(parse(text), onnx_dir)


def test_onnx_config_parameters_and_reshape(onnx_dir, linear_relu):
    config = parse(TINY_ONNX_CONFIG.replace("dims: [4]", "dims: [2, 2] reshape { shape: [4] }") + """
        parameters [{ key: "intra_op_thread_count" value { string_value: "1" } },
                    { key: "session.intra_op.allow_spinning" value { string_value: "1" } }]
        optimization { graph { level: 1 } }""")
    backend = load_backend(config, onnx_dir)
    x = rows(3)
    y = backend.execute({"x": x.reshape(3, 2, 2)})["y"]
    np.testing.assert_allclose(y, linear_relu(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_onnx_bad_requests_fail_alone(onnx_dir):
    backend = load_backend(parse(TINY_ONNX_CONFIG), onnx_dir)
    cases = [
        ({}, "expected 1 inputs but got 0 inputs for model 'tiny'.*missing required input\\(s\\) \\['x'\\]"),
        ({"x": rows(2), "extra": rows(2)}, "unexpected inference input 'extra' for model 'tiny'"),
        ({"x": rows(2).astype(np.float64)}, "inference input 'x' data-type is 'FP64', but model 'tiny' expects 'FP32'"),
        ({"x": np.zeros((2, 5), np.float32)},
         "unexpected shape for input 'x' for model 'tiny'. Expected \\[-1,4\\], got \\[2,5\\]"),
        ({"x": rows(9)}, "inference request batch-size must be <= 8 for 'tiny'"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidRequestError, match=message):
            backend.execute(inputs)
    with pytest.raises(InvalidRequestError, match="unexpected inference output 'nope'"):
        backend.execute({"x": rows(1)}, ["nope"])
    responses = backend.execute_requests([BackendRequest({"x": rows(2)}), BackendRequest(cases[2][0]),
                                          BackendRequest({"x": rows(1)}, is_cancelled=lambda: True),
                                          BackendRequest({"x": rows(3)}, requested_outputs=("y",))])
    assert responses[0].error is None and responses[0].outputs["y"].shape == (2, 3)
    assert isinstance(responses[1].error, InvalidRequestError) and not responses[1].outputs
    assert responses[2].error.code == "CANCELLED"
    assert responses[3].error is None and responses[3].outputs["y"].shape == (3, 3)


def test_onnx_bytes_tensors(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"]),
         helper.make_node("Cast", ["h"], ["h32"], to=TensorProto.FLOAT)],
        "strings", [helper.make_tensor_value_info("text", TensorProto.STRING, ["n", 2]),
                    helper.make_tensor_value_info("h", TensorProto.BFLOAT16, ["n", 3])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n", 2]),
         helper.make_tensor_value_info("h32", TensorProto.FLOAT, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    path = version_dir(tmp_path, "strings")
    onnx.save(model, os.path.join(path, "model.onnx"))
    backend = load_backend(parse('name: "strings"'), path)
    assert backend.max_batch_size == 4
    assert [dtypes.from_config(i.data_type).v2_name for i in backend.config.input] == ["BYTES", "BF16"]
    text = np.array([["héllo", "a b"], ["", "z"]], dtype=object)
    half = dtypes.from_v2("BF16").numpy
    out = backend.execute({"text": text, "h": np.array([[1.5, 2, -3]] * 2, dtype=half)})
    assert out["same"].dtype == object and out["same"].tolist() == [[s.encode() for s in r] for r in text.tolist()]
    np.testing.assert_array_equal(out["h32"], np.array([[1.5, 2, -3]] * 2, np.float32))
    with pytest.raises(InvalidRequestError, match="not utf-8"):
        backend.execute({"text": np.array([[b"\xff", b"a"]], dtype=object), "h": np.zeros((1, 3), half)})


def test_bad_onnx_files(tmp_path):
    path = version_dir(tmp_path, "broken")
    with pytest.raises(ModelLoadError, match="no model.onnx in"):
        load_backend(parse('name: "broken" platform: "onnxruntime_onnx"'), path)
    with open(os.path.join(path, "model.onnx"), "wb") as f:
        f.write(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="onnxruntime cannot load"):
        load_backend(parse('name: "broken" platform: "onnxruntime_onnx"'), path)


# ---------------------------------------------------------------- pytorch


TWO_IO_CONFIG = """
name: "{name}" platform: "pytorch_libtorch" max_batch_size: 8
input [{{ name: "{in_b}" data_type: TYPE_FP32 dims: [1] }}, {{ name: "{in_a}" data_type: TYPE_FP32 dims: [4] }}]
output [{{ name: "{out_b}" data_type: TYPE_FP32 dims: [1] }}, {{ name: "{out_a}" data_type: TYPE_FP32 dims: [3] }}]
"""


def eager(module, x, scale):
    with torch.no_grad():
        return [t.numpy() for t in module(torch.from_numpy(x), torch.from_numpy(scale))]


@pytest.fixture(scope="module")
def torch_dirs(tmp_path_factory, tiny_net) -> dict[str, str]:
    root = tmp_path_factory.mktemp("torch_repo")
    example = (torch.randn(2, 4), torch.randn(2, 1))
    dirs = {"script": version_dir(root, "script"), "export": version_dir(root, "export"),
            "static": version_dir(root, "static")}
    torch.jit.trace(tiny_net, example).save(os.path.join(dirs["script"], "model.pt"))
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(tiny_net, example, dynamic_shapes={"x": {0: batch}, "scale": {0: batch}})
    torch.export.save(program, os.path.join(dirs["export"], "model.pt2"))
    torch.export.save(torch.export.export(tiny_net, example), os.path.join(dirs["static"], "model.pt2"))
    return dirs


@pytest.mark.parametrize("kind, names", [
    # forward's argument names, listed out of order; outputs by <name>__<index>, listed out of order
    ("script", dict(in_a="x", in_b="scale", out_a="OUTPUT__0", out_b="OUTPUT__1")),
    # INPUT__<index> for inputs (listed out of order)
    ("script", dict(in_a="INPUT__0", in_b="INPUT__1", out_a="OUTPUT__0", out_b="OUTPUT__1")),
    ("export", dict(in_a="x", in_b="scale", out_a="y__0", out_b="sum__1")),
])
def test_torch_programs_match_eager(torch_dirs, tiny_net, kind, names):
    config = parse(TWO_IO_CONFIG.format(name=kind, **names))
    backend = load_backend(config, torch_dirs[kind])
    assert (backend.config.platform, backend.config.backend) == ("pytorch_libtorch", "pytorch")
    for n in (1, 3, 8):
        x, scale = rows(n, seed=n), rows(n, seed=n + 10)[:, :1].copy()
        out = backend.execute({names["in_a"]: x, names["in_b"]: scale})
        expected = eager(tiny_net, x, scale)
        np.testing.assert_allclose(out[names["out_a"]], expected[0], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out[names["out_b"]], expected[1], rtol=1e-6, atol=1e-6)
    assert list(backend.execute({names["in_a"]: x, names["in_b"]: scale}, [names["out_b"]])) == [names["out_b"]]
    backend.finalize()


def test_torch_strict_config_ordering(tmp_path, linear_relu):
    path = version_dir(tmp_path, "ordered")
    torch.jit.script(linear_relu).save(os.path.join(path, "model.pt"))
    config = parse('name: "ordered" backend: "pytorch" max_batch_size: 4 '
                   'input [{ name: "features" data_type: TYPE_FP32 dims: [4] }] '
                   'output [{ name: "scores" data_type: TYPE_FP32 dims: [3] }]')
    x = rows(4)
    y = load_backend(config, path).execute({"features": x})["scores"]
    np.testing.assert_allclose(y, linear_relu(torch.from_numpy(x)).detach().numpy(), rtol=1e-6, atol=1e-6)
    wrong = parse(str(config).replace("TYPE_FP32\n  dims: 3", "TYPE_INT64\n  dims: 3"))
    with pytest.raises(ModelExecutionError, match="unexpected datatype torch.float32 for inference output 'scores'"):
        load_backend(wrong, path).execute({"features": x})


def test_torch_export_checked_at_load(torch_dirs):
    names = dict(in_a="x", in_b="scale", out_a="OUTPUT__0", out_b="OUTPUT__1")
    with pytest.raises(ModelLoadError, match="static first dim"):
        load_backend(parse(TWO_IO_CONFIG.format(name="static", **names)), torch_dirs["static"])
    text = TWO_IO_CONFIG.format(name="export", **names).replace("TYPE_FP32 dims: [4]", "TYPE_FP16 dims: [4]")
    with pytest.raises(ModelLoadError, match="expects datatype TYPE_FP16 for input 'x', model provides torch.float32"):
        load_backend(parse(text), torch_dirs["export"])
    text = TWO_IO_CONFIG.format(name="export", **names).replace("dims: [4]", "dims: [5]")
    with pytest.raises(ModelLoadError, match="tensor 'x': the model expects dims \\[4\\]"):
        load_backend(parse(text), torch_dirs["export"])
    with pytest.raises(ModelLoadError, match="needs the config to list the inputs and outputs"):
        load_backend(parse('name: "export" platform: "pytorch_libtorch"'), torch_dirs["export"])
    static = TWO_IO_CONFIG.format(name="static", **names).replace("max_batch_size: 8", "max_batch_size: 0")
    for dims in ("[1]", "[4]", "[3]"):
        static = static.replace(f"dims: {dims}", f"dims: [2, {dims[1]}]")
    backend = load_backend(parse(static), torch_dirs["static"])
    assert backend.execute({"x": rows(2), "scale": np.ones((2, 1), np.float32)})["OUTPUT__0"].shape == (2, 3)


class _Boobytrap:
    """Unpickling this writes a file: proof that a refused file was never unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickled_modules_are_refused_unopened(tmp_path, tiny_net, torch_dirs):
    path = version_dir(tmp_path, "pickled")
    model = os.path.join(path, "model.pt")
    config = parse(TWO_IO_CONFIG.format(name="pickled", in_a="x", in_b="scale", out_a="OUTPUT__0", out_b="OUTPUT__1"))
    trap = str(tmp_path / "unpickled")
    for save in (lambda: torch.save({"module": tiny_net, "trap": _Boobytrap(trap)}, model),
                 lambda: pickle.dump(_Boobytrap(trap), open(model, "wb"))):
        save()
        with pytest.raises(ModelLoadError, match="refusing to load .*model.pt.*pickle"):
            load_backend(config, path)
        assert not os.path.exists(trap)
    # A torch.export archive whose weights are declared as pickles, or that carries compiled code.
    os.remove(model)
    target = os.path.join(path, "model.pt2")
    for rewrite, message in (("use_pickle", "tensor 'linear.weight' is stored as a pickle"),
                             ("aotinductor", "compiled payloads \\(data/aotinductor/")):
        _rewrite_pt2(os.path.join(torch_dirs["export"], "model.pt2"), target, rewrite)
        with pytest.raises(ModelLoadError, match=f"refusing to load .*model.pt2: .*{message}"):
            load_backend(config, path)
    _rewrite_pt2(os.path.join(torch_dirs["export"], "model.pt2"), target, "unchanged")
    assert load_backend(config, path).execute({"x": rows(1), "scale": np.ones((1, 1), np.float32)})


def _rewrite_pt2(source: str, target: str, how: str) -> None:
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        root = src.namelist()[0].split("/")[0]
        for name in src.namelist():
            data = src.read(name)
            if how == "use_pickle" and name.endswith("_weights_config.json"):
                config = json.loads(data)
                next(iter(config["config"].values()))["use_pickle"] = True
                data = json.dumps(config).encode()
            dst.writestr(name, data)
        if how == "aotinductor":
            dst.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")


# ---------------------------------------------------------------- python backend

PY_CONFIG = """
name: "pre" backend: "python" max_batch_size: 8
input [{ name: "TEXT" data_type: TYPE_STRING dims: [1] }, { name: "A" data_type: TYPE_FP32 dims: [4] },
       { name: "B" data_type: TYPE_FP32 dims: [4] }]
output [{ name: "TOKENS" data_type: TYPE_STRING dims: [1] }, { name: "NUM_TOKENS" data_type: TYPE_INT64 dims: [1] },
        { name: "SUM" data_type: TYPE_FP32 dims: [4] }, { name: "INSTANCE" data_type: TYPE_STRING dims: [1] }]
instance_group [{ count: 2 kind: KIND_CPU }]
parameters [{ key: "finalize_marker" value { string_value: "%s" } }]
"""

PY_MODEL = '''
import json
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.args = args
        self.config = json.loads(args["model_config"])
        sum_config = pb_utils.get_output_config_by_name(self.config, "SUM")
        self.sum_dtype = pb_utils.triton_string_to_numpy(sum_config["data_type"])
        self.marker = self.config["parameters"]["finalize_marker"]["string_value"]

    def execute(self, requests):
        responses = []
        for request in requests:
            text = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy()
            if any(t == b"boom" for t in text.reshape(-1)):
                error = pb_utils.TritonError("cannot tokenize 'boom'", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
                continue
            a = pb_utils.get_input_tensor_by_name(request, "A").as_numpy()
            b = pb_utils.get_input_tensor_by_name(request, "B").as_numpy()
            words = [t.decode("utf-8").lower().split() for t in text[:, 0]]
            outputs = {
                "TOKENS": np.array([[" ".join(w).encode()] for w in words], dtype=np.object_),
                "NUM_TOKENS": np.array([[len(w)] for w in words], dtype=np.int64),
                "SUM": (a + b).astype(self.sum_dtype),
                "INSTANCE": np.array([[self.args["model_instance_name"]]] * len(words), dtype=np.object_),
            }
            wanted = request.requested_output_names()
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(n, v) for n, v in outputs.items() if n in wanted]))
        return responses

    def finalize(self):
        with open(self.marker, "w") as f:
            json.dump(self.args, f)
'''


def py_request(texts, seed=0, **kwargs) -> BackendRequest:
    n = len(texts)
    rng = np.random.default_rng(seed)
    inputs = {"TEXT": np.array([[t] for t in texts], dtype=object),
              "A": rng.standard_normal((n, 4)).astype(np.float32), "B": np.ones((n, 4), np.float32)}
    return BackendRequest(inputs, **kwargs)


@pytest.fixture
def py_model(tmp_path):
    path = version_dir(tmp_path, "pre")
    with open(os.path.join(path, "model.py"), "w") as f:
        f.write(PY_MODEL)
    marker = str(tmp_path / "finalized")
    return parse(PY_CONFIG % marker), path, marker


def test_python_model_requests_and_per_request_errors(py_model):
    config, path, marker = py_model
    backend = load_backend(config, path, instance_index=1)
    assert backend.receives_requests and sys.modules["triton_python_backend_utils"].__name__.endswith("pb_utils")
    good = py_request([b"Hello  World", "ÉTÉ chaud x".encode()], seed=1)
    bad_dtype = BackendRequest({**py_request([b"a"]).inputs, "A": np.zeros((1, 4), np.float64)})
    responses = backend.execute_requests([good, py_request([b"ok", b"boom"]), bad_dtype,
                                          py_request([b"One"], requested_outputs=("SUM",))])
    assert responses[0].error is None
    out = responses[0].outputs
    assert out["TOKENS"].tolist() == [[b"hello world"], ["été chaud x".encode()]]
    assert out["NUM_TOKENS"].dtype == np.int64 and out["NUM_TOKENS"].tolist() == [[2], [3]]
    np.testing.assert_array_equal(out["SUM"], good.inputs["A"] + 1)
    assert out["INSTANCE"].tolist() == [[b"pre_0_1"]] * 2
    assert isinstance(responses[1].error, ModelExecutionError) and responses[1].error.code == "INVALID_ARG"
    assert "cannot tokenize 'boom'" in str(responses[1].error)
    assert isinstance(responses[2].error, InvalidRequestError) and "data-type is 'FP64'" in str(responses[2].error)
    assert list(responses[3].outputs) == ["SUM"] and responses[3].error is None
    # The concatenated path: the whole batch as one request.
    assert backend.execute(good.inputs)["NUM_TOKENS"].tolist() == [[2], [3]]
    with pytest.raises(ModelExecutionError, match="boom"):
        backend.execute(py_request([b"boom"]).inputs)
    backend.finalize()
    backend.finalize()
    with open(marker) as f:
        assert json.load(f)["model_instance_name"] == "pre_0_1"


def test_python_model_initialize_args(py_model):
    config, path, marker = py_model
    backend = load_backend(config, path)
    backend.finalize()
    with open(marker) as f:
        args = json.load(f)  # what initialize(args) received, written by the model's finalize
    assert args["model_instance_kind"] == "CPU" and args["model_instance_name"] == "pre_0_0"
    assert args["model_repository"] == os.path.dirname(path) and args["model_version"] == "1"
    assert args["model_name"] == "pre" and args["model_instance_device_id"] == "0"
    model_config = json.loads(args["model_config"])
    assert model_config == config_dict(backend.config)
    assert {k: model_config["input"][1][k] for k in ("name", "data_type", "dims", "optional")} == {
        "name": "A", "data_type": "TYPE_FP32", "dims": [4], "optional": False}
    assert model_config["max_batch_size"] == 8 and "dynamic_batching" not in model_config
    assert model_config["instance_group"][0]["count"] == 2 and model_config["instance_group"][0]["kind"] == "KIND_CPU"


@pytest.mark.parametrize("body, message", [
    ("def execute(self, requests):\n        raise ValueError('no luck')",
     "Failed to process the request\\(s\\) for model 'bad', message: ValueError: no luck"),
    ("def execute(self, requests):\n        return [pb_utils.InferenceResponse([])]",
     "Number of InferenceResponse objects do not match the number of InferenceRequest objects"),
    ("def execute(self, requests):\n        return None",
     "Expected a list in the execute return, found type 'NoneType'"),
    ("def execute(self, requests):\n        return [pb_utils.InferenceResponse([pb_utils.Tensor('Y', "
     "np.zeros((1, 1), np.int32))]) for r in requests]",
     "unexpected datatype for inference output 'Y' of model 'bad': data type is INT32, expected FP32"),
    ("def execute(self, requests):\n        return [pb_utils.InferenceResponse([pb_utils.Tensor('Z', "
     "np.zeros((1, 1), np.float32))]) for r in requests]",
     "returned output 'Z', which is not in its configuration"),
])
def test_python_model_failures_fail_their_requests(tmp_path, body, message):
    path = version_dir(tmp_path, "bad")
    with open(os.path.join(path, "model.py"), "w") as f:
        f.write("import numpy as np\nimport triton_python_backend_utils as pb_utils\n\n"
                f"class TritonPythonModel:\n    {body}\n")
    config = parse('name: "bad" backend: "python" max_batch_size: 4 '
                   'input [{ name: "X" data_type: TYPE_FP32 dims: [1] }] '
                   'output [{ name: "Y" data_type: TYPE_FP32 dims: [1] }]')
    backend = load_backend(config, path)
    x = BackendRequest({"X": np.zeros((1, 1), np.float32)})
    responses = backend.execute_requests([x, BackendRequest({"X": np.zeros((1, 2), np.float32)}), x])
    assert isinstance(responses[1].error, InvalidRequestError)  # checked before the model ran
    for response in (responses[0], responses[2]):
        assert isinstance(response.error, ModelExecutionError) and not response.outputs
        assert response.error.code == "INTERNAL" and re.search(message, str(response.error))


@pytest.mark.parametrize("source, message", [
    ("import not_a_module_anywhere\n", "failed to import: ModuleNotFoundError"),
    ("class Other:\n    pass\n", "defines no class TritonPythonModel"),
    ("class TritonPythonModel:\n    def initialize(self, args):\n        raise RuntimeError('no weights')\n"
     "    def execute(self, requests):\n        return []\n", "initialize failed: RuntimeError: no weights"),
    ("class TritonPythonModel:\n    async def execute(self, requests):\n        return []\n", "async def execute"),
])
def test_bad_python_models_are_load_errors(tmp_path, source, message):
    path = version_dir(tmp_path, "broken")
    with open(os.path.join(path, "model.py"), "w") as f:
        f.write(source)
    before = set(sys.modules)
    with pytest.raises(ModelLoadError, match=message):
        load_backend(parse('name: "broken" backend: "python"'), path)
    assert not [m for m in set(sys.modules) - before if m.startswith("flotilla_python_model_")]


AUTO_COMPLETE_MODEL = '''
import numpy as np
import triton_python_backend_utils as pb_utils
from helper import SCALE


class TritonPythonModel:
    @staticmethod
    def auto_complete_config(auto_complete_model_config):
        auto_complete_model_config.add_input({"name": "IN", "data_type": "TYPE_FP32", "dims": [2]})
        auto_complete_model_config.add_output({"name": "OUT", "data_type": "TYPE_FP32", "dims": [2]})
        auto_complete_model_config.set_max_batch_size(4)
        auto_complete_model_config.set_dynamic_batching()
        return auto_complete_model_config

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("OUT", r.inputs()[0].as_numpy() * SCALE)])
                for r in requests]
'''


def test_python_auto_complete_and_helper_modules(tmp_path):
    path = version_dir(tmp_path, "auto")
    with open(os.path.join(path, "model.py"), "w") as f:
        f.write(AUTO_COMPLETE_MODEL)
    with open(os.path.join(path, "helper.py"), "w") as f:
        f.write("SCALE = 3\n")
    minimal = parse('name: "auto"')
    assert backend_name(minimal, path) == "python"
    completed = auto_complete_config(minimal, path)
    assert completed.backend == "python" and completed.max_batch_size == 4 and completed.HasField("dynamic_batching")
    assert [(i.name, list(i.dims)) for i in completed.input] == [("IN", [2])]
    backend = load_backend(minimal, path)
    out = backend.execute({"IN": np.array([[1, 2]], np.float32)})
    np.testing.assert_array_equal(out["OUT"], [[3, 6]])
    conflicting = parse('name: "auto" input [{ name: "IN" data_type: TYPE_INT32 dims: [2] }]')
    with pytest.raises(ModelLoadError, match="configuration expects datatype TYPE_INT32 for input 'IN'"):
        load_backend(conflicting, path)


def test_pb_utils_matches_triton():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor
    from flotilla.repository.backends import pb_utils
    values = np.array([b"a", "é".encode(), b"", b"\x00\xff"], dtype=object)
    assert pb_utils.serialize_byte_tensor(values) == serialize_byte_tensor(values).item()
    assert pb_utils.deserialize_bytes_tensor(serialize_byte_tensor(values).item()).tolist() == values.tolist()
    assert deserialize_bytes_tensor(pb_utils.serialize_byte_tensor(values)).tolist() == values.tolist()
    assert pb_utils.triton_string_to_numpy("TYPE_FP32") is np.float32
    assert pb_utils.triton_string_to_numpy("TYPE_STRING") is np.object_
    assert pb_utils.numpy_to_triton_type(np.int64) == 9 and pb_utils.triton_to_numpy_type(1) is np.bool_
    tensor = pb_utils.Tensor("T", np.arange(6, dtype=np.float32).reshape(2, 3))
    assert tensor.shape() == [2, 3] and tensor.triton_dtype() == 11 and tensor.is_cpu()
    np.testing.assert_array_equal(pb_utils.Tensor.from_dlpack("U", torch.arange(3)).as_numpy(), [0, 1, 2])
    with pytest.raises(pb_utils.TritonModelException, match="np.object_"):
        pb_utils.Tensor("S", np.array(["text"]))
    with pytest.raises(pb_utils.TritonModelException, match="BLS"):
        pb_utils.InferenceRequest(model_name="m", inputs=[], requested_output_names=[]).exec()
    error = pb_utils.TritonError("nope")
    assert error.code() == pb_utils.TritonError.INTERNAL and error.message() == "nope"


# ---------------------------------------------------------------- selection and instances


def test_backend_selection(tmp_path, onnx_dir):
    empty = version_dir(tmp_path, "m")
    cases = [
        ('platform: "ensemble"', "is an ensemble"),
        ('platform: "tensorrt_plan"', "platform 'tensorrt_plan' is not supported"),
        ('backend: "vllm"', "backend 'vllm' is not supported"),
        ('backend: "python" platform: "onnxruntime_onnx"', "does not match platform"),
        ('runtime: "model.py" backend: "pytorch"', "runtime 'model.py' is not supported"),
        ("", "holds none of model.onnx"),
    ]
    for text, message in cases:
        with pytest.raises(ModelLoadError, match=message):
            backend_name(parse(f'name: "m" {text}'), empty)
    open(os.path.join(empty, "model.py"), "w").close()
    open(os.path.join(empty, "model.onnx"), "w").close()
    with pytest.raises(ModelLoadError, match="several backends"):
        backend_name(parse('name: "m"'), empty)
    assert backend_name(parse('name: "m" default_model_filename: "net.pt2"'), empty) == "pytorch"


def test_instance_specs():
    config = parse('name: "m" instance_group [{ count: 2 kind: KIND_CPU }, '
                   '{ name: "g" count: 1 kind: KIND_GPU gpus: [0, 1] }]')
    assert [(s.name, s.kind, s.device_id) for s in instance_specs(config)] == [
        ("m_0_0", "KIND_CPU", 0), ("m_0_1", "KIND_CPU", 0), ("g_0", "KIND_GPU", 0), ("g_1", "KIND_GPU", 1)]
    assert [(s.name, s.kind) for s in instance_specs(parse('name: "m"'))] == [("m_0_0", "KIND_AUTO")]
