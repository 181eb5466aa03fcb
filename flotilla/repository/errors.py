"""Errors of the model repository, in Triton's vocabulary.

``InferError`` carries Triton's status code name (``INVALID_ARG``, ``UNAVAILABLE``, ...) and Triton's message
text, so the KServe v2 layer can answer exactly as Triton does: ``http_status`` is Triton's HTTP mapping and the
message goes into ``{"error": message}``; gRPC uses the code name as its status code.
"""

from __future__ import annotations

from flotilla.errors import FlotillaError, InvalidRequestError

# Triton's status codes -> the HTTP status its HTTP endpoint answers with (http_server.cc HttpCodeFromError).
HTTP_STATUS = {
    "INVALID_ARG": 400,
    "UNSUPPORTED": 501,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 400,
    "UNAVAILABLE": 503,
    "INTERNAL": 500,
    "CANCELLED": 400,
}

QUEUE_FULL_MESSAGE = "Exceeds maximum queue size"            # Triton's PriorityQueue::PolicyQueue::Enqueue
TIMEOUT_MESSAGE = "Request timeout expired"                  # Triton's DynamicBatchScheduler (REJECT)
STOPPING_MESSAGE = ("Server is stopping, scheduler for model has stopped accepting new inference requests")


class ModelConfigError(FlotillaError, ValueError):
    """A model's configuration (config.pbtxt / config.yaml) or directory layout is invalid. The message
    names the model, the file or field and what is wrong."""


class ModelControlError(FlotillaError, RuntimeError):
    """A repository action (load, unload) is not allowed or failed. ``code`` is Triton's status code name."""

    def __init__(self, message: str, code: str = "UNAVAILABLE"):
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 500)


class InferError(FlotillaError, RuntimeError):
    """One inference request failed. ``code`` is Triton's status code name, ``message`` Triton's text."""

    def __init__(self, code: str, message: str):
        if code not in HTTP_STATUS:
            raise ValueError(f"unknown Triton status code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __repr__(self) -> str:
        return f"InferError({self.code!r}, {self.message!r})"


class InvalidArgError(InferError, InvalidRequestError):
    """A bad inference request (unknown, missing or ill-typed input, wrong shape or batch size): Triton's
    INVALID_ARG for the v2 layer and flotilla's ``InvalidRequestError`` (``param`` names the tensor) for every
    other caller, so one check serves the batcher, the backends and the protocol layers alike."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__("INVALID_ARG", message)
        self.param = param


def invalid_arg(message: str, param: str | None = None) -> InvalidArgError:
    return InvalidArgError(message, param)


def queue_full() -> InferError:
    """The request could not be queued because its priority level's queue holds ``max_queue_size``."""
    return InferError("UNAVAILABLE", QUEUE_FULL_MESSAGE)


def timed_out() -> InferError:
    """The request waited in the queue past its timeout and its queue policy is REJECT."""
    return InferError("UNAVAILABLE", TIMEOUT_MESSAGE)
