"""The rendered job, executed: each worker pod of a job the stack renders, started on this machine as
the operator and kubelet would start it.

- The container's own command and environment, from the rendered PyTorchJob (or TrainJob).
- The PET_* variables the operator (v1) or the torch runtime plugin (v2) injects for that spec
  (reference/*/NOTES.md).
- The pod's mounts at the pod's paths: a private mount namespace per pod (`unshare -m`, root) binds a
  directory standing for the shared claim at /data, the ConfigMap's file at /etc/llm-finetune and a
  pod-local /tmp; where mounting is impossible, the paths are mapped instead (the config is
  rewritten to point at the stand-in directories).
- Deviations, stated: the rendezvous host (`<job>-etcd-client.<ns>.svc`, or v2's
  `<job>-node-0-0.<job>:29500`) is a loopback address and port, and every pod binds 127.0.0.1
  (PET_LOCAL_ADDR) instead of its pod IP; a checkout under /tmp stays visible at its path in the pod's /tmp.

A pod is a process tree: `kill()` is a lost node (all of it dies), `terminate()` is kubelet's SIGTERM to PID 1.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Optional

import yaml

from tests.integration.procs import ROOT
from tests.integration.procs import kill_tree
from trainer.runtime import local

POD_PATHS = ("/data", "/etc/llm-finetune")


def can_use_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0


@contextlib.contextmanager
def pod_mountpoints():
    """Empty directories at the pods' mount paths (created if missing, removed again after)."""
    created = []
    try:
        for path in POD_PATHS:
            p = Path(path)
            if not p.exists():
                p.mkdir(parents=True)
                created.append(p)
        yield
    finally:
        for p in reversed(created):
            with contextlib.suppress(OSError):
                p.rmdir()


def operator_env(job: dict, rdzv_endpoint: str) -> dict[str, str]:
    """What the Training Operator v1 injects into the `pytorch` container of each worker pod for this
    PyTorchJob (NOTES.md), the rendezvous host mapped to the local etcd."""
    spec = job["spec"]
    elastic = spec["elasticPolicy"]
    workers = spec["pytorchReplicaSpecs"]["Worker"]["replicas"]
    low, high = elastic.get("minReplicas", workers), elastic.get("maxReplicas", workers)
    env = {
        "PET_RDZV_BACKEND": elastic.get("rdzvBackend", "c10d"),
        "PET_RDZV_ENDPOINT": rdzv_endpoint,
        "PET_NNODES": f"{low}:{high}" if (low, high) != (workers, workers) else str(workers),
        "PET_NPROC_PER_NODE": str(spec["nprocPerNode"]),
        "PYTHONUNBUFFERED": "1",
    }
    if "maxRestarts" in elastic:
        env["PET_MAX_RESTARTS"] = str(elastic["maxRestarts"])
    if "rdzvId" in elastic:
        env["PET_RDZV_ID"] = elastic["rdzvId"]
    return env


def torch_plugin_env(job: dict, node: int, master_port: int) -> dict[str, str]:
    """What Trainer v2's torch plugin injects into the `node` container of replicated-job index
    `node` (NOTES.md), the master `<job>-node-0-0.<job>:29500` mapped to loopback."""
    trainer = job["spec"]["trainer"]
    return {"PET_NNODES": str(trainer["numNodes"]), "PET_NPROC_PER_NODE": str(trainer["numProcPerNode"]),
            "PET_NODE_RANK": str(node), "PET_MASTER_ADDR": "127.0.0.1", "PET_MASTER_PORT": str(master_port),
            "PYTHONUNBUFFERED": "1"}


def container_of(job: dict) -> tuple[list[str], dict[str, str]]:
    """The worker container's command and its own environment, from either job kind."""
    if job["kind"] == "TrainJob":
        trainer = job["spec"]["trainer"]
        return trainer["command"], {e["name"]: e["value"] for e in trainer["env"]}
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    return container["command"], {e["name"]: e["value"] for e in container["env"]}


def _under_tmp(*paths: Path) -> list[Path]:
    """The outermost of `paths` that lie under /tmp (resolved), each once."""
    found = sorted({p for p in map(Path.resolve, paths) if p.is_relative_to("/tmp")}, key=lambda p: len(p.parts))
    return [p for i, p in enumerate(found) if not any(p.is_relative_to(q) for q in found[:i])]


class Pod:
    def __init__(self, name: str, command: list[str], env: dict[str, str], volume: Path, config_dir: Path,
                 tmp: Path, log: Path, namespaces: bool):
        self.name, self.log = name, log
        tmp.mkdir(parents=True, exist_ok=True)
        full_env = {**local.run_env(), **env, "PET_LOCAL_ADDR": "127.0.0.1",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        if namespaces:
            # A checkout (or its Python) under /tmp would vanish under the pod-local /tmp: bound back
            # at its own path inside it first, then the pod's /tmp is bound recursively.
            keep = ""
            for path in _under_tmp(ROOT, Path(sys.prefix), Path(sys.base_prefix)):
                inside = shlex.quote(str(tmp / path.relative_to("/tmp")))
                keep += f"mkdir -p {inside} && mount --bind {shlex.quote(str(path))} {inside} && "
            mounts = (f"mount --make-rprivate / && mount --bind {shlex.quote(str(volume))} /data && "
                      f"mount --bind {shlex.quote(str(config_dir))} /etc/llm-finetune && "
                      f"{keep}mount --rbind {shlex.quote(str(tmp))} /tmp && ")
            argv = ["unshare", "-m", "sh", "-c", mounts + "exec " + shlex.join(command)]
        else:  # path mapping: the config names the stand-in directories
            argv = [a.replace("/etc/llm-finetune", str(config_dir)) for a in command]
            full_env["LLM_FINETUNE_RUN_DIR"] = str(tmp)
        self._out = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
                                     start_new_session=True)

    def terminate(self) -> None:
        """kubelet stopping the pod: SIGTERM to the container's first process only (the launcher)."""
        pid = self.proc.pid
        if self.proc.poll() is None:
            # Under unshare the launcher is exec'ed in place of `sh`: same pid.
            os.kill(pid, signal.SIGTERM)

    def kill(self) -> None:
        """A lost node: every process of the pod dies at once (torchrun's workers included, which run
        in sessions of their own: a process-group kill alone would leave them training)."""
        kill_tree(self.proc)

    def wait(self, timeout: float) -> Optional[int]:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        local.stop(self.proc)
        self._out.close()


class Cluster:
    """One rendered job's pods against one local etcd, with the stand-in volume."""

    def __init__(self, root: Path, etcd: "EtcdServer"):
        self.root, self.etcd = root, etcd
        self.volume = root / "volume"
        self.volume.mkdir(parents=True, exist_ok=True)
        self.namespaces = can_use_namespaces()
        self.pods: list[Pod] = []
        self.count = 0

    def data_path(self, pod_path: str) -> Path:
        """Where a /data/... path of the pods lies on this machine."""
        assert pod_path.startswith("/data/")
        return self.volume / pod_path[len("/data/"):]

    def start(self, job: dict, config_text: str, node: int, tag: str = "", master_port: int = 0) -> Pod:
        self.count += 1
        name = f"pod{node}{tag}-{self.count}"
        config_dir = self.root / name / "config"
        config_dir.mkdir(parents=True)
        if not self.namespaces:  # map the pods' /data onto the stand-in volume
            config_text = config_text.replace("/data/", f"{self.volume}/")
        (config_dir / "config.yaml").write_text(config_text)
        command, env = container_of(job)
        if not self.namespaces:
            env = {k: v.replace("/data/", f"{self.volume}/") for k, v in env.items()}
        if job["kind"] == "TrainJob":
            env.update(torch_plugin_env(job, node, master_port))
        else:
            env.update(operator_env(job, self.etcd.endpoint))
        pod = Pod(name, command, env, self.volume, config_dir, self.root / name / "tmp",
                  self.root / f"{name}.log", self.namespaces)
        self.pods.append(pod)
        return pod

    def stop_all(self) -> None:
        for pod in self.pods:
            pod.stop()


class EtcdServer:
    """A real etcd (v2 API) on fixed loopback ports with a persistent data directory, which can be
    stopped and started again like a restarted etcd pod on its persistent volume."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.binary = shutil.which("etcd")
        if self.binary is None:
            raise local.EtcdUnavailable("etcd is not installed (Debian: apt-get install etcd-server)")
        self.proc: Optional[subprocess.Popen] = None
        self.client = self.peer = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client}"

    def start(self, attempts: int = 3) -> None:
        for attempt in range(attempts):
            if self.client is None or attempt:
                self.client, self.peer = local.free_port(), local.free_port()
            log = open(self.workdir / "etcd.log", "ab")
            self.proc = subprocess.Popen(
                [self.binary, "--name", "pod", "--data-dir", str(self.workdir / "data"), "--enable-v2=true",
                 "--listen-client-urls", f"http://127.0.0.1:{self.client}",
                 "--advertise-client-urls", f"http://127.0.0.1:{self.client}",
                 "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
                 "--initial-cluster", f"pod=http://127.0.0.1:{self.peer}"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            log.close()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://{self.endpoint}/v2/keys", timeout=2) as r:
                        if r.status == 200:
                            return
                except OSError:
                    time.sleep(0.2)
            local.stop(self.proc)
        raise local.EtcdUnavailable(f"etcd did not start; see {self.workdir / 'etcd.log'}")

    def stop(self) -> None:
        if self.proc is not None:
            local.stop(self.proc)
            self.proc = None


def rendered(raw: dict) -> tuple[dict, str, dict]:
    """(job manifest, trainer config text, stack outputs) of a stack config, under mocks."""
    from tests.infra.harness import render

    out = render(raw)
    jobs = out.of_kind("PyTorchJob") + out.of_kind("TrainJob")
    assert len(jobs) == 1
    return jobs[0].manifest(), out.one("ConfigMap")["data"]["config.yaml"], out.outputs


def config_output_dir(config_text: str) -> str:
    return yaml.safe_load(config_text)["output_dir"]
