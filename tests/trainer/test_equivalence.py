"""Packing changes the work, not the optimization: on the same micro-batches, this trainer (packed,
padding-free, variable-length attention, loss over labelled positions only, fused AdamW) ends at the
weights of the Hugging Face Trainer's padded recipe — the benchmark's baseline, bench/hf_baseline.py,
which trains on our batch order so that the two compare like for like."""

import importlib.util
import math
import sys
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import write_config
from trainer.config import load_config
from trainer.train import finetune

ROOT = Path(__file__).resolve().parents[2]


def _hf_baseline():
    spec = importlib.util.spec_from_file_location("hf_baseline", ROOT / "bench" / "hf_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k].float() ** 2).sum()) for k in b))


def test_packed_training_ends_where_the_hf_trainer_padded_ends_on_the_same_batches(
        tmp_path, tiny_model, flashcards_file, monkeypatch):
    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "ours",
                            data={"validation_fraction": 0.0},
                            training={"max_steps": 12, "learning_rate": 0.003, "per_device_train_batch_size": 4,
                                      "lr_scheduler_type": "linear", "save_steps": 1000, "logging_steps": 4})
    summary = finetune(load_config(cfg_path))
    assert summary["packing"] == "packed, variable-length attention", summary
    monkeypatch.setattr(sys, "argv", ["hf_baseline", "--config", str(cfg_path), "--mode", "padded",
                                      "--out", str(tmp_path / "hf")])
    assert _hf_baseline().main() == 0
    base = load_file(str(tiny_model / "model.safetensors"))
    ours = load_file(str(tmp_path / "ours" / "final" / "model.safetensors"))
    hf = load_file(str(tmp_path / "hf" / "final" / "model.safetensors"))
    assert _rel(base, hf) > 1e-2  # it trained
    assert _rel(ours, hf) < 1e-4, _rel(ours, hf)  # and to the same weights (summation order aside)
