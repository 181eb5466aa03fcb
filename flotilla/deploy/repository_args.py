"""``flotilla serve``'s model repository flags, with tritonserver's names, and the ``RepositorySpec`` they stand for.

- ``--model-repository PATH`` (repeatable; alias ``--model-store``): a Triton-layout repository to serve.
- ``--model-control-mode none|poll|explicit`` (default none), ``--load-model NAME`` (repeatable, explicit mode;
  ``*`` loads all), ``--repository-poll-secs N`` (poll mode; default 15), ``--strict-readiness [BOOL]``
  (default true; ``--strict-readiness=false`` as tritonserver spells it).

``repository_spec_from(ns)`` validates them with the deployment file's rules (``spec.repository_problem``),
naming the flag; the other flags without ``--model-repository`` are a usage error, never ignored.
"""

from __future__ import annotations

import argparse
import os

from flotilla.deploy.engine_args import finite_float
from flotilla.deploy.spec import DEFAULT_REPOSITORY_POLL_SECS, MODEL_CONTROL_MODES, RepositorySpec, repository_problem

_TRUE, _FALSE = ("true", "on", "1", "yes"), ("false", "off", "0", "no")
# ns attribute -> the flag that sets it (as messages name it)
REPOSITORY_FLAGS = {"model_repository": "--model-repository", "model_control_mode": "--model-control-mode",
                    "load_model": "--load-model", "repository_poll_secs": "--repository-poll-secs",
                    "strict_readiness": "--strict-readiness"}
_SETTING_FLAGS = {"model_control_mode": "--model-control-mode", "load_models": "--load-model",
                  "poll_secs": "--repository-poll-secs"}


def parse_bool(text: str) -> bool:
    """tritonserver's boolean option values (true/false, on/off, 1/0, yes/no; any case)."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_repository_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model repository (Triton's flags)")
    g.add_argument("--model-repository", "--model-store", dest="model_repository", action="append", default=None,
                   metavar="PATH", help="serve the models of this Triton-layout repository (config.pbtxt, "
                                        "<version>/model.onnx|model.pt|model.py, ensembles) over KServe v2; "
                                        "repeatable. Without a MODEL, no LLM is loaded")
    g.add_argument("--model-control-mode", choices=MODEL_CONTROL_MODES, default=None,
                   help="none (default): load every model at start; poll: also pick up changes every "
                        "--repository-poll-secs; explicit: load only --load-model models, then on request")
    g.add_argument("--load-model", dest="load_model", action="append", default=None, metavar="NAME",
                   help="explicit mode: a model to load at start (repeatable; '*' loads all)")
    g.add_argument("--repository-poll-secs", type=finite_float, default=None, metavar="SECONDS",
                   help=f"poll mode: seconds between repository polls (default {DEFAULT_REPOSITORY_POLL_SECS:g})")
    g.add_argument("--strict-readiness", type=parse_bool, nargs="?", const=True, default=None, metavar="BOOL",
                   help="ready only when every model that should be loaded is (default true)")


def repository_flags_given(ns: argparse.Namespace) -> list[str]:
    """The repository flags set on the command line (for usage errors next to ``--config``)."""
    return [flag for dest, flag in REPOSITORY_FLAGS.items() if getattr(ns, dest, None) is not None]


def repository_spec_from(ns: argparse.Namespace) -> RepositorySpec | None:
    """The repository the flags ask for (None without ``--model-repository``); ValueError naming the flag."""
    paths = getattr(ns, "model_repository", None)
    if not paths:
        stray = repository_flags_given(ns)
        if stray:
            raise ValueError(f"{', '.join(stray)} {'needs' if len(stray) == 1 else 'need'} --model-repository")
        return None
    mode = ns.model_control_mode or "none"
    load_models = tuple(dict.fromkeys(ns.load_model or ()))
    problem = repository_problem(mode, load_models, ns.repository_poll_secs)
    if problem is not None:
        setting, reason = problem
        raise ValueError(f"{_SETTING_FLAGS[setting]}: {reason}")
    if any(not p.strip() for p in paths):
        raise ValueError("--model-repository: expected a directory, got an empty string")
    poll = DEFAULT_REPOSITORY_POLL_SECS if ns.repository_poll_secs is None else ns.repository_poll_secs
    strict = True if ns.strict_readiness is None else ns.strict_readiness
    return RepositorySpec(paths=tuple(os.path.abspath(p) for p in paths), model_control_mode=mode, load_models=load_models, poll_secs=poll,
                          strict_readiness=strict)
