"""A small pod that sleeps with the volume mounted, for `kubectl cp` on and off the volume; with
training.reportTo tensorboard, it also serves the job's TensorBoard events (to `kubectl port-forward`)."""

from __future__ import annotations

from typing import Any

from infra.common import APP_UID, Names, container_security_context, metadata, pod_security_context
from infra.config import DATA_MOUNT, StackConfig


def data_access_pod_manifest(cfg: StackConfig) -> dict:
    names = Names(cfg.job_name)
    pod: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(names.data_access, cfg.namespace, cfg.job_name, "data-access"),
        "spec": {
            "securityContext": pod_security_context(APP_UID),
            "automountServiceAccountToken": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "data-access",
                    "image": cfg.data_access_image,
                    "imagePullPolicy": "IfNotPresent",
                    # `sleep infinity` as PID 1 ignores SIGTERM; trap it so deletes are quick.
                    "command": ["sh", "-c", "trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done"],
                    "workingDir": DATA_MOUNT,
                    "securityContext": container_security_context(),
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "500m", "memory": "256Mi"}},
                    "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}],
                }
            ],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": names.claim}}],
        },
    }
    if "tensorboard" in cfg.trainer.training.trackers:
        pod["spec"]["containers"].append(tensorboard_container(cfg))
        pod["spec"]["volumes"].append({"name": "tensorboard-home", "emptyDir": {"sizeLimit": "1Gi"}})
    return pod


TENSORBOARD_PORT = 6006


def tensorboard_command(cfg: StackConfig) -> list[str]:
    """Every run of this job (one directory per run identity) side by side. Bound to the pod's
    loopback: reachable only through `kubectl port-forward` (the API server's authorisation), never
    from other pods or outside the cluster."""
    return [
        "python",
        "-m",
        "tensorboard.main",
        "--logdir",
        f"{DATA_MOUNT}/output/{cfg.job_name}",
        "--host",
        "127.0.0.1",
        "--port",
        str(TENSORBOARD_PORT),
        "--reload_interval",
        "30",
    ]


def tensorboard_container(cfg: StackConfig) -> dict:
    return {
        "name": "tensorboard",
        "image": cfg.image,  # the trainer image has tensorboard (docker/requirements.txt)
        "imagePullPolicy": cfg.image_pull_policy,
        "command": tensorboard_command(cfg),
        "env": [{"name": "HOME", "value": "/home/tensorboard"}, {"name": "TMPDIR", "value": "/home/tensorboard"}],
        "securityContext": container_security_context(),
        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "volumeMounts": [
            {"name": "data", "mountPath": DATA_MOUNT, "readOnly": True},
            {"name": "tensorboard-home", "mountPath": "/home/tensorboard"},
        ],
    }
