"""What a weight-only quantized model stores, part by part: from its shapes (before any compute) or
from its tensors (after INC converted it).

Intel Neural Compressor 3.x writes weight-only models in the Hugging Face ("optimum", GPTQ-style)
layout. For every quantized layer with `i` inputs and `o` outputs at `b` bits and group size `g`
(`pack = 32 // b` values per int32) it stores:

    qweight            int32  [ceil(i / pack), o]           i * o * b / 8 bytes
    scales             fp16   [ceil(i / g), o]              2 bytes per group and output
    qzeros             int32  [ceil(i / g), ceil(o / pack)] written even for symmetric schemes
    bias               fp16   [o]                           written even when the layer has none
    scale_bf16_to_fp8  bf16   [1]

Every other tensor — token embeddings, norms, the lm_head (INC leaves it unquantized) — is kept,
and this product keeps it in the dtype of the model it came from (trainer/post/quantize.py casts it
back), so a bf16 model's embeddings are not widened to fp32.

Hand-written because INC reports neither sizes nor what it skipped, and the estimate is needed
before training to refuse a quantization that cannot shrink the model. The arithmetic is checked
against what INC writes in tests/trainer/test_quantize.py.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional, cast

import torch

# INC's own names: the ops its weight-only configs consider, and the heads they leave unquantized
# (neural_compressor.torch.utils.constants.LM_HEAD_NAMES with quant_lm_head=False).
LM_HEAD_PATTERNS = (".*lm_head", ".*output_layer", ".*embed_out")


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def layer_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(inputs, outputs) of an nn.Linear or a transformers Conv1D (GPT-2; weight stored [in, out])."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    rows, cols = cast(torch.Tensor, module.weight).shape
    return rows, cols


def quantizable_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The layers INC's RTN/GPTQ/AWQ configs quantize: Linear and Conv1D, the heads excluded."""
    kinds = tuple(k for k in (torch.nn.Linear, _conv1d_type()) if k is not None)
    heads = [re.compile(p) for p in LM_HEAD_PATTERNS]
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds) and not any(h.fullmatch(name) for h in heads)]


def effective_group_size(model: torch.nn.Module, requested: int) -> int:
    """The requested group size, or the largest power of two that divides every quantized layer's
    input width (a 64-wide test model cannot have groups of 128). -1 (per channel) stays -1."""
    if requested == -1:
        return -1
    widths = [layer_shape(m)[0] for _, m in quantizable_layers(model)]
    narrowest = min(widths) if widths else requested
    size = requested
    while size > narrowest or (narrowest % size):
        size //= 2
    return max(size, 1)


def woq_layer_bytes(
    inputs: int, outputs: int, bits: int, group_size: int, algorithm: str = "rtn", dtype: torch.dtype = torch.float32
) -> int:
    """Bytes INC's Hugging Face layout stores for one quantized layer (see the module docstring).
    AWQ adds its per-input-channel activation scale (`input_scale`, kept in the model's dtype)."""
    pack = 32 // bits
    groups = math.ceil(inputs / (inputs if group_size == -1 else group_size))
    qweight = math.ceil(inputs / pack) * outputs * 4
    scales = groups * outputs * 2
    qzeros = groups * math.ceil(outputs / pack) * 4
    awq = inputs * dtype_bytes(dtype) if algorithm == "awq" else 0
    return qweight + scales + qzeros + outputs * 2 + 2 + awq


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class Part:
    parameters: int = 0
    bytes: int = 0
    dtypes: set = field(default_factory=set)

    def add(self, parameters: int, nbytes: int, dtype: str) -> None:
        self.parameters += parameters
        self.bytes += nbytes
        self.dtypes.add(dtype)


@dataclass
class Breakdown:
    """Weights per part of a (quantized or to-be-quantized) model. `quantized` holds the layers INC
    quantizes; the other parts are what is kept, in `dtype`, the dtype of the model it came from."""

    bits: int
    group_size: int
    dtype: torch.dtype
    quantized_layers: int = 0
    parts: dict[str, Part] = field(default_factory=dict)
    unquantized_bytes: int = 0
    """The same weights, none quantized, in `dtype`: the size before quantization."""

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.parts.values())

    @property
    def ratio(self) -> float:
        return self.total_bytes / max(1, self.unquantized_bytes)

    def part(self, name: str) -> Part:
        return self.parts.setdefault(name, Part())

    def report(self) -> dict:
        return {
            "quantized_layers": self.quantized_layers,
            "kept_dtype": _name(self.dtype),
            "parts": {
                name: {
                    "parameters": p.parameters,
                    "bytes": p.bytes,
                    "dtype": ", ".join(sorted(p.dtypes)),
                    "kept": name != "quantized",
                }
                for name, p in self.parts.items()
            },
            "weights_bytes": self.total_bytes,
            "unquantized_bytes": self.unquantized_bytes,
            "ratio": round(self.ratio, 4),
            "explanation": self.explain(),
        }

    def explain(self) -> str:
        """Why the result is (or is not) smaller, in one sentence per side, from the parts."""
        q = self.parts.get("quantized", Part())
        kept = sorted(((n, p) for n, p in self.parts.items() if n != "quantized" and p.bytes), key=lambda kv: -kv[1].bytes)
        kept_bytes = sum(p.bytes for _, p in kept)
        group = "per channel" if self.group_size == -1 else f"groups of {self.group_size}"
        layers = (
            f"{self.quantized_layers} layers quantized to {self.bits} bits ({group}, an fp16 scale and a "
            f"packed zero point per group) take {q.bytes / max(1, q.parameters * dtype_bytes(self.dtype)):.0%}"
            f" of their {_name(self.dtype)} size"
            if self.quantized_layers
            else "no layer was quantized"
        )
        parts = ", ".join(f"{n} {p.parameters:,} parameters" for n, p in kept)
        return (
            f"{layers}; kept as {_name(self.dtype)}: {parts or 'nothing'}, "
            f"{kept_bytes / max(1, self.total_bytes):.0%} of the result; "
            f"result {self.ratio:.0%} of the unquantized size"
        )


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _owner(model: torch.nn.Module, key: str) -> tuple[str, torch.nn.Module]:
    name = key.rsplit(".", 1)[0] if "." in key else ""
    return name, model.get_submodule(name) if name else model


def _kept_part(model: torch.nn.Module, module: torch.nn.Module, tensor: torch.Tensor) -> str:
    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and module is head:
        return "lm_head"
    if isinstance(module, torch.nn.Embedding):
        return "embeddings"
    if tensor.ndim == 1:
        return "norms and biases"
    kinds = tuple(k for k in (torch.nn.Linear, _conv1d_type()) if k is not None)
    if isinstance(module, kinds):
        return "unquantized layers"
    return "other"


def _unique_state(model: torch.nn.Module):
    """Persistent tensors of the model, each stored tensor once (tied weights are saved once)."""
    seen = set()
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        yield key, tensor


def estimate(model: torch.nn.Module, bits: int, group_size: int, dtype: torch.dtype, algorithm: str = "rtn") -> Breakdown:
    """What quantizing `model` (meta tensors are fine) will store, with its other weights in `dtype`."""
    group = effective_group_size(model, group_size)
    layers = {name for name, _ in quantizable_layers(model)}
    out = Breakdown(bits, group, dtype)
    width = dtype_bytes(dtype)
    for name, module in quantizable_layers(model):
        i, o = layer_shape(module)
        out.part("quantized").add(i * o, woq_layer_bytes(i, o, bits, group, algorithm, dtype), f"int{bits}")
        out.quantized_layers += 1
    for key, tensor in _unique_state(model):
        owner, module = _owner(model, key)
        floating = tensor.is_floating_point()
        out.unquantized_bytes += tensor.numel() * (width if floating else tensor.element_size())
        if owner in layers:
            continue  # replaced by the quantized layer's buffers (its bias included)
        nbytes = tensor.numel() * (width if floating else tensor.element_size())
        out.part(_kept_part(model, module, tensor)).add(tensor.numel(), nbytes, _name(dtype if floating else tensor.dtype))
    return out


def measure(qmodel: torch.nn.Module, bits: int, group_size: int, dtype: torch.dtype, unquantized_bytes: int) -> Breakdown:
    """What an INC-converted model holds: its quantized layers' buffers and every kept tensor."""
    from neural_compressor.torch.algorithms.weight_only.modules import INCWeightOnlyLinear

    out = Breakdown(bits, group_size, dtype, unquantized_bytes=unquantized_bytes)
    for _, module in qmodel.named_modules():
        if isinstance(module, INCWeightOnlyLinear):
            out.quantized_layers += 1
            out.part("quantized").parameters += module.in_features * module.out_features
    for key, tensor in _unique_state(qmodel):
        _, module = _owner(qmodel, key)
        nbytes = tensor.numel() * tensor.element_size()
        # AWQ wraps a quantized layer to hold its input scale: that buffer belongs to the layer.
        if any(isinstance(m, INCWeightOnlyLinear) for m in (module, *module.children())):
            part = out.part("quantized")
            part.bytes += nbytes
            part.dtypes.add(f"int{bits}")
        else:
            out.part(_kept_part(qmodel, module, tensor)).add(tensor.numel(), nbytes, _name(tensor.dtype))
    return out


def meta_model(path: str):
    """The model of a directory built on the meta device: shapes only, no memory, no weights read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def saved_dtype(model_dir: str) -> Optional[torch.dtype]:
    """The floating dtype most weights of a saved model directory are stored in (safetensors headers)."""
    from pathlib import Path

    from safetensors import safe_open

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    count: dict[torch.dtype, int] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                piece = st.get_slice(key)
                dtype = names.get(piece.get_dtype())
                if dtype is not None:
                    count[dtype] = count.get(dtype, 0) + math.prod(piece.get_shape())
    return max(count, key=lambda k: count[k]) if count else None


# ---- what the written files hold: measured, per served format -------------------------------------

# What a quantized layer stores beside its packed weight (compressed-tensors and AutoRound's names).
QUANTIZED_PARTS = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_shape",
    "weight_g_idx",
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
)


def _stored_part(name: str, gguf: bool) -> str:
    if gguf:
        if name.startswith("token_embd"):
            return "embeddings"
        if name.startswith("output."):
            return "head"
        return "norms and biases" if "norm" in name or name.endswith(".bias") else "layers"
    if "embed_tokens" in name or name.endswith("wte.weight"):
        return "embeddings"
    if name.startswith("lm_head"):
        return "head"
    if name.rsplit(".", 1)[-1] in QUANTIZED_PARTS:
        return "layers"
    return "norms and biases" if "norm" in name or name.endswith(".bias") else "layers"


def stored(path) -> dict:
    """Where the bytes of a written model went, read from its files (a model directory of safetensors,
    or a .gguf file): per part (embeddings, head, layers, norms and biases) the bytes and the storage
    types, and whether the head is tied to the embedding (stored once) or written on its own. Real
    models spend much of their size here: SmolLM2's 49,152 x 576 embedding is a fifth of its
    parameters, so whether a format quantizes it and keeps the head tied decides how much it shrinks."""
    from pathlib import Path

    path = Path(path)
    parts: dict[str, dict] = {}

    def add(part: str, kind: str, size: int) -> None:
        entry = parts.setdefault(part, {"bytes": 0, "stored_as": set()})
        entry["bytes"] += int(size)
        entry["stored_as"].add(kind)

    if path.suffix == ".gguf":
        from gguf import GGUFReader

        for t in GGUFReader(str(path)).tensors:
            add(_stored_part(t.name, True), t.tensor_type.name.lower(), t.n_bytes)
    else:
        from safetensors import safe_open

        for file in sorted(path.glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    kind = piece.get_dtype().lower()
                    count = math.prod(piece.get_shape()) if piece.get_shape() else 1
                    width = {"f32": 4, "f16": 2, "bf16": 2, "i32": 4, "i64": 8, "i8": 1, "u8": 1, "f64": 8}.get(kind, 4)
                    add(_stored_part(key, False), kind, count * width)
    total = sum(p["bytes"] for p in parts.values())
    out = {
        name: {"bytes": p["bytes"], "stored_as": ", ".join(sorted(p["stored_as"])), "share": round(p["bytes"] / max(1, total), 4)}
        for name, p in parts.items()
    }
    tied = "head" not in parts
    summary = "; ".join(
        f"{name} {p['bytes'] / 1e6:.1f} MB as {p['stored_as']} ({p['share']:.0%})"
        for name, p in sorted(out.items(), key=lambda kv: -kv[1]["bytes"])
    )
    return {
        "parts": out,
        "bytes": total,
        "head_tied": tied,
        "explanation": summary
        + ("; the head is tied to the embedding (stored once)" if tied else "; the head is stored on its own"),
    }
