"""The worker pod both job APIs run: container, command, environment, volumes, security.

PyTorchJob (Training Operator v1) and TrainJob (Trainer v2) are two renderings of this one pod.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from infra.common import APP_UID, Names, container_security_context, pod_security_context
from infra.config import CONFIG_MOUNT, DATA_MOUNT, TOKEN_KEY, TOKEN_MOUNT, TRACKER_SECRETS, TRACKING_MOUNT, StackConfig
from infra.trainer_config import config_map_name
from trainer import envvars
from trainer.config import CREDENTIAL_FILES

CONTAINER = "pytorch"  # the Training Operator requires this name; Trainer v2's torch runtime uses "node"


def trainer_command(cfg: StackConfig) -> list[str]:
    """The pod's entry point: the launcher supervises torchrun (trainer/runtime/launch.py). No --nnodes,
    --nproc-per-node or --rdzv-*: the operator injects them as PET_* variables, which torchrun reads.
    docker/ images put python and the trainer package on PATH/PYTHONPATH; tests/test_docker.py checks."""
    return ["python", "-m", "trainer.runtime.launch", "finetune", "--config", cfg.config_path]


# Runtime settings for the CPU image (docker/Dockerfile.cpu installs these libraries at these paths):
# jemalloc + Intel OpenMP, thread pinning (PyTorch's CPU tuning guide; no Intel extension involved).
CPU_RUNTIME_ENV = {
    "LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2:/opt/venv/lib/libiomp5.so",
    "MALLOC_CONF": "oversize_threshold:1,background_thread:true,metadata_thp:auto",
    "KMP_AFFINITY": "granularity=fine,compact,1,0",
    "KMP_BLOCKTIME": "1",
}


def env(cfg: StackConfig) -> list[dict]:
    values = {
        "HF_HOME": f"{DATA_MOUNT}/cache/huggingface",  # downloads land on the shared volume, once
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "PYTHONUNBUFFERED": "1",
        envvars.LOG_FORMAT: "plain",  # plain log lines in pods, a progress bar locally
        # The launcher: how long a preempted pod has to save, and how often torchrun is started again.
        envvars.GRACE_SECONDS: str(cfg.grace_seconds),
        envvars.LAUNCH_ATTEMPTS: str(cfg.launch_attempts),
    }
    if cfg.has_token:
        # huggingface_hub reads the token from this file; the value is never in the pod spec.
        values[envvars.TOKEN_PATH] = f"{TOKEN_MOUNT}/{TOKEN_KEY}"
    for key in cfg.tracker_secrets:
        # Paths, not values: the trainer reads the credential from the mounted file (trainer/monitor/tracking.py).
        tracker, item = TRACKER_SECRETS[key]
        values[CREDENTIAL_FILES[tracker]] = f"{TRACKING_MOUNT}/{item}"
    if cfg.intel_runtime:
        values.update(CPU_RUNTIME_ENV)
    values.update(dict(cfg.extra_env))
    # An empty value is written as no value (the same variable, set empty): Go clients drop `value: ""`
    # when they write the object back, which on a TrainJob's immutable spec.trainer is a CEL failure.
    return [{"name": k, "value": v} if v != "" else {"name": k} for k, v in values.items()]


def resources(cfg: StackConfig) -> dict:
    r = cfg.resources
    # Requests equal limits: Guaranteed QoS, so training is neither CPU-throttled below what it
    # asked for nor the first to be evicted under memory pressure.
    amounts = {"cpu": r.cpu, "memory": r.memory}
    if r.gpus:
        amounts["nvidia.com/gpu"] = str(r.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def volumes(cfg: StackConfig) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): the shared claim, the trainer config, the token, /dev/shm, /tmp."""
    names = Names(cfg.job_name)
    mounts: list[dict[str, Any]] = [
        {"name": "data", "mountPath": DATA_MOUNT},
        {"name": "trainer-config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    vols: list[dict[str, Any]] = [
        {"name": "data", "persistentVolumeClaim": {"claimName": names.claim}},
        {"name": "trainer-config", "configMap": {"name": config_map_name(cfg)}},
        # The container runtime's 64 MiB /dev/shm breaks collectives and data loading.
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cfg.resources.shm_size}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if cfg.has_token:
        mounts.append({"name": "hf-token", "mountPath": TOKEN_MOUNT, "readOnly": True})
        vols.append(
            {
                "name": "hf-token",
                "secret": {"secretName": names.secret, "defaultMode": 0o440, "items": [{"key": TOKEN_KEY, "path": TOKEN_KEY}]},
            }
        )
    if cfg.tracker_secrets:
        mounts.append({"name": "tracking", "mountPath": TRACKING_MOUNT, "readOnly": True})
        vols.append(
            {
                "name": "tracking",
                "secret": {
                    "secretName": names.tracking_secret,
                    "defaultMode": 0o440,
                    "items": [{"key": TRACKER_SECRETS[k][1], "path": TRACKER_SECRETS[k][1]} for k in cfg.tracker_secrets],
                },
            }
        )
    return vols, mounts


def container(cfg: StackConfig, name: str = CONTAINER) -> dict:
    _, mounts = volumes(cfg)
    return {
        "name": name,
        "image": cfg.image,
        "imagePullPolicy": cfg.image_pull_policy,
        "command": trainer_command(cfg),
        "env": env(cfg),
        "resources": resources(cfg),
        # Root filesystem stays writable: compilers and kernel caches write under $HOME.
        "securityContext": container_security_context(read_only_root=False),
        "volumeMounts": mounts,
    }


def pod_spec(cfg: StackConfig) -> dict:
    vols, _ = volumes(cfg)
    spec = {
        "securityContext": pod_security_context(APP_UID),
        "automountServiceAccountToken": False,
        # SIGTERM -> the launcher asks the workers to save at the next step; SIGKILL after this.
        "terminationGracePeriodSeconds": cfg.grace_seconds,
        "containers": [container(cfg)],
        "volumes": vols,
    }
    spec.update(placement(cfg))
    if cfg.priority_class:
        # Preemption by a higher class is the SIGTERM path: save at the next step, resume on return.
        spec["priorityClassName"] = cfg.priority_class
    return spec


def placement(cfg: StackConfig) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if cfg.resources.node_selector:
        out["nodeSelector"] = dict(cfg.resources.node_selector)
    if cfg.resources.tolerations:
        out["tolerations"] = [{k: v for k, v in vars(t).items() if v is not None} for t in cfg.resources.tolerations]
    return out


def incarnation(cfg: StackConfig, spec: Any) -> str:
    """`<jobName>-<hash of the job spec>`: the rendezvous id of one job incarnation. A changed spec
    (config, image, resources, workers, runId) means a new job and a rendezvous never used before."""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{cfg.job_name}-{digest}"
