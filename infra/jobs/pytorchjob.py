"""Kubeflow Training Operator v1: the PyTorchJob that runs the launcher in every worker pod."""

from __future__ import annotations

from infra.common import labels, metadata
from infra.config import StackConfig
from infra.jobs import pod, queue
from infra.rendezvous import CLIENT_PORT, etcd_client_host

API_VERSION = "kubeflow.org/v1"
KIND = "PyTorchJob"
# The operator never reconciles running pods against a changed template, nor restarts a finished
# job: a change to these replaces the job. runPolicy (TTL, pod cleanup) is patched in place.
REPLACED_BY = ("pytorchReplicaSpecs", "elasticPolicy", "nprocPerNode")


def manifest(cfg: StackConfig) -> dict:
    elastic = {
        "rdzvBackend": "etcd-v2" if cfg.rendezvous == "etcd" else "c10d",
        "minReplicas": cfg.min_workers,
        "maxReplicas": cfg.max_workers,
        "maxRestarts": cfg.max_restarts,
    }
    if cfg.rendezvous == "etcd":
        elastic["rdzvHost"] = etcd_client_host(cfg)
        elastic["rdzvPort"] = CLIENT_PORT
    # c10d: the operator points torchrun at <job>-worker-0:23456 itself.
    spec = {
        "nprocPerNode": str(cfg.procs_per_worker),
        "elasticPolicy": elastic,
        "runPolicy": {
            "cleanPodPolicy": cfg.clean_pod_policy,
            "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
            # The operator compares this with the restarts of all pods together (PastBackoffLimit):
            # one event that restarts every worker (a node pool upgrade) counts `workers` times.
            "backoffLimit": cfg.workers * (cfg.max_restarts + 1),
            **queue_run_policy(cfg),
        },
        "pytorchReplicaSpecs": {
            "Worker": {
                "replicas": cfg.workers,
                # The launcher's exit codes: 1-127 permanent (an input error; attempts used up),
                # 128+ retryable (preempted, OOM-killed): the operator replaces the pod, which resumes.
                "restartPolicy": "ExitCode",
                "template": {"metadata": {"labels": labels(cfg.job_name, "worker")}, "spec": pod.pod_spec(cfg)},
            },
        },
    }
    # One job incarnation, one rendezvous: the id hashes what replaces the job (REPLACED_BY; the
    # launcher adds a generation when torchrun closed a previous one).
    elastic["rdzvId"] = pod.incarnation(cfg, {k: spec[k] for k in REPLACED_BY})
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": queue.queued(
            cfg,
            metadata(
                cfg.job_name,
                cfg.namespace,
                cfg.job_name,
                "training",
                # Return once submitted: training runs for hours, watch it with kubectl.
                annotations={"pulumi.com/skipAwait": "true"},
            ),
        ),
        "spec": spec,
    }


# Kueue (pkg/controller/jobs/kubeflow/kubeflowjob): admits the job as a whole through runPolicy.suspend
# (its webhook suspends a labelled job at creation; we create it suspended so no pod starts before
# admission even where the webhook is not in the path), and takes the Workload's priority from
# runPolicy.schedulingPolicy.priorityClass first, then the pod templates' priorityClassName.
IGNORED_AFTER_CREATE = ("spec.runPolicy.suspend",)  # Kueue's to change: a later `pulumi up` leaves it


def queue_run_policy(cfg: StackConfig) -> dict:
    policy: dict = {}
    if cfg.queue_name:
        policy["suspend"] = True
    if cfg.priority_class:
        # Also what the operator's gang scheduling (PodGroup) reads.
        policy["schedulingPolicy"] = {"priorityClass": cfg.priority_class}
    if cfg.active_deadline_seconds:
        # Counted from the job's start; at the deadline the operator deletes the pods (SIGTERM, grace period).
        policy["activeDeadlineSeconds"] = cfg.active_deadline_seconds
    return policy


def commands(cfg: StackConfig) -> dict[str, str]:
    ns, job = cfg.namespace, cfg.job_name
    return {
        **queue.commands(cfg, KIND),
        "watchJob": f"kubectl -n {ns} get pytorchjob {job} -w",
        "watchPods": f"kubectl -n {ns} get pods -l training.kubeflow.org/job-name={job} -w",
        "followLogs": f"kubectl -n {ns} logs -f {job}-worker-0 -c {pod.CONTAINER}",
    }


def runtime(cfg: StackConfig) -> None:
    """The job API's protocol: a PyTorchJob needs no runtime object."""
    return None


def rendezvous(job: dict) -> str:
    return job["spec"]["elasticPolicy"]["rdzvId"]
