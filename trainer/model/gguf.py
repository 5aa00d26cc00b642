"""GGUF files as a model source: a llama.cpp / Ollama model (the file a person already runs) becomes
a Hugging Face model directory that the trainer fine-tunes like any other base.

transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`) and dequantizes every tensor into
torch; what it loads that way refuses `save_pretrained` ("quantized with gguf and is not
serializable"), and reading it again on every start (and on every rank) would repeat the
dequantization. So rank 0 does it once: the weights, in the training dtype, go into a plain model
directory (config.json without a quantization_config, model.safetensors, the tokenizer with its chat
template) in the cache beside the data cache, keyed by the file's SHA-256 and the dtype, published
whole (written under a temporary name and renamed). Every later run, rank and restart reads that.

The fine-tune starts from the dequantized weights: the values the GGUF file's quantized blocks stand
for, which is what a person who runs that file in llama.cpp or Ollama already has (not the original
unquantized checkpoint the GGUF was made from, which this file does not hold).
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from trainer.atomic import publish_dir
from trainer.errors import UserError

SUFFIX = ".gguf"
MARKER = "gguf-source.json"  # written last into a cache entry: what it was made from


def is_gguf(name: str) -> bool:
    return name.lower().endswith(SUFFIX)


def architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares (llama, qwen2, phi3, ...), read from the header.

    Hand-written rather than gguf.GGUFReader: the reader parses every metadata array of the file (a
    49k-token vocabulary and its merges: ~5 s for SmolLM2) to answer one string, which the format
    (github.com/ggml-org/ggml docs/gguf.md) puts among the first key-value pairs."""
    import struct

    def refuse(why: str) -> UserError:
        return UserError(
            f"model: {path} is not a readable GGUF file ({why}). Fix: the path of a complete .gguf file "
            "(llama.cpp / Ollama model)"
        )

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # scalar value types
    try:
        with open(path, "rb") as f:
            magic, version, _tensors, count = struct.unpack("<4sIQQ", f.read(24))
            if magic != b"GGUF" or version < 2:
                raise refuse("no GGUF header")
            for _ in range(min(count, 64)):
                (length,) = struct.unpack("<Q", f.read(8))
                key = f.read(length).decode()
                (kind,) = struct.unpack("<I", f.read(4))
                if kind == 8:  # string
                    (n,) = struct.unpack("<Q", f.read(8))
                    value = f.read(n)
                    if key == "general.architecture":
                        return value.decode()
                elif kind in sizes:
                    f.seek(sizes[kind], 1)
                else:  # an array before the architecture: the file is not laid out as llama.cpp writes it
                    break
    except (OSError, struct.error, UnicodeDecodeError) as exc:
        raise refuse(f"{type(exc).__name__}: {exc}") from None
    raise refuse("no general.architecture among its first metadata keys")


# The names llama.cpp writes for architectures that transformers lists under another (its own
# modeling_gguf_pytorch_utils.load_gguf_checkpoint renames them the same way).
_RENAMED = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}


def readable_architectures() -> list[str]:
    """The GGUF architectures this transformers can load into torch (its own list)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))


def check_architecture(path: Path) -> str:
    arch = architecture(path)
    readable = readable_architectures()
    if _RENAMED.get(arch, arch) not in readable:
        raise UserError(
            f"model: {path.name} is a GGUF model of architecture {arch!r}, which transformers cannot read "
            f"from GGUF (it reads: {', '.join(readable)}). Fix: the model's Hugging Face checkpoint "
            "(model.name_or_path: a hub id or a directory saved with save_pretrained)"
        )
    return arch


def config_dict(path: Path) -> dict:
    """The model's config as transformers reads it from the GGUF file's metadata (no tensor is
    read): what the memory plan needs at preview and in `python -m trainer plan`."""
    from transformers import AutoConfig

    check_architecture(path)
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).to_dict()


def cache_key(path: Path, dtype: torch.dtype) -> str:
    from trainer.atomic import sha256_file

    return f"gguf-{sha256_file(path)[:20]}-{str(dtype).replace('torch.', '')}"


def dequantize(path: Path, dtype: torch.dtype, target: Path) -> None:
    """The GGUF file at `path` as a plain model directory at `target`, weights in `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    state = loaded.state_dict()
    config = copy.deepcopy(loaded.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    config.dtype = dtype
    # A fresh model of the same config (no GGUF quantizer attached, so it saves normally), holding the
    # loaded tensors themselves (assign: no second copy of the weights).
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise UserError(
            f"model: {name}: transformers read no values for {missing[:3]} from the GGUF file. Fix: the "
            "model's Hugging Face checkpoint instead"
        )
    del loaded
    model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps({"gguf_file": str(path), "dtype": str(dtype)}, indent=1) + "\n")
    publish_dir(tmp, target)


def resolve_file(
    name_or_path: str, gguf_file: Optional[str], revision: Optional[str], token: Optional[str], is_main: bool
) -> Optional[Path]:
    """The local GGUF file a model config names, downloading it from the hub when it names one there;
    None when the config names no GGUF file. Forms: name_or_path a .gguf file (local, or
    `owner/repo/file.gguf` on the hub); or gguf_file, a file inside name_or_path (a directory or a
    hub repo, as transformers' `gguf_file`)."""
    if gguf_file is None and not is_gguf(name_or_path):
        return None
    if gguf_file is None:
        local = Path(name_or_path).expanduser()
        if local.is_file() or name_or_path.startswith(("/", "./", "../")) or name_or_path.count("/") < 2:
            if not local.is_file():
                raise UserError(
                    f"model.name_or_path {name_or_path}: no such GGUF file. Fix: the path of a .gguf file "
                    "(on the volume: /data/...), or owner/repo/file.gguf on the hub"
                )
            return local
        repo, _, name = name_or_path.rpartition("/")
    else:
        local = Path(name_or_path).expanduser() / gguf_file
        if Path(name_or_path).expanduser().is_dir():
            if not local.is_file():
                raise UserError(
                    f"model.gguf_file {gguf_file} is not in {name_or_path}. Fix: the name of a .gguf file in that directory"
                )
            return local
        repo, name = name_or_path, gguf_file
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, name, revision=revision, token=token, local_files_only=not is_main))
    except Exception as error:  # hub errors come in many types; the message is what matters
        raise UserError(
            f"model: the GGUF file {name} of {repo} cannot be loaded: {type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}. Fix: check the repo id, the file name, "
            "the network, and the token for private or gated models"
        ) from None


def as_model_dir(path: Path, dtype: torch.dtype, cache_root: Path, log) -> str:
    """The cached plain model directory of a GGUF file (made now when it is not there)."""
    check_architecture(path)
    target = cache_root / cache_key(path, dtype)
    if (target / MARKER).exists():
        log(f"model: {path.name} read from its dequantized copy {target}")
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    log(
        f"model: dequantizing {path.name} into {str(dtype).replace('torch.', '')} once ({target}); the fine-tune "
        "starts from these weights, the ones llama.cpp runs"
    )
    dequantize(path, dtype, target)
    return str(target)
