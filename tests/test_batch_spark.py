"""Spark (``flotilla.batch.spark``) on a real local session (``local[2]``: two Python workers at most).

50 prompts through the UDF equal ``LLM.generate`` greedy in this process (the oracle), and a second job in
the same session (a new UDF, chat messages this time) reuses the workers' engines: an accumulator counts the
engines built across both jobs (at most one per Python worker: 2).
"""

from __future__ import annotations

import shutil
import sys

import pytest

pyspark = pytest.importorskip("pyspark")
if shutil.which("java") is None:
    pytest.skip("Spark needs Java 17 (apt-get install openjdk-17-jre-headless)", allow_module_level=True)

from flotilla.batch.spark import OUTPUT_SCHEMA, generate  # noqa: E402
from flotilla.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = dict(max_model_len=256, num_kv_blocks=256)  # as the tiny_llama_engine oracle
ENGINE_YAML = "{max_model_len: 256, num_kv_blocks: 256}"  # the same in a deployment file
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)
WORDS = "the quick brown fox jumps over a lazy dog while engineers deploy models".split()
PYTHON_WORKERS = 2  # local[2]: at most two tasks, so two Python workers, at once


def _prompts(n: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 9)) + f" {i}" for i in range(n)]


@pytest.fixture(scope="session")
def spark():
    """One local Spark session: two task slots, UI off, small driver memory, on loopback. Its Python workers
    run this interpreter: PYSPARK_PYTHON, which pyspark reads when the session starts (the conf
    ``spark.pyspark.python`` is spark-submit's)."""
    from pyspark.sql import SparkSession
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYSPARK_PYTHON", sys.executable)
        session = (SparkSession.builder.master(f"local[{PYTHON_WORKERS}]").appName("flotilla-tests")
                   .config("spark.ui.enabled", "false")
                   .config("spark.driver.memory", "512m")
                   .config("spark.driver.host", "127.0.0.1")
                   .config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.sql.shuffle.partitions", "4")
                   .getOrCreate())
        session.sparkContext.setLogLevel("ERROR")
        assert session.sparkContext.pythonExec == sys.executable
        yield session
        session.stop()


def _expected(outs) -> list[tuple]:
    return [(o.outputs[0].text, list(o.outputs[0].token_ids), o.outputs[0].finish_reason,
             len(o.prompt_token_ids), len(o.outputs[0].token_ids)) for o in outs]


def _actual(rows) -> list[tuple]:
    return [(r.output.text, list(r.output.token_ids), r.output.finish_reason, r.output.prompt_tokens,
             r.output.completion_tokens) for r in sorted(rows, key=lambda r: r.id)]


def test_udf_equals_llm_generate_and_a_second_job_reuses_the_engines(spark, tiny_llama, tiny_llama_engine,
                                                                     tmp_path):
    path, _ = tiny_llama
    prompts = _prompts(50)
    loads = spark.sparkContext.accumulator(0)
    df = spark.createDataFrame(list(enumerate(prompts)), "id int, prompt string").repartition(4)
    out = generate(df, "prompt", GREEDY, model=path, engine_kwargs=ENGINE, batch_size=8, engine_loads=loads)
    assert out.schema["output"].dataType == OUTPUT_SCHEMA
    rows = out.collect()
    assert _actual(rows) == _expected(tiny_llama_engine.generate(prompts, GREEDY))
    first_job_loads = loads.value
    assert 1 <= first_job_loads <= PYTHON_WORKERS

    # A second job: a new UDF over chat messages, the same engine settings from a deployment file.
    deploy = tmp_path / "deploy.yaml"
    deploy.write_text(f"models:\n  - name: tiny\n    model: {path}\n    engine: {ENGINE_YAML}\n")
    conversations = [[{"role": "user", "content": p}] for p in prompts[:20]]
    chats = spark.createDataFrame([(i, c) for i, c in enumerate(conversations)],
                                  "id int, messages array<struct<role: string, content: string>>").repartition(4)
    rows = generate(chats, "messages", GREEDY, config=str(deploy), batch_size=8, engine_loads=loads).collect()
    assert _actual(rows) == _expected(tiny_llama_engine.chat(conversations, GREEDY))
    assert loads.value <= PYTHON_WORKERS, f"{loads.value} engines built by {PYTHON_WORKERS} Python workers"


def test_bad_settings_fail_on_the_driver(spark, tiny_llama):
    path, _ = tiny_llama
    df = spark.createDataFrame([(1, "a")], "id int, prompt string")
    with pytest.raises(ValueError, match="no column 'text'"):
        generate(df, "text", GREEDY, model=path)
    with pytest.raises(TypeError, match="must hold prompts"):
        generate(df, "id", GREEDY, model=path)
    with pytest.raises(ValueError, match="n must be 1"):
        generate(df, "prompt", SamplingParams(n=2), model=path)
    with pytest.raises(ValueError, match="unknown engine setting"):
        generate(df, "prompt", GREEDY, model=path, engine_kwargs={"max_num_seq": 4})
