"""trainer.runtime.local's process control: what it starts, it stops, including processes that left its
process group (torchrun starts every worker in a session of its own)."""

import os
import subprocess
import sys
import time

import psutil
import pytest

from tests.integration.procs import kill_tree
from trainer.runtime import local

# A parent in its own group that starts a child in a new session (as torchrun does its workers),
# prints the child's pid, and waits.
TREE = ("import subprocess, sys, time\n"
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'], start_new_session=True)\n"
        "print(c.pid, flush=True)\n"
        "time.sleep(600)\n")


def _start():
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, start_new_session=True, text=True)
    child = psutil.Process(int(proc.stdout.readline()))
    assert child.is_running() and psutil.Process(proc.pid).children(recursive=True) == [child]
    assert _session(child) != _session(psutil.Process(proc.pid))
    return proc, child


def _session(p):
    return os.getsid(p.pid)


def _gone(p, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not p.is_running() or p.status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["stop", "kill_tree"])
def test_stopping_reaches_processes_in_other_sessions(how):
    proc, child = _start()
    try:
        if how == "stop":
            local.stop(proc, grace=10)
        else:
            kill_tree(proc, timeout=10)
        assert proc.poll() is not None
        assert _gone(child), f"{how} left pid {child.pid} running"
    finally:
        if child.is_running():
            child.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
