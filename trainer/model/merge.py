"""final/ of a QLoRA run, streamed from the base's files: each weight is read from the base's safetensors
files on its own, the trained LoRA product added in fp32 where the weight was adapted (a modules_to_save
copy replaces it), rounded once to the save dtype and written into final/'s shards, a shard at a time.

The base was held in 4 or 8 bits for training; merging into those weights would round the whole base to
them, so final/ starts from the files' exact values instead. Streaming keeps the merge within the memory
QLoRA was chosen for: a shard being written (1 GiB) and one tensor, never the unquantized model.

Hand-written because the libraries merge into a loaded model (PEFT's merge_and_unload) and safetensors'
Python API maps a whole file (every page read stays resident while it is mapped, up to the file's size);
here each tensor is read with a plain file read at its offset. The arithmetic is PEFT's: W + B @ A * scaling
(transposed for fan-in-fan-out layers), the same as `merge_and_unload` on the base in fp32.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, cast

import torch

from trainer.atomic import publish_dir
from trainer.model.memplan import MERGE_SHARD_BYTES as SHARD_BYTES

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class Delta:
    """One adapted layer's trained LoRA factors (fp32 copies) and how PEFT merges them."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    fan_in_fan_out: bool

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        product = (self.b @ self.a) * self.scaling
        return weight.float() + (product.t() if self.fan_in_fan_out else product)


def trained(peft_model) -> tuple[dict[str, Delta], dict[str, torch.Tensor]]:
    """The trained parts of a PEFT model by the base's weight names: LoRA factors per adapted weight, and
    the whole weights of modules_to_save copies."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    deltas: dict[str, Delta] = {}
    whole: dict[str, torch.Tensor] = {}
    for name, module in peft_model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            adapter = module.active_adapters[0]
            lora_a, lora_b = cast(Any, module.lora_A[adapter]), cast(Any, module.lora_B[adapter])
            deltas[f"{name}.weight"] = Delta(
                lora_a.weight.detach().float().clone(),
                lora_b.weight.detach().float().clone(),
                float(module.scaling[adapter]),
                bool(getattr(module, "fan_in_fan_out", False)),
            )
        elif isinstance(module, ModulesToSaveWrapper):
            copy = module.modules_to_save[module.active_adapters[0]]
            for key, p in copy.named_parameters():
                whole[f"{name}.{key}"] = p.detach().clone()
    return deltas, whole


def _header(path: Path) -> tuple[int, dict[str, Any]]:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


def _files(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        return [base_dir / n for n in names]
    single = base_dir / "model.safetensors"
    return [single] if single.exists() else []


def names(base_dir: str | Path) -> Optional[set[str]]:
    """Every weight name in the base's safetensors files; None where it has none (.bin checkpoints)."""
    files = _files(Path(base_dir))
    return {k for f in files for k in _header(f)[1]} if files else None


def _tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    start, header = _header(path)
    with path.open("rb") as f:
        for name, meta in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = meta["data_offsets"]
            f.seek(start + begin)
            buffer = bytearray(end - begin)
            f.readinto(buffer)
            dtype = _DTYPES[meta["dtype"]]
            tensor = torch.frombuffer(buffer, dtype=dtype) if buffer else torch.empty(0, dtype=dtype)
            yield name, tensor.reshape(meta["shape"])


def stream(
    base_dir: str | Path,
    deltas: dict[str, Delta],
    whole: dict[str, torch.Tensor],
    dtype: torch.dtype,
    out_dir: Path,
    shard_bytes: int = SHARD_BYTES,
) -> int:
    """Writes the merged weights into `out_dir` (model.safetensors, or shards and their index); returns
    how many weights were merged. Every trained name must be one of the files' (checked by the caller)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map: dict[str, int] = {}
    held, total, merged = 0, 0, 0
    written: list[str] = []

    def flush() -> None:
        nonlocal held
        number = len(written) + 1
        name = f"model-{number:05d}.safetensors"
        save_file(shards[0], str(out_dir / name), metadata={"format": "pt"})
        written.append(name)
        shards[0], held = {}, 0

    for path in _files(Path(base_dir)):
        for name, tensor in _tensors(path):
            if name in whole:
                tensor = whole[name]
            elif name in deltas:
                tensor = deltas[name].apply(tensor)
                merged += 1
            if tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if held and held + tensor.nbytes > shard_bytes:
                flush()
            shards[0][name] = tensor.contiguous()
            weight_map[name] = len(written)
            held += tensor.nbytes
            total += tensor.nbytes
    flush()
    if len(written) == 1:
        (out_dir / written[0]).rename(out_dir / "model.safetensors")
    else:
        index = {"metadata": {"total_size": total}, "weight_map": {k: written[i] for k, i in weight_map.items()}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return merged


def write_final(
    base_dir: str,
    deltas: dict[str, Delta],
    whole: dict[str, torch.Tensor],
    dtype: torch.dtype,
    tokenizer,
    final_dir: Path,
    source_files: tuple[str, ...] = (),
) -> int:
    """final/ as a plain Hugging Face model directory (config in the save dtype, the tokenizer, the base's
    SentencePiece model), swapped in whole; returns how many weights were merged."""
    from transformers import AutoConfig

    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged = stream(base_dir, deltas, whole, dtype, tmp)
    config = AutoConfig.from_pretrained(base_dir)
    config.dtype = dtype
    config.use_cache = True
    config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    for name in ("generation_config.json", *source_files):
        source = Path(base_dir) / name
        if source.is_file() and not (tmp / name).exists():
            shutil.copy2(source, tmp / name)
    publish_dir(tmp, final_dir)
    return merged
