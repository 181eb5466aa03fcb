"""The layers of DESIGN.md hold: a flotilla module imports only from its own component or from components
below it in ``LAYERS``, never back up. Imports inside functions count (a lazy import is still a
dependency, and lazy imports are how the old entrypoints <-> deploy cycle hid), so the check parses every
module with ``ast`` instead of importing it.

A component is a top-level package (``flotilla/deploy/``) or module (``flotilla/sampler.py``) of flotilla;
``flotilla`` itself is the package's ``__init__``, the public facade (``from flotilla import LLM``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import flotilla

# Top to bottom; a component imports only from components on later rows. Components on one row are
# peers: they may not import each other either.
LAYERS: list[tuple[str, ...]] = [
    ("entrypoints",),                        # protocol adapters (OpenAI, KServe) and the ``flotilla`` CLI
    ("k8s",),                                # manifests from a DeploymentConfig
    ("batch",),                              # batch jobs (OpenAI batch files, Spark, Ray Data)
    ("planner",),                            # cost model, simulator, plan search (its probe runs bench)
    ("bench",),                              # benchmark clients, datasets, vLLM's metric definitions
    ("deploy",),                             # deployment file, engine arguments, replica sets, Ray Serve
    ("repository",),                         # Triton-style model repository
    ("flotilla",),                           # the package facade: re-exports LLM, AsyncLLM, EngineArgs
    ("engine",),                             # LLMEngine, AsyncLLM, LLM, the core process
    ("executor",),                           # uniproc / multiproc / ray executors
    ("worker",),                             # model runner and the per-rank worker process
    ("spec_decode",),                        # speculative decoding: proposers, rejection sampling
    ("scheduler",),                          # token-budget scheduler (no torch)
    ("kv_cache",),                           # block pool, prefix cache (no torch)
    ("structured",),                         # grammar matchers -> token masks
    ("sampler",),                            # logits -> tokens
    ("models",),                             # model families, registry, weight loading
    ("layers",),                             # parallel layers, attention backends
    ("ops", "csrc"),                         # fused kernels and their eager fallbacks
    ("kernel_build",),                       # compiles csrc/ into the kernel library (no torch ops)
    ("tokenizer",),                          # tokenizer, detokenizer, chat templates
    ("tokenizer_bounds",),                   # provable lower bounds on a text's token count
    ("distributed",),                        # parallel state, collectives, launchers
    ("request",),                            # value types: a request (holds its SamplingParams)
    ("outputs",),                            # value types: RequestOutput, CompletionOutput, Logprob
    ("sampling_params", "pooling_params"),   # value types: SamplingParams, PoolingParams
    ("config",),                             # frozen config dataclasses
    ("envs", "errors", "file_lock", "procutil", "wire"),  # environment, exceptions, a bounded file lock, process helpers, the wire codec
]

PACKAGE_DIR = Path(flotilla.__file__).resolve().parent
LEVEL = {name: level for level, row in enumerate(LAYERS) for name in row}


def components(package_dir: Path) -> set[str]:
    """The top-level packages and modules of flotilla (and ``flotilla`` for the package itself)."""
    found = {"flotilla"}
    for entry in package_dir.iterdir():
        if entry.is_dir() and not entry.name.startswith((".", "_")):
            found.add(entry.name)
        elif entry.suffix == ".py" and entry.name != "__init__.py":
            found.add(entry.stem)
    return found


def module_name(path: Path, package_dir: Path) -> str:
    parts = ["flotilla", *path.relative_to(package_dir).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def component_of(module: str) -> str | None:
    """``flotilla.deploy.config`` -> ``deploy``; ``flotilla`` -> ``flotilla``; not flotilla's -> None."""
    parts = module.split(".")
    if parts[0] != "flotilla":
        return None
    return parts[1] if len(parts) > 1 else "flotilla"


def imported_modules(node: ast.AST, module: str, is_package: bool, package_dir: Path) -> list[str]:
    """The flotilla modules one import statement (or ``importlib.import_module("...")`` call) loads."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target != "flotilla":
            return [target]
        # ``from flotilla import envs`` loads the submodule; ``from flotilla import LLM`` the facade.
        return [f"flotilla.{a.name}" if _is_submodule(package_dir, a.name) else "flotilla" for a in node.names]
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
            and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return [node.args[0].value]
    return []


def _is_submodule(package_dir: Path, name: str) -> bool:
    return (package_dir / f"{name}.py").exists() or (package_dir / name / "__init__.py").exists()


def layer_violations(package_dir: Path) -> list[str]:
    """Every import (top-level or inside a function) that goes up or sideways in ``LAYERS``, as
    ``path:line: module imports target (a -> b)``; components missing from ``LAYERS`` are reported too."""
    problems = [f"{package_dir / name}: component {name!r} is not placed in LAYERS (tests/test_layers.py)"
                for name in sorted(components(package_dir) - set(LEVEL))]
    for path in sorted(package_dir.rglob("*.py")):
        module = module_name(path, package_dir)
        source = component_of(module)
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = []
        for node in ast.walk(tree):
            for target in imported_modules(node, module, path.name == "__init__.py", package_dir):
                dest = component_of(target)
                if dest is None or dest == source or source not in LEVEL or dest not in LEVEL:
                    continue
                if LEVEL[dest] <= LEVEL[source]:
                    where = "up" if LEVEL[dest] < LEVEL[source] else "sideways"
                    found.append((node.lineno, f"{path.relative_to(package_dir.parent)}:{node.lineno}: {module} "
                                               f"imports {target} ({source} -> {dest} goes {where})"))
        problems += [message for _, message in sorted(found)]
    return problems


def test_every_import_goes_down_the_layers():
    problems = layer_violations(PACKAGE_DIR)
    assert not problems, "imports against the layers of DESIGN.md:\n" + "\n".join(problems)


def test_the_checker_sees_lazy_relative_and_facade_imports(tmp_path):
    pkg = tmp_path / "flotilla"
    (pkg / "deploy").mkdir(parents=True)
    (pkg / "engine").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "envs.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "llm.py").write_text(
        "from flotilla import envs\n"                       # down: fine
        "def f():\n"
        "    from ..deploy import config\n"                 # lazy and relative, up
        "    import flotilla.entrypoints.cli\n"             # up
        "    from flotilla import LLM\n")                   # the facade sits above engine
    (pkg / "deploy" / "__init__.py").write_text("")
    (pkg / "deploy" / "config.py").write_text("import importlib\nimportlib.import_module('flotilla.bench.cli')\n")
    (pkg / "newpkg").mkdir()
    (pkg / "newpkg" / "a.py").write_text("")
    problems = layer_violations(pkg)
    assert problems[0].endswith("component 'newpkg' is not placed in LAYERS (tests/test_layers.py)")
    assert problems[1:] == [
        "flotilla/deploy/config.py:2: flotilla.deploy.config imports flotilla.bench.cli (deploy -> bench goes up)",
        "flotilla/engine/llm.py:3: flotilla.engine.llm imports flotilla.deploy (engine -> deploy goes up)",
        "flotilla/engine/llm.py:4: flotilla.engine.llm imports flotilla.entrypoints.cli "
        "(engine -> entrypoints goes up)",
        "flotilla/engine/llm.py:5: flotilla.engine.llm imports flotilla (engine -> flotilla goes up)",
    ]


def test_peers_on_one_row_may_not_import_each_other(tmp_path):
    pkg = tmp_path / "flotilla"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "envs.py").write_text("from flotilla.errors import FlotillaError\n")
    assert layer_violations(pkg) == [
        "flotilla/envs.py:1: flotilla.envs imports flotilla.errors (envs -> errors goes sideways)"]
