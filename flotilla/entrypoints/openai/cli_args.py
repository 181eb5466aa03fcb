"""The ``flotilla serve`` flags (beyond the engine flags) and the resolved server configuration.

This module imports nothing heavy, so building the CLI parser stays fast.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from flotilla.deploy.engine_args import finite_float
from flotilla.entrypoints.openai.tool_parsers import TOOL_PARSERS, check_tool_parser

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_GRPC_PORT = 8001  # Triton's
METRICS_PREFIXES = ("flotilla", "vllm")


def check_prefixes(prefixes) -> tuple[str, ...]:
    """The metric prefixes, validated (ValueError naming the unknown one)."""
    prefixes = tuple(dict.fromkeys(p.strip() for p in prefixes if p.strip()))
    unknown = [p for p in prefixes if p not in METRICS_PREFIXES]
    if unknown or not prefixes:
        raise ValueError(f"--metrics-prefixes must be some of {','.join(METRICS_PREFIXES)}, got "
                         f"{','.join(prefixes) or 'none'}")
    return prefixes


@dataclass(frozen=True)
class ServerConfig:
    """HTTP-side settings. ``api_key`` None means no authentication; ``max_queued_requests`` bounds each
    model's requests admitted but not yet running (past it: 429); ``shutdown_timeout`` is the SIGTERM drain
    limit; ``served_model_name`` names the engine when the app serves a single one given without a name;
    ``metrics_prefixes`` the prefixes ``/metrics`` exports every metric under (``flotilla``, ``vllm``);
    ``chat_template`` the template text every chat request uses unless it brings its own (which it may only
    with ``trust_request_chat_template``);
    ``enable_auto_tool_choice`` with ``tool_call_parser`` (vLLM's flags) enables ``tool_choice: auto``;
    ``enable_tokenizer_info_endpoint`` serves ``GET /tokenizer_info`` (vLLM's flag; off by default as there);
    ``grpc_port`` the KServe v2 gRPC port (Triton's 8001 by default, 0: off; see ``grpc_port_required``)."""

    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "model"
    api_key: str | None = None
    max_queued_requests: int = 1024
    shutdown_timeout: float = 30.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    retry_after_s: int = 1
    log_level: str = "info"
    metrics_prefixes: tuple[str, ...] = METRICS_PREFIXES
    chat_template: str | None = None  # --chat-template's text (None: the tokenizer's own)
    trust_request_chat_template: bool = False  # accept a request's chat_template
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    enable_tokenizer_info_endpoint: bool = False
    grpc_port: int = DEFAULT_GRPC_PORT  # KServe v2 gRPC (0: off), on ``host``
    grpc_port_required: bool = False  # --grpc-port given: failing to bind it is an error, not a warning


def add_model_selection_args(p: argparse.ArgumentParser, verb: str = "serve") -> None:
    """MODEL, ``--config`` and ``--served-model-name`` (``serve`` and ``run-batch``)."""
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help=f"model to {verb} (same as --model; default: smollm2-135m-instruct)")
    p.add_argument("--config", default=None, metavar="DEPLOY_YAML",
                   help=f"{verb} every model of a deployment file in this process (model and engine settings "
                        "then come from the file, not from flags)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name requests send (default: the model argument)")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Add the server flags; the engine flags (``flotilla.deploy.engine_args.add_engine_args``) must be added by
    the caller."""
    add_model_selection_args(p)
    p.add_argument("--ray", action="store_true",
                   help="run the deployment on Ray Serve (one deployment per model, an OpenAI ingress); with "
                        "--ray-address join that cluster, else start a local one bound to loopback")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on every route except /health and /metrics")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting for the engine beyond which new ones get 429")
    p.add_argument("--shutdown-timeout", type=finite_float, default=30.0,
                   help="seconds to drain in-flight requests after SIGTERM")
    p.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="larger request bodies get 413")
    p.add_argument("--metrics-prefixes", default="flotilla,vllm", metavar="PREFIXES",
                   help="comma-separated prefixes /metrics exports every metric under, from flotilla,vllm "
                        "(same values under each; vllm: matches dashboards written for vLLM)")
    add_chat_args(p)
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true",
                   help="serve GET /tokenizer_info: the tokenizer's configuration, special tokens and chat template "
                        "(vLLM's flag; lm-evaluation-harness then tokenizes through the server)")
    p.add_argument("--grpc-port", type=int, default=None, metavar="PORT",
                   help=f"KServe v2 / Triton gRPC port on --host (default {DEFAULT_GRPC_PORT}, Triton's; 0 turns "
                        f"gRPC off). A default port that is in use only logs a warning")
    p.add_argument("--batch-data-dir", default=None, metavar="DIR",
                   help="where the Batch API (/v1/files, /v1/batches) keeps its files and batch states; unfinished "
                        "batches resume when a server starts on it (default: FLOTILLA_CACHE_DIR/batches)")
    p.add_argument("--uvicorn-log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])


def add_chat_args(p: argparse.ArgumentParser) -> None:
    """The chat template and tool-calling flags (``serve`` and ``run-batch``)."""
    p.add_argument("--chat-template", default=None, metavar="FILE_OR_TEMPLATE",
                   help="the jinja2 chat template for chat requests and /tokenize, instead of the tokenizer's: a "
                        "file, or the template text itself (vLLM's flag)")
    p.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a request's own chat_template (a template is code the server runs; vLLM's flag)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="let the model call tools on its own (tool_choice auto, the default with tools); needs "
                        "--tool-call-parser")
    p.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="how tool calls are parsed out of the model's text (vLLM's names): hermes "
                        "(<tool_call>{...}</tool_call>, Hermes and Qwen2.5 models), llama3_json "
                        "({\"name\": ..., \"parameters\": ...}, Llama 3.1/3.2), pythonic ([f(a=1), g()], "
                        "Llama 3.2/4, ToolACE)")


def server_config_from(ns: argparse.Namespace, served_model_name: str, api_key: str | None = None) -> ServerConfig:
    """The server settings from the flags; ``api_key`` is used when ``--api-key`` is not given."""
    if ns.max_queued_requests < 0:
        raise ValueError("--max-queued-requests must be >= 0")
    if ns.shutdown_timeout < 0:
        raise ValueError("--shutdown-timeout must be >= 0")
    if ns.max_request_body_bytes <= 0:
        raise ValueError("--max-request-body-bytes must be positive")
    grpc_port = getattr(ns, "grpc_port", None)
    if grpc_port is not None and not 0 <= grpc_port <= 65535:
        raise ValueError(f"--grpc-port must be in [0, 65535] (0: no gRPC), got {grpc_port}")
    if grpc_port is not None and grpc_port != 0 and grpc_port == ns.port:
        raise ValueError(f"--grpc-port {grpc_port} is also the HTTP --port; choose another (or 0: no gRPC)")
    prefixes = check_prefixes(getattr(ns, "metrics_prefixes", "flotilla,vllm").split(","))
    return ServerConfig(host=ns.host, port=ns.port, served_model_name=served_model_name,
                        api_key=ns.api_key or api_key, max_queued_requests=ns.max_queued_requests,
                        shutdown_timeout=ns.shutdown_timeout, max_body_bytes=ns.max_request_body_bytes, log_level=ns.uvicorn_log_level,
                        metrics_prefixes=prefixes, **chat_settings_from(ns),
                        enable_tokenizer_info_endpoint=bool(getattr(ns, "enable_tokenizer_info_endpoint", False)),
                        grpc_port=DEFAULT_GRPC_PORT if grpc_port is None else grpc_port,
                        grpc_port_required=grpc_port is not None)


def chat_settings_from(ns: argparse.Namespace) -> dict:
    """The ``ServerConfig`` fields of ``add_chat_args``' flags, validated (ValueError naming the flag)."""
    from flotilla.entrypoints.openai.chat_templates import load_chat_template
    chat_template = load_chat_template(getattr(ns, "chat_template", None))
    parser = check_tool_parser(getattr(ns, "tool_call_parser", None))
    auto_tools = bool(getattr(ns, "enable_auto_tool_choice", False))
    if auto_tools and parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (available: "
                         f"{', '.join(sorted(TOOL_PARSERS))})")
    return {"chat_template": chat_template,
            "trust_request_chat_template": bool(getattr(ns, "trust_request_chat_template", False)),
            "enable_auto_tool_choice": auto_tools, "tool_call_parser": parser}
