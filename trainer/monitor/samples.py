"""Held-out prompts answered greedily by the model being trained: by the base before the first step
and by the fine-tuned model after the last, side by side in report.json and report.md (the quantize
stage adds the quantized model's answers, from the engine that serves it)."""

from __future__ import annotations

from typing import Any

import torch


@torch.no_grad()
def generate(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """A greedy answer to one prompt (the quantize stage's samples too)."""
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True).input_ids
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(
        ids,
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


@torch.no_grad()
def answers(model, tokenizer, prompts: list[str], new_tokens: int, autocast) -> list[str]:
    """Greedy answers of `model` (a transformers or peft model, unwrapped) to `prompts`. The packed
    training attention (trainer/model/attention.py) takes example boundaries, not the KV cache's growing
    keys: generation runs on SDPA and the training attention is put back after."""
    from trainer.model.attention import VARLEN
    from trainer.model.probes import _hf

    inner = _hf(model)
    training_attention = inner.config._attn_implementation
    was_training = model.training
    if training_attention == VARLEN:
        inner.set_attn_implementation("sdpa")
    model.eval()
    try:
        with autocast:
            return [generate(model, tokenizer, p, new_tokens) for p in prompts]
    finally:
        if training_attention == VARLEN:
            inner.set_attn_implementation(VARLEN)
        if was_training:
            model.train()


def table(pairs: list[tuple[str, str]], base: list[str], tuned: list[str]) -> list[dict[str, Any]]:
    """report.json's training.samples: prompt, reference, the base's and the fine-tuned model's answers."""
    rows = []
    for i, (prompt, reference) in enumerate(pairs):
        rows.append(
            {
                "prompt": prompt,
                "reference": reference,
                "base": base[i] if i < len(base) else None,
                "fine_tuned": tuned[i] if i < len(tuned) else None,
            }
        )
    return rows
