"""Ensembles (issue 14): a Python tokenizer -> an ONNX encoder exported in-test from a small torch module -> a
Python pooling step, run as Triton runs an ensemble (each step through its own model's dynamic batcher), against
the same pipeline computed directly in numpy/torch; validation with Triton's messages; ensembles that follow
their composing models through unload, load and reload."""

from __future__ import annotations

import asyncio
import re

import numpy as np
import pytest
from triton_repository import (ENCODER_PBTXT, ENSEMBLE_PBTXT, POOLING_PBTXT, TOKENIZER_PBTXT, export_encoder,
                               make_encoder, reference_embedding, run, texts_array, until, write,
                               write_embedding_repository)

from flotilla.repository import InferError, ModelConfigError, parse_model_config
from flotilla.repository.config import normalize
from flotilla.repository.ensemble import validate_dependencies, validate_ensemble_scheduling
from flotilla.repository.manager import ModelRepository

TEXTS = ["Hello world", "the quick brown fox jumps over", "a", "Ünïcode wörds and  spaces ", "one two"]


@pytest.fixture(scope="module")
def encoder():
    return make_encoder(0)


@pytest.fixture
def repo_dir(tmp_path, encoder):
    write_embedding_repository(tmp_path, encoder)
    return tmp_path


def embed(repo, texts):
    return repo.model("embed").infer({"TEXT": texts_array(texts)})


def test_the_ensemble_matches_the_pipeline_computed_directly(repo_dir, encoder):
    async def main():
        repo = ModelRepository([repo_dir])
        await repo.start()
        try:
            out = await embed(repo, TEXTS)
            np.testing.assert_allclose(out.outputs["EMBEDDING"], reference_embedding(encoder, TEXTS), rtol=1e-5,
                                       atol=1e-6)
            meta = repo.model("embed").metadata()
            assert meta.platform == "ensemble" and meta.versions == ("1",)
            assert [(t.name, t.datatype, t.shape) for t in meta.inputs] == [("TEXT", "BYTES", (-1, 1))]
            assert [(t.name, t.datatype, t.shape) for t in meta.outputs] == [("EMBEDDING", "FP32", (-1, 8))]
            config = repo.model("embed").config()
            assert [s.model_name for s in config.ensemble_scheduling.step] == ["tokenizer", "encoder", "pooling"]
            with pytest.raises(InferError, match="unexpected inference input 'IDS' for model 'embed'"):
                await repo.model("embed").infer({"IDS": np.zeros((1, 1), np.int64)})
            with pytest.raises(InferError, match="unexpected inference output 'hidden' for model 'embed'"):
                await repo.model("embed").infer({"TEXT": texts_array(["x"])}, requested_outputs=["hidden"])
        finally:
            await repo.close()
    run(main())


def test_concurrent_ensemble_requests_are_batched_in_each_step(repo_dir, encoder):
    texts = [f"request {i} " + "word " * (i % 5) for i in range(16)]

    async def main():
        repo = ModelRepository([repo_dir])
        await repo.start()
        try:
            outs = await asyncio.gather(*(embed(repo, [t]) for t in texts))
            got = np.concatenate([o.outputs["EMBEDDING"] for o in outs])          # (16, 8)
            np.testing.assert_allclose(got, reference_embedding(encoder, texts), rtol=1e-5, atol=1e-6)
            encoder_stats = repo.model("encoder").statistics()
            sizes = {b["batch_size"]: b["compute_infer"]["count"] for b in encoder_stats["batch_stats"]}
            assert max(sizes) > 1 and sum(s * n for s, n in sizes.items()) == 16      # batched across requests
            assert encoder_stats["execution_count"] < 16 and encoder_stats["inference_count"] == 16
            assert max(b["batch_size"] for b in repo.model("tokenizer").statistics()["batch_stats"]) > 1
            stats = repo.model("embed").statistics()
            assert stats["inference_stats"]["success"]["count"] == 16 and stats["inference_count"] == 16
            # queue and compute of the ensemble are the sums over its steps' requests
            steps = [repo.model(m).statistics()["inference_stats"] for m in ("tokenizer", "encoder", "pooling")]
            for key in ("queue", "compute_infer"):
                assert stats["inference_stats"][key]["ns"] == pytest.approx(sum(s[key]["ns"] for s in steps), abs=16)
            assert stats["batch_stats"] == []
        finally:
            await repo.close()
    run(main())


def test_a_failing_step_fails_its_request_alone(repo_dir, encoder):
    async def main():
        repo = ModelRepository([repo_dir])
        await repo.start()
        try:
            good = [asyncio.create_task(embed(repo, [t])) for t in TEXTS]
            bad = asyncio.create_task(embed(repo, ["boom goes the step"]))
            outs = await asyncio.gather(*good)
            with pytest.raises(InferError, match="cannot tokenize 'boom'") as info:
                await bad
            assert info.value.code == "INVALID_ARG"
            got = np.concatenate([o.outputs["EMBEDDING"] for o in outs])
            np.testing.assert_allclose(got, reference_embedding(encoder, TEXTS), rtol=1e-5, atol=1e-6)
            stats = repo.model("embed").statistics()["inference_stats"]
            assert stats["success"]["count"] == len(TEXTS) and stats["fail"]["count"] == 1
        finally:
            await repo.close()
    run(main())


# -------------------------------------------------------------------------------------------- validation

def config(text: str):
    c = parse_model_config(text)
    normalize(c)
    return c


COMPOSING = {name: config(text) for name, text in (("tokenizer", TOKENIZER_PBTXT), ("encoder", ENCODER_PBTXT),
                                                   ("pooling", POOLING_PBTXT))}


def lookup(name):
    return ({1: COMPOSING[name]}, None) if name in COMPOSING else None


@pytest.mark.parametrize("edit, message", [
    (('model_name: "encoder"', 'model_name: "encodr"'),
     "ensemble embed contains models that are not available or ambiguous: encodr"),
    (('input_map [ { key: "INPUT_IDS" value: "ids" }, { key: "ATTENTION_MASK" value: "mask" } ]',
      'input_map [ { key: "INPUT_IDS" value: "ids" } ]'),
     "in ensemble embed, input ATTENTION_MASK in model encoder is not mapped to any ensemble tensors"),
    (('output_map { key: "HIDDEN" value: "hidden" }', 'output_map { key: "HIDDN" value: "hidden" }'),
     "in ensemble embed, ensemble tensor hidden is mapped from non-existing output HIDDN in model encoder"),
    (('max_batch_size: 8', 'max_batch_size: 16'),
     "ensemble embed allows maximum batch size 16, but it contains model tokenizer which only allows maximum "
     "batch size to be 8"),
    (('data_type: TYPE_FP32 dims: [ 8 ]', 'data_type: TYPE_FP16 dims: [ 8 ]'),
     "in ensemble embed, ensemble tensor EMBEDDING: inconsistent data type: TYPE_FP16 is inferred from model embed "
     "while TYPE_FP32 is inferred from model pooling"),
    (('model_version: -1\n    input_map [ { key: "INPUT_IDS"', 'model_version: 3\n    input_map [ { key: "INPUT_IDS"'),
     "ensemble 'embed' depends on 'encoder' whose required version 3 is not loaded."),
])
def test_dependency_validation_uses_triton_s_messages(edit, message):
    text = ENSEMBLE_PBTXT.replace(*edit)
    assert text != ENSEMBLE_PBTXT
    ensemble = config(text)
    validate_ensemble_scheduling(ensemble)
    with pytest.raises(ModelConfigError, match=re.escape(message)):
        validate_dependencies(ensemble, lookup)


@pytest.mark.parametrize("edit, message", [
    # a cycle: the tokenizer's input is the pooling step's output, which needs the tokenizer's
    (('input_map { key: "TEXT" value: "TEXT" }', 'input_map { key: "TEXT" value: "EMBEDDING" }'),
     "output 'EMBEDDING' for ensemble 'embed' is not written: at least one of its depending tensors, 'ids', is "
     "not connected"),
    (('output_map { key: "HIDDEN" value: "hidden" }', 'output_map [ { key: "HIDDEN" value: "hidden" }, '
                                                        '{ key: "X" value: "mask" } ]'),
     "ensemble tensor 'mask' can appear in an output map only once for ensemble 'embed' step 1"),
    (('output_map { key: "HIDDEN" value: "hidden" }', 'output_map { key: "HIDDEN" value: "spare" }'),
     "output 'EMBEDDING' for ensemble 'embed' is not written: at least one of its depending tensors, 'hidden', is "
     "not connected"),
    (('output_map { key: "EMBEDDING" value: "EMBEDDING" }', 'output_map { key: "EMBEDDING" value: "E2" }'),
     "ensemble output 'EMBEDDING' for ensemble embed' is not used"),
    (('ensemble_scheduling {', 'instance_group [ { count: 2 } ] ensemble_scheduling {'),
     "instance group should not be specified for ensemble 'embed'"),
])
def test_config_validation_uses_triton_s_messages(edit, message):
    text = ENSEMBLE_PBTXT.replace(*edit)
    assert text != ENSEMBLE_PBTXT
    with pytest.raises(ModelConfigError, match=re.escape(message)):
        validate_ensemble_scheduling(config(text))


def test_invalid_ensembles_are_unavailable_with_the_reason(repo_dir):
    # Two ensembles that use each other, and one whose data flow has a cycle.
    for name, other in (("ring_a", "ring_b"), ("ring_b", "ring_a")):
        write(repo_dir / name / "config.pbtxt", ENSEMBLE_PBTXT.replace('name: "embed"', f'name: "{name}"')
              .replace('model_name: "pooling"', f'model_name: "{other}"'))
        (repo_dir / name / "1").mkdir()
    write(repo_dir / "loop" / "config.pbtxt", ENSEMBLE_PBTXT.replace('name: "embed"', 'name: "loop"')
          .replace('input_map { key: "TEXT" value: "TEXT" }', 'input_map { key: "TEXT" value: "EMBEDDING" }'))
    (repo_dir / "loop" / "1").mkdir()

    async def main():
        repo = ModelRepository([repo_dir])
        await repo.start()
        try:
            rows = {e.name: (e.state, e.reason) for e in repo.index()}
            assert rows["embed"] == ("READY", "")
            assert rows["ring_a"] == ("UNAVAILABLE", "circular dependency between ensembles: ring_a -> ... -> "
                                                     "ring_b -> ring_a")
            assert rows["loop"][0] == "UNAVAILABLE" and "is not written" in rows["loop"][1]
        finally:
            await repo.close()
    run(main())


# ------------------------------------------------------------------------- following composing models

def test_an_ensemble_follows_its_composing_models(repo_dir, encoder):
    new_encoder = make_encoder(1)

    async def main():
        repo = ModelRepository([repo_dir], model_control_mode="explicit")
        await repo.start()
        try:
            await repo.load("embed")                    # explicit mode loads the composing models too
            assert repo.model_versions("encoder") == ["1"] and repo.model_versions("pooling") == ["1"]
            np.testing.assert_allclose((await embed(repo, TEXTS)).outputs["EMBEDDING"],
                                       reference_embedding(encoder, TEXTS), rtol=1e-5, atol=1e-6)
            await repo.load("pooling")                  # now loaded explicitly (kept by unload_dependents)
            await repo.unload("pooling")
            rows = {e.name: (e.state, e.reason) for e in repo.index()}
            assert rows["embed"] == ("UNAVAILABLE", "ensemble embed contains models that are not available or "
                                                    "ambiguous: pooling")
            with pytest.raises(InferError, match="'embed' has no available versions"):
                repo.model("embed")
            await repo.load("pooling")
            assert repo.model_versions("embed") == ["1"]

            # Reload the middle step with a new version while ensemble requests run: none is lost.
            export_encoder(new_encoder, repo_dir / "encoder" / "2" / "model.onnx")
            texts = [f"text {i}" for i in range(8)]
            old = reference_embedding(encoder, texts)
            new = reference_embedding(new_encoder, texts)
            running = [asyncio.create_task(embed(repo, [t])) for t in texts]
            await until(lambda: repo.model("tokenizer").statistics()["inference_stats"]["success"]["count"] > 5,
                        "ensemble requests past their first step")
            await repo.load("encoder")
            assert repo.model_versions("encoder") == ["2"]
            for i, out in enumerate(await asyncio.gather(*running)):
                got = out.outputs["EMBEDDING"][0]
                assert np.allclose(got, old[i], atol=1e-5) or np.allclose(got, new[i], atol=1e-5)
            np.testing.assert_allclose((await embed(repo, texts)).outputs["EMBEDDING"], new, rtol=1e-5, atol=1e-6)

            await repo.unload("embed", unload_dependents=True)
            loaded = {e.name for e in repo.index(ready_only=True)}
            assert loaded == {"encoder", "pooling"}     # loaded explicitly; the tokenizer came with the ensemble
        finally:
            await repo.close()
    run(main())
