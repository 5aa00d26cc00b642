"""The Kubeflow SDK's TrainerClient (kubeflow 0.5.0) reads a TrainJob this stack renders: its own code,
over HTTP, against a local stand-in for the API server that serves the rendered TrainJob and
TrainingRuntime and the pods the Trainer's JobSet makes from them (the JobSet's labels, the pod the
runtime and spec.trainer compose). What it needs: the runtime's `trainer.kubeflow.org/framework` label,
the ancestor label on the `node` replicated job, a `node` container with an image; steps and logs come
from the pods' JobSet labels."""

from __future__ import annotations

import http.server
import json
import re
import urllib.parse

import pytest
from kubernetes.client import Configuration

from tests.infra.harness import effective_trainjob_pod, render, runtimes
from tests.local_http import serving

NS, JOB = "ml", "tj"
GPUS = {"image": "ghcr.io/x/trainer-cuda:1.0", "procsPerWorker": 4, "workers": 3,
        "resources": {"gpus": 4, "cpu": "32", "memory": "256Gi"}}


def _cluster(raw: dict) -> dict:
    """What the API server holds once the stack is up and the Trainer started the JobSet's pods."""
    rendered = render({"dataset": {"name": "org/data"}, "storage": {"className": "nfs-rwx"}, "jobApi": "trainer-v2",
                       "namespace": NS, "jobName": JOB, **raw})
    job, (runtime,) = rendered.one("TrainJob"), runtimes(rendered)
    stamp = {"creationTimestamp": "2026-12-06T10:00:00Z", "uid": "0000-1"}
    job["metadata"].update(stamp)
    runtime["metadata"].update(stamp)
    pod_spec = effective_trainjob_pod(job, [runtime])
    pods = []
    for index in range(job["spec"]["trainer"]["numNodes"]):
        template = runtime["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]
        labels = {**template["metadata"]["labels"], "jobset.sigs.k8s.io/jobset-name": JOB,
                  "jobset.sigs.k8s.io/replicatedjob-name": "node", "batch.kubernetes.io/job-completion-index": str(index)}
        pods.append({"apiVersion": "v1", "kind": "Pod", "spec": pod_spec, "status": {"phase": "Running"},
                     "metadata": {"name": f"{JOB}-node-0-{index}-abcde", "namespace": NS, "labels": labels,
                                  "creationTimestamp": f"2026-12-06T10:0{index}:00Z"}})
    return {"job": job, "runtime": runtime, "pods": pods}


def _selected(pod: dict, selector: str) -> bool:
    """Label selectors as the SDK writes them: `k=v` and `k in (a, b)` terms."""
    labels = pod["metadata"]["labels"]
    for term in re.findall(r"[^,(]+(?:\([^)]*\))?", selector):
        term = term.strip()
        if " in " in term:
            key, values = term.split(" in ", 1)
            if labels.get(key.strip()) not in [v.strip() for v in values.strip("() ").split(",")]:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
    return True


class FakeApiServer:
    def __init__(self, cluster: dict):
        self.cluster, self.requests = cluster, []
        base = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}"
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                url = urllib.parse.urlparse(self.path)
                query = urllib.parse.parse_qs(url.query)
                server.requests.append(url.path)
                c, body = server.cluster, None
                if url.path == f"{base}/trainjobs":
                    body = {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList", "items": [c["job"]]}
                elif url.path == f"{base}/trainjobs/{JOB}":
                    body = c["job"]
                elif url.path == f"{base}/trainingruntimes/{c['runtime']['metadata']['name']}":
                    body = c["runtime"]
                elif url.path == f"/api/v1/namespaces/{NS}/pods":
                    selector = query.get("labelSelector", [""])[0]
                    body = {"apiVersion": "v1", "kind": "PodList", "metadata": {},
                            "items": [p for p in c["pods"] if _selected(p, selector)]}
                elif url.path.endswith("/log") and query.get("container") == ["node"]:
                    name = url.path.split("/")[-2]
                    if any(p["metadata"]["name"] == name for p in c["pods"]):
                        text = f"[rank 0] step 10/100 loss 1.2345 ({name})\n".encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "text/plain")
                        self.end_headers()
                        self.wfile.write(text)
                        return
                payload = json.dumps(body if body is not None else
                                     {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound",
                                      "code": 404}).encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)



def _client(server: FakeApiServer):
    from kubeflow.common.types import KubernetesBackendConfig
    from kubeflow.trainer import TrainerClient

    conf = Configuration(host=f"http://127.0.0.1:{server.httpd.server_address[1]}")
    return TrainerClient(backend_config=KubernetesBackendConfig(namespace=NS, client_configuration=conf))


@pytest.mark.parametrize("raw", [{}, GPUS], ids=["cpu", "gpus"])
def test_the_sdk_lists_shows_and_reads_logs_of_our_trainjob(raw):
    cluster = _cluster(raw)
    with serving(FakeApiServer(cluster)) as server:
        client = _client(server)
        (listed,) = client.list_jobs()
        job = client.get_job(JOB)
        logs = list(client.get_job_logs(JOB))
    workers = raw.get("workers", 2)
    for j in (listed, job):
        assert j.name == JOB and j.num_nodes == workers
        assert j.runtime.name == cluster["runtime"]["metadata"]["name"]
        assert j.runtime.trainer.framework == "torch" and j.runtime.trainer.image == cluster["job"]["spec"]["trainer"]["image"]
        assert sorted(s.name for s in j.steps) == [f"node-{i}" for i in range(workers)]
        assert j.status == "Running"  # every node pod running
    if raw.get("resources", {}).get("gpus"):
        assert {(s.device, s.device_count) for s in job.steps} == {("gpu", "4")}
    assert logs == [f"[rank 0] step 10/100 loss 1.2345 ({JOB}-node-0-0-abcde)"]
    assert f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{NS}/trainingruntimes/" \
           f"{cluster['runtime']['metadata']['name']}" in server.requests


def test_without_the_framework_label_the_sdk_cannot_read_the_runtime():
    """The label is what the SDK needs (not decoration): without it get_job fails."""
    cluster = _cluster({})
    del cluster["runtime"]["metadata"]["labels"]["trainer.kubeflow.org/framework"]
    with serving(FakeApiServer(cluster)) as server:
        with pytest.raises(RuntimeError):
            _client(server).get_job(JOB)
