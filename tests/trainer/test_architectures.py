"""Any causal LM transformers ships: packing proven isolated (or replaced by padding), the model's own
loss, LoRA on its own projections — decided by probes on the model itself, not by a list of names."""

import pytest
import torch

from tests import zoo
from trainer.model import probes
from trainer.config import LoraConfig
from trainer.data import IGNORE, collate
from trainer.errors import UserError
from trainer.model.modeling import CausalLMLoss, apply_lora, load_model

CPU = torch.device("cpu")


@pytest.fixture(scope="session")
def zoo_models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("zoo")
    return {name: zoo.write(name, root / name, tokenizer) for name in zoo.ARCHITECTURES}


def _rows(lengths, vocab, prompt=3, seed=0):
    """(input ids, labels) examples of random tokens, the first `prompt` tokens masked."""
    import numpy as np

    g = np.random.default_rng(seed)
    rows = []
    for n in lengths:
        ids = g.integers(4, vocab, n)
        labels = ids.copy()
        labels[:prompt] = IGNORE
        rows.append((ids, labels))
    return rows


PATHS = {zoo.VARLEN: probes.PACKED_VARLEN, zoo.PACKED: probes.PACKED, zoo.PADDED: probes.PADDED}


@pytest.mark.parametrize("name", list(zoo.ARCHITECTURES))
def test_probe_packs_only_where_isolated_and_the_loss_is_the_models_own(zoo_models, name):
    model = load_model(str(zoo_models[name]), torch.float32, "auto", CPU)
    loss_module = CausalLMLoss(model)
    varlen = model.config._attn_implementation in ("sdpa", "eager")  # as the trainer decides
    plan = probes.run(loss_module, None, CPU, varlen=varlen)
    assert plan.packing == PATHS[zoo.expected(name)], (name, plan)
    assert not plan.full_logits and plan.loss_gap < 1e-6, plan
    if zoo.expected(name) == zoo.PADDED:
        assert plan.leak > 10 * plan.tolerance  # a leak, not noise: the decision is not marginal
        with pytest.raises(UserError, match=r"data.packing: true, but on .* attend to each other: an example's "
                                            r"logits change by [0-9.e-]+ .*Fix: data.packing: null"):
            probes.run(loss_module, True, CPU, varlen=varlen)
    # A micro-batch on the chosen path: its summed loss is the model's own loss of each example alone.
    vocab = model.get_input_embeddings().num_embeddings
    rows = _rows([9, 14, 6], vocab)
    tensors, _ = collate(rows, 3, plan.packs)
    model.eval()
    with torch.no_grad():
        total, count = loss_module(tensors["input_ids"], tensors["position_ids"], tensors["labels"],
                                   **plan.extra(tensors["position_ids"]))
        reference, n = 0.0, 0
        for ids, labels in rows:
            labels = torch.from_numpy(labels)[None]
            k = int((labels[0, 1:] != IGNORE).sum())
            reference += float(model(input_ids=torch.from_numpy(ids)[None], labels=labels, use_cache=False).loss) * k
            n += k
    assert int(count) == n
    assert abs(float(total) - reference) <= 1e-5 * abs(reference), (float(total), reference)


@pytest.mark.parametrize("name", list(zoo.ARCHITECTURES))
def test_lora_defaults_to_the_models_own_attention_projections(zoo_models, name):
    model = load_model(str(zoo_models[name]), torch.float32, "auto", CPU)
    peft_model, described = apply_lora(model, LoraConfig(r=4))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, p in peft_model.named_parameters()
               if p.requires_grad and ".lora_A" in n}
    assert adapted, name
    if name.startswith("mamba"):
        assert described.startswith("all-linear")  # no attention block: every projection
    else:
        assert described.startswith("auto: ") and set(described[len("auto: "):].split(", ")) == adapted
    expected = {"gpt2-conv1d": {"c_attn", "c_proj"}, "phi3-fused-qkv": {"qkv_proj", "o_proj"},
                "gpt-neox": {"query_key_value", "dense"}, "falcon-rotary": {"query_key_value", "dense"},
                "llama": {"q_proj", "k_proj", "v_proj", "o_proj"}}
    if name in expected:
        assert adapted == expected[name]


def test_all_linear_and_modules_to_save(zoo_models):
    model = load_model(str(zoo_models["gpt2-conv1d"]), torch.float32, "auto", CPU)
    peft_model, described = apply_lora(model, LoraConfig(r=4, target_modules=("all-linear",),
                                                         modules_to_save=("lm_head",)))
    trained = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert described == "all-linear"
    assert any("c_fc" in n for n in trained) and any("lm_head" in n or "wte" in n for n in trained)
    with pytest.raises(UserError, match=r"\['q_proj'\] not found.*named: c_attn, c_fc, c_proj"):
        apply_lora(load_model(str(zoo_models["gpt2-conv1d"]), torch.float32, "auto", CPU),
                   LoraConfig(target_modules=("q_proj",)))


def test_attention_implementation_falls_back_or_refuses_clearly(zoo_models):
    gemma = load_model(str(zoo_models["gemma2-softcap"]), torch.float32, "auto", CPU)
    assert gemma.config._attn_implementation == "eager"  # no SDPA path in this class: not a crash
    llama = load_model(str(zoo_models["llama"]), torch.float32, "auto", CPU)
    assert llama.config._attn_implementation == "sdpa"
    with pytest.raises(UserError, match=r"model.attn_implementation 'sdpa'.*Fix: model.attn_implementation: auto"):
        load_model(str(zoo_models["mamba-recurrent"]), torch.float32, "sdpa", CPU)
