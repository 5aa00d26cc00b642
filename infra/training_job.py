"""The Kubeflow PyTorchJob that runs `torchrun -m trainer finetune` in every worker pod."""

from __future__ import annotations

from infra.common import APP_UID, Names, container_security_context, labels, metadata, pod_security_context
from infra.config import CONFIG_MOUNT, DATA_MOUNT, TOKEN_KEY, TOKEN_MOUNT, StackConfig
from infra.rendezvous import CLIENT_PORT, etcd_client_host

# The container command. docker/ images put `torchrun` and the trainer package on PATH/PYTHONPATH;
# tests/infra check the Dockerfiles against this.
TRAINER_MODULE = "trainer"


def trainer_command(cfg: StackConfig) -> list[str]:
    # No --nnodes/--nproc-per-node/--rdzv-*: the operator injects them as PET_* variables from
    # elasticPolicy and nprocPerNode, and torchrun reads those.
    return ["torchrun", "-m", TRAINER_MODULE, "finetune", "--config", cfg.config_path]


# Runtime settings for the Intel Xeon image (docker/Dockerfile.cpu installs these libraries at
# these paths): oneCCL progress threads, jemalloc + Intel OpenMP, thread pinning.
INTEL_ENV = {
    "CCL_WORKER_COUNT": "1",
    "CCL_ATL_TRANSPORT": "ofi",
    "FI_PROVIDER": "tcp",
    "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2:/opt/venv/lib/libiomp5.so",
    "MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto",
    "KMP_AFFINITY": "granularity=fine,compact,1,0",
    "KMP_BLOCKTIME": "1",
}


def _env(cfg: StackConfig) -> list[dict]:
    env = {
        "HF_HOME": f"{DATA_MOUNT}/cache/huggingface",  # downloads land on the shared volume, once
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        "LLM_FINETUNE_LOG_FORMAT": "plain",  # plain log lines in pods, a progress bar locally
    }
    if cfg.has_token:
        # huggingface_hub reads the token from this file; the value is never in the pod spec.
        env["HF_TOKEN_PATH"] = f"{TOKEN_MOUNT}/{TOKEN_KEY}"
    if cfg.intel_runtime:
        env.update(INTEL_ENV)
    env.update(dict(cfg.extra_env))
    return [{"name": k, "value": v} for k, v in env.items()]


def _resources(cfg: StackConfig) -> dict:
    r = cfg.resources
    # Requests equal limits: Guaranteed QoS, so training is neither CPU-throttled below what it
    # asked for nor the first to be evicted under memory pressure.
    amounts = {"cpu": r.cpu, "memory": r.memory}
    if r.gpus:
        amounts["nvidia.com/gpu"] = str(r.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def pytorchjob_manifest(cfg: StackConfig) -> dict:
    names = Names(cfg.job_name)
    mounts = [
        {"name": "data", "mountPath": DATA_MOUNT},
        {"name": "trainer-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes = [
        {"name": "data", "persistentVolumeClaim": {"claimName": names.claim}},
        {"name": "trainer-config", "configMap": {"name": names.config_map}},
        # The container runtime's 64 MiB /dev/shm breaks collectives and data loading.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if cfg.has_token:
        mounts.append({"name": "hf-token", "mountPath": TOKEN_MOUNT, "readOnly": True})
        volumes.append({"name": "hf-token", "secret": {"secretName": names.secret, "defaultMode": 0o440,
                                                       "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]}})
    pod_spec = {
        "securityContext": pod_security_context(APP_UID),
        "automountServiceAccountToken": False,
        "containers": [{
            "name": "pytorch",  # the operator requires this name
            "image": cfg.image,
            "imagePullPolicy": cfg.image_pull_policy,
            "command": trainer_command(cfg),
            "env": _env(cfg),
            "resources": _resources(cfg),
            # Root filesystem stays writable: compilers and kernel caches write under $HOME.
            "securityContext": container_security_context(read_only_root=False),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if cfg.resources.node_selector:
        pod_spec["nodeSelector"] = dict(cfg.resources.node_selector)
    if cfg.resources.tolerations:
        pod_spec["tolerations"] = [{k: v for k, v in vars(t).items() if v is not None}
                                   for t in cfg.resources.tolerations]
    elastic = {
        "rdzvBackend": "etcd-v2" if cfg.rendezvous == "etcd" else "c10d",
        "rdzvId": cfg.job_name,
        "minReplicas": cfg.min_workers,
        "maxReplicas": cfg.max_workers,
        "maxRestarts": cfg.max_restarts,
    }
    if cfg.rendezvous == "etcd":
        elastic["rdzvHost"] = etcd_client_host(cfg)
        elastic["rdzvPort"] = CLIENT_PORT
    # c10d: the operator points torchrun at <job>-worker-0:23456 itself.
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata(cfg.job_name, cfg.namespace, cfg.job_name, "training",
                             # Return once submitted: training runs for hours, watch it with kubectl.
                             annotations={"pulumi.com/skipAwait": "true"}),
        "spec": {
            "nprocPerNode": str(cfg.procs_per_worker),
            "elasticPolicy": elastic,
            "runPolicy": {
                "cleanPodPolicy": cfg.clean_pod_policy,
                "ttlSecondsAfterFinished": cfg.ttl_seconds_after_finished,
                "backoffLimit": cfg.max_restarts + 1,
            },
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": cfg.workers,
                    # Pod-level restarts on failure; torchrun restarts its processes first.
                    "restartPolicy": "OnFailure",
                    "template": {"metadata": {"labels": labels(cfg.job_name, "worker")}, "spec": pod_spec},
                },
            },
        },
    }
