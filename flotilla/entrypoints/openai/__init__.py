"""The OpenAI-compatible HTTP server (``flotilla serve``).

Module map (one job each):

| module | job |
| --- | --- |
| ``cli_args`` | the ``serve`` flags and the resolved ``ServerConfig`` |
| ``protocol`` | pydantic request models (strict types) and their translation to ``SamplingParams`` |
| ``errors`` | OpenAI's error JSON; exception -> status mapping; never a stack trace |
| ``body`` | read and validate a JSON request body (400 naming the field) |
| ``middleware`` | ASGI middlewares: body size limit (413), API key (401), in-flight counting |
| ``admission`` | the pure admission decision (429 / 503), the app's request tracker, per-model waiting counts |
| ``metrics`` | Prometheus metrics on one registry per app, labelled per model (engine stats, latency histograms) |
| ``generation`` | one model's ``ServingContext`` (tokenizer lanes); runs engine requests for one HTTP request: merge, metrics, abort |
| ``models`` | ``ServedModels``: model names and route aliases -> ``ServingContext``; model cards |
| ``responses`` | choice accumulation, logprobs formats (legacy completions, chat), usage |
| ``sse`` | server-sent events response that aborts on client disconnect |
| ``cancellation`` | races a non-streaming handler against the client's disconnect |
| ``serving_completion`` | ``/v1/completions`` |
| ``serving_chat`` | ``/v1/chat/completions`` |
| ``tool_calling`` | ``tools`` / ``tool_choice``: the plan (structured-output constraint, template tools), each choice's tool calls |
| ``tool_parsers/`` | ``--tool-call-parser`` parsers (``hermes``) and the incremental JSON call scanner they share |
| ``serving_tokenization`` | ``/tokenize`` and ``/detokenize`` |
| ``serving_embedding`` | ``/v1/embeddings``: inputs tokenized on a lane, each joined to the model's batcher, float or base64 |
| ``api_server`` | ``build_app``: the FastAPI app over one engine or ``{name: EngineClient}``: routes, health, models, tokenize, metrics, and the KServe v2 routes (``flotilla.entrypoints.kserve``) |
| ``banner`` | the startup banner (every model, the routes, the server settings) |
| ``serving_files`` | the Batch API's ``/v1/files``: multipart uploads validated up front, content, listing, delete |
| ``serving_batches`` | the Batch API's ``/v1/batches`` over ``flotilla.batch.batches``; ``BatchAPI`` (on, or off with the reason) |
| ``in_process`` | ``InProcessClient``: a request through the app's ASGI stack without a socket (batch jobs), with the batch priority |
| ``run_batch`` | ``flotilla run-batch``: a batch file through the app in-process (plan, engines, job, summary, exit code) |
| ``server`` | ``flotilla serve``: the deployment (flags or ``--config``), engine lifetimes, uvicorn with a draining SIGTERM, the KServe v2 gRPC server (``--grpc-port``) on the same loop |
| ``listen`` | the listening socket, bound before any model loads |
| ``ray_ingress`` | ``OpenAIIngress``: the same app on Ray Serve over ``RemoteEngine``s, ``RemoteEmbedder``s and a ``RemoteRepository``; ``build_openai_ray_app`` |
| ``ray_server`` | ``flotilla serve --ray``: ``run_on_ray`` (cluster, Serve start, signals, drain, shutdown) |
| ``ray_proxy`` | runs in Serve's HTTP proxy: the errors Serve answers itself become OpenAI JSON |
"""
