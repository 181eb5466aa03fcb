"""The model repository manager (issue 14): a Triton-layout repository written by the test loads unchanged;
explicit load / unload / reload of a new version under many concurrent requests loses none; a broken model
stays UNAVAILABLE with its reason while the others serve; poll mode picks up a new version on a fake clock.

Oracles: the torch module the ONNX model was exported from, and the arithmetic of the Python models (each
response says which version served it)."""

from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch
from triton_repository import (FakeClock, make_encoder, export_encoder, run, tokenize, until, write,
                               write_embedding_repository, write_scale, SCALE_PY)

from flotilla.errors import InvalidRequestError
from flotilla.repository import InferError
from flotilla.repository.manager import ModelRepository


def x(value: float, rows: int = 1) -> dict:
    return {"X": np.full((rows, 2), value, dtype=np.float32)}


@pytest.fixture(scope="module")
def encoder():
    return make_encoder(0)


@pytest.fixture
def repo_dir(tmp_path, encoder):
    write_embedding_repository(tmp_path, encoder)
    write_scale(tmp_path, 1, factor=1.0)
    return tmp_path


def states(repo: ModelRepository) -> dict:
    return {(e.name, e.version): (e.state, e.reason) for e in repo.index()}


# ---------------------------------------------------------------------------------------- loads unchanged

def test_a_triton_repository_loads_unchanged_and_serves(repo_dir, encoder):
    # Auto-completed: an ONNX model with no config at all, and a config.yaml of the same fields.
    export_encoder(encoder, repo_dir / "bare" / "1" / "model.onnx")
    write(repo_dir / "scale_yaml" / "config.yaml", "backend: python\nmax_batch_size: 4\n"
          "input: [{name: X, data_type: TYPE_FP32, dims: [2]}]\noutput: [{name: Y, data_type: TYPE_FP32, dims: [2]}]\n")
    write(repo_dir / "scale_yaml" / "3" / "model.py", SCALE_PY % (3.0, 0.0))

    async def main():
        repo = ModelRepository([repo_dir])
        await repo.start()
        try:
            assert repo.live() and repo.ready()
            assert {k: s for k, (s, _) in states(repo).items()} == {
                (n, "1"): "READY" for n in ("bare", "embed", "encoder", "pooling", "scale", "tokenizer")} | {
                ("scale_yaml", "3"): "READY"}
            meta = repo.model("encoder").metadata()
            assert meta.platform == "onnxruntime_onnx" and meta.versions == ("1",)
            assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [
                ("INPUT_IDS", "INT64", (-1, -1)), ("ATTENTION_MASK", "INT64", (-1, -1))]
            assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [("HIDDEN", "FP32", (-1, -1, 8))]
            bare = repo.model("bare").config()     # Triton's auto-complete from the ONNX file
            assert bare.max_batch_size == 4 and bare.HasField("dynamic_batching")
            assert list(bare.dynamic_batching.preferred_batch_size) == [4]
            assert [i.name for i in bare.input] == ["INPUT_IDS", "ATTENTION_MASK"]
            assert bare.instance_group[0].count == 2        # Triton's onnxruntime default on CPU
            assert repo.model("scale").metadata().platform == "python"
            assert repo.server_metadata()["name"] == "flotilla"

            ids, mask = tokenize(["hello there world", "one"])
            out = await repo.model("encoder").infer({"INPUT_IDS": ids, "ATTENTION_MASK": mask})
            with torch.no_grad():
                want = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
            np.testing.assert_allclose(out.outputs["HIDDEN"], want, rtol=1e-5, atol=1e-6)
            bare_out = await repo.model("bare").infer({"INPUT_IDS": ids, "ATTENTION_MASK": mask})
            np.testing.assert_allclose(bare_out.outputs["HIDDEN"], want, rtol=1e-5, atol=1e-6)
            yaml_out = await repo.model("scale_yaml", "3").infer(x(2.0))
            np.testing.assert_array_equal(yaml_out.outputs["Y"], x(6.0)["X"])
            assert yaml_out.parameters == {"served_by": "3"}

            # Bad requests: Triton's messages, one check for batcher and backends alike.
            with pytest.raises(InferError, match="unexpected shape for input 'X' for model 'scale'") as info:
                await repo.model("scale").infer({"X": np.zeros((1, 3), np.float32)})
            assert info.value.code == "INVALID_ARG" and isinstance(info.value, InvalidRequestError)
            for name, version, message in (("nope", None, "Request for unknown model: 'nope' is not found"),
                                           ("scale", "7", "'scale' version 7 is not found"),
                                           ("scale", "x", "failed to get model version")):
                with pytest.raises(InferError, match=message):
                    repo.model(name, version)
            stats = repo.model("scale").statistics()
            assert stats["name"] == "scale" and stats["version"] == "1"
            assert stats["inference_stats"]["fail"]["count"] == 1 and stats["inference_stats"]["success"]["count"] == 0
            stats = repo.model("encoder").statistics()
            assert stats["inference_count"] == 2 and stats["execution_count"] == 1 and stats["last_inference"] > 0
            assert stats["inference_stats"]["success"]["count"] == 1
            assert stats["inference_stats"]["compute_infer"]["ns"] > 0
            assert [b["batch_size"] for b in stats["batch_stats"]] == [2]
        finally:
            await repo.close()
        assert not repo.live() and not repo.ready()
        with pytest.raises(InferError, match="has no available versions"):
            repo.model("scale")
    run(main())


# ----------------------------------------------------------------------------- explicit reload under load

async def _clients(repo, n: int, phase: dict, results: list, name: str = "scale"):
    """``n`` clients, each with one request outstanding at all times until ``phase["stop"]``; every response
    is checked and recorded as (version that served it, phase when it was sent, phase when it came back)."""
    async def client(i: int):
        k = 0
        while not phase["stop"]:
            value, sent = float(i * 1000 + k), phase["now"]
            out = await repo.model(name).infer(x(value, rows=1 + k % 2))
            factor = {"1": 1.0, "2": 2.0}[out.parameters["served_by"]]
            np.testing.assert_array_equal(out.outputs["Y"], x(value * factor, rows=1 + k % 2)["X"])
            results.append((out.parameters["served_by"], sent, phase["now"]))
            k += 1
    return [asyncio.create_task(client(i)) for i in range(n)]


def test_explicit_reload_of_a_new_version_under_load_loses_no_request(repo_dir):
    async def main():
        repo = ModelRepository([repo_dir], model_control_mode="explicit", load_models=["scale"])
        await repo.start()
        try:
            assert {n for n, _ in states(repo) if states(repo)[(n, _)][0] == "READY"} == {"scale"}
            old = repo.model("scale", "1")
            phase, results = {"now": "before", "stop": False}, []
            clients = await _clients(repo, 32, phase, results)
            await until(lambda: len(results) >= 50, "requests served by version 1")
            write_scale(repo_dir, 2, factor=2.0)
            phase["now"] = "reloading"                    # 32 requests are outstanding on version 1 now
            await repo.load("scale")                      # returns once version 1 has drained
            phase["now"] = "after"
            assert repo.model_versions("scale") == ["2"] and not old.ready()
            await until(lambda: sum(sent == "after" for _, sent, _ in results) >= 50, "requests after the reload")
            phase["stop"] = True
            await asyncio.gather(*clients)                 # no client saw an error
            served = [v for v, _, _ in results]
            assert served.count("1") >= 50 and served.count("2") >= 50
            # In flight across the swap: admitted by version 1 before the reload, answered by it during it.
            assert sum(v == "1" and sent == "before" and back != "before" for v, sent, back in results) >= 32
            assert {v for v, sent, _ in results if sent == "after"} == {"2"}
            v1 = old.statistics()["inference_stats"]
            assert v1["success"]["count"] == served.count("1") and v1["fail"]["count"] == 0

            # Unload while requests are in flight: the admitted ones finish, then the model is gone.
            inflight = [asyncio.create_task(repo.model("scale").infer(x(float(i)))) for i in range(40)]
            await until(lambda: repo.model("scale").statistics()["inference_stats"]["success"]["count"]
                        > served.count("2"), "requests in flight")
            assert sum(t.done() for t in inflight) < 40      # 40 rows: at least three batches on two instances
            await repo.unload("scale")
            outs = await asyncio.gather(*inflight)
            assert [o.parameters["served_by"] for o in outs] == ["2"] * 40
            assert states(repo)[("scale", "")] == ("UNAVAILABLE", "unloaded")
            with pytest.raises(InferError, match="'scale' has no available versions") as info:
                repo.model("scale")
            assert info.value.code == "NOT_FOUND"
            await repo.load("scale")
            assert (await repo.model("scale").infer(x(1.0))).parameters == {"served_by": "2"}
        finally:
            await repo.close()
    run(main())


def test_explicit_load_with_config_override_and_files(repo_dir):
    config = json.dumps({"backend": "python", "max_batch_size": 4,
                         "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [2]}],
                         "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [2]}]})
    model_py = (SCALE_PY % (2.0, 0.0)).encode()

    async def main():
        none_mode = ModelRepository([repo_dir])
        await none_mode.start()
        with pytest.raises(InferError, match="explicit model load / unload is not allowed") as info:
            await none_mode.load("scale")
        assert info.value.code == "UNAVAILABLE"
        await none_mode.close()

        repo = ModelRepository([repo_dir], model_control_mode="explicit")
        await repo.start()
        try:
            assert all(state == "" for state, _ in states(repo).values())    # listed, nothing loaded
            await repo.load("uploaded", config=config, files={"file:2/model.py": model_py})
            out = await repo.model("uploaded").infer(x(4.0))
            assert out.parameters == {"served_by": "2"}
            np.testing.assert_array_equal(out.outputs["Y"], x(8.0)["X"])
            for kwargs, message in (({"files": {"file:1/model.py": model_py}}, "'config' parameter must be given"),
                                    ({"config": config, "files": {"file:../1/model.py": model_py}},
                                     "invalid model file path"),
                                    ({"config": "{not json"}, "not valid JSON"),
                                    ({"config": json.dumps({"max_batch_size": "x"})}, "max_batch_size")):
                with pytest.raises(InferError, match=message) as info:
                    await repo.load("uploaded", **kwargs)
                assert info.value.code == "INVALID_ARG"
            assert (await repo.model("uploaded").infer(x(1.0))).parameters == {"served_by": "2"}   # still serving
            with pytest.raises(InferError, match="load failed for model 'nope'"):
                await repo.load("nope")
            # A config override applies to a repository model too (here: its version policy).
            write_scale(repo_dir, 2, factor=2.0)
            await repo.load("scale", config=json.dumps({"version_policy": {"all": {}}, "backend": "python",
                                                        "max_batch_size": 16,
                                                        "input": [{"name": "X", "data_type": "TYPE_FP32",
                                                                   "dims": [2]}],
                                                        "output": [{"name": "Y", "data_type": "TYPE_FP32",
                                                                    "dims": [2]}]}))
            assert repo.model_versions("scale") == ["1", "2"]
            assert (await repo.model("scale", "1").infer(x(1.0))).parameters == {"served_by": "1"}
            await repo.unload("uploaded")
            assert states(repo)[("uploaded", "")] == ("UNAVAILABLE", "unloaded")
        finally:
            await repo.close()
    run(main())


# ----------------------------------------------------------------------------------------- broken models

def test_a_broken_model_stays_unavailable_with_its_reason_while_others_serve(repo_dir):
    write(repo_dir / "bad_syntax" / "config.pbtxt", 'name: "bad_syntax" max_batch_size: [')
    write(repo_dir / "bad_syntax" / "1" / "model.py", "")
    write(repo_dir / "bad_init" / "config.pbtxt", 'backend: "python"')
    write(repo_dir / "bad_init" / "1" / "model.py", "class TritonPythonModel:\n    def initialize(self, args):\n"
                                                    "        raise RuntimeError('no GPU here')\n"
                                                    "    def execute(self, requests):\n        return []\n")
    write(repo_dir / "no_file" / "config.pbtxt", 'platform: "onnxruntime_onnx" max_batch_size: 2')
    (repo_dir / "no_file" / "1").mkdir()
    shutil.rmtree(repo_dir / "pooling")       # the ensemble loses a composing model

    async def main():
        repo = ModelRepository([repo_dir])
        await repo.start()
        try:
            s = states(repo)
            assert s[("scale", "1")] == ("READY", "") and s[("encoder", "1")] == ("READY", "")
            state, reason = s[("bad_syntax", "")]
            assert state == "UNAVAILABLE" and "config.pbtxt:1" in reason
            state, reason = s[("bad_init", "")]
            assert state == "UNAVAILABLE" and "initialize failed: RuntimeError: no GPU here" in reason
            assert "failed to load 'bad_init' version 1" in reason
            assert "no model.onnx" in s[("no_file", "")][1]
            assert s[("embed", "")] == ("UNAVAILABLE", "ensemble embed contains models that are not available or "
                                                       "ambiguous: pooling")
            with pytest.raises(InferError, match="'bad_init' has no available versions"):
                repo.model("bad_init")
            assert (await repo.model("scale").infer(x(1.0))).parameters == {"served_by": "1"}
            assert repo.live() and not repo.ready()             # strict readiness: not every model is ready
            assert [e.name for e in repo.index(ready_only=True)] == ["encoder", "scale", "tokenizer"]
        finally:
            await repo.close()
        lenient = ModelRepository([repo_dir], strict_readiness=False)
        await lenient.start()
        assert lenient.ready()
        await lenient.close()
    run(main())


# ------------------------------------------------------------------------------------------------ polling

def test_poll_mode_picks_up_changes_on_a_fake_clock(repo_dir):
    async def main():
        clock = FakeClock()
        repo = ModelRepository([repo_dir], model_control_mode="poll", poll_interval_s=10.0, clock=clock)
        await repo.start()
        try:
            v1 = repo.model("scale", "1")
            write_scale(repo_dir, 2, factor=2.0)
            write_scale(repo_dir, 1, factor=5.0, name="added")
            assert await repo.poll() == []                  # not time yet
            assert repo.model_versions("scale") == ["1"]
            clock.t += 10.0
            repo.wakeup()                                   # the poll timer sees the clock moved
            await until(lambda: repo.model_versions("scale") == ["2"] and repo.model_versions("added") == ["1"],
                        "the poll to load scale version 2 and the new model")
            assert not v1.ready()
            assert (await repo.model("scale").infer(x(1.0))).parameters == {"served_by": "2"}
            np.testing.assert_array_equal((await repo.model("added").infer(x(1.0))).outputs["Y"], x(5.0)["X"])
            # A broken change keeps the loaded version serving; a removed model is unloaded.
            write(repo_dir / "scale" / "config.pbtxt", "max_batch_size: {")
            shutil.rmtree(repo_dir / "added")
            clock.t += 10.0
            assert sorted(await repo.poll()) == ["added", "scale"]
            assert repo.model_versions("scale") == ["2"] and "added" not in {e.name for e in repo.index()}
            assert (await repo.model("scale").infer(x(1.0))).parameters == {"served_by": "2"}
            with pytest.raises(InferError, match="not allowed if polling is enabled"):
                await repo.unload("scale")
        finally:
            await repo.close()
    run(main())


# --------------------------------------------------------------------- models served next to the repository

def test_external_models_are_ensemble_steps_and_their_names_are_taken(tmp_path):
    """The server's other models (here: a model of a second repository) may be ensemble steps; a repository
    model of the same name is not loaded and says why."""
    server_dir, repo_dir = tmp_path / "server", tmp_path / "repo"
    write_scale(server_dir, 1, factor=3.0)                      # "scale" is the server's model
    write_scale(repo_dir, 1, factor=5.0)                        # ... so the repository's "scale" must not load
    write_scale(repo_dir, 1, factor=2.0, name="double")
    write(repo_dir / "chain" / "config.pbtxt", """
name: "chain" platform: "ensemble" max_batch_size: 4
input [{ name: "X" data_type: TYPE_FP32 dims: [2] }]
output [{ name: "Y" data_type: TYPE_FP32 dims: [2] }]
ensemble_scheduling { step [
  { model_name: "double" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Y" value: "d" } },
  { model_name: "scale" model_version: -1 input_map { key: "X" value: "d" } output_map { key: "Y" value: "Y" } }
] }
""")
    (repo_dir / "chain" / "1").mkdir()

    async def main():
        server = ModelRepository([server_dir])
        await server.start()
        repo = ModelRepository([repo_dir], strict_readiness=False)
        repo.set_external_models({"scale": server.model("scale")})
        await repo.start()
        try:
            found = states(repo)
            assert found[("scale", "")][0] == "UNAVAILABLE" and "already served" in found[("scale", "")][1]
            assert found[("chain", "1")][0] == "READY"
            out = await repo.model("chain").infer(x(1.0, rows=2))
            np.testing.assert_allclose(out.outputs["Y"], np.full((2, 2), 6.0))      # 1 * 2 (double) * 3 (server)
            with pytest.raises(InferError) as info:
                repo.model("scale")
            assert info.value.code == "NOT_FOUND"
        finally:
            await repo.close()
            await server.close()
    run(main())
