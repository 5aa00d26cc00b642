"""At size: a LoRA run's frozen base in the compute dtype, the adapters in fp32; final/ still the
exact fp32 merge; quantization one layer at a time equal to quantizing an fp32 copy of the model."""


import pytest
import torch

from tests.conftest import write_config
from trainer.config import load_config


def _lora_cfg(tmp_path, model, data, **training):
    return load_config(write_config(tmp_path / "c.yaml", model, data, tmp_path / "out", model={"dtype": "bf16"},
                                    lora={"enabled": True, "r": 8, "modules_to_save": ["lm_head"]},
                                    training={"max_steps": 4, "save_steps": 4, "learning_rate": 0.01, **training}))


def _expected_final(base, adapter, dtype):
    """What final/ held before: the base in fp32, the adapter merged in fp32, cast once to `dtype`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.to(dtype) for k, v in merged.state_dict().items()}


def _final(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_lora_holds_the_frozen_base_in_bf16_and_trains_fp32_adapters(tmp_path, bf16_model, flashcards_file, fast_bf16):
    from trainer.train import session

    with session(_lora_cfg(tmp_path, bf16_model, flashcards_file)) as trainer:
        base, optimizer = trainer.training.net.base, trainer.training.optimizer
        frozen = {q.dtype for q in base.parameters() if not q.requires_grad}
        trained = {n: q.dtype for n, q in base.named_parameters() if q.requires_grad}
        assert frozen == {torch.bfloat16}
        assert set(trained.values()) == {torch.float32}
        assert any("lora_A" in n for n in trained) and any("modules_to_save" in n for n in trained)
        assert {q.dtype for g in optimizer.param_groups for q in g["params"]} == {torch.float32}
        assert trainer.placement.memory.plan.terms["frozen weights"] > 0


@pytest.mark.parametrize("saved", ["bf16", "fp32"])
def test_final_is_the_exact_fp32_merge_whatever_the_frozen_dtype(tmp_path, bf16_model, pretrained_model,
                                                                   flashcards_file, saved):
    """bf16 base: merged in memory (exact: bf16 holds it). fp32 base: training held it in bf16, so
    final/ is rebuilt from the base's files; either way equal to the fp32 merge, bit for bit."""
    from trainer.train import finetune

    base = bf16_model if saved == "bf16" else pretrained_model
    cfg = _lora_cfg(tmp_path, base, flashcards_file)
    finetune(cfg)
    dtype = torch.bfloat16 if saved == "bf16" else torch.float32
    got, want = _final(cfg.final_dir), _expected_final(base, cfg.adapter_dir, dtype)
    assert set(got) == set(want)
    for key, tensor in got.items():
        assert tensor.dtype == dtype, key
        assert torch.equal(tensor, want[key]), key


def test_rtn_layer_by_layer_equals_quantizing_an_fp32_copy(tmp_path, bf16_model):
    """The bf16 model, quantized one decoder layer at a time in fp32, packs exactly what INC packs from
    the whole model widened to fp32 (the old path, a full fp32 copy)."""
    from neural_compressor.torch.quantization import convert, prepare
    from transformers import AutoModelForCausalLM

    from trainer.config import QuantizeConfig
    from trainer.post.quantize import _rtn_by_layer, inc_config

    qcfg = inc_config(QuantizeConfig(bits=4, group_size=32), 32)
    whole = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.float32)
    whole = convert(prepare(whole, qcfg))
    by_layer = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16)
    _rtn_by_layer(by_layer, qcfg)
    a, b = whole.state_dict(), by_layer.state_dict()
    assert set(a) == set(b)
    packed = [k for k in a if k.endswith(("qweight", "scales", "qzeros"))]
    assert packed
    for key in packed:
        assert torch.equal(a[key], b[key]), key
    # What INC did not quantize stays in the model's dtype (no fp32 copy of embeddings or norms).
    assert by_layer.model.embed_tokens.weight.dtype == torch.bfloat16
    assert by_layer.model.layers[0].input_layernorm.weight.dtype == torch.bfloat16
    # INC's own mapping names the output head too, with an fp32 (not quantized) config.
    quantized = {k for k, c in whole.qconfig.items() if getattr(c, "dtype", "") != "fp32"}
    assert {k for k in by_layer.qconfig} == quantized
