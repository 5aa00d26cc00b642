"""The PyTorchJob the stack renders, executed: two worker pods started with the container's own
command, the operator's PET_* environment and the pods' mount paths, against a real local etcd
(tests/integration/pods.py). Day two on the real code path: run again, change and re-run, a replaced
pod of either rank, an etcd restart, and SIGTERM."""

import json
import os
import re
import shutil
import time

import pytest

from tests.integration.pods import Cluster, EtcdServer, pod_mountpoints, rendered
from trainer.runtime import local


def stack(**over):
    raw = {
        "jobName": "exec", "namespace": "ml", "workers": 2, "procsPerWorker": 1, "maxRestarts": 2,
        "launchAttempts": 3, "terminationGracePeriodSeconds": 60, "storage": {"className": "nfs-rwx"},
        "model": "/data/models/tiny",
        "dataset": {"file": "cards.json", "maxSeqLength": 256, "validationFraction": "0.05"},
        "training": {"max_steps": 12, "save_steps": 5, "logging_steps": 1, "per_device_train_batch_size": 4,
                     "learning_rate": 0.003},
        "lora": {"enabled": False}, "quantize": {"enabled": False, "samplePrompts": 0},
    }
    for key, value in over.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


@pytest.fixture
def cluster(tmp_path, tiny_model, flashcards_records):
    try:
        etcd = EtcdServer(tmp_path / "etcd")
        etcd.start()
    except local.EtcdUnavailable as exc:
        if os.environ.get("LLM_FINETUNE_REQUIRE_ETCD") == "1":
            pytest.fail(f"{exc}: CI must run the etcd tests")
        pytest.skip(str(exc))
    try:
        with pod_mountpoints():
            c = Cluster(tmp_path, etcd)
            shutil.copytree(tiny_model, c.volume / "models" / "tiny")
            (c.volume / "cards.json").write_text(json.dumps(flashcards_records))
            try:
                yield c
            finally:
                c.stop_all()
    finally:
        etcd.stop()


def _run(cluster, raw, timeout=300, tag=""):
    job, config, outputs = rendered(raw)
    pods = [cluster.start(job, config, node, tag) for node in (0, 1)]
    codes = [p.wait(timeout) for p in pods]
    logs = "".join(p.log.read_text() for p in pods)
    assert codes == [0, 0], logs[-5000:]
    return job, outputs, logs


def _metrics(cluster, outputs):
    path = cluster.data_path(outputs["outputDir"]) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
    return rows


def _wait_for(predicate, timeout, what, pods=()):
    deadline = time.monotonic() + timeout
    while not predicate():
        for p in pods:
            assert p.proc.poll() is None, f"{p.name} exited early: {p.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_runs_runs_again_and_reruns_a_changed_config(cluster):
    job, outputs, logs = _run(cluster, stack())
    out = cluster.data_path(outputs["outputDir"])
    assert (out / "final" / "config.json").exists()
    rdzv = job["spec"]["elasticPolicy"]["rdzvId"]
    assert f"rendezvous {rdzv}-g0 (etcd-v2)" in logs
    # `kubectl delete pytorchjob && pulumi up`: the same spec again. torchrun closed generation 0 when
    # it finished (closed for 2 hours in etcd); the launcher takes the next one, and the run, already
    # complete, resumes at its last step and finishes.
    started = time.monotonic()
    _, _, again = _run(cluster, stack(), tag="again")
    assert f"rendezvous {rdzv}-g1" in again and "resumed from checkpoint step 12" in again
    assert time.monotonic() - started < 120
    # A new runId: a fresh run of the unchanged config, in a directory of its own.
    job2, outputs2, logs2 = _run(cluster, stack(runId="2"), tag="runid")
    assert outputs2["outputDir"] != outputs["outputDir"] and "resumed from" not in logs2
    assert job2["spec"]["elasticPolicy"]["rdzvId"] != rdzv
    assert (cluster.data_path(outputs2["outputDir"]) / "final" / "config.json").exists()
    # A changed config: trained afresh with it; the earlier runs' results stay where they are.
    _, outputs3, logs3 = _run(cluster, stack(training={"learning_rate": 0.002}), tag="changed")
    assert outputs3["outputDir"] not in (outputs["outputDir"], outputs2["outputDir"])
    rows = _metrics(cluster, outputs3)
    assert rows and all(r["learning_rate"] <= 0.002 for r in rows) and rows[-1]["step"] == 12
    assert (out / "final" / "config.json").exists()


@pytest.mark.parametrize("victim", ["rank-0 pod", "other pod"])
def test_a_replaced_pod_of_either_rank_resumes_from_the_last_checkpoint(cluster, victim):
    raw = stack(training={"max_steps": 40, "save_steps": 5})
    job, config, outputs = rendered(raw)
    pods = [cluster.start(job, config, node) for node in (0, 1)]
    out = cluster.data_path(outputs["outputDir"])
    _wait_for(lambda: (out / "checkpoints" / "step-00000010" / "COMPLETE").exists(), 240, "checkpoint 10", pods)
    holds_rank0 = ["world 2 (backend" in p.log.read_text() for p in pods]
    assert sum(holds_rank0) == 1
    node = holds_rank0.index(True) if victim == "rank-0 pod" else holds_rank0.index(False)
    pods[node].kill()  # the node is lost: agent and worker die at once
    killed = time.monotonic()
    last_words = pods[node].log.read_text()
    replacement = cluster.start(job, config, node, "replacement")
    survivor = pods[1 - node]
    assert replacement.wait(300) == 0, replacement.log.read_text()[-4000:]
    assert survivor.wait(120) == 0, survivor.log.read_text()[-4000:]
    elapsed = time.monotonic() - killed
    logs = replacement.log.read_text() + survivor.log.read_text()
    resumed = [int(m) for m in re.findall(r"resumed from checkpoint step (\d+)", logs)]
    assert resumed and min(resumed) >= 10, logs[-3000:]
    assert (out / "final" / "config.json").exists()
    assert pods[node].log.read_text() == last_words, "a process of the lost pod went on running"
    steps = [r["step"] for r in _metrics(cluster, outputs)]
    assert steps == sorted(set(steps)) and steps[-1] == 40
    print(f"\n{victim}: killed -> finished in {elapsed:.0f}s")
    assert elapsed < 240, f"recovery took {elapsed:.0f}s"


def test_an_etcd_restart_mid_run_is_recovered(cluster):
    raw = stack(training={"max_steps": 40, "save_steps": 5})
    job, config, outputs = rendered(raw)
    pods = [cluster.start(job, config, node) for node in (0, 1)]
    out = cluster.data_path(outputs["outputDir"])
    _wait_for(lambda: (out / "checkpoints" / "step-00000005" / "COMPLETE").exists(), 240, "checkpoint 5", pods)
    cluster.etcd.stop()  # the etcd pod restarts (its data on its persistent volume)
    time.sleep(10)
    cluster.etcd.start()
    codes = [p.wait(400) for p in pods]
    logs = "".join(p.log.read_text() for p in pods)
    assert codes == [0, 0], logs[-5000:]
    # The agents lost etcd and exited; the launchers waited for it and started torchrun again.
    assert "RendezvousConnectionError" in logs and "retrying in" in logs
    assert re.search(r"attempt 2/3: torchrun, rendezvous exec-\w+-g\d", logs)
    assert "resumed from checkpoint step" in logs
    assert (out / "final" / "config.json").exists()
    assert _metrics(cluster, outputs)[-1]["step"] == 40


def test_sigterm_saves_at_the_next_step_and_the_replacement_loses_at_most_one_step(cluster):
    raw = stack(training={"max_steps": 60, "save_steps": 1000})
    job, config, outputs = rendered(raw)
    pods = [cluster.start(job, config, node) for node in (0, 1)]
    _wait_for(lambda: len(_metrics(cluster, outputs)) >= 8, 240, "8 logged steps", pods)
    logged = _metrics(cluster, outputs)[-1]["step"]
    pods[0].terminate()  # kubelet: SIGTERM to the container's first process
    t0 = time.monotonic()
    assert pods[0].wait(60) == 143, pods[0].log.read_text()[-4000:]  # saved, then stopped within the grace
    print(f"\nSIGTERM -> pod exited 143 in {time.monotonic() - t0:.1f}s; last logged step {logged}")
    out = cluster.data_path(outputs["outputDir"])
    saved = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*") if (p / "COMPLETE").exists())
    assert saved and saved[-1] >= logged, (saved, logged)  # every step done before SIGTERM is kept
    assert "stop requested (file) at step" in pods[0].log.read_text()
    replacement = cluster.start(job, config, 0, "replacement")
    assert replacement.wait(300) == 0, replacement.log.read_text()[-4000:]
    assert pods[1].wait(120) == 0, pods[1].log.read_text()[-4000:]
    logs = replacement.log.read_text() + pods[1].log.read_text()
    assert f"resumed from checkpoint step {saved[-1]}" in logs
    assert _metrics(cluster, outputs)[-1]["step"] == 60


def test_the_rendered_trainjob_trains_to_completion(cluster):
    """Trainer v2: the TrainJob's `node` container command, with the torch plugin's PET_* variables
    (static rendezvous on node 0), two nodes."""
    raw = {k: v for k, v in stack().items() if k not in ("maxRestarts",)}
    job, config, outputs = rendered({**raw, "jobApi": "trainer-v2"})
    assert job["kind"] == "TrainJob"
    for attempt in range(3):  # the static master port must be known to both nodes before they start
        port = local.free_port()
        pods = [cluster.start(job, config, node, f"v2-{attempt}", master_port=port) for node in (0, 1)]
        codes = [p.wait(300) for p in pods]
        logs = "".join(p.log.read_text() for p in pods)
        if codes == [0, 0] or "address already in use" not in logs.lower():
            break
    assert codes == [0, 0], logs[-5000:]
    assert "(static)" in logs and "world 2 (backend gloo" in logs
    out = cluster.data_path(outputs["outputDir"])
    assert (out / "final" / "config.json").exists()
    assert _metrics(cluster, outputs)[-1]["step"] == 12
