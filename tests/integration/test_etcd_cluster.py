"""Three etcd members with the flags the stack renders, on loopback: the loss of one member is
recovered when it comes back with its data directory (its persistent volume), as the StatefulSet's
volumeClaimTemplates give it; an empty data directory (what an emptyDir gave) cannot rejoin."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from trainer.runtime import local


def _flags(raw):
    """The member flags of the rendered StatefulSet that do not name pod addresses."""
    from tests.infra.harness import render

    args = render(raw).one("StatefulSet")["spec"]["template"]["spec"]["containers"][0]["args"]
    return [a for a in args if a.split("=")[0] in ("--enable-v2", "--initial-cluster-state",
                                                   "--initial-cluster-token")]


@pytest.fixture
def etcd_binary():
    binary = shutil.which("etcd")
    if binary is None:
        if os.environ.get("LLM_FINETUNE_REQUIRE_ETCD") == "1":
            pytest.fail("etcd is not installed: CI must run the etcd tests")
        pytest.skip("etcd is not installed")
    return binary


def _health(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read()).get("health") == "true"
    except (OSError, ValueError):
        return False


def test_a_member_lost_and_restarted_with_its_volume_rejoins(tmp_path, etcd_binary):
    flags = _flags({"dataset": {"name": "o/d"}, "storage": {"className": "nfs-rwx"}, "etcdReplicas": 3})
    assert "--initial-cluster-state=new" in flags and "--enable-v2=true" in flags
    ports = {m: (local.free_port(), local.free_port()) for m in ("m0", "m1", "m2")}
    cluster = ",".join(f"{m}=http://127.0.0.1:{peer}" for m, (_, peer) in ports.items())
    procs = {}

    def start(member, data):
        client, peer = ports[member]
        log = open(tmp_path / f"{member}.log", "ab")
        procs[member] = subprocess.Popen(
            [etcd_binary, "--name", member, "--data-dir", str(data), *flags,
             "--listen-client-urls", f"http://127.0.0.1:{client}", "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", cluster], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def wait_healthy(members, timeout=60):
        deadline = time.monotonic() + timeout
        while not all(_health(ports[m][0]) for m in members):
            assert time.monotonic() < deadline, {m: (tmp_path / f"{m}.log").read_text()[-1500:] for m in members}
            time.sleep(0.3)

    try:
        for m in ports:
            start(m, tmp_path / m)
        wait_healthy(ports)
        put = urllib.request.Request(f"http://127.0.0.1:{ports['m0'][0]}/v2/keys/rdzv", data=b"value=round-1",
                                     method="PUT")
        urllib.request.urlopen(put, timeout=5).read()
        local.stop(procs["m2"])  # the member's pod is lost; its volume is not
        start("m2", tmp_path / "m2")  # recreated by the StatefulSet, same data directory
        wait_healthy(ports)
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['m2'][0]}/v2/keys/rdzv", timeout=5) as r:
            assert json.loads(r.read())["node"]["value"] == "round-1"
        # The same loss on an emptyDir: the member comes back empty with --initial-cluster-state=new
        # and cannot rejoin a cluster that already has its id.
        local.stop(procs["m2"])
        start("m2", tmp_path / "m2-empty")
        deadline = time.monotonic() + 30
        while procs["m2"].poll() is None and not _health(ports["m2"][0]) and time.monotonic() < deadline:
            time.sleep(0.3)
        assert procs["m2"].poll() is not None or not _health(ports["m2"][0])
    finally:
        for p in procs.values():
            local.stop(p)
