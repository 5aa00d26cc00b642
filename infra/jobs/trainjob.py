"""Kubeflow Trainer v2: a TrainJob on the `torch-distributed` runtime running the same pod.

The runtime's torch plugin injects the static rendezvous (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR = `<job>-node-0-0.<job>`, PET_MASTER_PORT = 29500), so torchrun — under
the same launcher as on v1 — meets on node 0 with no etcd. Everything pod-level the runtime does not
know (the shared volume, the config and token mounts, /dev/shm, node selection, the restricted
security contexts, the grace period) arrives through `runtimePatches` on the `node` replicated job.
The TrainJob's `spec.trainer` is immutable: any change replaces the TrainJob.
"""

from __future__ import annotations

from typing import Optional

from infra.common import Names, labels, metadata
from infra.config import StackConfig
from infra.jobs import pod, queue

API_VERSION = "trainer.kubeflow.org/v1alpha1"
KIND = "TrainJob"
CONTAINER = "node"  # the torch-distributed runtime's replicated job and container
RESERVED_ENV = ("PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT")
PATCH_MANAGER = "llm-finetune.pulumi.com/stack"
REPLACED_BY = ("spec",)  # runtimeRef, trainer and the pod-level patches are immutable


def manifest(cfg: StackConfig) -> dict:
    container = pod.container(cfg, name=CONTAINER)
    pod_spec = pod.pod_spec(cfg)
    patch_pod = {
        "securityContext": pod_spec["securityContext"],
        "terminationGracePeriodSeconds": pod_spec["terminationGracePeriodSeconds"],
        "volumes": pod_spec["volumes"],
        "containers": [{"name": CONTAINER, "volumeMounts": container["volumeMounts"],
                        "securityContext": container["securityContext"]}],
        **pod.placement(cfg),
    }
    spec = {
        "runtimeRef": runtime_ref(cfg),
        "trainer": {
            "image": cfg.image,
            "command": container["command"],
            # Never a reserved name (the plugin sets them) and never the token (a mounted file).
            "env": [e for e in container["env"] if e["name"] not in RESERVED_ENV],
            "numNodes": cfg.workers,
            # Explicit: without a GPU and without this the plugin starts one process per CPU.
            "numProcPerNode": cfg.procs_per_worker,
            "resourcesPerNode": container["resources"],
        },
        "runtimePatches": [{
            "manager": PATCH_MANAGER,
            "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{
                "name": CONTAINER,
                "template": {"spec": {"template": {
                    "metadata": {"labels": labels(cfg.job_name, "worker")},
                    "spec": patch_pod,
                }}},
            }]}}},
        }],
    }
    if cfg.queue_name:
        spec["suspend"] = True  # Kueue (pkg/controller/jobs/trainjob) unsuspends it on admission
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": queue.queued(cfg, metadata(cfg.job_name, cfg.namespace, cfg.job_name, "training",
                                         annotations={"pulumi.com/skipAwait": "true"})),
        "spec": spec,
    }


IGNORED_AFTER_CREATE = ("spec.suspend",)  # Kueue's to change: a later `pulumi up` leaves it


def runtime_ref(cfg: StackConfig) -> dict:
    if cfg.priority_class:
        return {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": Names(cfg.job_name).runtime}
    return {"name": cfg.trainer_runtime}


def runtime_manifest(cfg: StackConfig) -> Optional[dict]:
    """With priorityClassName: a namespaced TrainingRuntime built like the `torch-distributed`
    ClusterTrainingRuntime (one replicated job `node`, container `node`, the torch plugin) whose pod
    template carries the priority class. Why a runtime of our own: the v2.3 TrainJob's runtimePatches
    have no priorityClassName, the Trainer copies the runtime's pod template into the JobSet (so the
    kube-scheduler sees the class), and Kueue's TrainJob integration reads the priority from the
    pod sets it builds from the runtime (jobframework.ExtractPriority), so queued jobs get the same
    priority for admission and preemption. Everything else arrives from the TrainJob as without it."""
    if not cfg.priority_class:
        return None
    name = Names(cfg.job_name).runtime
    return {
        "apiVersion": API_VERSION,
        "kind": "TrainingRuntime",
        "metadata": metadata(name, cfg.namespace, cfg.job_name, "training-runtime",
                             labels={**labels(cfg.job_name, "training-runtime"),
                                     "trainer.kubeflow.org/framework": "torch"}),
        "spec": {
            "mlPolicy": {"numNodes": 1, "torch": {}},
            "template": {"spec": {"replicatedJobs": [{
                "name": CONTAINER,
                "template": {
                    "metadata": {"labels": {"trainer.kubeflow.org/trainjob-ancestor-step": "trainer"}},
                    "spec": {"template": {"spec": {
                        "priorityClassName": cfg.priority_class,
                        "containers": [{"name": CONTAINER, "image": cfg.image}],
                    }}},
                },
            }]}},
        },
    }


def effective_pod_spec(job: dict, runtime: dict) -> dict:
    """The `node` pod spec the Trainer controller builds: the runtime's template with the patches
    applied (containers merged by name). What the Pod Security Standard is checked against."""
    import copy

    base = next(r for r in runtime["spec"]["template"]["spec"]["replicatedJobs"] if r["name"] == CONTAINER)
    spec = copy.deepcopy(base["template"]["spec"]["template"]["spec"])
    for patch in job["spec"].get("runtimePatches", []):
        for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
            if rj["name"] != CONTAINER:
                continue
            pod_patch = rj["template"]["spec"]["template"]["spec"]
            for key, value in pod_patch.items():
                if key != "containers":
                    spec[key] = copy.deepcopy(value)
            for c in pod_patch.get("containers", []):
                target = next(x for x in spec["containers"] if x["name"] == c["name"])
                target.update(copy.deepcopy(c))
    node = next(x for x in spec["containers"] if x["name"] == CONTAINER)
    trainer = job["spec"]["trainer"]
    node.update({"image": trainer["image"], "command": trainer["command"], "env": trainer["env"],
                 "resources": trainer["resourcesPerNode"]})
    return spec


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
