"""Only ``flotilla/envs.py`` reads the environment (DESIGN.md), checked on the source with ``ast``.

A read is any use of ``os.environ`` / ``os.environb`` other than setting or deleting a variable (``.get``,
indexing, ``in``, iterating, passing the mapping on), and any call of ``os.getenv`` / ``os.getenvb``,
whatever the import spelling (``import os as o``, ``from os import environ, getenv``). Writes (a variable set
or removed for the processes this one starts) are not reads. ``envs.py`` itself is checked to document each
setting it reads.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import flotilla
from flotilla import envs

PACKAGE_DIR = Path(flotilla.__file__).resolve().parent
EXEMPT = {"envs.py"}  # the one module that reads the environment
_MAPPINGS = {"environ", "environb"}
_GETTERS = {"getenv", "getenvb"}
_WRITES = {"pop", "update", "clear", "__setitem__", "__delitem__"}  # as statements: the value is discarded


def environment_reads(source: str, filename: str = "<source>") -> list[int]:
    """Line numbers where ``source`` reads the process environment."""
    tree = ast.parse(source, filename=filename)
    os_names, mapping_names, getter_names = {"os"}, set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            os_names |= {a.asname or a.name for a in node.names if a.name == "os"}
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            mapping_names |= {a.asname or a.name for a in node.names if a.name in _MAPPINGS}
            getter_names |= {a.asname or a.name for a in node.names if a.name in _GETTERS}
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

    def is_os(node, names: set[str]) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr in names and isinstance(node.value, ast.Name)
                and node.value.id in os_names)

    reads = []
    for node in ast.walk(tree):
        if is_os(node, _GETTERS) or (isinstance(node, ast.Name) and node.id in getter_names):
            reads.append(node.lineno)
        elif is_os(node, _MAPPINGS) or (isinstance(node, ast.Name) and node.id in mapping_names
                                         and isinstance(node.ctx, ast.Load)):
            if not _is_write(node, parents):
                reads.append(node.lineno)
    return sorted(set(reads))


def _is_write(node: ast.AST, parents: dict) -> bool:
    """``environ[k] = v``, ``del environ[k]``, or ``environ.pop(k)`` / ``.update(...)`` as a statement."""
    parent = parents.get(node)
    if isinstance(parent, ast.Subscript) and parent.value is node:
        return isinstance(parent.ctx, (ast.Store, ast.Del))
    if isinstance(parent, ast.Attribute) and parent.attr in _WRITES:
        call = parents.get(parent)
        return isinstance(call, ast.Call) and isinstance(parents.get(call), ast.Expr)
    return False


def test_only_envs_reads_the_environment():
    found = []
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        if path.relative_to(PACKAGE_DIR).as_posix() in EXEMPT:
            continue
        for line in environment_reads(path.read_text(encoding="utf-8"), str(path)):
            found.append(f"{path.relative_to(PACKAGE_DIR.parent)}:{line}")
    assert not found, ("read the environment through a function of flotilla/envs.py (documented: variable, "
                       "meaning, default) instead:\n" + "\n".join(found))


@pytest.mark.parametrize("source, lines", [
    ("import os\nx = os.environ.get('A')\n", [2]),
    ("import os\nx = os.environ['A']\n", [2]),
    ("import os\nx = 'A' in os.environ\n", [2]),
    ("import os\nf(os.environ)\n", [2]),
    ("import os\nx = dict(os.environ)\n", [2]),
    ("import os\nx = os.getenv('A', 'b')\n", [2]),
    ("import os as o\nx = o.environ.copy()\n", [2]),
    ("from os import environ\nx = environ.get('A')\n", [2]),
    ("from os import getenv as g\nx = g('A')\n", [2]),
    ("def f():\n    import os\n    return os.environ.setdefault('A', '1')\n", [3]),
    ("import os\nx = os.environ.pop('A', None)\n", [2]),  # the popped value is used: a read
    ("import os\nos.environ['A'] = '1'\nos.environ.pop('A', None)\ndel os.environ['B']\n", []),
    ("import os\nos.environ.update(A='1')\nx = os.path.join('a', 'b')\n", []),
    ("environ = {}\nx = environ.get('A')\n", []),  # not os.environ
])
def test_the_checker(source, lines):
    assert environment_reads(source) == lines


def test_envs_documents_every_setting():
    """Every public function of envs.py says which variable it reads, what it means and its default."""
    for name in dir(envs):
        func = getattr(envs, name)
        if name.startswith("_") or not callable(func) or getattr(func, "__module__", None) != envs.__name__:
            continue
        doc = func.__doc__ or ""
        assert doc.strip(), f"envs.{name} has no docstring"
        assert "default" in doc.lower() or name == "named", f"envs.{name}: say what the default is"


def test_launcher_environment_reads_only_the_launchers_variables(monkeypatch):
    for name in envs.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("FLOTILLA_UNRELATED", "x")
    assert envs.launcher_environment() == {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.5"}
    from flotilla.distributed.launch import detect_launch
    info = detect_launch(envs.launcher_environment())
    assert (info.launcher, info.rank, info.world_size, info.master_addr) == ("torchrun", 1, 2, "10.0.0.5")


def test_launcher_variables_cover_what_rank_discovery_reads():
    import re

    from flotilla.distributed import launch
    tree = ast.parse(Path(launch.__file__).read_text(encoding="utf-8"))
    names = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)
             and re.fullmatch(r"[A-Z][A-Z_]{3,}", node.value)}
    assert names and names <= set(envs.LAUNCHER_VARIABLES), names - set(envs.LAUNCHER_VARIABLES)
