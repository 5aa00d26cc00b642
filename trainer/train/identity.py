"""What a run is, and whether a checkpoint may be resumed into it (the resume guard).

One rule, documented in the README: **what a checkpoint already holds cannot change; what happens
after it can.** A checkpoint records the base model's weights fingerprint, the training precision,
the LoRA settings, the optimizer, the data (its content and how it is turned into examples) and the
data order (seed, batch size, accumulation). A resume where any of those differ is refused in one
line naming the key, the old and the new value, before any compute. The schedule — learning rate,
scheduler, warm-up, length, weight decay, clipping — shapes only the steps still to come: a change is
applied from the checkpoint's step and logged.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from trainer.config import TrainerConfig

SCHEDULE_KEYS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "warmup_ratio",
    "max_steps",
    "num_train_epochs",
    "weight_decay",
    "max_grad_norm",
)
_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024


def weights_fingerprint(model_dir: str) -> str:
    """A fingerprint of a saved model's weights without reading them all: its config, each weight
    file's size and header (tensor names, shapes, dtypes, offsets) and 16 evenly spaced 64 KiB samples
    of its bytes. Two base models of the same shapes differ in every sample."""
    h = hashlib.sha256()
    root = Path(model_dir)
    config = root / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_SAMPLE_BYTES))  # the safetensors header (and the start of the data)
            for i in range(1, _SAMPLES + 1):
                fh.seek(max(0, size * i // (_SAMPLES + 1)))
                h.update(fh.read(_SAMPLE_BYTES))
    return h.hexdigest()[:16]


def guarded(cfg: TrainerConfig, weights: str, data: str, precision: str, lora_targets: Any) -> dict[str, Any]:
    """The values a checkpoint holds, by config key: any change means a different training."""
    t = cfg.training
    data_keys = {
        f"data.{k}": v
        for k, v in cfg.to_dict()["data"].items()
        if k not in ("file_wait_seconds", "file_settle_seconds", "cache_dir")
    }
    out = {
        "model.weights": weights,
        "model.dtype": precision,
        "data.content": data,
        **data_keys,
        "training.seed": t.seed,
        "training.per_device_train_batch_size": t.per_device_train_batch_size,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "training.optim": t.optim,
        "training.tokens_per_micro_batch": t.tokens_per_micro_batch,
        "lora.enabled": cfg.lora.enabled,
    }
    if cfg.lora.enabled:
        out.update(
            {
                "lora.r": cfg.lora.r,
                "lora.alpha": cfg.lora.alpha,
                "lora.target_modules": lora_targets,
                "lora.modules_to_save": list(cfg.lora.modules_to_save),
            }
        )
        if cfg.lora.base_bits:  # absent for a base in model.dtype: checkpoints from before the key resume
            out["lora.base_bits"] = cfg.lora.base_bits
    return json.loads(json.dumps(out))  # as state.json will hold it (tuples become lists)


def schedule(cfg: TrainerConfig) -> dict[str, Any]:
    return {f"training.{k}": getattr(cfg.training, k) for k in SCHEDULE_KEYS}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, current value) for every key that differs. LoRA switched on or off
    is the one difference worth naming: its settings exist on one side only."""
    keys = sorted(set(saved) | set(current))
    found = [(k, saved.get(k), current.get(k)) for k in keys if saved.get(k) != current.get(k)]
    if any(k == "lora.enabled" for k, _, _ in found):
        found = [d for d in found if not d[0].startswith("lora.") or d[0] == "lora.enabled"]
    return found


def describe(key: str, old: Any, new: Any) -> str:
    short = {
        "model.weights": "the base model's weights",
        "data.content": "the data's content",
        "model.dtype": "the weights' precision",
    }
    if key in short:
        return (
            f"{short[key]} changed (fingerprint {old} -> {new})"
            if key != "model.dtype"
            else f"model.dtype: the weights were {old}, now {new}"
        )
    return f"{key} was {old!r}, now {new!r}"
