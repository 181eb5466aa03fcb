"""``flotilla serve --model-repository`` (issue 14): Triton's flags and the deployment file's ``model_repository:``
validated before anything loads; a server of repository models only (no LLM) loads them at start and, on
SIGTERM, drains and finalizes them (a Python model's ``finalize`` runs)."""

from __future__ import annotations

import httpx
import pytest
from test_server_helpers import ServerProcess
from triton_repository import write, write_scale

from flotilla.deploy.config import (DeploymentConfigError, ModelSpec, RepositorySpec, deployment_from_cli,
                                    load_deployment_config)
from flotilla.entrypoints.cli import build_parser, main

FINALIZE_PY = '''
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.marker = args["model_repository"] + "/finalized"

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("Y", pb_utils.get_input_tensor_by_name(r, "X")
                                                            .as_numpy())]) for r in requests]

    def finalize(self):
        open(self.marker, "w").write("done")
'''


def test_the_file_key_and_the_flags_stand_for_the_same_repository(tmp_path):
    write(tmp_path / "deploy.yaml", """\
model_repository:
  paths: [repo, /abs/other]
  model_control_mode: explicit
  load_models: [embed, scale]
  strict_readiness: false
""")
    from_file = load_deployment_config(tmp_path / "deploy.yaml")
    want = RepositorySpec(paths=(str(tmp_path / "repo"), "/abs/other"), model_control_mode="explicit",
                          load_models=("embed", "scale"), poll_secs=15.0, strict_readiness=False)
    assert from_file.models == () and from_file.model_repository == want      # relative: to the file
    ns = build_parser().parse_args(["serve", "--model-repository", str(tmp_path / "repo"), "--model-store",
                                    "/abs/other", "--model-control-mode", "explicit", "--load-model", "embed",
                                    "--load-model", "scale", "--strict-readiness=false"])
    assert deployment_from_cli(ns) == from_file
    # Next to an LLM; poll mode with its interval.
    ns = build_parser().parse_args(["serve", "tiny", "--model-repository", "r", "--model-control-mode", "poll",
                                    "--repository-poll-secs", "2"])
    cli = deployment_from_cli(ns)
    assert cli.models == (ModelSpec("tiny", "tiny"),) and cli.model_repository.poll_secs == 2.0
    assert cli.model_repository.strict_readiness and cli.model_repository.model_control_mode == "poll"


@pytest.mark.parametrize("text, key, needle", [
    ("model_repository: {paths: []}", "model_repository.paths", "non-empty list of repository directories"),
    ("model_repository: {path: [r]}", "model_repository.path", "unknown key (expected one of: paths, "
                                                                "model_control_mode, load_models"),
    ("model_repository: {paths: [r], model_control_mode: auto}", "model_repository.model_control_mode",
     "expected one of: none, poll, explicit"),
    ("model_repository: {paths: [r], repository_poll_secs: 5}", "model_repository.repository_poll_secs",
     "needs model control mode 'poll'"),
    ("model_repository: {paths: [r], model_control_mode: poll, repository_poll_secs: 0}",
     "model_repository.repository_poll_secs", "> 0"),
    ("model_repository: {paths: [r], model_control_mode: explicit, load_models: ['*', a]}",
     "model_repository.load_models", "'*' (all models) must be the only model"),
    ("model_repository: {paths: [r], strict_readiness: 1}", "model_repository.strict_readiness", "true or false"),
    ("routes: {}", "models", "required key is missing"),
])
def test_file_errors_name_the_key(tmp_path, text, key, needle):
    write(tmp_path / "deploy.yaml", text)
    with pytest.raises(DeploymentConfigError) as e:
        load_deployment_config(tmp_path / "deploy.yaml")
    assert e.value.key == key and needle in str(e.value), str(e.value)


@pytest.mark.parametrize("argv, needle", [
    (["--model-repository", "{missing}"], "is not a directory"),
    (["--model-repository", "{repo}", "--load-model", "scale"],
     "--load-model: models to load at startup need model control mode 'explicit'"),
    (["--model-repository", "{repo}", "--model-control-mode", "poll", "--repository-poll-secs", "0"],
     "--repository-poll-secs: must be > 0"),
    (["--model-control-mode", "explicit"], "--model-control-mode needs --model-repository"),
    (["--model-repository", "{repo}", "--max-num-seqs", "4"], "--max-num-seqs needs a MODEL to serve"),
    (["--model-repository", "{repo}", "--model-control-mode", "poll", "--ray"],
     "model control mode 'poll' is not available with --ray"),
    (["--config", "{deploy}", "--model-repository", "{repo}"], "--config cannot be combined"),
    (["--config", "{bad_deploy}"], "model_repository.load_models: models to load at startup need model control"),
])
def test_usage_errors_exit_2_before_anything_loads(tmp_path, capsys, argv, needle):
    write_scale(tmp_path / "repo", 1, factor=1.0)
    write(tmp_path / "deploy.yaml", "model_repository: {paths: [repo]}\n")
    write(tmp_path / "bad.yaml", "model_repository: {paths: [repo], load_models: [scale]}\n")
    paths = {"missing": str(tmp_path / "nowhere"), "repo": str(tmp_path / "repo"),
             "deploy": str(tmp_path / "deploy.yaml"), "bad_deploy": str(tmp_path / "bad.yaml")}
    assert main(["serve", *(a.format(**paths) for a in argv), "--port", "0"]) == 2
    assert needle in capsys.readouterr().err


def test_a_server_of_repository_models_only_loads_them_and_finalizes_them_on_sigterm(tmp_path):
    repo = tmp_path / "repo"
    write(repo / "echo" / "config.pbtxt", 'backend: "python" max_batch_size: 4 '
          'input [{ name: "X" data_type: TYPE_FP32 dims: [2] }] output [{ name: "Y" data_type: TYPE_FP32 dims: [2] }]')
    write(repo / "echo" / "1" / "model.py", FINALIZE_PY)
    write(repo / "broken" / "config.pbtxt", 'backend: "python"')
    (repo / "broken" / "1").mkdir(parents=True)
    server = ServerProcess(None, "--model-repository", str(repo), startup_timeout=120)
    try:
        assert httpx.get(server.base_url + "/models", timeout=10).json()["data"] == []   # no LLM
        out = server.output()
        assert "model repository (none model control)" in out and "echo                    version 1 READY" in out
        assert "broken                  UNAVAILABLE: failed to load 'broken' version 1" in out
        assert not (repo / "echo" / "finalized").exists()
    finally:
        code = server.stop()
    assert code == 0, server.output()
    assert (repo / "echo" / "finalized").read_text() == "done"      # drained and finalized at shutdown
