"""Which attention implementation the model runs with.

`model.attn_implementation: auto` asks for the fastest implementation the model class supports on
this device — flash-attention-2 on CUDA when it is installed, else transformers' own choice (SDPA
where the class supports it, eager otherwise: Gemma2 and Mamba have no SDPA path) — and falls back
when the class lacks it. An explicit choice the class does not support is refused with the ones it
does. Whether packed examples stay isolated under the chosen implementation is measured by the
start-up probe (trainer/probes.py), never assumed.
"""

from __future__ import annotations

import importlib.util
from typing import Optional

import torch


def candidates(requested: str, device: torch.device) -> list[Optional[str]]:
    """Implementations to try, in order; None is transformers' default (sdpa, else eager)."""
    if requested != "auto":
        return [requested]
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return ["flash_attention_2", None]
    return [None]


def unsupported(error: Exception) -> bool:
    """Whether transformers refused an attention implementation for this model class."""
    text = str(error)
    return isinstance(error, (ValueError, ImportError)) and ("attn_implementation" in text or "attention" in text)


# ---- variable-length attention for packed micro-batches ------------------------------------------

VARLEN = "llm_finetune_varlen"
SEGMENTS = "llm_finetune_segments"  # the forward keyword carrying a packed row's example boundaries


def segments(position_ids: torch.Tensor) -> list[int]:
    """Cumulative example boundaries [0, e1, e2, ..., L] of a packed row (position ids restart at 0),
    computed once per micro-batch on the host."""
    starts = (position_ids[0] == 0).nonzero().flatten().tolist()
    return starts + [int(position_ids.shape[1])]


def sliding_window(config) -> Optional[int]:
    """The model's attention window, if any of its layers uses one (Mistral, Gemma 2/3, Qwen2 with
    use_sliding_window...); None when all attend to the whole sequence."""
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types and not any("sliding" in str(kind) for kind in layer_types):
        return None
    return int(window)


def varlen_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention over a packed row at the cost of Σ len², not (Σ len)²: each example attends causally
    to itself only, through SDPA's causal kernel (no mask tensor), one call per example.

    transformers' dispatch with packed position_ids builds a dense block-diagonal [L, L] mask instead,
    which sends SDPA to its masked path and costs (Σ len)². Registered through AttentionInterface, so
    every model that uses the standard attention dispatch can take it; no mask is built for it (the
    mask interface has no entry: transformers then passes none). The start-up probe
    (trainer/probes.py) checks it against the model's own attention before it is used."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("varlen attention has no logit softcapping")
    if attention_mask is not None:
        raise NotImplementedError("varlen attention takes example boundaries, not a mask")
    bounds = kwargs.get(SEGMENTS)
    window = kwargs.get("sliding_window")
    if query.shape[0] != 1 or bounds is None:
        bounds = None
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])] if bounds else [query.shape[2]]
    if window is not None and max(lengths) > window:
        raise NotImplementedError("varlen attention has no sliding window (an example is longer than it)")
    gqa = query.shape[1] != key.shape[1]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                is_causal=q.shape[2] > 1, enable_gqa=gqa)

    if bounds is None:  # one sequence per row (padded rows: the padding comes last, after every real token)
        return sdpa(query, key, value).transpose(1, 2).contiguous(), None
    # Examples of the same length go through one batched call (all of them, for uniform data).
    by_length: dict[int, list[int]] = {}
    for a, n in zip(bounds[:-1], lengths):
        by_length.setdefault(n, []).append(a)
    if len(by_length) == 1 and len(lengths) == 1:
        return sdpa(query, key, value).transpose(1, 2).contiguous(), None
    pieces, order = [], []
    for n, starts in by_length.items():
        index = torch.tensor([a + i for a in starts for i in range(n)], device=query.device)
        def take(t):  # [1, H, L, D] -> [len(starts), H, n, D]
            return t[0].index_select(1, index).unflatten(1, (len(starts), n)).transpose(0, 1)
        out = sdpa(take(query), take(key), take(value))  # [k, H, n, D]
        pieces.append(out.transpose(0, 1).flatten(1, 2))  # [H, k*n, D]
        order.append(index)
    joined = torch.cat(pieces, dim=1)  # the kernel's dtype (bf16 under autocast)
    out = query.new_empty(query.shape[1:], dtype=joined.dtype)
    out.index_copy_(1, torch.cat(order), joined)
    return out[None].transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
