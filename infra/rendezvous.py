"""etcd rendezvous for torchrun's etcd-v2 backend: StatefulSet, Services and a NetworkPolicy.

Only in-cluster Services (the seed published an unauthenticated etcd through a LoadBalancer), and a
NetworkPolicy that admits the client port only from this job's worker pods.
"""

from __future__ import annotations

from infra.common import ETCD_UID, Names, container_security_context, labels, metadata, pod_security_context, selector
from infra.config import StackConfig

CLIENT_PORT = 2379
PEER_PORT = 2380


def etcd_client_host(cfg: StackConfig) -> str:
    return f"{Names(cfg.job_name).etcd_client}.{cfg.namespace}.svc"


def _member_url(cfg: StackConfig, member: str, port: int) -> str:
    names = Names(cfg.job_name)
    return f"http://{member}.{names.etcd_peers}.{cfg.namespace}.svc:{port}"


def etcd_manifests(cfg: StackConfig) -> list[dict]:
    """StatefulSet, headless peer Service, ClusterIP client Service, NetworkPolicy; none for c10d."""
    if cfg.rendezvous != "etcd":
        return []
    names = Names(cfg.job_name)
    members = [f"{names.etcd}-{i}" for i in range(cfg.etcd_replicas)]
    initial_cluster = ",".join(f"{m}={_member_url(cfg, m, PEER_PORT)}" for m in members)
    pod_labels = labels(cfg.job_name, "etcd")
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(names.etcd, cfg.namespace, cfg.job_name, "etcd"),
        "spec": {
            "serviceName": names.etcd_peers,
            "replicas": cfg.etcd_replicas,
            # All members must start together to form the initial cluster.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector(cfg.job_name, "etcd")},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "securityContext": pod_security_context(ETCD_UID),
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "etcd",
                            "image": cfg.etcd_image,
                            "imagePullPolicy": "IfNotPresent",
                            "command": ["etcd"],
                            "args": [
                                "--name=$(POD_NAME)",
                                "--data-dir=/var/lib/etcd/data",
                                # torchrun's etcd / etcd-v2 rendezvous speaks the v2 API only.
                                "--enable-v2=true",
                                f"--listen-client-urls=http://0.0.0.0:{CLIENT_PORT}",
                                f"--advertise-client-urls=http://$(POD_NAME).{names.etcd_peers}.{cfg.namespace}.svc:{CLIENT_PORT}",
                                f"--listen-peer-urls=http://0.0.0.0:{PEER_PORT}",
                                f"--initial-advertise-peer-urls=http://$(POD_NAME).{names.etcd_peers}.{cfg.namespace}.svc:{PEER_PORT}",
                                f"--initial-cluster={initial_cluster}",
                                "--initial-cluster-state=new",
                                f"--initial-cluster-token={cfg.job_name}",
                            ],
                            "env": [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
                            "ports": [
                                {"name": "client", "containerPort": CLIENT_PORT},
                                {"name": "peer", "containerPort": PEER_PORT},
                            ],
                            "readinessProbe": {
                                "httpGet": {"path": "/health", "port": CLIENT_PORT},
                                "periodSeconds": 5,
                                "failureThreshold": 3,
                            },
                            "securityContext": container_security_context(),
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "128Mi"},
                                "limits": {"cpu": "1", "memory": "512Mi"},
                            },
                            # A persistent data directory per member: a restarted member keeps its member id
                            # and rejoins (on an empty emptyDir with --initial-cluster-state=new it panics),
                            # and the rendezvous state (which generations are closed) survives an etcd restart.
                            "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
                        }
                    ],
                },
            },
            "volumeClaimTemplates": [
                {
                    "metadata": {"name": "data", "labels": pod_labels},
                    "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": cfg.etcd_storage}}},
                }
            ],
            # pulumi destroy deletes the StatefulSet; its members' volumes go with it.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
        },
    }
    peers = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(names.etcd_peers, cfg.namespace, cfg.job_name, "etcd"),
        "spec": {
            "clusterIP": "None",
            # Members must resolve each other before they are ready, or the cluster never forms.
            "publishNotReadyAddresses": True,
            "selector": selector(cfg.job_name, "etcd"),
            "ports": [
                {"name": "client", "port": CLIENT_PORT, "targetPort": CLIENT_PORT},
                {"name": "peer", "port": PEER_PORT, "targetPort": PEER_PORT},
            ],
        },
    }
    client = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(names.etcd_client, cfg.namespace, cfg.job_name, "etcd"),
        "spec": {
            "type": "ClusterIP",  # in-cluster only
            "selector": selector(cfg.job_name, "etcd"),
            "ports": [{"name": "client", "port": CLIENT_PORT, "targetPort": CLIENT_PORT}],
        },
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(names.etcd, cfg.namespace, cfg.job_name, "etcd"),
        "spec": {
            "podSelector": {"matchLabels": selector(cfg.job_name, "etcd")},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": selector(cfg.job_name, "worker")}}],
                    "ports": [{"protocol": "TCP", "port": CLIENT_PORT}],
                },
                # Members talk to each other (peer port; client port for health checks).
                {
                    "from": [{"podSelector": {"matchLabels": selector(cfg.job_name, "etcd")}}],
                    "ports": [{"protocol": "TCP", "port": PEER_PORT}, {"protocol": "TCP", "port": CLIENT_PORT}],
                },
            ],
        },
    }
    return [statefulset, peers, client, policy]
