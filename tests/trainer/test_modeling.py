import pytest

from trainer.config import LoraConfig, ModelConfig
from trainer.errors import UserError
from trainer.model.modeling import apply_lora, linear_module_names, load_model, read_token, resolve


def test_lora_target_the_model_lacks_is_refused_with_the_valid_names(tiny_model):
    import torch

    model = load_model(str(tiny_model), torch.float32, "sdpa", torch.device("cpu"))
    assert {"q_proj", "v_proj", "down_proj"} <= set(linear_module_names(model))
    with pytest.raises(UserError, match=r"\['query_key_value'\] not found .*named: down_proj, gate_proj, k_proj, "
                                        r"o_proj, q_proj, up_proj, v_proj.*\[auto\].*\[all-linear\]"):
        apply_lora(model, LoraConfig(target_modules=("q_proj", "query_key_value")))
    peft_model, described = apply_lora(model, LoraConfig(r=4, target_modules=("q_proj", "v_proj")))
    assert described == "q_proj, v_proj"
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0


def test_unloadable_model_paths(tmp_path):
    import torch

    from trainer.runtime.distributed import Dist

    single = Dist(0, 0, 1, 1, None, torch.device("cpu"))
    with pytest.raises(UserError, match="does not exist"):
        resolve(ModelConfig(name_or_path=str(tmp_path / "nope")), None, single)
    with pytest.raises(UserError, match="without config.json"):
        resolve(ModelConfig(name_or_path=str(tmp_path)), None, single)
    # A hub id with the hub unreachable (offline in tests) is refused with a fix, not a traceback.
    with pytest.raises(UserError, match="org/missing-model.*cannot be loaded.*Fix"):
        resolve(ModelConfig(name_or_path="org/missing-model"), None, single)


def test_token_comes_from_the_mounted_file(tmp_path, monkeypatch):
    f = tmp_path / "token"
    f.write_text("hf_fromfile\n")
    monkeypatch.setenv("HF_TOKEN_PATH", str(f))
    monkeypatch.setenv("HF_TOKEN", "hf_fromenv")
    assert read_token() == "hf_fromfile"
    monkeypatch.delenv("HF_TOKEN_PATH")
    assert read_token() == "hf_fromenv"
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="cannot be read"):
        read_token()


def test_selective_loss_equals_full_logits_loss(tiny_model):
    """Projecting only labelled positions gives the same loss and gradients as full logits."""
    import torch

    from trainer.model.modeling import CausalLMLoss

    torch.manual_seed(0)
    model = load_model(str(tiny_model), torch.float32, "sdpa", torch.device("cpu"))
    ids = torch.randint(4, 500, (2, 40))
    labels = ids.clone()
    labels[:, :15] = -100  # a masked prompt
    labels[1, 30:] = -100  # padding
    pos = torch.cat([torch.arange(20), torch.arange(20)]).expand(2, 40)
    loss, n = CausalLMLoss(model)(ids, pos, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    logits = model(input_ids=ids, position_ids=pos).logits
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                            ignore_index=-100, reduction="sum")
    ref.backward()
    ref_grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert int(n) == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(loss, ref, rtol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, ref_grads))
    assert set(CausalLMLoss(model).state_dict()) == {f"model.{k}" for k in model.state_dict()}
