"""QLoRA: a LoRA run whose frozen base's linear layers are held quantized (lora.base_bits: 4 or 8).

The library is bitsandbytes (chosen by measuring, bench/qlora_kernels.py: its NF4 layer at the 7B MLP shape
runs a forward and an input gradient in 2.03x an fp32 weight's time on an AVX2 CPU, torchao's NF4Tensor in
5.88x, both at a quarter of bf16's memory), reached through transformers' BitsAndBytesConfig as the Hugging
Face Trainer + PEFT does: transformers quantizes each weight as it is read from the files, so the base is
never resident unquantized, and PEFT puts its LoRA layers on bitsandbytes' Linear4bit/Linear8bitLt.

What stays as for LoRA: the embeddings, the head and the norms in the frozen base's storage dtype (transformers
keeps the head unquantized, as the QLoRA paper does), the adapters and the optimizer state in fp32. The
quantized layers dequantize their weight for each matmul into the compute dtype (fp32 on a CPU whose bf16 is
slow: trainer/model/compute.py), one layer at a time.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from trainer.errors import UserError


def short_name(bits: int) -> str:
    """What the quantized base's weights are called in the logs and the plan."""
    return "NF4" if bits == 4 else "int8"


def require() -> None:
    """bitsandbytes importable here (x86-64 CPUs from AVX2 up and CUDA), else refused before any load."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure to import is the same refusal
        raise UserError(
            f"lora.base_bits needs bitsandbytes, which does not load here ({type(exc).__name__}: "
            f"{exc}). Fix: `pip install -r requirements.lock` (it pins bitsandbytes), or remove "
            "lora.base_bits to keep the base in model.dtype"
        ) from None


def quantization_config(bits: int, compute: torch.dtype) -> Any:
    """transformers' BitsAndBytesConfig for a frozen base of `bits` computed in `compute`."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
        )
    return BitsAndBytesConfig(load_in_8bit=True)


@contextmanager
def reading_not_mapping() -> Iterator[None]:
    """transformers maps every safetensors shard of the model while it loads and keeps each page it has
    read until loading ends: for a base quantized as it loads, the whole unquantized model (13.5 GB at
    7B) stays resident in file pages only to be dropped after (measured: 16.9 GiB at the end of loading,
    6.8 after). Within this context its loader reads each tensor with pread instead (safetensors' own
    backend, the one transformers uses on Windows and MPS): each tensor is read, quantized and freed.
    Hand-written because transformers offers no switch for it (disable_mmap reads whole files at once)."""
    import transformers.modeling_utils as loading

    mapped = loading.safe_open

    def opened(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("backend") == "mmap":
            kwargs["backend"] = "pread"
        return mapped(*args, **kwargs)

    setattr(loading, "safe_open", opened)  # noqa: B010 - a module global replaced for the load's duration
    try:
        yield
    finally:
        setattr(loading, "safe_open", mapped)  # noqa: B010


@dataclass(frozen=True)
class Quantized:
    """What the loaded base holds quantized: layers, weights and their bytes."""

    bits: int
    layers: int
    weights: int
    bytes: int

    def describe(self) -> str:
        kind = "NF4 with double quantization" if self.bits == 4 else "int8 (LLM.int8)"
        return (
            f"frozen base quantized by bitsandbytes while it loaded: {self.layers} linear layers in {kind}, "
            f"{self.weights / 1e6:.1f}M weights in {self.bytes / 1e6:,.1f} MB "
            f"({8 * self.bytes / max(1, self.weights):.2f} bits a weight)"
        )


def quantized_layers(model: torch.nn.Module) -> list[Any]:
    import bitsandbytes as bnb

    return [m for m in model.modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def inspect(model: torch.nn.Module, bits: int) -> Quantized:
    """Counts the quantized layers and their bytes as held (packed weights and quantization state)."""
    layers = quantized_layers(model)
    weights = sum(m.in_features * m.out_features for m in layers)
    held = 0
    for m in layers:
        weight: Any = m.weight
        held += weight.numel() * weight.element_size()
        state = getattr(weight, "quant_state", None)  # 4-bit: absmax (and its own state when nested)
        if state is not None:
            for tensor in (state.absmax, getattr(getattr(state, "state2", None), "absmax", None)):
                held += tensor.numel() * tensor.element_size() if tensor is not None else 0
        scale = getattr(weight, "SCB", None)  # 8-bit: a scale per row
        held += scale.numel() * scale.element_size() if scale is not None else 0
    return Quantized(bits, len(layers), weights, held)
