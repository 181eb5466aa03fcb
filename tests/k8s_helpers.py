"""Run a generated manifest's container on this machine, as the kubelet would run it in the image.

``LocalContainer`` takes a container of a manifest (command, args, env, volume mounts) and runs it as a
subprocess with exactly those arguments and variables, after these substitutions (the only ones):
- the image's programs (``flotilla``, ``python``) are this virtual environment's (``.venv/bin``);
- a ConfigMap volume is the ConfigMap's files written to a temporary directory, and an argument under its
  mount path points there;
- ``--host 0.0.0.0`` binds loopback, and every port argument a free port (this machine is shared);
- a ``secretKeyRef`` is the value the test gives for that Secret's key, a ``fieldRef`` to the pod IP is
  127.0.0.1; every other variable of the manifest is passed as written, on top of this process's environment
  (for PATH, HOME and flotilla's cache of compiled kernels, which the image bakes in).
Probes are then the manifest's own ``httpGet`` path against the mapped port.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import httpx

from test_server_helpers import child_pids, free_port, pid_alive

VENV_BIN = os.path.dirname(sys.executable)
PORT_FLAGS = ("--port", "--grpc-port")


def find(objects: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kserve_container(runtime: dict, isvc: dict) -> tuple[dict, dict]:
    """The predictor container KServe builds: the runtime's container with the InferenceService's model
    fields on top (env and volume mounts appended, probes and resources replaced), and the pod's volumes."""
    container = dict(runtime["spec"]["containers"][0])
    model = isvc["spec"]["predictor"]["model"]
    for key in ("env", "volumeMounts"):
        container[key] = [*container.get(key, []), *model.get(key, [])]
    for key in ("resources", "startupProbe", "readinessProbe", "livenessProbe", "args", "command"):
        if key in model:
            container[key] = model[key]
    return container, {"volumes": isvc["spec"]["predictor"].get("volumes", [])}


class LocalContainer:
    """A manifest's container running here (see the module docstring). ``port`` is the local port of the
    container's first ``--port``; ``ports`` maps every port argument's manifest value to its local one."""

    def __init__(self, container: dict, pod_spec: dict, objects: list[dict], secrets: dict[tuple[str, str], str],
                 rewrite=None):
        self.dir = tempfile.TemporaryDirectory(prefix="flotilla-k8s-")
        mounts = self._mount_config_maps(container, pod_spec, objects, rewrite)
        argv = [*container.get("command", []), *container.get("args", [])]
        argv[0] = os.path.join(VENV_BIN, os.path.basename(argv[0])) if argv[0] in ("flotilla", "python") else argv[0]
        self.ports: dict[int, int] = {}
        out = []
        for i, arg in enumerate(argv):
            previous = argv[i - 1] if i else ""
            if previous == "--host" and arg == "0.0.0.0":
                arg = "127.0.0.1"
            elif previous in PORT_FLAGS and arg != "0":
                self.ports[int(arg)] = local = free_port()
                arg = str(local)
            for mount_path, local_dir in mounts.items():
                if arg.startswith(mount_path + "/"):
                    arg = local_dir + arg[len(mount_path):]
            out.append(arg)
        self.argv = out
        self.port = self.ports[int(argv[argv.index("--port") + 1])]
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **self._env(container, secrets))
        self.log = open(os.path.join(self.dir.name, "output.log"), "w+", encoding="utf-8")
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        self.children: list[int] = []

    def _mount_config_maps(self, container, pod_spec, objects, rewrite) -> dict[str, str]:
        volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "configMap" not in volume:
                continue
            cm = find(objects, "ConfigMap", volume["configMap"]["name"])
            local = os.path.join(self.dir.name, mount["name"])
            os.makedirs(local)
            for file, text in cm["data"].items():
                with open(os.path.join(local, file), "w", encoding="utf-8") as f:
                    f.write(rewrite(file, text) if rewrite else text)
            mounts[mount["mountPath"]] = local
        return mounts

    @staticmethod
    def _env(container, secrets) -> dict[str, str]:
        env = {}
        for var in container.get("env", []):
            source = var.get("valueFrom")
            if source is None:
                env[var["name"]] = var["value"]
            elif "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                env[var["name"]] = secrets[(ref["name"], ref["key"])]
            elif source.get("fieldRef", {}).get("fieldPath") == "status.podIP":
                env[var["name"]] = "127.0.0.1"
            else:
                raise AssertionError(f"no local value for {var}")
        return env

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def probe(self, probe: dict) -> int | None:
        """The status of one ``httpGet`` probe of the manifest (None: no answer within its timeout)."""
        get = probe["httpGet"]
        try:
            return httpx.get(self.url + get["path"], timeout=probe.get("timeoutSeconds", 1)).status_code
        except httpx.HTTPError:
            return None

    def wait_until(self, probe: dict, status: int = 200, timeout_s: float | None = None) -> None:
        """Poll ``probe`` until it answers ``status``: within the probe's own budget (failureThreshold x
        periodSeconds) unless ``timeout_s`` is given."""
        budget = timeout_s or probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
        deadline = time.monotonic() + budget
        while self.probe(probe) != status:
            assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"{probe['httpGet']['path']} not {status} in {budget} s:\n" \
                                                f"{self.output()[-4000:]}"
            time.sleep(0.2)
        self.children = self.children or child_pids(self.proc.pid)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in self.children:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.log.close()
        self.dir.cleanup()
        return self.proc.returncode
