"""The CUDA-only paths, on a machine that has GPUs (each test skips with the reason without them):
NCCL with one and two processes, FSDP2 sharded checkpoints saved and resumed on CUDA, bf16 autocast,
fused AdamW on the device, and the start-up probe choosing torch's varlen kernel. The tests that run
on either device take the `device` fixture instead (LLM_FINETUNE_DEVICE=cuda puts them on the GPU)."""

import json

import pytest

from tests.conftest import cuda_count, needs_gpus, write_config
from tests.integration.procs import start, stop, torchrun, wait


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def on_cuda(monkeypatch):
    monkeypatch.setenv("LLM_FINETUNE_DEVICE", "cuda")  # the trainer (and every process it starts) on the GPU


@pytest.mark.parametrize("processes", [1, 2])
def test_nccl_trains_on_one_and_two_gpus(tmp_path, tiny_model, flashcards_file, processes):
    if cuda_count() < processes:
        pytest.skip(f"needs {processes} CUDA GPU(s); this machine has {cuda_count()}")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out, model={"dtype": "auto"},
                       training={"max_steps": 20, "save_steps": 10, "logging_steps": 5, "ddp_backend": "nccl"})
    log = tmp_path / "run.log"
    proc = start(torchrun(processes, "-m", "trainer", "finetune", "--config", str(cfg)), log)
    try:
        assert wait(proc, 600, log) == 0, log.read_text()[-4000:]
    finally:
        stop(proc)
    text = log.read_text()
    assert f"world {processes} (backend {'nccl' if processes > 1 else 'none'}, device cuda" in text
    assert "mixed precision: bf16 compute" in text  # auto on a bf16-capable GPU
    rows = _rows(out)
    assert rows[-1]["step"] == 20 and rows[-1]["loss"] < rows[0]["loss"]
    report = json.loads((out / "report.json").read_text())["training"]
    assert report["peak_device_memory_gib"] > 0


@needs_gpus(2)
def test_fsdp2_sharded_checkpoints_save_and_resume_on_cuda(tmp_path, tiny_model, flashcards_file):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out, model={"dtype": "bf16"},
                       training={"max_steps": 20, "save_steps": 10, "fsdp": True, "logging_steps": 5,
                                 "ddp_backend": "nccl"})
    log = tmp_path / "run.log"
    for steps in (10, 20):
        proc = start(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg),
                              "--set", f"training.max_steps={steps}"), log)
        try:
            assert wait(proc, 600, log) == 0, log.read_text()[-4000:]
        finally:
            stop(proc)
    text = log.read_text()
    assert "resumed from checkpoint step 10" in text and "backend nccl, device cuda" in text
    assert _rows(out)[-1]["step"] == 20
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(str(out / "final")) is not None


@needs_gpus(1)
def test_cuda_choices_bf16_autocast_fused_adamw_and_the_varlen_kernel(tmp_path, tiny_model, flashcards_file):
    import torch

    from trainer.config import load_config
    from trainer.train import session

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, tmp_path / "out",
                                   model={"dtype": "auto"}, data={"packing": True},
                                   training={"max_steps": 4, "save_steps": 100, "logging_steps": 2}))
    with session(cfg) as trainer:
        precision, training = trainer.placement.precision, trainer.training
        assert trainer.dist.device.type == "cuda"
        assert precision.mixed and precision.compute == torch.bfloat16
        assert training.optimizer.defaults.get("fused") is True
        assert training.net.probe.packing == "packed, variable-length attention"
        summary = trainer.train()
        assert summary["steps"] == 4 and summary["peak_device_memory_gib"] > 0
