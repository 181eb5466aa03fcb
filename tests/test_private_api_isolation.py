"""Private Ray and torch APIs appear only in their one module each (``flotilla/distributed/ray_compat.py``,
``flotilla/layers/torch_compat.py``), where ``test_ray_compat.py`` and ``test_torch_compat.py`` guard them.

A static check over flotilla's source: a name with a leading underscore reached from a Ray or torch module
(attribute, import, ``getattr``/``hasattr`` string, a keyword argument of a Ray/torch call, or an attribute a
subclass of a Ray/torch class inherits) anywhere else fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flotilla

ROOT = Path(flotilla.__file__).parent
LIBRARIES = ("ray", "torch")
ISOLATED = {"distributed/ray_compat.py", "layers/torch_compat.py"}
# Being replaced by a public CPU-feature check in a parallel change (issue 11); drop this entry after it lands.


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _library_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted module path, for every import of a Ray or torch module (or of a name in one)."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in LIBRARIES:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``torch.cpu._x`` for an attribute chain rooted at a Ray/torch import, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id], *reversed(parts)])
    return None


def _inherited_private(cls: ast.ClassDef, aliases: dict[str, str]) -> list[str]:
    """``self._x`` in a subclass of a Ray/torch class where ``_x`` is not the subclass's own: the base's."""
    bases = [b for b in (_dotted(b, aliases) for b in cls.bases) if b]
    if not bases:
        return []
    own = {n.name for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    own |= {t.id for n in cls.body if isinstance(n, (ast.Assign, ast.AnnAssign))
            for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    self_attrs = [n for n in ast.walk(cls) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Name) and n.value.id == "self"]
    own |= {n.attr for n in self_attrs if isinstance(n.ctx, ast.Store)}
    return [f"{bases[0]}.{n.attr}" for n in self_attrs
            if isinstance(n.ctx, ast.Load) and _private(n.attr) and n.attr not in own]


def private_uses(source: str) -> list[str]:
    """Every private Ray/torch name the module's source reaches."""
    tree = ast.parse(source)
    aliases = _library_aliases(tree)
    found = []
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        found += _inherited_private(cls, aliases)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in LIBRARIES:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if any(_private(p) for p in node.module.split(".")) or _private(a.name)]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names
                      if a.name.split(".")[0] in LIBRARIES and any(_private(p) for p in a.name.split("."))]
        elif isinstance(node, ast.Attribute):
            path = _dotted(node, aliases)
            if path and _private(node.attr):
                found.append(path)
        elif isinstance(node, ast.Call):
            target = _dotted(node.func, aliases) or (node.func.id if isinstance(node.func, ast.Name) else "")
            if target in ("getattr", "hasattr") and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant):
                base = _dotted(node.args[0], aliases)
                if base and isinstance(node.args[1].value, str) and _private(node.args[1].value):
                    found.append(f"{base}.{node.args[1].value}")
            elif target.split(".")[0] in LIBRARIES:
                found += [f"{target}({k.arg}=)" for k in node.keywords if k.arg and _private(k.arg)]
    return found


def test_the_check_finds_each_kind_of_private_use():
    source = """
import ray
import torch
import torch.nn.functional as F
from ray.serve._private import replica
from ray._private.ray_constants import ENABLE_RAY_CLUSTER
from torch import _weight_int8pack_mm
torch._weight_int8pack_mm(x, q, s)
torch.ops.mkldnn._linear_pointwise(x)
getattr(torch.cpu, "_is_avx512_bf16_supported", None)
hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
ray.init(address="local", _node_ip_address="127.0.0.1")
F._canonical_mask(x)
torch.__version__, torch.ops.flotilla.rms_norm, ray.util.get_node_ip_address()
from ray.serve.request_router import RequestRouter
class Router(RequestRouter):
    def update_replicas(self, replicas):
        self._mine = 1
        return self._replica_id_set, self._mine, self._helper(), self.curr_replicas
    def _helper(self):
        return 0
"""
    assert sorted(private_uses(source)) == sorted([
        "ray.serve._private.replica", "ray._private.ray_constants.ENABLE_RAY_CLUSTER",
        "torch._weight_int8pack_mm", "torch._weight_int8pack_mm", "torch.ops.mkldnn._linear_pointwise",
        "torch.cpu._is_avx512_bf16_supported", "torch.ops.mkldnn._reorder_linear_weight", "ray.init(_node_ip_address=)",
        "torch.nn.functional._canonical_mask", "ray.serve.request_router.RequestRouter._replica_id_set"])


def test_private_ray_and_torch_apis_only_in_their_compat_modules():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ISOLATED:
            continue
        offenders += [f"{rel}: {use}" for use in private_uses(path.read_text())]
    assert not offenders, ("private Ray/torch APIs outside ray_compat.py / torch_compat.py (move them there, "
                           "with a test that fails when they change):\n" + "\n".join(offenders))
    compat = {rel: private_uses((ROOT / rel).read_text()) for rel in ISOLATED}
    assert compat["distributed/ray_compat.py"] and compat["layers/torch_compat.py"]  # the check sees them
