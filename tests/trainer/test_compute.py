"""Storage and compute chosen apart (trainer/model/compute.py): bf16 weights computed in fp32 one layer at a
time on CPUs whose bf16 matmul is slow, with the answer about the CPU stated both ways (never the
machine's own: LLM_FINETUNE_CPU_BF16)."""

import json

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import write_config
from trainer import envvars
from trainer.model.compute import MatmulRates, measure, widen, widened_linear
from trainer.config import load_config
from trainer.errors import UserError


def test_the_measurement_is_real_or_stated(monkeypatch):
    monkeypatch.delenv(envvars.CPU_BF16)
    measured = measure()
    assert measured.source == "measured" and measured.fp32 > 0 and measured.bf16 > 0
    assert measured.bf16_fast == (measured.bf16 >= 0.5 * measured.fp32)
    for stated, fast in (("slow", False), ("fast", True)):
        monkeypatch.setenv(envvars.CPU_BF16, stated)
        assert measure().bf16_fast is fast and stated in measure().describe()
    monkeypatch.setenv(envvars.CPU_BF16, "maybe")
    with pytest.raises(ValueError, match="fast, slow or unset"):
        measure()
    assert "bf16 matmul 0.3 GFLOP/s a core, fp32 166" in MatmulRates(166.0, 0.3).describe()


@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one-chunk", "chunks-of-5-outputs"])
@pytest.mark.parametrize("transposed", [False, True], ids=["Linear", "Conv1D"])
def test_a_widened_linear_computes_as_fp32_and_keeps_only_the_bf16_weight_for_the_backward(transposed, chunk_rows,
                                                                                           monkeypatch):
    from trainer.model import compute

    if chunk_rows:  # the 7B shape's chunking, on a small matrix: 5 output features widened at a time
        monkeypatch.setattr(compute, "WIDEN_CHUNK_BYTES", 4 * (32 if transposed else 48) * chunk_rows)
    torch.manual_seed(0)
    weight = torch.randn(32, 48).to(torch.bfloat16)  # Linear: [out, in]; Conv1D: [in, out]
    bias = torch.randn(32 if not transposed else 48).to(torch.bfloat16)
    x = torch.randn(2, 3, 48 if not transposed else 32, requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = widened_linear(x, weight, bias, transposed)
    (y * torch.arange(y.numel()).view_as(y)).sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    w = weight.float()
    y_ref = x_ref @ w + bias.float() if transposed else F.linear(x_ref, w, bias.float())
    (y_ref * torch.arange(y_ref.numel()).view_as(y_ref)).sum().backward()
    assert y.dtype == torch.float32
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(x.grad, x_ref.grad, atol=1e-4)
    # What autograd keeps: the bf16 weight itself, no fp32 copy of it.
    assert [t.dtype for t in saved if t.shape == weight.shape] == [torch.bfloat16]
    assert not any(t.dtype == torch.float32 and t.numel() == weight.numel() for t in saved)


def test_a_bf16_model_widened_computes_what_its_fp32_copy_computes(bf16_model):
    from transformers import AutoModelForCausalLM

    narrow = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="trainable torch.bfloat16 weights"):
        widen(narrow)  # trainable bf16 weights (pure bf16) are not widened
    narrow.requires_grad_(False)
    wide = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.float32)
    done = widen(narrow)
    assert done.layers > 0 and done.embeddings == 1 and "linear layers widened one at a time" in done.describe()
    assert widen(narrow).layers == 0  # idempotent
    # The big matrices stay bf16; only vectors (norms) were converted.
    assert narrow.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert narrow.model.embed_tokens.weight.dtype == torch.bfloat16
    ids = torch.randint(0, narrow.config.vocab_size, (2, 24))
    with torch.no_grad():
        a, b = narrow(ids).logits, wide(ids).logits
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-4), (a - b).abs().max()


def _metrics_losses(out, key="loss"):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def _lora(tmp_path, name, model, data, dtype, **model_keys):
    return load_config(write_config(tmp_path / f"{name}.yaml", model, data, tmp_path / name,
                                    model={"dtype": dtype, "save_dtype": "fp32", **model_keys},
                                    lora={"enabled": True, "r": 8},
                                    training={"max_steps": 4, "save_steps": 4, "logging_steps": 1,
                                              "learning_rate": 0.01}))


def test_bf16_on_a_cpu_without_fast_bf16_keeps_bf16_storage_and_trains_as_fp32_does(tmp_path, bf16_model,
                                                                                    flashcards_file, monkeypatch,
                                                                                    capsys):
    """model.dtype bf16 where bf16 is slow: the frozen base stays bf16 and the losses are the fp32 run's
    on the same (bf16-exact) weights, to fp32 rounding."""
    from trainer.train import finetune

    monkeypatch.setenv(envvars.CPU_BF16, "slow")
    finetune(_lora(tmp_path, "split", bf16_model, flashcards_file, "bf16"))
    log = capsys.readouterr().err
    assert "fp32 weights and compute (compute fp32: this CPU: slow bf16 matmuls, as LLM_FINETUNE_CPU_BF16=slow states)" in log
    assert "frozen weights bf16 (model.dtype: bf16), compute fp32: " in log
    assert "linear layers widened one at a time" in log
    finetune(_lora(tmp_path, "fp32", bf16_model, flashcards_file, "fp32"))
    split, fp32 = _metrics_losses(tmp_path / "split"), _metrics_losses(tmp_path / "fp32")
    assert len(split) == len(fp32) == 4
    assert split == pytest.approx(fp32, rel=1e-4, abs=1e-5)
    reports = [json.loads((tmp_path / d / "report.json").read_text())["training"] for d in ("split", "fp32")]
    assert reports[0]["eval_loss"] < reports[0]["eval_loss_before"]
    assert reports[0]["eval_loss"] == pytest.approx(reports[1]["eval_loss"], rel=1e-4)


def test_auto_keeps_fp32_where_it_fits_and_bf16_where_memory_needs_it(tmp_path, bf16_model, flashcards_file,
                                                                      monkeypatch, capsys):
    from trainer.model import memplan
    from trainer.train import session

    monkeypatch.setenv(envvars.CPU_BF16, "slow")
    cfg = _lora(tmp_path, "auto", bf16_model, flashcards_file, "auto")
    with session(cfg) as trainer:
        assert {q.dtype for q in trainer.training.net.base.parameters()} == {torch.float32}
    assert "frozen weights" not in capsys.readouterr().err  # nothing widened
    decide = memplan.decide

    def only_bf16_fits(shape, setting, runtime, budget, source):
        d = decide(shape, setting, runtime, budget, source)
        d.fits = setting.frozen_bytes == 2
        return d

    monkeypatch.setattr(memplan, "decide", only_bf16_fits)
    with session(_lora(tmp_path, "auto2", bf16_model, flashcards_file, "auto")) as trainer:
        base = trainer.training.net.base
        frozen = {q.dtype for q in base.parameters() if not q.requires_grad and q.dim() == 2}
        assert frozen == {torch.bfloat16}
        assert trainer.placement.memory.plan.terms["widened weights"] > 0
    assert "frozen weights bf16 (memory: fp32 would not fit), compute fp32" in capsys.readouterr().err


def test_insisting_on_bf16_compute_where_it_crawls_is_refused_before_loading(tmp_path, bf16_model, flashcards_file,
                                                                             monkeypatch):
    from trainer.train import finetune

    monkeypatch.setenv(envvars.CPU_BF16, "slow")
    cfg = _lora(tmp_path, "insist", bf16_model, flashcards_file, "bf16", compute_dtype="bf16")
    with pytest.raises(UserError, match=r"model.compute_dtype: bf16.*slow here.*Fix: model.compute_dtype: auto"):
        finetune(cfg)
    assert not (tmp_path / "insist" / "checkpoints").exists()


def test_a_bf16_model_is_measured_in_fp32_where_bf16_is_slow_and_given_back_as_it_was(bf16_model, monkeypatch):
    """Evaluation, the quantize stage's measurements and the demo's samples (trainer/post/measure.py) run a
    saved bf16 model through compute.for_inference; the quantize stage then quantizes that same model."""
    from transformers import AutoModelForCausalLM

    from trainer.model.compute import for_inference

    monkeypatch.setenv(envvars.CPU_BF16, "slow")
    model = AutoModelForCausalLM.from_pretrained(bf16_model, dtype=torch.bfloat16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    with for_inference(model) as note, torch.no_grad():
        assert note.startswith("bfloat16 weights computed in fp32 (this CPU: ") and "widened" in note
        assert model(ids).logits.dtype == torch.float32
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert "forward" not in vars(model.model.layers[0].mlp.up_proj)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16
    monkeypatch.setenv(envvars.CPU_BF16, "fast")
    with for_inference(model) as note:
        assert note.startswith("as stored (bfloat16; this CPU:")
