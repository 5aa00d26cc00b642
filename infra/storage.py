"""The optional StorageClass and the volume claim every worker shares."""

from __future__ import annotations

from typing import Optional

from infra.common import Names, metadata
from infra.config import StackConfig


def storage_class_manifest(cfg: StackConfig) -> Optional[dict]:
    """A StorageClass only when the stack asks for one (storage.createClass)."""
    s = cfg.storage
    if not s.create_class:
        return None
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        # Cluster-scoped: no namespace.
        "metadata": {k: v for k, v in metadata(s.class_name, "", cfg.job_name, "storage").items() if k != "namespace"},
        "provisioner": s.provisioner,
        "parameters": dict(s.parameters),
        # Retain: deleting the claim must not delete the fine-tuned model with it.
        "reclaimPolicy": "Retain" if s.retain_on_destroy else "Delete",
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
        "metadata": metadata(Names(cfg.job_name).claim, cfg.namespace, cfg.job_name, "storage",
                             annotations=annotations),
        "spec": spec,
    }
