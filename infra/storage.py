"""The optional StorageClass and the volume claim every worker shares."""

from __future__ import annotations

from typing import Optional

from infra.common import APP_UID, Names, labels, metadata
from infra.config import StackConfig


def storage_class_manifest(cfg: StackConfig) -> Optional[dict]:
    """A StorageClass only when the stack asks for one (storage.createClass)."""
    s = cfg.storage
    if not s.create_class or not s.class_name:
        return None
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        # Cluster-scoped: no namespace.
        "metadata": {k: v for k, v in metadata(s.class_name, "", cfg.job_name, "storage").items() if k != "namespace"},
        "provisioner": s.provisioner,
        "parameters": dict(s.parameters),
        # Delete: the disk goes when its claim is deleted (a Retain class left a billed volume behind
        # after `kubectl delete pvc`). Keeping the model is the claim's job: storage.retainOnDestroy.
        "reclaimPolicy": "Delete",
        "volumeBindingMode": s.volume_binding_mode,
        "allowVolumeExpansion": True,
    }


def claim_manifest(cfg: StackConfig) -> dict:
    s = cfg.storage
    spec = {"accessModes": [s.access_mode], "resources": {"requests": {"storage": s.size}}}
    if s.class_name:
        spec["storageClassName"] = s.class_name
    annotations = {
        # WaitForFirstConsumer classes bind only once a pod mounts the claim; waiting for Bound here
        # would deadlock with the data-access pod that depends on it.
        "pulumi.com/skipAwait": "true",
    }
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(Names(cfg.job_name).claim, cfg.namespace, cfg.job_name, "storage", annotations=annotations),
        "spec": spec,
    }


PREPARED_MARKER = ".llm-finetune-prepared"


def ownership_job_manifest(cfg: StackConfig) -> Optional[dict]:
    """A one-shot Job that makes the volume's top directories writable by the pods' uid.

    Kubernetes applies fsGroup only to volumes whose CSI driver supports it, which NFS-like
    ReadWriteMany shares (NFS, Filestore, EFS) do not: a fresh share is root-owned and the non-root
    workers cannot create /data/cache or /data/output. Changing the owner needs root with CHOWN (and
    FOWNER/DAC_OVERRIDE for a share already holding files): this Job is the one place that asks for
    more than the restricted Pod Security Standard (it meets baseline), runs once per volume (a marker
    file), touches only /data, /data/cache and /data/output, and can be switched off
    (storage.prepareOwnership: false) for a share that is already writable by uid 1000."""
    if not cfg.storage.prepare_ownership:
        return None
    names = Names(cfg.job_name)
    uid = APP_UID
    script = (
        f"set -e; if [ -f /data/{PREPARED_MARKER} ]; then echo 'volume already prepared'; exit 0; fi; "
        f"mkdir -p /data/cache /data/output; chown {uid}:{uid} /data /data/cache /data/output; "
        f"chmod 2775 /data /data/cache /data/output; touch /data/{PREPARED_MARKER}; "
        f"chown {uid}:{uid} /data/{PREPARED_MARKER}; echo 'volume prepared for uid {uid}'"
    )
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(names.volume_prep, cfg.namespace, cfg.job_name, "volume-prep"),
        "spec": {
            "backoffLimit": 3,
            "template": {
                "metadata": {"labels": labels(cfg.job_name, "volume-prep")},
                "spec": {
                    "restartPolicy": "OnFailure",
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsUser": 0,
                        "runAsGroup": 0,
                        "runAsNonRoot": False,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "prepare",
                            "image": cfg.data_access_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["sh", "-c", script],
                            "securityContext": {
                                "allowPrivilegeEscalation": False,
                                "readOnlyRootFilesystem": True,
                                "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "FOWNER", "DAC_OVERRIDE"]},
                            },
                            "resources": {
                                "requests": {"cpu": "10m", "memory": "16Mi"},
                                "limits": {"cpu": "200m", "memory": "64Mi"},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                        }
                    ],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": names.claim}}],
                },
            },
        },
    }
