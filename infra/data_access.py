"""A small pod that sleeps with the volume mounted, for `kubectl cp` on and off the volume."""

from __future__ import annotations

from infra.common import APP_UID, Names, container_security_context, metadata, pod_security_context
from infra.config import DATA_MOUNT, StackConfig


def data_access_pod_manifest(cfg: StackConfig) -> dict:
    names = Names(cfg.job_name)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata(names.data_access, cfg.namespace, cfg.job_name, "data-access"),
        "spec": {
            "securityContext": pod_security_context(APP_UID),
            "automountServiceAccountToken": False,
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "data-access",
                "image": cfg.data_access_image,
                "imagePullPolicy": "IfNotPresent",
                # `sleep infinity` as PID 1 ignores SIGTERM; trap it so deletes are quick.
                "command": ["sh", "-c", "trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done"],
                "workingDir": DATA_MOUNT,
                "securityContext": container_security_context(),
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"},
                              "limits": {"cpu": "500m", "memory": "256Mi"}},
                "volumeMounts": [{"name": "data", "mountPath": DATA_MOUNT}],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": names.claim}}],
        },
    }
