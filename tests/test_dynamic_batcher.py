"""The dynamic batcher's runner (asyncio + worker threads, a fake clock) and the tensor side of batching:
Triton's request checks, concatenation along the batch dimension with ragged padding, splitting back."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from flotilla.errors import InvalidRequestError
from flotilla.repository import (
    DynamicBatcher, InferError, InferRequest, ModelIO, TensorExecutor, concat_inputs, parse_model_config,
    split_outputs,
)
from flotilla.repository.dynamic_batcher import Executed
from flotilla.repository.config import normalize, validate_model_config

WAIT_S = 10.0   # generous bound for every condition a test waits on


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def model_config(text: str):
    config = parse_model_config(text)
    normalize(config)
    validate_model_config(config)
    return config


DOUBLER = """name: "doubler" backend: "python" max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""


def doubler_config(db: str, instances: int = 1):
    return model_config(DOUBLER + f"dynamic_batching {{ {db} }} instance_group [ {{ count: {instances} }} ]")


async def until(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class Recorder(TensorExecutor):
    """Doubles X; records each batch's size; optionally blocks a batch until released."""

    def __init__(self, io, log, gate: dict | None = None):
        super().__init__(io, self.run)
        self.log, self.gate = log, gate if gate is not None else {}

    def run(self, inputs):
        x = inputs["X"]                                          # (batch, 2)
        self.log.append(x.shape[0])
        event = self.gate.get(float(x[0, 0]))
        if event is not None:
            assert event.wait(WAIT_S), "the test never released this batch"
        if np.any(x < 0):
            raise RuntimeError("negative input")
        return {"Y": x * 2}


def x(value: float, rows: int = 1) -> dict:
    return {"X": np.full((rows, 2), value, dtype=np.float32)}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def make_batcher(config, gate=None, clock=None):
    io, log = ModelIO.from_config(config), []
    count = sum(g.count for g in config.instance_group)
    instances = [Recorder(io, log, gate) for _ in range(count)]
    return DynamicBatcher.from_config(config, instances, clock=clock or FakeClock()), log


# ------------------------------------------------------------------------------------------ the runner

def test_batches_form_at_preferred_sizes_and_each_request_gets_its_rows():
    async def main():
        clock = FakeClock()
        batcher, log = make_batcher(doubler_config("preferred_batch_size: [ 4 ] "
                                                   "max_queue_delay_microseconds: 5000000"), clock=clock)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.infer(x(i, rows=1 + i % 2))) for i in range(5)]   # sizes 1,2,1,2,1
        await until(lambda: sum(t.done() for t in tasks) == 3, "the first preferred batch")
        assert log == [4]                                           # 1 + 2 + 1 = preferred 4, at once
        assert not tasks[3].done() and batcher.stats().queue_length == 2
        clock.t += 5.0                                              # the queue delay passes
        batcher.wakeup()
        results = await asyncio.gather(*tasks)
        assert log == [4, 3]
        for i, out in enumerate(results):
            np.testing.assert_array_equal(out["Y"], x(i, rows=1 + i % 2)["X"] * 2)
        stats = batcher.stats()
        assert stats.batch_sizes == {4: 1, 3: 1} and stats.success_count == 5 and stats.inference_count == 7
        assert stats.queue_s == pytest.approx(2 * 5.0)              # requests 3 and 4 waited the delay
        await batcher.stop()
    run(main())


def test_a_full_queue_is_rejected_at_once_and_admitted_requests_finish():
    async def main():
        gate = {7.0: threading.Event()}
        batcher, _ = make_batcher(doubler_config("max_queue_delay_microseconds: 0 "
                                                 "default_queue_policy { max_queue_size: 2 }"), gate)
        await batcher.start()
        running = asyncio.create_task(batcher.infer(x(7)))            # occupies the only instance
        await until(lambda: batcher.stats().running == 1, "the blocked batch")
        queued = [asyncio.create_task(batcher.infer(x(1))) for _ in range(2)]
        await until(lambda: batcher.stats().queue_length == 2, "two queued requests")
        with pytest.raises(InferError, match="^Exceeds maximum queue size$") as info:
            await batcher.infer(x(1))
        assert info.value.http_status == 503 and batcher.stats().rejected_queue_full == 1
        gate[7.0].set()
        assert all(r["Y"][0, 0] == v for r, v in zip(await asyncio.gather(running, *queued), (14, 2, 2)))
        await batcher.stop()
    run(main())


def test_queue_timeouts_reject_while_instances_are_busy():
    async def main():
        clock = FakeClock()
        gate = {7.0: threading.Event()}
        batcher, _ = make_batcher(doubler_config("default_queue_policy { default_timeout_microseconds: 2000 }"),
                                  gate, clock)
        await batcher.start()
        running = asyncio.create_task(batcher.infer(x(7)))
        await until(lambda: batcher.stats().running == 1, "the blocked batch")
        waiting = asyncio.create_task(batcher.infer(x(1)))
        await until(lambda: batcher.stats().queue_length == 1, "the queued request")
        clock.t += 0.002
        batcher.wakeup()
        with pytest.raises(InferError, match="^Request timeout expired$") as info:
            await waiting
        assert info.value.code == "UNAVAILABLE" and batcher.stats().rejected_timeout == 1
        gate[7.0].set()
        assert (await running)["Y"][0, 0] == 14
        await batcher.stop()
    run(main())


def test_priority_levels_run_high_priority_first():
    async def main():
        gate = {7.0: threading.Event()}
        config = doubler_config("max_queue_delay_microseconds: 0 priority_levels: 2 default_priority_level: 2")
        config.max_batch_size = 1
        del config.dynamic_batching.preferred_batch_size[:]
        batcher, log = make_batcher(config, gate)
        await batcher.start()
        order = []

        async def one(value, priority):
            await batcher.infer(x(value), priority=priority)
            order.append(value)
        first = asyncio.create_task(one(7, 0))
        await until(lambda: batcher.stats().running == 1, "the blocked batch")
        rest = [asyncio.create_task(one(v, p)) for v, p in ((1, 2), (2, 0), (3, 1), (4, 1))]
        await until(lambda: batcher.stats().queue_length == 4, "four queued requests")
        gate[7.0].set()
        await asyncio.gather(first, *rest)
        assert order == [7, 3, 4, 1, 2]
        await batcher.stop()
    run(main())


@pytest.mark.parametrize("preserve", [True, False])
def test_ordering_is_preserved_when_asked_while_instances_run_concurrently(preserve):
    async def main():
        gate = {0.0: threading.Event()}
        db = f"max_queue_delay_microseconds: 0 preserve_ordering: {str(preserve).lower()}"
        config = doubler_config(db, instances=2)
        config.max_batch_size = 2
        config.dynamic_batching.preferred_batch_size[:] = [2]
        batcher, log = make_batcher(config, gate)
        await batcher.start()
        finished = []

        async def one(i):
            await batcher.infer(x(i))
            finished.append(i)
        first = [asyncio.create_task(one(i)) for i in (0, 1)]          # batch 1 blocks on instance 0
        await until(lambda: batcher.stats().running == 1, "batch 1 running")
        second = [asyncio.create_task(one(i)) for i in (2, 3)]         # batch 2 runs on instance 1
        await until(lambda: batcher.stats().execution_count == 1, "batch 2 done")
        await asyncio.sleep(0.05)                                      # a chance to (wrongly) deliver early
        assert finished == ([] if preserve else [2, 3])
        gate[0.0].set()
        await asyncio.gather(*first, *second)
        assert finished == ([0, 1, 2, 3] if preserve else [2, 3, 0, 1])
        await batcher.stop()
    run(main())


def test_a_failing_execute_fails_only_its_batch_and_a_bad_request_fails_alone():
    async def main():
        clock = FakeClock()
        batcher, log = make_batcher(doubler_config("preferred_batch_size: [ 2 ] max_queue_delay_microseconds: "
                                                   "1000000"), clock=clock)
        await batcher.start()
        bad_batch = [asyncio.create_task(batcher.infer(x(v))) for v in (-1, 5)]
        good_batch = [asyncio.create_task(batcher.infer(x(v))) for v in (3, 4)]
        with pytest.raises(InferError, match="unexpected shape for input 'X' for model 'doubler'. Expected "
                                             r"\[-1,2\], got \[1,3\]") as info:
            await batcher.infer({"X": np.zeros((1, 3), np.float32)})
        assert info.value.http_status == 400
        with pytest.raises(InferError, match="data-type is 'FP64', but model 'doubler' expects 'FP32'"):
            await batcher.infer({"X": np.zeros((1, 2))})
        with pytest.raises(InferError, match="'priority' and 'timeout' must be >= 0"):
            await batcher.infer(x(1), timeout_us=-1)
        results = await asyncio.gather(*bad_batch, *good_batch, return_exceptions=True)
        assert [type(r).__name__ for r in results] == ["InferError", "InferError", "dict", "dict"]
        assert results[0].code == "INTERNAL" and "RuntimeError: negative input" in results[0].message
        assert [r["Y"][0, 0] for r in results[2:]] == [6, 8]
        alone = asyncio.create_task(batcher.infer(x(1), requested_outputs=["Y"]))
        await until(lambda: batcher.stats().queue_length == 1, "a lone request")
        clock.t += 1.0                                          # the delay passes: it runs alone
        batcher.wakeup()
        assert (await alone)["Y"][0, 0] == 2
        stats = batcher.stats()
        assert (stats.fail_count, stats.success_count, stats.batch_sizes) == (2, 3, {2: 2, 1: 1})
        await batcher.stop()
    run(main())


def test_an_executor_can_fail_single_requests():
    class PerRequest:
        def execute(self, requests):
            return [InferError("INVALID_ARG", "odd") if r.inputs["X"][0, 0] % 2 else {"Y": r.inputs["X"]}
                    for r in requests]

    async def main():
        config = doubler_config("preferred_batch_size: [ 3 ] max_queue_delay_microseconds: 1000000")
        batcher = DynamicBatcher.from_config(config, [PerRequest()], clock=FakeClock())
        await batcher.start()
        results = await asyncio.gather(*(batcher.infer(x(v)) for v in (2, 3, 4)), return_exceptions=True)
        assert isinstance(results[1], InferError) and results[1].message == "odd"
        assert results[0]["Y"][0, 0] == 2 and results[2]["Y"][0, 0] == 4
        await batcher.stop()
    run(main())


def test_results_carry_response_parameters_times_and_the_backend_s_error_code():
    class ModelError(RuntimeError):        # as the backends' ModelExecutionError: a Triton code and a message
        def __init__(self, message, code):
            super().__init__(message)
            self.message, self.code = message, code

    class Split:
        def execute(self, requests):
            out = []
            for r in requests:
                v = float(r.inputs["X"][0, 0])
                if v == 13:
                    out.append(ModelError("unlucky", "UNAVAILABLE"))
                elif v == 7:
                    out.append(ModelError("unknown code", "UNKNOWN"))
                else:
                    out.append(Executed({"Y": r.inputs["X"] * 2}, {"seen": v}, 0.001, 0.002, 0.003))
            return out

    async def main():
        clock = FakeClock()
        config = doubler_config("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 1000000")
        batcher = DynamicBatcher.from_config(config, [Split()], clock=clock)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.infer_result(x(v))) for v in (1, 13, 7, 2)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0].parameters == {"seen": 1.0} and results[0].outputs["Y"][0, 0] == 2
        assert (results[0].compute_input_s, results[0].compute_infer_s, results[0].compute_output_s) == (
            0.001, 0.002, 0.003)
        assert results[1].code == "UNAVAILABLE" and results[1].message == "unlucky"
        assert results[2].code == "INTERNAL" and "unknown code" in results[2].message
        stats = batcher.stats()
        assert stats.executed_count == 4 and stats.batch_compute_s == {4: (0.001, 0.002, 0.003)}
        assert stats.compute_infer_s == pytest.approx(4 * 0.002)
        # The tensor path splits its own time: gather the inputs, run the model, scatter the outputs.
        io = ModelIO.from_config(config)
        executed = TensorExecutor(io, lambda b: {"Y": b["X"] * 2}).execute(
            [InferRequest(0, x(1.0), 1), InferRequest(1, x(2.0, rows=2), 2)])
        assert [e.outputs["Y"].shape for e in executed] == [(1, 2), (2, 2)]
        assert all(e.compute_input_s >= 0 and e.compute_infer_s > 0 and e.compute_output_s >= 0 for e in executed)
        await batcher.stop()
    run(main())


def test_cancelled_requests_leave_the_queue_and_stop_drains_the_rest():
    async def main():
        clock = FakeClock()
        batcher, log = make_batcher(doubler_config("max_queue_delay_microseconds: 1000000"), clock=clock)
        await batcher.start()
        gone = asyncio.create_task(batcher.infer(x(1)))
        kept = [asyncio.create_task(batcher.infer(x(v))) for v in (2, 3)]
        await until(lambda: batcher.stats().queue_length == 3, "three queued requests")
        gone.cancel()
        await until(lambda: batcher.stats().queue_length == 2, "the cancelled request leaving the queue")
        await batcher.stop(drain=True)                          # no waiting for the 1 s delay of the fake clock
        assert log == [2] and [r["Y"][0, 0] for r in await asyncio.gather(*kept)] == [4, 6]
        with pytest.raises(InferError, match="Server is stopping") as info:
            await batcher.infer(x(1))
        assert info.value.http_status == 503
    run(main())


def test_stop_without_drain_fails_queued_requests():
    async def main():
        batcher, _ = make_batcher(doubler_config("max_queue_delay_microseconds: 1000000"))
        await batcher.start()
        queued = asyncio.create_task(batcher.infer(x(1)))
        await until(lambda: batcher.stats().queue_length == 1, "the queued request")
        await batcher.stop(drain=False)
        with pytest.raises(InferError, match="Server is stopping"):
            await queued
    run(main())


# --------------------------------------------------------------------------------------------- tensors

RAGGED = """name: "enc" backend: "python" max_batch_size: 8
input [ { name: "ids" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true },
        { name: "mask" data_type: TYPE_INT64 dims: [ -1 ] allow_ragged_batch: true },
        { name: "scale" data_type: TYPE_FP32 dims: [ 1 ] reshape { shape: [ ] } } ]
output [ { name: "hidden" data_type: TYPE_FP32 dims: [ -1, 3 ] }, { name: "pooled" data_type: TYPE_FP32 dims: [ 3 ] } ]
batch_output [ { target_name: "hidden" kind: BATCH_SCATTER_WITH_INPUT_SHAPE source_input: "ids" } ]
parameters { key: "pad_value.ids" value { string_value: "99" } }
"""


def test_ragged_inputs_are_padded_per_batch_and_outputs_cut_back():
    io = ModelIO.from_config(model_config(RAGGED))
    reqs = [{"ids": np.array([[1, 2, 3]]), "mask": np.ones((1, 3), np.int64), "scale": np.array([[2.0]], np.float32)},
            {"ids": np.array([[4], [5]]), "mask": np.ones((2, 1), np.int64), "scale": np.ones((2, 1), np.float32)}]
    sizes = [io.check_request(r)[0] for r in reqs]
    assert sizes == [1, 2]
    assert io.check_request(reqs[0])[1] == io.check_request(reqs[1])[1]   # ragged: one batch despite lengths
    batch = concat_inputs(io, reqs)
    np.testing.assert_array_equal(batch["ids"], [[1, 2, 3], [4, 99, 99], [5, 99, 99]])   # pad_value.ids
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1], [1, 0, 0], [1, 0, 0]])      # default pad 0
    assert batch["scale"].shape == (3,)                                       # reshape { shape: [ ] }
    hidden = np.arange(27, dtype=np.float32).reshape(3, 3, 3)                 # (batch, padded length, 3)
    pooled = np.arange(9, dtype=np.float32).reshape(3, 3)
    outs = split_outputs(io, {"hidden": hidden, "pooled": pooled}, reqs, sizes)
    assert outs[0]["hidden"].shape == (1, 3, 3) and outs[1]["hidden"].shape == (2, 1, 3)   # scattered back
    np.testing.assert_array_equal(outs[1]["hidden"], hidden[1:, :1])
    np.testing.assert_array_equal(outs[1]["pooled"], pooled[1:])
    with pytest.raises(InferError, match="output 'pooled' of model 'enc' has batch dimension"):
        split_outputs(io, {"hidden": hidden, "pooled": pooled[:2]}, reqs, sizes)
    with pytest.raises(InferError, match="has data type 'FP64' but its config declares 'FP32'"):
        split_outputs(io, {"hidden": hidden, "pooled": pooled.astype(np.float64)}, reqs, sizes)
    with pytest.raises(InferError, match="did not produce output 'pooled'"):
        split_outputs(io, {"hidden": hidden}, reqs, sizes)


def test_non_ragged_variable_inputs_batch_only_with_equal_shapes():
    io = ModelIO.from_config(model_config(RAGGED.replace("allow_ragged_batch: true }", "}", 1)))
    a = {"ids": np.zeros((1, 3), np.int64), "mask": np.zeros((1, 3), np.int64), "scale": np.ones((1, 1), np.float32)}
    b = {"ids": np.zeros((1, 4), np.int64), "mask": np.zeros((1, 4), np.int64), "scale": np.ones((1, 1), np.float32)}
    assert io.check_request(a)[1] != io.check_request(b)[1]


@pytest.mark.parametrize("inputs, message", [
    ({"X": np.zeros((1, 2), np.float32), "Z": np.zeros(1)}, "unexpected inference input 'Z' for model 'doubler'"),
    ({}, r"expected 1 inputs but got 0 inputs for model 'doubler'. Got input\(s\) \[\], but missing required "
         r"input\(s\) \['X'\]. Please provide all required input\(s\)."),
    ({"X": np.zeros((9, 2), np.float32)}, "inference request batch-size must be <= 8 for 'doubler'"),
    ({"X": np.zeros((0, 2), np.float32)}, "inference request batch-size must be >= 1 for 'doubler'"),
    ({"X": np.float32(1.0) * np.ones(())}, "input 'X' has no shape but model requires batch dimension"),
    ({"X": np.zeros((2,), np.float32)}, r"Expected \[-1,2\], got \[2\]. NOTE: Setting a non-zero max_batch_size"),
])
def test_request_checks_use_triton_s_messages(inputs, message):
    io = ModelIO.from_config(model_config(DOUBLER))
    with pytest.raises(InferError, match=message) as info:
        io.check_request(inputs)
    assert info.value.code == "INVALID_ARG"
    assert isinstance(info.value, InvalidRequestError)      # the same check the backends run
    with pytest.raises(InferError, match="unexpected inference output 'nope' for model 'doubler'"):
        io.select_outputs(["Y", "nope"])
    assert io.select_outputs([]) == ["Y"] and io.select_outputs(["Y", "Y"]) == ["Y"]


def test_bytes_inputs_pad_with_empty_bytes_and_models_without_batching_pass_through():
    config = model_config("""name: "t" backend: "python" max_batch_size: 4
        input [ { name: "text" data_type: TYPE_STRING dims: [ -1 ] allow_ragged_batch: true } ]""")
    io = ModelIO.from_config(config)
    reqs = [{"text": np.array([[b"a", b"b"]], dtype=object)}, {"text": np.array([[b"c"]], dtype=object)}]
    for r in reqs:
        io.check_request(r)
    assert concat_inputs(io, reqs)["text"].tolist() == [[b"a", b"b"], [b"c", b""]]
    flat = ModelIO.from_config(model_config(DOUBLER.replace("max_batch_size: 8", "max_batch_size: 0")))
    assert flat.check_request({"X": np.zeros(2, np.float32)})[0] == 1
    with pytest.raises(InferError, match=r"Expected \[2\], got \[1,2\]\.$"):
        flat.check_request({"X": np.zeros((1, 2), np.float32)})
