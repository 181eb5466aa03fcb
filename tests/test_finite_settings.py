"""Every float setting is finite, and a non-finite one is an error naming it before anything loads (issue 11,
found by hand #5: ``--kv-cache-memory nan`` and ``LLM(kv_cache_memory=nan)`` passed validation and failed
after the model had loaded with "cannot convert float NaN to integer"). The deployment file's half is in
tests/test_deploy_schema.py."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import subprocess
import sys
import typing

import pytest

from flotilla import config as config_module
from flotilla.deploy.engine_args import finite_float, rate_float
from flotilla.engine.arg_utils import EngineArgs
from flotilla.engine.llm import LLM
from flotilla.entrypoints.cli import build_parser
from flotilla.errors import InvalidRequestError

NON_FINITE = ["nan", "inf", "-inf", "NaN", "1e999"]
NEEDS = {("generate",): ["--prompt", "x"]}  # the subcommands' required flags


def float_flags(parser: argparse.ArgumentParser, command: tuple = ()):
    """``(subcommand path, action)`` of every flag of every ``flotilla`` subcommand that takes a number."""
    for action in parser._actions:  # noqa: SLF001 - argparse's own flag table
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                yield from float_flags(sub, (*command, name))
        elif action.type in (float, finite_float, rate_float):
            yield command, action


FLAGS = list(float_flags(build_parser()))


def test_no_flag_takes_a_plain_float():
    plain = [f"flotilla {' '.join(cmd)} {'/'.join(a.option_strings)}" for cmd, a in FLAGS if a.type is float]
    assert not plain, f"use finite_float (or rate_float) for: {plain}"
    names = {a.option_strings[0] for _, a in FLAGS}
    assert {"--kv-cache-memory", "--shutdown-timeout", "--temperature", "--top-p", "--request-rate",
            "--burstiness", "--random-range-ratio", "--bw-size-mib"} <= names


@pytest.mark.parametrize("value", NON_FINITE)
@pytest.mark.parametrize("command, action", FLAGS, ids=[f"{' '.join(c)} {a.option_strings[0]}" for c, a in FLAGS])
def test_every_float_flag_refuses_non_finite_values(command, action, value, capsys):
    argv = [*command, *NEEDS.get(command, []), f"{action.option_strings[0]}={value}"]
    if action.type is rate_float and float(value) == math.inf:
        assert getattr(build_parser().parse_args(argv), action.dest) == float(value)  # inf: no rate limit
        return
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {'/'.join(action.option_strings)}: expected a " in err and repr(value) in err, err


def test_serve_with_a_nan_kv_cache_memory_fails_fast_before_loading_the_model():
    """The embedded model is installed, so without the check this loads it and then fails."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-m", "flotilla.entrypoints.cli", "serve", "--kv-cache-memory", "nan",
                           "--port", "0"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "error: argument --kv-cache-memory: expected a finite number, got 'nan'" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr  # nothing loaded, nothing served


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_engine_args_name_a_non_finite_field_before_resolving_the_model(value):
    # The model does not exist: the error is about kv_cache_memory, so the check ran before any lookup.
    with pytest.raises(InvalidRequestError, match="^kv_cache_memory must be a finite number") as e:
        LLM(model="/nonexistent/model", kv_cache_memory=value)
    assert e.value.param == "kv_cache_memory"
    with pytest.raises(InvalidRequestError, match="^kv_cache_memory must be a finite number"):
        EngineArgs(model="/nonexistent/model", kv_cache_memory=value).create_engine_config()


def config_float_fields():
    """``(class, field)`` for every float field of the config dataclasses that build with their defaults."""
    for cls in vars(config_module).values():
        if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == config_module.__name__:
            hints = typing.get_type_hints(cls)
            if all(f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                   for f in dataclasses.fields(cls)):
                yield from ((cls, f.name) for f in dataclasses.fields(cls) if hints[f.name] in (float, float | None))


CONFIG_FLOATS = list(config_float_fields())


def test_the_config_dataclasses_float_fields_are_found():
    assert {(c.__name__, f) for c, f in CONFIG_FLOATS} >= {("CacheConfig", "kv_cache_memory"),
                                                            ("ParallelConfig", "collective_timeout_s")}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("cls, name", CONFIG_FLOATS, ids=[f"{c.__name__}.{f}" for c, f in CONFIG_FLOATS])
def test_config_dataclasses_refuse_non_finite_floats(cls, name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got {value}"):
        cls(**{name: value})
