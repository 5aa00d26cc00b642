"""Kueue: the queue label both job APIs carry (read before writing: kubernetes-sigs/kueue
pkg/controller/jobs/kubeflow/kubeflowjob and pkg/controller/jobs/trainjob, and its docs
site/content/en/docs/tasks/run/{kubeflow/pytorchjobs,trainjobs}.md).

Kueue admits a labelled job as a whole: the job is created suspended, Kueue's controller creates a
Workload (`<kind>-<job name>-<hash>`, `kubectl get workloads`) and unsuspends the job when the
LocalQueue's ClusterQueue has quota for every pod of it.
"""

from __future__ import annotations

from infra.config import StackConfig

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue's WorkloadPriorityClass (pkg/controller/constants: WorkloadPriorityClassLabel), read by both job integrations
# before the pods' PriorityClass (jobframework.ExtractPriority).
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"


def queued(cfg: StackConfig, meta: dict) -> dict:
    """The Kueue labels on the job object only: the data-access pod, etcd and the volume-prep job
    are not training workloads and are never queued."""
    if cfg.queue_name:
        meta["labels"] = {**meta["labels"], QUEUE_LABEL: cfg.queue_name}
    if cfg.workload_priority_class:
        meta["labels"] = {**meta["labels"], PRIORITY_LABEL: cfg.workload_priority_class}
    return meta


def commands(cfg: StackConfig, kind: str) -> dict[str, str]:
    """With a queue: the job's Kueue Workload (QUOTA RESERVED, ADMITTED; `describe` says why it waits)."""
    if not cfg.queue_name:
        return {}
    return {
        "watchAdmission": f"kubectl -n {cfg.namespace} get workloads -w | grep -e '^NAME' -e '^{kind.lower()}-{cfg.job_name}-'"
    }
