"""The ConfigMap carrying the trainer config (the contract in trainer/config.py)."""

from __future__ import annotations

from infra.common import Names, metadata
from infra.config import StackConfig

CONFIG_FILE = "config.yaml"


def config_map_name(cfg: StackConfig) -> str:
    """Named by the run: a changed config is a new, immutable ConfigMap, so a pod of the job being
    replaced can never read the next run's config (a mounted ConfigMap is updated in place)."""
    return f"{Names(cfg.job_name).config_map}-{cfg.run_hash}"


def config_map_manifest(cfg: StackConfig) -> dict:
    # cfg.trainer was validated by trainer.config at parse time; render it whole so the file in the
    # pod states every value the run uses, defaults included.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(config_map_name(cfg), cfg.namespace, cfg.job_name, "trainer-config"),
        "immutable": True,
        "data": {CONFIG_FILE: cfg.trainer.to_yaml()},
    }
