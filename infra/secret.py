"""The Secrets: the Hugging Face token, and the trackers' credentials (each only when the stack has one).
Their data is added from secret Outputs in infra/component.py, never here (the placeholders say which)."""

from __future__ import annotations

from typing import Optional

from infra.common import Names, metadata
from infra.config import TOKEN_KEY, TRACKER_SECRETS, StackConfig


def _secret(cfg: StackConfig, name: str, keys: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(name, cfg.namespace, cfg.job_name, "credentials"),
        "type": "Opaque",
        "immutable": False,
        "stringData": {key: f"<from pulumi config --secret {stack_key}>" for key, stack_key in keys.items()},
    }


def secret_manifest(cfg: StackConfig) -> Optional[dict]:
    """The token Secret (key `token`)."""
    return _secret(cfg, Names(cfg.job_name).secret, {TOKEN_KEY: "hfToken"}) if cfg.has_token else None


def tracking_secret_manifest(cfg: StackConfig) -> Optional[dict]:
    """The trackers' Secret (keys mlflow-token, wandb-api-key: those the stack has)."""
    if not cfg.tracker_secrets:
        return None
    return _secret(cfg, Names(cfg.job_name).tracking_secret, {TRACKER_SECRETS[k][1]: k for k in cfg.tracker_secrets})
