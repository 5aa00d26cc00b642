"""Which attention implementation the model runs with.

`model.attn_implementation: auto` asks for the fastest implementation the model class supports on
this device — flash-attention-2 on CUDA when it is installed, else transformers' own choice (SDPA
where the class supports it, eager otherwise: Gemma2 and Mamba have no SDPA path) — and falls back
when the class lacks it. An explicit choice the class does not support is refused with the ones it
does. Whether packed examples stay isolated under the chosen implementation is measured by the
start-up probe (trainer/model/probes.py), never assumed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache
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


@dataclass(frozen=True)
class Segments:
    """A packed row's example boundaries in every form the attention needs, built once per micro-batch
    on the host from the collated position ids and copied to the device without waiting (pinned,
    non-blocking): every layer's forward reuses them, so the forward has no host synchronisation and no
    host-to-device copy of its own (it had one per layer and example length, each a blocking copy on
    CUDA)."""

    bounds: tuple[int, ...]
    """[0, e1, e2, ..., L]: cumulative example boundaries (host ints)."""
    cu_seqlens: torch.Tensor
    """int32 [n + 1] on the device: the same boundaries, as torch's varlen kernel takes them."""
    groups: tuple[tuple[int, int, torch.Tensor], ...]
    """(length, examples of that length, their token indices on the device): one batched SDPA call each."""
    order: torch.Tensor
    """The groups' token indices concatenated (where each group's output goes back)."""

    @property
    def lengths(self) -> list[int]:
        return [b - a for a, b in zip(self.bounds[:-1], self.bounds[1:])]

    @property
    def max_length(self) -> int:
        return max(self.lengths)


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def bounds(position_ids: torch.Tensor) -> tuple[int, ...]:
    """Cumulative example boundaries (0, e1, e2, ..., L) of a packed row: its position ids restart at 0
    at each example. Give the host tensor the collator made: reading a device tensor is a sync."""
    pos = position_ids[0].cpu()
    return tuple((pos == 0).nonzero().flatten().tolist()) + (int(pos.shape[0]),)


def plan(position_ids: torch.Tensor, device: Optional[torch.device] = None) -> Segments:
    """Segments of a packed row from its position ids, on `device` (default: where the ids are)."""
    return from_bounds(bounds(position_ids), device if device is not None else position_ids.device)


def from_bounds(bounds: tuple[int, ...], device: torch.device) -> Segments:
    device = torch.device(device)
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    by_length: dict[int, list[int]] = {}
    for a, n in zip(bounds[:-1], lengths):
        by_length.setdefault(n, []).append(a)
    host = [
        (n, len(starts), (torch.tensor(starts)[:, None] + torch.arange(n)[None]).flatten()) for n, starts in by_length.items()
    ]
    order = torch.cat([index for _, _, index in host])
    return Segments(
        bounds=tuple(bounds),
        cu_seqlens=_to(torch.tensor(bounds, dtype=torch.int32), device),
        groups=tuple((n, k, _to(index, device)) for n, k, index in host),
        order=_to(order, device),
    )


def segments(position_ids: torch.Tensor) -> list[int]:
    """Cumulative example boundaries [0, e1, e2, ..., L] of a packed row, as a list."""
    return list(bounds(position_ids))


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


@lru_cache(maxsize=1)
def _cuda_varlen():
    """torch's variable-length flash attention (torch.nn.attention.varlen, torch >= 2.10), CUDA only."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def kernel(query: torch.Tensor, dropout: float) -> str:
    """Which kernel a packed row takes: torch's varlen flash kernel on CUDA in half precision (it has
    no fp32 and no dropout), else one causal SDPA call per group of equally long examples."""
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0 and _cuda_varlen():
        return "varlen_attn"
    return "sdpa"


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    **kwargs,
):
    """Attention over a packed row at the cost of Σ len², not (Σ len)²: each example attends causally
    to itself only, through a kernel that takes example boundaries (torch's varlen flash kernel on
    CUDA) or SDPA's causal kernel per group of equally long examples (no mask tensor either way).

    transformers' dispatch with packed position_ids builds a dense block-diagonal [L, L] mask instead,
    which sends SDPA to its masked path and costs (Σ len)². Registered through AttentionInterface, so
    every model that uses the standard attention dispatch can take it; no mask is built for it (the
    mask interface has no entry: transformers then passes none). The start-up probe
    (trainer/model/probes.py) checks it against the model's own attention before it is used."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("varlen attention has no logit softcapping")
    if attention_mask is not None:
        raise NotImplementedError("varlen attention takes example boundaries, not a mask")
    seg = kwargs.get(SEGMENTS)
    if isinstance(seg, (list, tuple)):  # boundaries as a list (tests, tools): planned here
        seg = from_bounds(tuple(seg), query.device)
    window = kwargs.get("sliding_window")
    if query.shape[0] != 1:
        seg = None
    lengths = seg.lengths if seg is not None else [query.shape[2]]
    if window is not None and max(lengths) > window:
        raise NotImplementedError("varlen attention has no sliding window (an example is longer than it)")
    gqa = query.shape[1] != key.shape[1]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout, scale=scaling, is_causal=q.shape[2] > 1, enable_gqa=gqa
        )

    if seg is None or len(lengths) == 1:  # one sequence per row (padded rows: the padding comes last)
        return sdpa(query, key, value).transpose(1, 2).contiguous(), None
    if kernel(query, dropout) == "varlen_attn":  # [1, H, L, D] -> [L, H, D]
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
        out = _cuda_varlen()(
            q,
            k,
            v,
            seg.cu_seqlens,
            seg.cu_seqlens,
            seg.max_length,
            seg.max_length,
            scale=scaling,
            window_size=(-1, 0),
            enable_gqa=gqa,
        )
        return out[None], None
    pieces = []
    for n, count, index in seg.groups:

        def take(t):  # [1, H, L, D] -> [count, H, n, D]
            return t[0].index_select(1, index).unflatten(1, (count, n)).transpose(0, 1)

        out = sdpa(take(query), take(key), take(value))  # [count, H, n, D]
        pieces.append(out.transpose(0, 1).flatten(1, 2))  # [H, count*n, D]
    joined = torch.cat(pieces, dim=1)  # the kernel's dtype (bf16 under autocast)
    out = query.new_empty(query.shape[1:], dtype=joined.dtype)
    out.index_copy_(1, seg.order, joined)
    return out[None].transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
