"""Names, labels and the restricted security settings every module shares."""

from __future__ import annotations

from dataclasses import dataclass

# One uid/gid for every pod that writes to the shared volume (trainer image user, data-access pod),
# so files copied on with `kubectl cp` are readable by the workers and vice versa.
APP_UID = 1000
ETCD_UID = 65532


@dataclass(frozen=True)
class Names:
    """Kubernetes object names, all derived from the job name."""

    job: str

    @property
    def claim(self) -> str:
        return f"{self.job}-data"

    @property
    def secret(self) -> str:
        return f"{self.job}-hf-token"

    @property
    def tracking_secret(self) -> str:
        return f"{self.job}-tracking"

    @property
    def runtime(self) -> str:
        return f"{self.job}-runtime"

    @property
    def config_map(self) -> str:
        return f"{self.job}-config"

    @property
    def volume_prep(self) -> str:
        return f"{self.job}-volume-prep"

    @property
    def data_access(self) -> str:
        return f"{self.job}-data-access"

    @property
    def etcd(self) -> str:
        return f"{self.job}-etcd"

    @property
    def etcd_peers(self) -> str:
        return f"{self.job}-etcd-peers"

    @property
    def etcd_client(self) -> str:
        return f"{self.job}-etcd-client"


def labels(job: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "llm-finetune",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": "pulumi",
    }


def selector(job: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/instance": job, "app.kubernetes.io/component": component}


def metadata(name: str, namespace: str, job: str, component: str, **extra) -> dict:
    meta = {"name": name, "namespace": namespace, "labels": labels(job, component)}
    meta.update(extra)
    return meta


def pod_security_context(uid: int, fs_group: bool = True) -> dict:
    """Pod-level half of the restricted Pod Security Standard."""
    ctx = {"runAsNonRoot": True, "runAsUser": uid, "runAsGroup": uid, "seccompProfile": {"type": "RuntimeDefault"}}
    if fs_group:
        ctx["fsGroup"] = uid
        ctx["fsGroupChangePolicy"] = "OnRootMismatch"  # no recursive chown of a large volume on every start
    return ctx


def container_security_context(read_only_root: bool = True) -> dict:
    """Container-level half of the restricted Pod Security Standard."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": read_only_root,
        "runAsNonRoot": True,
    }
