"""The KServe v2 / Open Inference Protocol (Triton's HTTP and gRPC endpoints) of ``flotilla serve``.

Thin adapters: every request becomes calls on ``flotilla.repository.service.InferenceService`` /
``ServedModel``; nothing here knows a model.

Module map (one job each):

| module | job |
| --- | --- |
| ``tensors`` | tensor encodings: raw bytes (binary extension, gRPC raw contents), JSON ``data``, typed contents |
| ``infer_call`` | ``InferCall`` (a decoded request), Triton's reserved parameters, versions, errors, ``run_infer`` |
| ``http_codec`` | the ``.../infer`` HTTP body: JSON + binary tensors (``Inference-Header-Content-Length``) |
| ``grpc_codec`` | ``ModelInferRequest`` / ``ModelInferResponse``, streamed generation responses |
| ``messages`` | metadata, config (Triton's JSON), statistics, repository index: JSON and gRPC forms |
| ``compression`` | gzip / deflate request and response bodies, bounded by the body limit |
| ``http`` | the ``/v2`` FastAPI router (Triton's error JSON and status codes) |
| ``grpc_server`` | ``inference.GRPCInferenceService`` on grpc.aio, API key interceptor, ``GrpcServer`` lifecycle |
| ``llm_model`` | a served LLM as a v2 model (Triton's vLLM-backend conventions: ``text_input`` -> ``text_output``) |
| ``embedding_model`` | a served embedding model as a v2 model (``text_input`` rows -> ``embedding`` rows) |
| ``service`` | ``KServeService``: the app's ``InferenceService`` (its engine models + the model repository) |
| ``metrics`` | Triton's ``nv_inference_*`` metrics on ``/metrics`` |
"""
