"""Batch jobs: OpenAI batch files (``flotilla run-batch``), the Files/Batches store of the Batch API on
``flotilla serve``, and the Spark and Ray Data integrations.

This layer sits below ``entrypoints`` and never imports it: a job sends each request through a ``send(url,
body) -> (status_code, json_body)`` callable that the entrypoints layer wires to the OpenAI app in-process
(``flotilla.entrypoints.openai.in_process``), so batch results are byte for byte what the online server
answers.

| module | job |
| --- | --- |
| ``format`` | the batch file format: input and output lines (pydantic), ``parse_line`` (bad line -> error line) |
| ``ids`` | ``custom_id``s in bounded memory: 8-byte hashes for the duplicate check and the ids already done |
| ``io`` | ``-`` / local / fsspec inputs (read twice, stdin spooled) and outputs (whole lines), torn-line repair |
| ``runner`` | ``run_job``: a window of requests in flight refilled as each finishes; results as they come |
| ``progress`` | tqdm on a terminal, periodic log lines otherwise |
| ``job`` | a file job: the first pass (count, duplicates), ``--resume``'s scan, the run, the summary |
| ``store`` | the Files store and its data directory (atomic state files, one owner at a time) |
| ``batches`` | the Batch API's status machine over the store; resumes unfinished batches on start |
| ``engine_cache`` | the engine a batch job resolves (a model or a deployment-file entry), one per worker process |
| ``spark`` | Spark: a pandas UDF / ``predict_batch_udf`` with one engine per Python worker |
| ``ray_data`` | Ray Data: a ``ray.data.llm``-shaped processor, engines in a fixed actor pool (TP/PP on placement groups) |
"""

# The engine priority of batch requests (vLLM's convention: lower values run first; online requests have 0).
from flotilla.request import BATCH_PRIORITY  # noqa: E402,F401
