"""The ConfigMap carrying the trainer config (the contract in trainer/config.py)."""

from __future__ import annotations

from infra.common import Names, metadata
from infra.config import StackConfig

CONFIG_FILE = "config.yaml"


def config_map_manifest(cfg: StackConfig) -> dict:
    # cfg.trainer was validated by trainer.config at parse time; render it whole so the file in the
    # pod states every value the run uses, defaults included.
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(Names(cfg.job_name).config_map, cfg.namespace, cfg.job_name, "trainer-config"),
        "data": {CONFIG_FILE: cfg.trainer.to_yaml()},
    }
