"""One writer per output_dir: the lease is taken over by the same run, refused while its holder lives,
and broken only when the holder is provably gone."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from trainer.errors import UserError
from trainer.runtime.lock import LOCK, OutputLock


def test_second_run_is_refused_while_the_first_holds_the_lease(tmp_path):
    first = OutputLock(tmp_path, identity="run:a", heartbeat=0.2, ttl=2)
    first.acquire()
    try:
        with pytest.raises(UserError, match=r"output_dir .* is in use by another run \(run:a on .*pid \d+.*Fix: wait"):
            OutputLock(tmp_path, identity="run:b", ttl=2).acquire()
    finally:
        first.release()
    assert not (tmp_path / LOCK).exists()
    second = OutputLock(tmp_path, identity="run:b")
    second.acquire()  # free once released
    second.release()


def test_the_same_run_restarted_takes_its_lease_over(tmp_path):
    OutputLock(tmp_path, identity="run:job-1").acquire()  # a pod that died without releasing
    again = OutputLock(tmp_path, identity="run:job-1")
    again.acquire()
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    again.release()


def test_a_dead_holder_on_this_host_is_replaced_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / LOCK).write_text(json.dumps({"run": "run:old", "host": socket.gethostname(), "pid": proc.pid}))
    logs = []
    started = time.monotonic()
    lock = OutputLock(tmp_path, identity="run:new", ttl=60, log=logs.append)
    lock.acquire()
    assert time.monotonic() - started < 5 and "is gone; taking over" in logs[0]
    lock.release()


def test_a_holder_elsewhere_is_broken_only_after_its_lease_stops_being_refreshed(tmp_path):
    (tmp_path / LOCK).write_text(json.dumps({"run": "run:old", "host": "other-pod", "pid": 1}))
    started = time.monotonic()
    lock = OutputLock(tmp_path, identity="run:new", ttl=1.5, heartbeat=0.4)
    lock.acquire()  # no refresh seen for ttl: the other pod is gone
    assert time.monotonic() - started >= 1.5
    lock.release()
    # A holder elsewhere that keeps refreshing its lease is alive: refused.
    alive = OutputLock(tmp_path, identity="run:alive", heartbeat=0.2)
    alive.acquire()
    (tmp_path / LOCK).write_text(json.dumps({"run": "run:alive", "host": "other-pod", "pid": 1}))
    try:
        with pytest.raises(UserError, match="in use by another run"):
            OutputLock(tmp_path, identity="run:late", ttl=1.5, heartbeat=0.4).acquire()
    finally:
        alive.release()
