"""Start and always stop real processes (torchrun agents, etcd) on loopback, with bounded waits."""

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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(ROOT) + os.pathsep + e.get("PYTHONPATH", ""), "GLOO_SOCKET_IFNAME": "lo",
              "OMP_NUM_THREADS": "1", "LLM_FINETUNE_LOG_FORMAT": "plain", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    return e


def torchrun_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--local-addr", "127.0.0.1", *args]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "wb")
    # Own process group, so stop() reaches every worker torchrun spawned.
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"timed out after {timeout}s; log:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def etcd_server(tmp: Path):
    """A real etcd (Debian etcd-server 3.4) with the v2 API on free loopback ports."""
    binary = shutil.which("etcd")
    if binary is None:
        if os.environ.get("LLM_FINETUNE_REQUIRE_ETCD") == "1":
            pytest.fail("etcd is required here (CI): apt-get install etcd-server")
        pytest.skip("etcd not installed (apt-get install etcd-server)")
    client, peer = free_port(), free_port()
    log = tmp / "etcd.log"
    proc = start([binary, "--name", "test", "--data-dir", str(tmp / "etcd-data"), "--enable-v2=true",
                  "--listen-client-urls", f"http://127.0.0.1:{client}",
                  "--advertise-client-urls", f"http://127.0.0.1:{client}",
                  "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                  "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                  "--initial-cluster", f"test=http://127.0.0.1:{peer}"], log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{client}/v2/keys", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"etcd did not start; log:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield f"127.0.0.1:{client}"
    finally:
        stop(proc)
