"""Model and tokenizer: hub id or local directory, token from a mounted file, LoRA, saving."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Optional, cast

import torch

from trainer.atomic import publish_dir
from trainer import envvars
from trainer.config import LoraConfig, ModelConfig
from trainer.errors import UserError


def read_token() -> Optional[str]:
    """HF_TOKEN_PATH (the Secret mounted by the stack) first, then HF_TOKEN; never logged."""
    path = os.environ.get(envvars.TOKEN_PATH)
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise UserError(
                f"HF_TOKEN_PATH={path} cannot be read ({exc.strerror}). Fix: pulumi config set "
                "--secret hfToken hf_... and pulumi up, or unset HF_TOKEN_PATH"
            ) from None
        return token or None
    return os.environ.get("HF_TOKEN") or None


def resolve(cfg: ModelConfig, token: Optional[str], d, cache_root: Optional[Path] = None, log=lambda m: None) -> str:
    """A local directory holding the model. On the hub, rank 0 downloads (into HF_HOME on the
    shared volume) while the others wait, then everyone loads from the cache. A GGUF file (local or on
    the hub) is dequantized once by rank 0 into a model directory under `cache_root` (trainer/model/gguf.py)."""
    from trainer.model import gguf

    if cfg.gguf_file is not None or gguf.is_gguf(cfg.name_or_path):
        if cache_root is None:
            raise RuntimeError("resolve: a GGUF model needs the cache root (trainer.data.cache_root(cfg))")
        from trainer.runtime.distributed import main_first

        def dequantized() -> str:
            path = gguf.resolve_file(cfg.name_or_path, cfg.gguf_file, cfg.revision, token, d.is_main)
            assert path is not None  # a GGUF source, checked above
            return gguf.as_model_dir(path, gguf_dtype(cfg), Path(cache_root), log if d.is_main else lambda m: None)

        return main_first(d, dequantized)
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(
                f"model.name_or_path {local} is a directory without config.json: not a Hugging Face "
                "model directory. Fix: point it at a directory saved with save_pretrained"
            )
        return str(local)
    if cfg.name_or_path.startswith(("/", "./", "../")):
        raise UserError(
            f"model.name_or_path {cfg.name_or_path} does not exist. Fix: the path of a model directory "
            "(on the volume: /data/...) or a hub id such as meta-llama/Llama-2-7b-hf"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

    def fetch() -> str:
        # Rank 0 downloads; the others, released after it, read the shared cache only.
        try:
            return snapshot_download(
                cfg.name_or_path, revision=cfg.revision, token=token, allow_patterns=patterns, local_files_only=not d.is_main
            )
        except Exception as error:  # hub errors come in many types; the message is what matters
            gated = "gated" in str(error).lower() or "401" in str(error) or "403" in str(error)
            hint = (
                "it is gated: accept its licence on the hub and set the token (pulumi config set --secret "
                "hfToken hf_...; locally HF_TOKEN)"
                if gated
                else "check the hub id, the network, and the token for private or gated models"
            )
            raise UserError(
                f"model.name_or_path {cfg.name_or_path!r} cannot be loaded: {type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}. Fix: {hint}"
            ) from None

    from trainer.runtime.distributed import main_first

    return main_first(d, fetch)


def gguf_dtype(cfg: ModelConfig) -> torch.dtype:
    """The dtype a GGUF model is dequantized into: bf16 when the config trains in bf16 by name (half the
    memory and disk of fp32), else fp32. A function of the config alone, so training, evaluation and a
    checkpoint's reload all read the same base on any machine."""
    return torch.bfloat16 if cfg.dtype in ("bf16", "pure-bf16") else torch.float32


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"tokenizer at {path} cannot be loaded: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(path: str, dtype: torch.dtype, attn: str, device: torch.device, quantization: Any = None):
    """The model in `dtype` (fp32 master weights in mixed precision) with the attention implementation
    `attn` asks for (trainer/model/attention.py); refused in one line when the class cannot run it.
    `quantization`: a BitsAndBytesConfig (trainer/model/qlora.py), applied to each weight as it is read, on `device`."""
    from transformers import AutoModelForCausalLM

    from trainer.model.attention import candidates, unsupported

    tries = candidates(attn, device)
    # bitsandbytes' layers are placed while they load (they cannot be moved after).
    placed = {"quantization_config": quantization, "device_map": {"": device}} if quantization is not None else {}
    from trainer.model.qlora import reading_not_mapping

    for i, implementation in enumerate(tries):
        try:
            with reading_not_mapping() if quantization is not None else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=implementation, **placed)
            break
        except Exception as exc:
            if unsupported(exc) and i + 1 < len(tries):
                continue  # auto: the next implementation this device offers
            if unsupported(exc):
                raise UserError(
                    f"model.attn_implementation {attn!r}: {str(exc).splitlines()[0]} Fix: "
                    "model.attn_implementation: auto (the best the model supports)"
                ) from None
            raise UserError(f"model at {path} cannot be loaded: {type(exc).__name__}: {exc}") from None
    # No KV cache in training; it also matters for packing: transformers looks for packed sequences
    # (position_ids restarting at 0) only when there is no cache.
    model.config.use_cache = False
    return model if quantization is not None else cast(Any, model).to(device)


def import_model_class(path) -> None:
    """Import the modeling module of the model at `path` (as loading will), so a memory plan made
    before loading measures a runtime that already holds it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(path))]
    except Exception:  # noqa: BLE001 - an unknown class is for load_model to report
        pass


def save_dtype(requested: str, model_path: str) -> torch.dtype:
    """The dtype final/ is saved in: the user's choice, or the base model's own (config.json)."""
    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if requested != "auto":
        return named[requested]
    import json

    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


def projection_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every Linear or transformers Conv1D (GPT-2's fused projections) of the model, output head aside."""
    from transformers.pytorch_utils import Conv1D

    head = cast(Any, model).get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and m is not head]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in projection_layers(model)})


def attention_projections(model: torch.nn.Module) -> list[str]:
    """Full names of the projections inside the model's attention blocks (q/k/v/o, qkv_proj, c_attn,
    query_key_value, ...), found by structure rather than a list of architectures' names."""
    attention = [n for n, m in model.named_modules() if type(m).__name__.endswith(("Attention", "Attention2"))]
    return [n for n, _ in projection_layers(model) if any(n.startswith(a + ".") for a in attention)]


def lora_targets(model: torch.nn.Module, requested: tuple[str, ...]):
    """What peft adapts: `auto` (the attention projections; every linear layer for a model without
    attention, e.g. Mamba), `all-linear` (peft's own), or names checked against the model's own."""
    if tuple(requested) == ("all-linear",):
        return "all-linear", "all-linear"
    if tuple(requested) == ("auto",):
        found = attention_projections(model)
        if not found:  # e.g. Mamba: every projection peft can adapt on this architecture
            found = [n for n, _ in projection_layers(model) if _peft_can_adapt(model, n.rsplit(".", 1)[-1])]
            return found, "all-linear (the model has no attention block): " + ", ".join(
                sorted({n.rsplit(".", 1)[-1] for n in found})
            )
        return found, "auto: " + ", ".join(sorted({n.rsplit(".", 1)[-1] for n in found}))
    available = linear_module_names(model)
    missing = [t for t in requested if t not in available]
    if missing:
        raise UserError(
            f"lora.target_modules {missing} not found in the model. Its linear layers are named: "
            f"{', '.join(available)}. Fix: choose from those, or lora.target_modules: [auto] (its "
            "attention projections) or [all-linear]"
        )
    return list(requested), ", ".join(requested)


def _peft_can_adapt(model, leaf: str) -> bool:
    """peft's own rule for layers LoRA must not wrap (Mamba's fused kernels read out_proj/conv1d
    weights directly); asked rather than copied, so it stays in step with peft."""
    try:
        from peft import LoraConfig as PeftLora
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba
    except ImportError:  # an older or newer peft without the check: it will say so itself
        return True
    try:
        _check_lora_target_modules_mamba(PeftLora(target_modules=[leaf]), model, leaf)
    except ValueError:
        return False
    return True


def apply_lora(model, cfg: LoraConfig):
    """Wrap with a peft LoRA adapter; returns (peft model, what was targeted)."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    targets, described = lora_targets(model, cfg.target_modules)
    peft_cfg = PeftLora(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        modules_to_save=list(cfg.modules_to_save) or None,
        task_type="CAUSAL_LM",
        bias="none",
    )
    try:
        return get_peft_model(model, peft_cfg), described
    except ValueError as exc:  # a module peft cannot adapt here, or a modules_to_save name the model lacks
        raise UserError(
            f"lora: {str(exc).rstrip('.')}. Fix: lora.target_modules [auto] (what this model supports) "
            f"and lora.modules_to_save names of the model's modules "
            f"({', '.join(linear_module_names(model))})"
        ) from None


def weights(p: torch.Tensor) -> int:
    """The weights a parameter stands for: a 4-bit bitsandbytes weight packs two in a byte (QLoRA)."""
    state = getattr(p, "quant_state", None)
    return int(torch.Size(state.shape).numel()) if state is not None else p.numel()


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(weights(p) for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def exact_in(held: torch.dtype, saved: torch.dtype) -> bool:
    """Whether weights saved in `saved` are held exactly in `held` (fp16 -> bf16 loses 3 mantissa bits)."""
    return held == saved or held == torch.float32


def trainable_fp32(model) -> None:
    """Adapters and modules_to_save copies in fp32 whatever the base's dtype (peft's own
    autocast_adapter_dtype does it for the adapters; the modules_to_save copies are the base's dtype)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def merge_lora(model, dtype: torch.dtype):
    """The plain model with every LoRA layer merged: each layer's base weight is widened to fp32, the
    adapter's product added there, and the sum rounded once to `dtype` — one layer at a time, so an
    exact merge costs one layer of extra memory, not an fp32 copy of the model."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            held = cast(torch.Tensor, base.weight).data
            base.weight.data = held.float()
            module.merge()
            merged = base.weight.data.to(dtype)
            if held.dtype == dtype:
                # Back into the weight's own storage: transformers loads weights as pages mapped from the
                # safetensors files, which stay resident while the file is mapped, so a new tensor per
                # layer would hold the merged model beside the loaded one (+4 GiB at 7B on q/k/v/o).
                held.copy_(merged)
                merged = held
            base.weight.data = merged
    return model.unload()  # the merged base layers, adapters removed


def rebuild(path: str, dtype: torch.dtype, lora: Optional[LoraConfig], trained: dict) -> torch.nn.Module:
    """The base model from its files in `dtype`, with the trained weights put back (LoRA adapters and
    modules_to_save, or every weight of a full fine-tune): final/ then starts from the base's exact values."""
    model = load_model(path, dtype, "auto", torch.device("cpu"))
    if lora is not None:
        model, _ = apply_lora(model, lora)
        trainable_fp32(model)
    missing, unexpected = model.load_state_dict(trained, strict=False)
    if unexpected:
        raise RuntimeError(f"trained weights not in the rebuilt model: {unexpected[:3]}")
    return model


# Tokenizer files that transformers 5 reads but no longer writes (it saves tokenizer.json): llama.cpp's
# GGUF converter takes a SentencePiece model (Llama 2, Mistral, Gemma) from tokenizer.model only.
SOURCE_TOKENIZER_FILES = ("tokenizer.model",)


def save_final(
    model, tokenizer, final_dir: Path, adapter_dir: Optional[Path], dtype: torch.dtype, base_dir: Optional[str] = None
) -> None:
    """final/: a plain Hugging Face model directory (LoRA merged); adapter/: the LoRA adapter alone.
    `base_dir`: the base model's directory, whose SentencePiece model is carried over (GGUF export)."""
    import shutil

    from peft import PeftModel

    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, PeftModel):
        if adapter_dir is not None:
            model.save_pretrained(str(adapter_dir))
            tokenizer.save_pretrained(str(adapter_dir))
        model = merge_lora(model, dtype)
    model.config.use_cache = True
    model.to(dtype).save_pretrained(str(tmp), safe_serialization=True)  # cast in place, tensor by tensor
    tokenizer.save_pretrained(str(tmp))
    for name in SOURCE_TOKENIZER_FILES if base_dir else ():
        source = Path(str(base_dir)) / name
        if source.is_file() and not (tmp / name).exists():
            shutil.copy2(source, tmp / name)
    publish_dir(tmp, final_dir)  # swapped in whole: a reader never sees a half-written final/


class CausalLMLoss(torch.nn.Module):
    """Summed next-token loss of the model's own forward, projecting to the vocabulary only where a
    label exists.

    Prompt tokens (masked out of the loss) and padding need hidden states but no logits. transformers'
    `logits_to_keep` takes a boolean [batch, length] mask (per-row positions, as packed training needs),
    so the model's own head runs — softcapping, logit multipliers, casts, tied or untied weights — on
    the labelled positions only: no [batch, length, vocab] logits tensor (gigabytes at 32k-128k
    vocabularies). trainer/model/probes.py checks at start-up that this equals the model's own
    `forward(labels=...)` loss and falls back to full logits (`full_logits=True`) where it does not.
    DDP/FSDP wrap this module, so it is what their hooks see.
    """

    def __init__(self, model, full_logits: bool = False):
        super().__init__()
        self.model = model  # the HF (or peft) model: the only registered child, so state dicts stay "model.*"
        self.full_logits = full_logits

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, **extra):
        targets = labels[:, 1:]
        keep = targets != -100
        if self.full_logits:
            logits = self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
            logits = logits[:, :-1][keep]
        else:
            mask = torch.nn.functional.pad(keep, (0, 1), value=False)  # positions whose next token is a label
            logits = self.model(
                input_ids=input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=mask, **extra
            ).logits
            logits = logits.reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()
