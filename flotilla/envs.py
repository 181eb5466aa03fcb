"""The only module that reads ``os.environ``. Each setting is a function so tests can change it."""

import os


def num_threads() -> int | None:
    """FLOTILLA_NUM_THREADS: torch intra-op threads for the CPU model runner (default: torch's choice)."""
    value = os.environ.get("FLOTILLA_NUM_THREADS")
    return int(value) if value else None


def log_level() -> str:
    """FLOTILLA_LOG_LEVEL: logging level name (default INFO)."""
    return os.environ.get("FLOTILLA_LOG_LEVEL", "INFO").upper()


def named(variable: str) -> str | None:
    """The value of an environment variable the user named in a setting (e.g. a deployment file's
    ``api_key_env``); None when unset."""
    return os.environ.get(variable)
