"""QLoRA (lora.base_bits): the frozen base held in NF4 or int8 by bitsandbytes trains as PEFT + bitsandbytes
under the Hugging Face Trainer does on the same batches, resumes to the uninterrupted run's adapters, and
final/ is PEFT's merge of those adapters into the base re-read from its files (never the 4-bit one)."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import write_config
from tests.trainer.test_equivalence import _hf_baseline
from trainer.train import identity
from trainer.model import memplan
from trainer.config import ConfigError, TrainerConfig, load_config
from trainer.train import finetune

TRAINING = {"max_steps": 8, "learning_rate": 0.003, "per_device_train_batch_size": 4, "lr_scheduler_type": "linear",
            "save_steps": 4, "logging_steps": 1}
LORA = {"enabled": True, "dropout": 0.0, "target_modules": ["all-linear"]}


def _rel(a: dict, b: dict) -> float:
    num = sum(float(((a[k].float() - b[k].float()) ** 2).sum()) for k in b)
    return math.sqrt(num / sum(float((b[k].float() ** 2).sum()) for k in b))


def _losses(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_as_peft_and_bitsandbytes_do_and_final_is_merged_into_the_files_base(
        tmp_path, wide_model, flashcards_file, monkeypatch, capsys, bits):
    cfg_path = write_config(tmp_path / "c.yaml", wide_model, flashcards_file, tmp_path / "ours",
                            data={"validation_fraction": 0.0}, training=TRAINING, lora={**LORA, "base_bits": bits})
    finetune(load_config(cfg_path))
    err = capsys.readouterr().err
    kind = "NF4 with double quantization" if bits == 4 else "int8"
    assert f"frozen base quantized by bitsandbytes while it loaded: 14 linear layers in {kind}" in err
    assert "frozen base in " + ("NF4" if bits == 4 else "int8") in err
    assert f"final/: the base's weights re-read from {wide_model} in fp32 (training held them in {bits} bits)" in err
    losses = _losses(tmp_path / "ours")
    assert losses[-1] < losses[0], losses

    # The Hugging Face Trainer + PEFT + bitsandbytes (bench/hf_baseline.py) on our batch order.
    monkeypatch.setattr(sys, "argv", ["hf_baseline", "--config", str(cfg_path), "--mode", "padded",
                                      "--out", str(tmp_path / "hf")])
    assert _hf_baseline().main() == 0
    ours = load_file(str(tmp_path / "ours" / "adapter" / "adapter_model.safetensors"))
    hf = load_file(str(tmp_path / "hf" / "adapter" / "adapter_model.safetensors"))
    assert set(ours) == set(hf)
    b = {k: v for k, v in hf.items() if "lora_B" in k}
    assert min(float(v.abs().max()) for v in b.values()) > 0  # it trained (B starts at zero)
    # Same library, same quantized weights, same batches: the same adapters up to summation order (packed
    # rows against padded ones), where int8's activations are themselves quantized per row.
    assert _rel(ours, hf) < (1e-3 if bits == 4 else 2e-2), _rel(ours, hf)

    # final/: PEFT's merge_and_unload of our adapter into the base as its files hold it (fp32 here).
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(wide_model), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(tmp_path / "ours" / "adapter")).merge_and_unload().state_dict()
    final = load_file(str(tmp_path / "ours" / "final" / "model.safetensors"))
    assert set(final) <= set(merged)
    worst = max(float((final[k] - merged[k]).abs().max()) for k in final)
    assert worst < 1e-6, worst
    files = load_file(str(wide_model / "model.safetensors"))
    assert not torch.equal(final["model.layers.0.mlp.up_proj.weight"], files["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(final["model.norm.weight"], files["model.norm.weight"])  # untouched: exactly the file's


def test_qlora_resume_gives_the_uninterrupted_runs_adapters(tmp_path, wide_model, flashcards_file, monkeypatch):
    def cfg(name):
        return write_config(tmp_path / f"{name}.yaml", wide_model, flashcards_file, tmp_path / name,
                            model={"dtype": "bf16"}, training=TRAINING, lora={**LORA, "base_bits": 4})

    finetune(load_config(cfg("straight")))
    from trainer.train.checkpoint import Checkpointer

    original = Checkpointer.save

    def save_then_crash(self, step, *args):
        path = original(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt("killed right after the first checkpoint")
        return path

    monkeypatch.setattr(Checkpointer, "save", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        finetune(load_config(cfg("split")))
    monkeypatch.setattr(Checkpointer, "save", original)
    state = json.loads(next((tmp_path / "split" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["identity"]["lora.base_bits"] == 4
    finetune(load_config(cfg("split")))
    a = load_file(str(tmp_path / "straight" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "split" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_the_quantized_base_takes_what_the_memory_plan_counts(wide_model):
    """The plan's bytes a weight (memplan.NF4_BYTES_PER_WEIGHT) are what bitsandbytes holds, and at the
    Llama-2-7B shape QLoRA's training plan is under half of LoRA's bf16 one."""
    from trainer.model import modeling, qlora

    model = modeling.load_model(str(wide_model), torch.bfloat16, "auto", torch.device("cpu"),
                                qlora.quantization_config(4, torch.float32))
    held = qlora.inspect(model, 4)
    assert held.layers == 14 and held.weights == 2 * (4 * 256 * 256 - 2 * 256 * 128 + 3 * 256 * 1024)
    assert held.bytes / held.weights == pytest.approx(memplan.NF4_BYTES_PER_WEIGHT, rel=0.01)
    assert modeling.trainable_parameters(model)[1] == sum(
        t.numel() for t in load_file(str(wide_model / "model.safetensors")).values())

    shape = memplan.Shape.from_config({"hidden_size": 4096, "num_hidden_layers": 32, "intermediate_size": 11008,
                                       "vocab_size": 32000, "num_attention_heads": 32, "dtype": "bfloat16"})
    cfg = TrainerConfig.from_dict({"model": {"name_or_path": "m", "dtype": "bf16"}, "data": {"file": "d.json"},
                                   "quantize": {"enabled": False}})
    q4 = TrainerConfig.from_dict({**cfg.to_dict(), "lora": {**cfg.to_dict()["lora"], "base_bits": 4}})
    # bench/scale.py's micro-batch: one example of up to 256 tokens.
    lora = memplan.estimate(shape, memplan.setting_for(cfg, shape, 1, 1, mixed=True, tokens=256))
    qlora_plan = memplan.estimate(shape, memplan.setting_for(q4, shape, 1, 1, mixed=True, tokens=256))
    assert qlora_plan.train < 0.5 * lora.train
    assert qlora_plan.terms["quantized weights"] == pytest.approx(6.48e9 * memplan.NF4_BYTES_PER_WEIGHT, rel=0.01)
    assert qlora_plan.final < qlora_plan.train  # final/ streams the base from its files: a shard at a time
    assert "final/" in qlora_plan.describe() and "dequantized layer" in qlora_plan.describe()


@pytest.mark.parametrize("change,key,words", [
    ({"lora": {"base_bits": 3}}, "lora.base_bits", "must be 4 (NF4, QLoRA) or 8"),
    ({"lora": {"base_bits": 4, "enabled": False}}, "lora.base_bits", "lora.enabled is false"),
    ({"lora": {"base_bits": 4}, "training": {"fsdp": True}}, "training.fsdp", "Fix: training.fsdp: false"),
])
def test_what_qlora_cannot_do_is_refused_with_the_key_and_the_fix(tmp_path, change, key, words):
    import yaml

    raw = {"model": {"name_or_path": "m"}, "data": {"file": "d.json"}, **change}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert key in str(err.value) and words in str(err.value) and "c.yaml:" in str(err.value)


def test_the_base_bits_are_part_of_a_checkpoints_identity_only_when_set():
    base = {"model": {"name_or_path": "m"}, "data": {"file": "d.json"}}
    plain = identity.guarded(TrainerConfig.from_dict(base), "w", "d", "fp32", ["q_proj"])
    four = identity.guarded(TrainerConfig.from_dict({**base, "lora": {"base_bits": 4}}), "w", "d", "fp32", ["q_proj"])
    assert "lora.base_bits" not in plain  # checkpoints written before the key still resume
    assert identity.differences(four, plain) == [("lora.base_bits", 4, None)]


def test_final_streamed_from_the_files_in_shards_is_peft_merge_and_unload(tmp_path, tiny_model, tokenizer):
    """trainer/model/merge.py without training: random LoRA factors (and a modules_to_save copy) merged from the
    files into several shards load as PEFT's merge_and_unload of the same adapter, rounded once to bf16."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.model import merge

    def peft_model():
        base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
        torch.manual_seed(0)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                modules_to_save=["lm_head"]))
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = torch.randn_like(p) * 0.1
        return model

    deltas, whole = merge.trained(peft_model())
    assert len(deltas) == 4 and set(whole) == {"lm_head.weight"}
    final = tmp_path / "final"
    assert merge.write_final(str(tiny_model), deltas, whole, torch.bfloat16, tokenizer, final) == 4
    assert (final / "model.safetensors").exists()  # under 1 GiB: one file
    shards = tmp_path / "shards"
    merge.stream(str(tiny_model), deltas, whole, torch.bfloat16, shards, shard_bytes=20_000)
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3

    expected = peft_model().merge_and_unload().to(torch.bfloat16).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.bfloat16).state_dict()
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    for name, tensor in load_file(str(final / "model.safetensors")).items():
        part = load_file(str(shards / index["weight_map"][name]))
        assert torch.equal(part[name], tensor), name


def test_trainer_plan_shows_the_quantized_base(tmp_path, wide_model, flashcards_file):
    from trainer import cli

    cfg = load_config(write_config(tmp_path / "c.yaml", wide_model, flashcards_file, tmp_path / "out",
                                   model={"dtype": "bf16"}, lora={**LORA, "base_bits": 4}))
    text = cli.plan(cfg, processes=1, workers=1, memory=None)
    assert "its linear layers in NF4 (lora.base_bits: 4, bitsandbytes), dequantized per layer into fp32" in text
    assert "train " in text and "final/ " in text  # the stages (a tiny model's packed weights round to 0.00 GiB)


def test_a_quantized_load_reads_the_files_instead_of_mapping_them(wide_model, monkeypatch):
    """transformers would keep every page of the unquantized files mapped until loading ends (16.9 GiB at
    7B for a 3.6 GiB result): the quantized load reads each tensor with pread (trainer/model/qlora.py)."""
    import transformers.modeling_utils as loading

    from trainer.model import modeling, qlora

    backends = []
    original = loading.safe_open

    def spy(*args, **kwargs):
        backends.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(loading, "safe_open", spy)
    modeling.load_model(str(wide_model), torch.bfloat16, "auto", torch.device("cpu"),
                        qlora.quantization_config(4, torch.float32))
    assert backends == ["pread"] and loading.safe_open is spy  # put back after the load
    modeling.load_model(str(wide_model), torch.bfloat16, "auto", torch.device("cpu"))
    assert backends == ["pread", "mmap"]  # an unquantized base is used from its pages: mapped as before
