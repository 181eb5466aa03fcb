"""Spark: flotilla engines inside Spark's Python workers (extra ``spark``: pyspark 4.3 on Java 17).

- ``engine_udf(sampling, model=... | config="deploy.yaml", ...)``: a pandas UDF built on
  ``pyspark.ml.functions.predict_batch_udf``. Applied to a string column (prompts) or, with ``chat=True``, to
  a column of JSON chat conversations, it returns a struct column of ``OUTPUT_SCHEMA``: ``text``,
  ``token_ids``, ``finish_reason``, ``prompt_tokens``, ``completion_tokens``.
- ``generate(df, prompt_col, sampling, model=... | config=..., output_col="output")``: ``df`` with that
  struct column added. ``prompt_col`` holds prompts (string) or chat messages (an array of
  ``struct<role, content>`` or of maps), rendered with the model's chat template as ``LLM.chat`` does.

Engines: each Python worker builds one engine (``flotilla.batch.engine_cache.PROCESS_ENGINES``) the first
time a task needs it, and reuses it for every batch and every later job of the session with the same engine
settings (Spark keeps Python workers between tasks: ``spark.python.worker.reuse``, on by default; a worker
idle for a minute is stopped, and its successor loads the model again). ``engine_loads`` (a Spark
accumulator) counts the engines built across the cluster.

Settings are resolved on the driver (``resolve_engine``: the same model entries and engine settings as a
deployment file); the workers receive the resulting ``EngineArgs``, so a model path must exist on every
executor. When the engine settings leave ``num_threads`` unset it becomes ``spark.task.cpus`` (torch's
threads per engine = the cores Spark gives each task). Each ``predict`` call runs one ``LLM.generate`` over
``batch_size`` rows; the engine batches them continuously (``max_num_seqs`` at a time).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from pyspark.ml.functions import predict_batch_udf
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from flotilla.batch.engine_cache import PROCESS_ENGINES, resolve_engine
from flotilla.batch.rows import generate_rows, sampling_params_from
from flotilla.engine.arg_utils import EngineArgs
from flotilla.sampling_params import SamplingParams

DEFAULT_BATCH_SIZE = 512
OUTPUT_SCHEMA = T.StructType([
    T.StructField("text", T.StringType()),
    T.StructField("token_ids", T.ArrayType(T.IntegerType())),
    T.StructField("finish_reason", T.StringType()),
    T.StructField("prompt_tokens", T.IntegerType()),
    T.StructField("completion_tokens", T.IntegerType()),
])


def engine_udf(sampling: SamplingParams | Mapping[str, Any] | None = None, *, model: str | None = None,
               config: str | None = None, model_name: str | None = None,
               engine_kwargs: Mapping[str, Any] | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
               chat: bool = False, engine_loads=None):
    """A ``predict_batch_udf`` that generates one output per row with a flotilla engine.

    ``sampling``: one ``SamplingParams`` (or a dict of its fields) for every row (``n`` must be 1).
    ``model`` / ``config`` / ``model_name`` / ``engine_kwargs``: the engine (``resolve_engine``).
    ``batch_size``: rows per ``LLM.generate`` call (at least a few times ``max_num_seqs`` keeps the engine's
    batch full). ``chat``: the input column holds JSON chat conversations (``generate`` builds it).
    ``engine_loads``: an optional accumulator (``sc.accumulator(0)``) incremented once per engine built.
    Settings are checked here, on the driver: bad ones raise before any job runs.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    engine = resolve_engine(model, config=config, model_name=model_name, engine_kwargs=engine_kwargs)
    args = _with_task_threads(engine.args)
    params = sampling_params_from(sampling)
    make_predict_fn = functools.partial(_make_predict_fn, args, params, chat, engine_loads)
    return predict_batch_udf(make_predict_fn, return_type=OUTPUT_SCHEMA, batch_size=batch_size)


def generate(df: DataFrame, prompt_col: str, sampling: SamplingParams | Mapping[str, Any] | None = None, *,
             model: str | None = None, config: str | None = None, model_name: str | None = None,
             engine_kwargs: Mapping[str, Any] | None = None, output_col: str = "output",
             batch_size: int = DEFAULT_BATCH_SIZE, engine_loads=None) -> DataFrame:
    """``df`` with ``output_col``: a struct of ``OUTPUT_SCHEMA`` per row, generated from ``prompt_col``
    (prompts, or chat messages: see the module docstring). Other arguments as ``engine_udf``. Lazy, as any
    Spark transformation: the engines run when an action needs the column.
    Select the fields with ``.select("*", "output.*")``."""
    if prompt_col not in df.columns:
        raise ValueError(f"no column {prompt_col!r} in the DataFrame (columns: {', '.join(df.columns)})")
    dtype = df.schema[prompt_col].dataType
    column, chat = _input_column(df[prompt_col], prompt_col, dtype)
    udf = engine_udf(sampling, model=model, config=config, model_name=model_name, engine_kwargs=engine_kwargs,
                     batch_size=batch_size, chat=chat, engine_loads=engine_loads)
    return df.withColumn(output_col, udf(column))


def _input_column(column: Column, name: str, dtype: T.DataType) -> tuple[Column, bool]:
    """The UDF's input for a prompt column: the strings themselves, or chat messages as JSON text."""
    if isinstance(dtype, T.StringType):
        return column, False
    if isinstance(dtype, T.ArrayType) and isinstance(dtype.elementType, (T.StructType, T.MapType)):
        return F.to_json(column), True
    raise TypeError(f"column {name!r} must hold prompts (string) or chat messages (array of struct<role, "
                    f"content> or of map<string, string>), got {dtype.simpleString()}")


def _with_task_threads(args: EngineArgs) -> EngineArgs:
    """``args`` with ``num_threads`` = ``spark.task.cpus`` when unset (and a Spark session is active)."""
    if args.num_threads is not None:
        return args
    session = SparkSession.getActiveSession()
    if session is None:
        return args
    return dataclasses.replace(args, num_threads=int(session.conf.get("spark.task.cpus", "1")))


def _make_predict_fn(args: EngineArgs, params: SamplingParams, chat: bool, engine_loads):
    """Runs in a Python worker, once per UDF (Spark caches the result per worker): load or reuse this
    process's engine, and return the batch ``predict`` function."""
    on_load = (lambda: engine_loads.add(1)) if engine_loads is not None else None
    PROCESS_ENGINES.get(args, on_load)

    def predict(inputs) -> list[dict]:
        # inputs: (batch,) numpy object array of str (prompts, or JSON conversations with chat)
        items = [json.loads(x) if chat and x is not None else x for x in inputs.tolist()]
        with PROCESS_ENGINES.lock:  # the engine runs one generate at a time
            llm = PROCESS_ENGINES.get(args, on_load)  # the same engine, unless another UDF replaced it
            results = generate_rows(llm, items, params)
        # one dict per row; predict_batch_udf wants each array field as a 1-D numpy array
        return [dict(dataclasses.asdict(r), token_ids=np.asarray(r.token_ids, dtype=np.int32)) for r in results]

    return predict
