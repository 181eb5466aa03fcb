"""Exceptions that flotilla raises to its users.

Every error a user can cause carries a message that names the problem; the server issue maps
``InvalidRequestError`` to HTTP 400 and ``ModelNotFoundError`` to 404.
"""


class FlotillaError(Exception):
    """Base class of every error flotilla raises on purpose."""


class InvalidRequestError(FlotillaError, ValueError):
    """A request (prompt or sampling parameters) is invalid. ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class ModelNotFoundError(FlotillaError, FileNotFoundError):
    """A model argument resolves to nothing: no such path, alias or installed package."""


class ModelLoadError(FlotillaError, RuntimeError):
    """A model was found but cannot be loaded: unsupported architecture, corrupt or refused weights."""


class EngineDeadError(FlotillaError, RuntimeError):
    """The engine stopped (a worker failed); in-flight requests cannot complete.

    Its message is what HTTP clients see (503): plain words such as ``WORKER_RANK_FAILED``, never an
    exception's text, a file path, an internal address or a stack trace; the detail goes to the server log.
    """


WORKER_RANK_FAILED = "a worker rank failed"
