"""Single-process smoke runs on the tiny model: loss falls, weights change, final/ loads, resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_config
from trainer.config import load_config
from trainer.train import finetune


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loss_falls_weights_change_final_loads(tmp_path, request, flashcards_file, finance_file, lora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Full: the random tiny model on flashcards. LoRA: a briefly trained base adapted to finance data.
    tiny_model = request.getfixturevalue("pretrained_model" if lora else "tiny_model")
    data = finance_file if lora else flashcards_file
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_model, data, out,
                                   data={"template": "chat"} if lora else {},
                                   training={"max_steps": 30, "eval_steps": 15, "learning_rate": 0.01 if lora else 0.003},
                                   lora={"enabled": lora, "r": 8, "alpha": 32,
                                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj"]}))
    summary = finetune(cfg)
    rows = _metrics(out)
    train_rows = [r for r in rows if "loss" in r]
    assert train_rows[-1]["loss"] < train_rows[0]["loss"] * 0.9
    for key in ("step", "loss", "learning_rate", "grad_norm", "tokens_per_second", "num_input_tokens_seen"):
        assert key in train_rows[0]
    assert [r["num_input_tokens_seen"] for r in train_rows] == sorted(r["num_input_tokens_seen"] for r in train_rows)
    assert any("eval_loss" in r for r in rows) and summary["eval_loss"] is not None
    before = load_file(str(tiny_model / "model.safetensors"))
    after = load_file(str(out / "final" / "model.safetensors"))
    assert set(before) == set(after)  # LoRA merged: a plain model directory
    assert any(not torch.allclose(before[k], after[k]) for k in before)
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    ids = tok("What is the main effect of insulin", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    assert (out / "adapter").exists() == lora
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["steps"] == 30


def test_resumes_from_the_newest_complete_checkpoint(tmp_path, tiny_model, flashcards_file, capsys):
    out = tmp_path / "out"
    cfg_path = write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                            training={"max_steps": 10, "save_steps": 10})
    finetune(load_config(cfg_path))
    (out / "checkpoints" / "step-00000015").mkdir()  # debris of a crashed save
    capsys.readouterr()
    finetune(load_config(cfg_path, ["training.max_steps=20"]))
    err = capsys.readouterr().err
    assert "resumed from checkpoint step 10" in err
    assert "ignoring incomplete checkpoint" in err
    steps = [r["step"] for r in _metrics(out) if "loss" in r]
    assert steps == [5, 10, 15, 20]  # continued, not restarted


class Crash(Exception):
    pass


def test_resume_matches_an_uninterrupted_run(tmp_path, tiny_model, flashcards_file, monkeypatch):
    """Model, optimizer, scheduler, data position and RNG all restored: same weights either way."""
    straight = tmp_path / "straight"
    finetune(load_config(write_config(tmp_path / "a.yaml", tiny_model, flashcards_file, straight,
                                      training={"max_steps": 12, "save_steps": 6},
                                      lora={"enabled": True, "dropout": 0.1})))
    split = tmp_path / "split"
    cfg_b = write_config(tmp_path / "b.yaml", tiny_model, flashcards_file, split,
                         training={"max_steps": 12, "save_steps": 6}, lora={"enabled": True, "dropout": 0.1})
    from trainer.train.checkpoint import Checkpointer

    original = Checkpointer.save

    def save_then_crash(self, step, *args):
        path = original(self, step, *args)
        if step == 6:
            raise Crash("killed right after the first checkpoint")
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(Crash):
        finetune(load_config(cfg_b))
    monkeypatch.setattr(Checkpointer, "save", original)
    assert not (split / "final").exists()
    finetune(load_config(cfg_b))
    a = load_file(str(straight / "final" / "model.safetensors"))
    b = load_file(str(split / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    # Token accounting survives the crash too (save_steps 6 is not a multiple of logging_steps 5).
    seen = [[r["num_input_tokens_seen"] for r in _metrics(d) if "loss" in r] for d in (straight, split)]
    assert seen[0] == seen[1]
    assert json.loads((split / "report.json").read_text())["training"]["num_input_tokens_seen"] == seen[0][-1]


@pytest.mark.parametrize("fast_bf16,save_dtype", [(True, "bf16"), (False, "auto")],
                         ids=["cpu-with-bf16", "cpu-without-bf16"])
def test_auto_precision_on_either_cpu_trains_saves_and_quantizes(tmp_path, wide_model, flashcards_file, monkeypatch,
                                                                 capsys, fast_bf16, save_dtype):
    """`model.dtype: auto` decided both ways, whatever this machine's CPU: the bf16 path (taken on
    AVX512-BF16/AMX CPUs: bf16 compute, fp32 master weights) and the fp32 path each train, save a
    loadable final/ in the chosen dtype (auto: the base model's, fp32 here) and quantize it smaller."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer import envvars
    from trainer.post.quantsize import saved_dtype

    monkeypatch.setenv(envvars.CPU_BF16, "fast" if fast_bf16 else "slow")
    out = tmp_path / "out"
    cfg = load_config(write_config(tmp_path / "c.yaml", wide_model, flashcards_file, out,
                                   model={"dtype": "auto", "save_dtype": save_dtype},
                                   training={"max_steps": 8, "save_steps": 8, "logging_steps": 4},
                                   quantize={"enabled": True, "eval_samples": 8, "sample_prompts": 1,
                                             "max_new_tokens": 4}))
    finetune(cfg)
    log = capsys.readouterr().err
    assert ("mixed precision: bf16 compute, fp32 master weights" if fast_bf16 else "fp32 weights and compute") in log
    expected = torch.bfloat16 if fast_bf16 else torch.float32
    assert saved_dtype(str(out / "final")) == expected
    model = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    tok = AutoTokenizer.from_pretrained(str(out / "final"))
    ids = tok("What is the main effect of insulin", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    q = json.loads((out / "report.json").read_text())["quantize"]
    assert q["size_bytes_after"] < q["size_bytes_before"] * 0.4
    assert q["breakdown"]["kept_dtype"] == str(expected).replace("torch.", "")


def test_a_small_learning_rate_moves_bf16_weights_as_it_moves_fp32_weights(tmp_path, tiny_model, flashcards_file,
                                                                           fast_bf16):
    """bf16 compute keeps fp32 master weights: at lr 1e-5 as many weights move as in fp32. Pure bf16
    (explicit only) loses most of those updates to rounding: the check can tell the two apart."""
    base = load_file(str(tiny_model / "model.safetensors"))
    changed = {}
    for dtype in ("fp32", "bf16", "pure-bf16"):
        out = tmp_path / dtype
        finetune(load_config(write_config(tmp_path / f"{dtype}.yaml", tiny_model, flashcards_file, out,
                                          model={"dtype": dtype, "save_dtype": "fp32"},
                                          training={"max_steps": 4, "learning_rate": 1e-5, "save_steps": 100},
                                          data={"validation_fraction": 0.0})))
        after = load_file(str(out / "final" / "model.safetensors"))
        start = {k: v.to(torch.bfloat16).float() if dtype == "pure-bf16" else v for k, v in base.items()}
        moved = sum(int((start[k] != after[k]).sum()) for k in base)
        changed[dtype] = moved / sum(v.numel() for v in base.values())
    print("fraction of weights changed at lr 1e-5:", changed)
    assert changed["fp32"] > 0.5, changed
    assert changed["bf16"] >= 0.9 * changed["fp32"], changed
    assert changed["pure-bf16"] < 0.5 * changed["fp32"], changed


def test_compute_timing_is_not_switched_by_a_checkpoint(tmp_path, tiny_model, flashcards_file, monkeypatch):
    """The loop times forward and backward with host clocks on CPUs only (`timing`); saving a checkpoint
    once rebound that name to the checkpointer's timing dict, so the choice flipped with the dict's
    contents (an empty one stopped the timing: compute_seconds None on a CPU; a full one started it on a
    GPU, where host clocks need syncs)."""
    from trainer.train.checkpoint import Checkpointer

    original = Checkpointer.save

    def save_with_empty_timing(self, *args, **kwargs):
        path = original(self, *args, **kwargs)
        self.timing = {}
        return path

    monkeypatch.setattr(Checkpointer, "save", save_with_empty_timing)
    out = tmp_path / "out"
    summary = finetune(load_config(write_config(tmp_path / "c.yaml", tiny_model, flashcards_file, out,
                                                training={"max_steps": 6, "save_steps": 2, "logging_steps": 2})))
    assert summary["compute_seconds"] is not None and summary["compute_seconds"] > 0
