"""Local runs without a cluster: free loopback ports, a local etcd (v2 API), the torchrun command.

Shared by `make demo` (trainer/dev/demo.py), the integration tests and the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Iterator, Optional


ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is trainer/runtime/local.py)


def run_env(**extra: str) -> dict[str, str]:
    """The environment of a local torchrun: this checkout importable, collectives on loopback, no hub
    access (nothing may download in demos, benchmarks or tests). Threads are left to torchrun and the
    trainer (which sets them per process), so a benchmark baseline gets torchrun's default too."""
    env = dict(os.environ)
    env.update(
        {
            "PYTHONPATH": str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
            "GLOO_SOCKET_IFNAME": "lo",
            # Workers host their own store per rendezvous round, as in the pods (trainer/runtime/launch.py).
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    nproc: int,
    *args: str,
    rdzv: str = "c10d",
    endpoint: Optional[str] = None,
    nnodes: int = 1,
    max_restarts: int = 0,
    rdzv_id: Optional[str] = None,
) -> list[str]:
    """`python -m torch.distributed.run` on loopback (the same launcher the PyTorchJob runs).

    Without an endpoint (one node), the c10d store binds port 0: the kernel picks a free port at
    bind time, so no port is chosen in advance and nothing can take it in between (what
    torchrun --standalone does)."""
    if endpoint is None and nnodes != 1:
        raise ValueError("several nodes need a rendezvous endpoint they all know (e.g. a local etcd)")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--local-addr",
        "127.0.0.1",
        "--nnodes",
        str(nnodes),
        "--nproc-per-node",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        "--rdzv-backend",
        rdzv,
        "--rdzv-endpoint",
        endpoint or "127.0.0.1:0",
    ]
    # A rendezvous id of its own per launch (torchrun's default is "none" for every launch): it is the
    # run's identity for the output_dir lease, shared by the restarts of this launch only.
    cmd += ["--rdzv-id", rdzv_id or f"local-{uuid.uuid4().hex[:12]}"]
    return cmd + list(args)


def descendants(pid: int) -> list:
    """Every process below `pid` (psutil.Process), across sessions: torchrun starts each worker in a
    session of its own, so a process-group signal does not reach them."""
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_all(procs: list, timeout: float) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(procs, timeout=timeout)


def stop(proc: subprocess.Popen, grace: float = 15) -> None:
    """Stop a process started with start_new_session=True, and everything it spawned (its process
    group gets SIGTERM, then SIGKILL; processes below it in other sessions, such as torchrun's
    workers whose agent is already gone, are killed after)."""
    below = descendants(proc.pid)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=grace)
    kill_all([p for p in below if p.is_running()], grace)


class EtcdUnavailable(RuntimeError):
    pass


def _start_etcd(binary: str, workdir: Path, timeout: float) -> tuple[subprocess.Popen, int]:
    """Start etcd on two free loopback ports; (process, client port) once it answers, or raise.

    etcd cannot bind port 0 (it must advertise its URLs), so ports are picked first; if another
    process took one in between, etcd exits at once with "address already in use" and the caller
    tries again with new ports."""
    client, peer = free_port(), free_port()
    with open(workdir / "etcd.log", "ab") as log:
        proc = subprocess.Popen(
            [
                binary,
                "--name",
                "local",
                "--data-dir",
                str(workdir / "etcd-data"),
                "--enable-v2=true",
                "--listen-client-urls",
                f"http://127.0.0.1:{client}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{client}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"local=http://127.0.0.1:{peer}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{client}/v2/keys", timeout=2) as r:
                if r.status == 200:
                    return proc, client
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise EtcdUnavailable(f"etcd did not start; see {workdir / 'etcd.log'}")
        time.sleep(0.2)


@contextlib.contextmanager
def etcd(workdir: Path, timeout: float = 30, attempts: int = 3) -> Iterator[str]:
    """A real etcd (Debian's etcd-server) with the v2 API on free loopback ports; yields host:port.
    Always stopped on exit."""
    binary = shutil.which("etcd")
    if binary is None:
        raise EtcdUnavailable("etcd is not installed (Debian: apt-get install etcd-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(attempts):
        try:
            proc, client = _start_etcd(binary, workdir, timeout)
            break
        except EtcdUnavailable:
            if attempt == attempts - 1 or "address already in use" not in (workdir / "etcd.log").read_text():
                raise
    try:
        yield f"127.0.0.1:{client}"
    finally:
        stop(proc)
