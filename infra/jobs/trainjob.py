"""Kubeflow Trainer v2: a TrainJob on a torch runtime running the same pod.

The runtime's torch plugin injects the static rendezvous (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR = `<job>-node-0-0.<job>`, PET_MASTER_PORT = 29500), so torchrun — under
the same launcher as on v1 — meets on node 0 with no etcd.

Everything pod-level the TrainJob's `spec.trainer` cannot say (the shared volume, the config and token
mounts, /dev/shm, node selection, the restricted security contexts, the grace period, the priority
class) lives in a namespaced TrainingRuntime the stack renders, built like the `torch-distributed`
ClusterTrainingRuntime; the TrainJob carries no `runtimePatches`. Why: Trainer v2.3's CRD makes
`spec.trainer` and the runtimePatches pod fields immutable by CEL (`self == oldSelf`), and Kueue starts a
queued TrainJob with a full Update of the object it decoded into Go types; whatever does not come back
byte-equal (a defaulted or normalized container in a patch) fails its rule and the job stays suspended
while its Workload shows admitted (kubeflow/trainer#3888, #3890; kueue#11931). Kueue's own patch (manager
`kueue.x-k8s.io/manager`: node selectors, tolerations, scheduling gates) is the only one left, and
`spec.trainer` holds only values that re-encode as written (canonical quantities: infra/quantity.py;
no empty strings, lists or maps). The runtime is named after a hash of its spec, so a changed pod is a
new runtime and a new TrainJob, never an in-place change to an object a running JobSet was built from.

A cluster runtime of the user's own (`trainerRuntime`) is used as it is, with the pod-level settings in
a runtime patch of the stack's; a queued job is refused there (config.py), since that patch is what Kueue's
update may not reproduce.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from infra.common import Names, labels, metadata
from infra.config import RESERVED_ENV, TORCH_RUNTIME, StackConfig
from infra.jobs import pod, queue

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
CONTAINER = "node"  # the torch-distributed runtime's replicated job and container
PATCH_MANAGER = "llm-finetune.pulumi.com/stack"
REPLACED_BY = ("spec",)  # runtimeRef, trainer, activeDeadlineSeconds and the pod-level patches are immutable
ANCESTOR_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"  # which replicated job gets spec.trainer


def own_runtime(cfg: StackConfig) -> bool:
    return cfg.trainer_runtime == TORCH_RUNTIME


def trainer(cfg: StackConfig) -> dict:
    """spec.trainer: what the torch plugin puts on the `node` container."""
    container = pod.container(cfg, name=CONTAINER)
    return {
        "image": cfg.image,
        "command": container["command"],
        # Never a reserved name (the plugin sets them) and never the token (a mounted file).
        "env": [e for e in container["env"] if e["name"] not in RESERVED_ENV],
        "numNodes": cfg.workers,
        # Explicit: without a GPU and without this the plugin starts one process per CPU.
        "numProcPerNode": cfg.procs_per_worker,
        "resourcesPerNode": container["resources"],
    }


def node_pod(cfg: StackConfig) -> dict:
    """The `node` pod template the stack adds to the runtime: everything but what spec.trainer sets."""
    container = pod.container(cfg, name=CONTAINER)
    spec = pod.pod_spec(cfg)
    spec["containers"] = [
        {
            "name": CONTAINER,
            "image": cfg.image,
            "imagePullPolicy": container["imagePullPolicy"],
            "volumeMounts": container["volumeMounts"],
            "securityContext": container["securityContext"],
        }
    ]
    return {"metadata": {"labels": labels(cfg.job_name, "worker")}, "spec": spec}


def manifest(cfg: StackConfig) -> dict:
    spec: dict[str, Any] = {"runtimeRef": runtime_ref(cfg), "trainer": trainer(cfg)}
    if not own_runtime(cfg):
        node = node_pod(cfg)
        patch_pod = {
            k: v
            for k, v in node["spec"].items()
            if k in ("securityContext", "terminationGracePeriodSeconds", "volumes", "nodeSelector", "tolerations")
        }
        patch_pod["containers"] = [
            {k: v for k, v in node["spec"]["containers"][0].items() if k in ("name", "volumeMounts", "securityContext")}
        ]
        spec["runtimePatches"] = [
            {
                "manager": PATCH_MANAGER,
                "trainingRuntimeSpec": {
                    "template": {
                        "spec": {
                            "replicatedJobs": [
                                {
                                    "name": CONTAINER,
                                    "template": {"spec": {"template": {"metadata": node["metadata"], "spec": patch_pod}}},
                                }
                            ]
                        }
                    }
                },
            }
        ]
    if cfg.active_deadline_seconds:
        spec["activeDeadlineSeconds"] = cfg.active_deadline_seconds
    if cfg.queue_name:
        spec["suspend"] = True  # Kueue (pkg/controller/jobs/trainjob) unsuspends it on admission
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": queue.queued(
            cfg, metadata(cfg.job_name, cfg.namespace, cfg.job_name, "training", annotations={"pulumi.com/skipAwait": "true"})
        ),
        "spec": spec,
    }


IGNORED_AFTER_CREATE = ("spec.suspend",)  # Kueue's to change: a later `pulumi up` leaves it


def runtime_ref(cfg: StackConfig) -> dict:
    if own_runtime(cfg):
        return {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": runtime_name(cfg)}
    return {"name": cfg.trainer_runtime}


def runtime_spec(cfg: StackConfig) -> dict:
    return {
        "mlPolicy": {"numNodes": 1, "torch": {}},
        "template": {
            "spec": {
                "replicatedJobs": [
                    {
                        "name": CONTAINER,
                        "template": {"metadata": {"labels": {ANCESTOR_LABEL: "trainer"}}, "spec": {"template": node_pod(cfg)}},
                    }
                ]
            }
        },
    }


def runtime_name(cfg: StackConfig, spec: Optional[dict] = None) -> str:
    """`<job>-runtime-<hash of its spec>`: a changed pod is a new runtime (runtimes are immutable by
    design) and, through runtimeRef, a new TrainJob."""
    spec = runtime_spec(cfg) if spec is None else spec
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"{Names(cfg.job_name).runtime}-{digest}"


def runtime(cfg: StackConfig) -> Optional[dict]:
    """The job API's protocol (infra/jobs/__init__.py): the TrainingRuntime this stack creates, if any."""
    return runtime_manifest(cfg)


def runtime_manifest(cfg: StackConfig) -> Optional[dict]:
    """The stack's TrainingRuntime, built like the `torch-distributed` ClusterTrainingRuntime (one
    replicated job `node`, container `node`, the torch plugin) with the whole pod template. The Trainer
    copies it into the JobSet (so the kube-scheduler sees the priority class), and Kueue's TrainJob
    integration reads the pod sets, priority included, from it (jobframework.ExtractPriority)."""
    if not own_runtime(cfg):
        return None
    spec = runtime_spec(cfg)
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRuntime",
        "metadata": metadata(
            runtime_name(cfg, spec),
            cfg.namespace,
            cfg.job_name,
            "training-runtime",
            labels={
                **labels(cfg.job_name, "training-runtime"),
                # The Kubeflow SDK's TrainerClient needs it to read the runtime.
                "trainer.kubeflow.org/framework": "torch",
            },
        ),
        "spec": spec,
    }


def commands(cfg: StackConfig) -> dict[str, str]:
    ns, job = cfg.namespace, cfg.job_name
    pods = f"jobset.sigs.k8s.io/jobset-name={job}"
    return {
        **queue.commands(cfg, KIND),
        "watchJob": f"kubectl -n {ns} get trainjob {job} -w",
        "watchPods": f"kubectl -n {ns} get pods -l {pods} -w",
        "followLogs": f"kubectl -n {ns} logs -f -l {pods},batch.kubernetes.io/job-completion-index=0 -c {CONTAINER}",
    }


def rendezvous(job: dict) -> str:
    name = job["metadata"]["name"]
    return f"static: {name}-node-0-0.{name}:29500"
