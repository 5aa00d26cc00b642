"""Real torchrun: 2 processes over gloo, a 2-node etcd-v2 rendezvous, and a killed worker survived."""

import json
import os
import signal
import time

import pytest

from tests.conftest import write_config
from tests.integration.procs import etcd_server, start, stop, torchrun, wait


def _loss_fell(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    return train[-1]["loss"] < train[0]["loss"] * 0.9, train


def _finetune_on_two(cfg, log) -> str:
    """`torchrun --nproc-per-node 2 -m trainer finetune`, to its end (bounded); its log."""
    proc = start(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg)), log)
    try:
        assert wait(proc, 300, log) == 0, log.read_text()[-4000:]
    finally:
        stop(proc)
    return log.read_text()


def _loads(final):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    return model, tok


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_process_gloo_run(tmp_path, request, flashcards_file, finance_file, lora):
    model = request.getfixturevalue("pretrained_model" if lora else "tiny_model")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", model, finance_file if lora else flashcards_file, out,
                       data={"template": "chat"} if lora else {},
                       training={"max_steps": 24, "learning_rate": 0.01 if lora else 0.003, "logging_steps": 4,
                                 "eval_steps": 12, "report_to": ["tensorboard"]},
                       lora={"enabled": lora, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"]},
                       # Quantization runs after training, once, on rank 0; every rank must exit 0.
                       quantize={"enabled": not lora, "eval_samples": 16, "max_new_tokens": 4})
    text = _finetune_on_two(cfg, tmp_path / "run.log")
    assert "world 2 (backend gloo" in text
    fell, rows = _loss_fell(out)
    assert fell, rows
    # Tokens seen count both ranks: more than one rank's share of a step.
    model, tok = _loads(out / "final")
    assert (out / "adapter").exists() == lora
    report = json.loads((out / "report.json").read_text())
    assert ("quantize" in report) == (not lora) and (out / "quantized").exists() == (not lora)
    assert text.count("quantize: measuring") == (0 if lora else 1)
    assert model.config.vocab_size == len(tok)
    # Only rank 0 reports: one event file, each logged step once, the same losses as metrics.jsonl.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    events = acc.Scalars("loss")
    assert [e.step for e in events] == [r["step"] for r in rows]
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # float32 events


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_fsdp_two_processes_shards_trains_and_saves(tmp_path, tiny_model, flashcards_file, dtype, fast_bf16):
    """FSDP2 over gloo: sharded training (bf16: MixedPrecisionPolicy over fp32 shards), full-state
    checkpoints, resume, and an unsharded final/ in the base model's dtype."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out, model={"dtype": dtype},
                       training={"max_steps": 20, "save_steps": 10, "fsdp": True, "logging_steps": 5})
    log = tmp_path / "run.log"
    for max_steps in (10, 20):  # the second run resumes from the first one's checkpoint
        proc = start(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg),
                              "--set", f"training.max_steps={max_steps}"), log)
        try:
            assert wait(proc, 300, log) == 0, log.read_text()[-4000:]
        finally:
            stop(proc)
    text = log.read_text()
    assert "resumed from checkpoint step 10" in text
    assert ("mixed precision: bf16 compute" in text) == (dtype == "bf16")
    fell, rows = _loss_fell(out)
    assert fell, rows
    model, tok = _loads(out / "final")
    assert model.num_parameters() > 0
    from trainer.post.quantsize import saved_dtype
    import torch

    assert saved_dtype(str(out / "final")) == torch.float32  # the base model's dtype


def test_fsdp_lora_on_a_cpu_without_fast_bf16_shards_a_bf16_base_computed_in_fp32(tmp_path, bf16_model,
                                                                                    flashcards_file, monkeypatch):
    """model.dtype bf16 where bf16 is slow (stated: LLM_FINETUNE_CPU_BF16=slow): FSDP2 shards the bf16 base
    and gathers it per layer, the widened layers compute in fp32 on each rank, and the run trains."""
    from trainer import envvars

    monkeypatch.setenv(envvars.CPU_BF16, "slow")
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", bf16_model, flashcards_file, out, model={"dtype": "bf16"},
                       lora={"enabled": True, "r": 8}, training={"max_steps": 10, "save_steps": 10, "fsdp": True,
                                                                 "logging_steps": 5, "learning_rate": 0.01})
    text = _finetune_on_two(cfg, tmp_path / "run.log")
    assert "world 2 (backend gloo" in text and "fp32 weights and compute (compute fp32: this CPU" in text
    assert "frozen weights bf16 (model.dtype: bf16), compute fp32" in text
    report = json.loads((out / "report.json").read_text())["training"]
    assert report["eval_loss"] < report["eval_loss_before"], report  # the pretrained base's held-out loss fell
    assert (out / "final" / "config.json").exists()


def test_qlora_on_two_processes_replicates_a_4_bit_base_and_saves_a_merged_final(tmp_path, bf16_model,
                                                                                  flashcards_file):
    """DDP over a bitsandbytes NF4 base (each rank quantizes it while loading; DDP broadcasts the packed
    weights and reduces the adapters' gradients); final/ is the files' base with the adapters merged."""
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", bf16_model, flashcards_file, out, model={"dtype": "bf16"},
                       lora={"enabled": True, "r": 8, "base_bits": 4},
                       training={"max_steps": 10, "save_steps": 5, "logging_steps": 5, "learning_rate": 0.01})
    text = _finetune_on_two(cfg, tmp_path / "run.log")
    assert "world 2 (backend gloo" in text and "linear layers in NF4 with double quantization" in text
    report = json.loads((out / "report.json").read_text())["training"]
    assert report["eval_loss"] < report["eval_loss_before"], report
    assert "training held them in 4 bits" in text and (out / "final" / "config.json").exists()
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_two_nodes_rendezvous_over_etcd_v2(tmp_path, tiny_model, flashcards_file):
    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={"max_steps": 10, "logging_steps": 5})
    with etcd_server(tmp_path) as endpoint:
        agents, logs = [], []
        try:
            for node in range(2):
                log = tmp_path / f"node{node}.log"
                logs.append(log)
                agents.append(start(torchrun(1, "-m", "trainer", "finetune", "--config", str(cfg), nnodes=2,
                                             rdzv="etcd-v2", endpoint=endpoint, rdzv_id=f"test-{os.getpid()}"),
                                    log))
            for proc, log in zip(agents, logs):
                assert wait(proc, 300, log) == 0, log.read_text()[-4000:]
        finally:
            for proc in agents:
                stop(proc)
    combined = "".join(log.read_text() for log in logs)
    assert "world 2 (backend gloo" in combined
    assert (out / "final" / "config.json").exists()


def test_killed_worker_is_survived_by_resuming(tmp_path, tiny_model, flashcards_file):
    import psutil

    out = tmp_path / "out"
    cfg = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                       training={"max_steps": 150, "save_steps": 10, "logging_steps": 10})
    # A truncated checkpoint left by an earlier crash must not stop the run.
    debris = out / "checkpoints" / "step-00000005"
    debris.mkdir(parents=True)
    (debris / "model.pt").write_bytes(b"truncated")
    log = tmp_path / "run.log"
    proc = start(torchrun(2, "-m", "trainer", "finetune", "--config", str(cfg), max_restarts=2), log)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / "step-00000010" / "COMPLETE").exists():
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if "finetune" in " ".join(p.cmdline())]
        assert len(workers) == 2, workers
        os.kill(workers[1].pid, signal.SIGKILL)
        assert wait(proc, 400, log) == 0, log.read_text()[-4000:]
    finally:
        stop(proc)
    text = log.read_text()
    assert "resumed from checkpoint step" in text, text[-4000:]
    resumed = int(text.split("resumed from checkpoint step ")[1].split()[0])
    assert resumed >= 10
    assert (out / "final" / "config.json").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 150  # continued, one row per logging step
