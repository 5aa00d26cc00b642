"""`make demo`'s program (its 12 steps): a real pretrained model (SmolLM2, from its GGUF file) fine-tuned
with LoRA on real text through its chat template on 2 processes gets measurably better, and its
quantized formats are measured in their engines; every promised artefact is left behind."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.integration.procs import ROOT, env

pytestmark = pytest.mark.slow


def test_demo_fine_tunes_a_real_model_that_gets_better(tmp_path, smollm2, smollm2_gguf):
    from trainer.model import gguf

    # The demo's GGUF cache, pre-filled with the session's dequantized copy (the demo makes it itself
    # on a first run: tests/trainer/test_gguf.py covers that path).
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / gguf.cache_key(smollm2_gguf, torch.float32)).symlink_to(smollm2)
    rendezvous = "etcd" if shutil.which("etcd") else "c10d"
    result = subprocess.run([sys.executable, "-m", "trainer.dev.demo", "--out", str(tmp_path), "--steps", "12",
                             "--rendezvous", rendezvous], capture_output=True, text=True, env=env(), cwd=ROOT,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "output"
    for artefact in ("final/config.json", "final/model.safetensors", "adapter/adapter_model.safetensors",
                     "quantized/config.json", "quantized-gguf-q8_0/model-q8_0.gguf", "report.json", "report.md",
                     "loss_curve.png", "quantization.png", "metrics.jsonl"):
        assert (out / artefact).exists(), artefact
    assert "world 2" in result.stderr and "read from its dequantized copy" in result.stderr
    report = json.loads((out / "report.json").read_text())
    t, q = report["training"], report["quantize"]

    # It learnt: the held-out loss (functions never trained on) falls by at least 10% in 12 steps (the demo's own count).
    assert t["eval_loss"] <= 0.9 * t["eval_loss_before"], (t["eval_loss_before"], t["eval_loss"])
    assert "base model before training: validation loss" in result.stderr  # eval_on_start, before step 1
    # Three held-out questions, answered by the base and the fine-tuned model (the trainer), and by each
    # quantized format in its engine.
    samples = t["samples"]
    assert len(samples) == 3 and all(s["base"] and s["fine_tuned"] for s in samples)
    assert any(s["base"] != s["fine_tuned"] for s in samples)
    assert [s["prompt"] for s in q["samples"]] == [s["prompt"] for s in samples]

    # Quantized means smaller on a real model (tied 49k x 576 embedding included), at a measured cost.
    assert q["format"] == "compressed-tensors" and q["engine"] == "transformers"
    assert q["size_bytes_after"] < 0.4 * q["size_bytes_before"]
    assert q["algorithm"] == "opt-rtn" and q["perplexity_after"] / q["perplexity_before"] <= 1.10  # 4-bit: +10% at most
    g = report["quantize_also"]["gguf:q8_0"]
    assert g["engine"] == "llama.cpp" and g["size_bytes_after"] < 0.3 * g["size_bytes_before"]  # fp32 -> q8_0
    assert g["perplexity_after"] / g["perplexity_before"] < 1.01
    # q8_0 in llama.cpp answers as final/ does in transformers, greedily, for at least 2 of 3 prompts.
    same = sum(a["after"] == b["before"] for a, b in zip(g["samples"], q["samples"]))
    assert same >= 2, [(a["after"], b["before"]) for a, b in zip(g["samples"], q["samples"])]

    md = (out / "report.md").read_text()
    assert "What the fine-tune gained" in md and "**base model**" in md and "gguf:q8_0 in llama.cpp" in md
    assert "validation loss" in result.stderr.strip().splitlines()[-1]  # the run's last line says what it gained
    assert "what it gained" in result.stdout and "held-out question 3" in result.stdout

    # The config the demo ran is the format the stack renders: it parses with the same module.
    from trainer.config import load_config

    assert load_config(tmp_path / "config.yaml").output_dir == str(out)
    summary = subprocess.run([sys.executable, "-m", "trainer", "report", str(out)], capture_output=True, text=True,
                             env=env(), cwd=ROOT, timeout=300)
    assert summary.returncode == 0 and "| perplexity |" in summary.stdout and "loss_curve.png" in summary.stdout
