"""Versions, version policies and model control modes (none / poll / explicit) of the model repository, on
real directories, with a fake clock pacing the poll."""

from __future__ import annotations

import shutil

import pytest
from tritonclient.grpc import model_config_pb2 as mc

from flotilla.repository import (
    ModelConfigError, ModelControl, ModelControlError, parse_model_config, scan_repositories, versions_to_load,
)
from flotilla.repository.config import version_dirs
from test_repository_config import make_model


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def policy(text: str) -> mc.ModelConfig:
    config = parse_model_config(f'name: "m" {text}')
    if not config.HasField("version_policy"):
        config.version_policy.latest.num_versions = 1
    return config


@pytest.mark.parametrize("text, available, expected", [
    ("", [1, 2, 3], [3]),
    ("version_policy { latest { num_versions: 2 } }", [1, 7, 3], [3, 7]),
    ("version_policy { latest { num_versions: 5 } }", [2, 1], [1, 2]),
    ("version_policy { all { } }", [3, 1, 2], [1, 2, 3]),
    ("version_policy { specific { versions: [ 1, 3 ] } }", [1, 2, 3], [1, 3]),
    ("version_policy { specific { versions: [ 1, 4 ] } }", [1, 2, 3], [1]),
])
def test_version_policies(text, available, expected):
    assert versions_to_load(policy(text), available) == expected


def test_a_policy_that_selects_nothing_is_triton_s_error():
    with pytest.raises(ModelConfigError, match=r"at least one version must be available under the version policy "
                                               r"of model 'm' .*versions \[4\] are specified"):
        versions_to_load(policy("version_policy { specific { versions: [ 4 ] } }"), [1, 2])
    with pytest.raises(ModelConfigError, match="version directories present: none"):
        versions_to_load(policy(""), [])


def test_version_directories_are_integers_without_leading_zeros(tmp_path):
    model = make_model(tmp_path, "m", None, versions={1: "model.py", 10: "model.py", 0: "model.py"})
    for name in ("007", "v2", "warmup", "configs", "2abc"):
        (model / name).mkdir()
    (model / "3").write_text("a file, not a version directory")
    assert [p.name for p in version_dirs(model)] == ["0", "1", "10"]


def repo_with_two_models(tmp_path):
    repo = tmp_path / "repo"
    make_model(repo, "alpha", 'backend: "python"', versions={1: "model.py", 2: "model.py"})
    make_model(repo, "beta", 'backend: "python" version_policy { all { } }', versions={1: "model.py", 3: "model.py"})
    make_model(repo, "broken", 'max_batch_size: -3', versions={1: "model.py"})
    (repo / ".hidden").mkdir()
    (repo / "README.txt").write_text("not a model")
    return repo


def test_mode_none_loads_everything_at_startup_and_refuses_load_unload(tmp_path):
    control = ModelControl([repo_with_two_models(tmp_path)], "none")
    targets = control.startup()
    assert sorted(targets) == ["alpha", "beta", "broken"]
    assert targets["alpha"].versions == (2,) and targets["beta"].versions == (1, 3)
    assert targets["alpha"].config.backend == "python" and targets["alpha"].error is None
    assert targets["broken"].config is None and "'max_batch_size' must be non-negative" in targets["broken"].error
    for action in (lambda: control.load("alpha"), lambda: control.unload("alpha")):
        with pytest.raises(ModelControlError, match="explicit model load / unload is not allowed if polling is "
                                                    "enabled") as info:
            action()
        assert info.value.http_status == 503
    with pytest.raises(ModelControlError, match="only in model control mode 'poll'"):
        control.poll()


def test_mode_explicit_loads_named_models_and_reloads_new_versions(tmp_path):
    repo = repo_with_two_models(tmp_path)
    control = ModelControl([repo], "explicit", load_models=["beta"])
    assert list(control.startup()) == ["beta"]
    assert ModelControl([repo], "explicit").startup() == {}
    assert sorted(ModelControl([repo], "explicit", load_models=["*"]).startup()) == ["alpha", "beta", "broken"]
    assert control.load("alpha").versions == (2,)
    (repo / "alpha" / "5").mkdir()
    (repo / "alpha" / "5" / "model.py").write_text("")
    assert control.load("alpha").versions == (5,)                    # a load re-reads the directory
    override = parse_model_config('{"backend": "python", "version_policy": {"all": {}}}', "json")
    assert control.load("alpha", override).versions == (1, 2, 5)
    with pytest.raises(ModelControlError, match="failed to load 'nope', failed to poll from model repository"):
        control.load("nope")
    with pytest.raises(ModelControlError, match="invalid model name"):
        control.load("../alpha")
    control.unload("alpha")                                         # allowed in explicit mode
    missing = ModelControl([repo], "explicit", load_models=["ghost"]).startup()
    assert "no model directory named 'ghost'" in missing["ghost"].error


def test_startup_argument_errors(tmp_path):
    repo = repo_with_two_models(tmp_path)
    with pytest.raises(ModelControlError, match="need model control mode 'explicit'"):
        ModelControl([repo], "poll", load_models=["alpha"])
    with pytest.raises(ModelControlError, match="Wildcard model name"):
        ModelControl([repo], "explicit", load_models=["*", "alpha"])
    with pytest.raises(ModelControlError, match="is not a directory"):
        ModelControl([tmp_path / "missing"], "none").startup()
    with pytest.raises(ValueError):
        ModelControl([repo], "sometimes")


def test_poll_diff_with_a_fake_clock(tmp_path):
    repo = repo_with_two_models(tmp_path)
    clock = FakeClock()
    control = ModelControl([repo], "poll", poll_interval_s=15, clock=clock)
    control.startup()
    assert control.poll() is None and control.seconds_until_poll() == 15
    clock.t += 14.9
    make_model(repo, "gamma", 'backend: "python"', versions={4: "model.py"})
    assert control.poll() is None                                   # not due yet: nothing is scanned
    clock.t += 0.1
    changes = control.poll()
    assert [(c.name, c.kind) for c, _ in changes] == [("gamma", "added")]
    assert changes[0][1].versions == (4,)
    assert control.poll() is None                                   # the next poll is 15 s later
    clock.t += 15
    assert control.poll() == []                                     # nothing changed

    (repo / "alpha" / "3").mkdir()
    (repo / "alpha" / "3" / "model.py").write_text("v3")
    shutil.rmtree(repo / "beta" / "1")
    (repo / "beta" / "3" / "model.py").write_text("new weights, new size")
    shutil.rmtree(repo / "gamma")
    clock.t += 15
    by_name = {c.name: (c, t) for c, t in control.poll()}
    alpha, alpha_target = by_name["alpha"]
    assert alpha.kind == "modified" and alpha.versions_added == (3,) and not alpha.config_changed
    assert alpha_target.versions == (3,)                            # latest 1 now serves version 3
    beta, beta_target = by_name["beta"]
    assert beta.versions_removed == (1,) and beta.versions_modified == (3,) and beta_target.versions == (3,)
    assert by_name["gamma"][0].kind == "removed" and by_name["gamma"][1] is None

    (repo / "alpha" / "config.pbtxt").write_text('backend: "python" max_batch_size: -1')
    (repo / "broken" / "config.pbtxt").write_text('backend: "python"')
    clock.t += 15
    by_name = {c.name: (c, t) for c, t in control.poll()}
    assert by_name["alpha"][0].config_changed and "non-negative" in by_name["alpha"][1].error
    assert by_name["broken"][1].error is None and by_name["broken"][1].versions == (1,)


def test_label_files_count_as_config_changes(tmp_path):
    repo = repo_with_two_models(tmp_path)
    clock = FakeClock()
    control = ModelControl([repo], "poll", poll_interval_s=1, clock=clock)
    control.startup()
    (repo / "alpha" / "labels.txt").write_text("cat\ndog\n")
    clock.t += 1
    (change, _), = control.poll()
    assert change.name == "alpha" and change.config_changed


def test_a_model_in_two_repositories_is_an_error_for_that_model_only(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    make_model(a, "dup", 'backend: "python"', versions={1: "model.py"})
    make_model(b, "dup", 'backend: "python"', versions={1: "model.py"})
    make_model(b, "solo", 'backend: "python"', versions={1: "model.py"})
    scan = scan_repositories([a, b])
    assert list(scan.models) == ["solo"] and "more than one model repository" in scan.errors["dup"]
    targets = ModelControl([a, b], "none").startup()
    assert targets["solo"].error is None and "more than one model repository" in targets["dup"].error
