"""The Secrets: the Hugging Face token, and the trackers' credentials (each only when the stack has one)."""

from __future__ import annotations

from typing import Optional

from infra.common import Names, metadata
from infra.config import TOKEN_KEY, TRACKER_SECRETS, StackConfig


def secret_manifest(cfg: StackConfig) -> Optional[dict]:
    """Metadata and type of the token Secret; its data is added from the secret Output, never here."""
    if not cfg.has_token:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(Names(cfg.job_name).secret, cfg.namespace, cfg.job_name, "credentials"),
        "type": "Opaque",
        "immutable": False,
        "stringData": {TOKEN_KEY: "<from pulumi config --secret hfToken>"},
    }


def tracking_secret_manifest(cfg: StackConfig) -> Optional[dict]:
    """Metadata of the trackers' Secret (keys: mlflow-token, wandb-api-key); values from secret Outputs."""
    if not cfg.tracker_secrets:
        return None
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(Names(cfg.job_name).tracking_secret, cfg.namespace, cfg.job_name, "credentials"),
        "type": "Opaque",
        "stringData": {TRACKER_SECRETS[k][1]: f"<from pulumi config --secret {k}>" for k in cfg.tracker_secrets},
    }
