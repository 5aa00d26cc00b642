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
