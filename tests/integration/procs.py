"""Start and always stop real processes (torchrun agents, etcd) on loopback, with bounded waits."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import pytest

from trainer.runtime import local
from trainer.runtime.local import stop, torchrun  # noqa: F401  (re-exported for the tests)

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict[str, str]:
    return local.run_env(LLM_FINETUNE_LOG_FORMAT="plain")


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    f = open(log, "wb")
    # Own process group, so stop() reaches every worker torchrun spawned.
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env(), cwd=ROOT, start_new_session=True)


def wait(proc: subprocess.Popen, timeout: float, log: Path) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"timed out after {timeout}s; log:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def etcd_server(tmp: Path):
    """A real etcd on loopback; skipped where etcd is not installed, except in CI where it must be."""
    try:
        with local.etcd(tmp / "etcd") as endpoint:
            yield endpoint
    except local.EtcdUnavailable as exc:
        if os.environ.get("LLM_FINETUNE_REQUIRE_ETCD") == "1":
            pytest.fail(f"{exc}: CI must run the etcd tests")
        pytest.skip(str(exc))


def kill_tree(proc: subprocess.Popen, timeout: float = 30) -> None:
    """Kill `proc` and every process below it at once, as a lost node loses them: the tree is stopped
    first (a stopped process spawns nothing), then killed."""
    import psutil

    tree: dict[int, "psutil.Process"] = {}
    for _ in range(10):  # until no new process appears under the stopped ones
        fresh = [p for p in local.descendants(proc.pid) if p.pid not in tree]
        if not fresh:
            break
        for p in fresh:
            tree[p.pid] = p
            with contextlib.suppress(psutil.Error):
                p.suspend()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=timeout)
    local.kill_all(list(tree.values()), timeout)
