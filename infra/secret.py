"""The Secret holding the Hugging Face token (only when the stack has one)."""

from __future__ import annotations

from typing import Optional

from infra.common import Names, metadata
from infra.config import TOKEN_KEY, StackConfig


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
