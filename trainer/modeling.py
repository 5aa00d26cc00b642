"""Model and tokenizer: hub id or local directory, token from a mounted file, LoRA, saving."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from trainer.config import LoraConfig, ModelConfig
from trainer.errors import UserError


def read_token() -> Optional[str]:
    """HF_TOKEN_PATH (the Secret mounted by the stack) first, then HF_TOKEN; never logged."""
    path = os.environ.get("HF_TOKEN_PATH")
    if path:
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise UserError(f"HF_TOKEN_PATH={path} cannot be read ({exc.strerror}). Fix: pulumi config set "
                            "--secret hfToken hf_... and pulumi up, or unset HF_TOKEN_PATH") from None
        return token or None
    return os.environ.get("HF_TOKEN") or None


def resolve(cfg: ModelConfig, token: Optional[str], d) -> str:
    """A local directory holding the model. On the hub, rank 0 downloads (into HF_HOME on the
    shared volume) while the others wait, then everyone loads from the cache."""
    local = Path(cfg.name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(f"model.name_or_path {local} is a directory without config.json: not a Hugging Face "
                            "model directory. Fix: point it at a directory saved with save_pretrained")
        return str(local)
    if cfg.name_or_path.startswith(("/", "./", "../")):
        raise UserError(f"model.name_or_path {cfg.name_or_path} does not exist. Fix: the path of a model directory "
                        "(on the volume: /data/...) or a hub id such as meta-llama/Llama-2-7b-hf")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]

    def fetch() -> str:
        # Rank 0 downloads; the others, released after it, read the shared cache only.
        try:
            return snapshot_download(cfg.name_or_path, revision=cfg.revision, token=token, allow_patterns=patterns,
                                     local_files_only=not d.is_main)
        except Exception as error:  # hub errors come in many types; the message is what matters
            gated = "gated" in str(error).lower() or "401" in str(error) or "403" in str(error)
            hint = ("it is gated: accept its licence on the hub and set the token (pulumi config set --secret "
                    "hfToken hf_...; locally HF_TOKEN)" if gated
                    else "check the hub id, the network, and the token for private or gated models")
            raise UserError(f"model.name_or_path {cfg.name_or_path!r} cannot be loaded: {type(error).__name__}: "
                            f"{str(error).splitlines()[0] if str(error) else ''}. Fix: {hint}") from None

    from trainer.distributed import main_first

    return main_first(d, fetch)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"tokenizer at {path} cannot be loaded: {exc}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_model(path: str, dtype: torch.dtype, attn: str, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
    except Exception as exc:
        raise UserError(f"model at {path} cannot be loaded: {type(exc).__name__}: {exc}") from None
    # No KV cache in training; it also matters for packing: transformers looks for packed sequences
    # (position_ids restarting at 0) only when there is no cache.
    model.config.use_cache = False
    return model.to(device)


def linear_module_names(model: torch.nn.Module) -> list[str]:
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            names.add(full.rsplit(".", 1)[-1])
    return sorted(names)


def apply_lora(model, cfg: LoraConfig):
    """Wrap with a peft LoRA adapter after checking every target against the model's modules."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model

    available = linear_module_names(model)
    missing = [t for t in cfg.target_modules if t not in available]
    if missing:
        raise UserError(f"lora.target_modules {missing} not found in the model. Its linear modules are: "
                        f"{', '.join(available)}. Fix: choose from those (Llama: q_proj, k_proj, v_proj, o_proj, "
                        "gate_proj, up_proj, down_proj)")
    peft_cfg = PeftLora(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, peft_cfg)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total


def save_final(model, tokenizer, final_dir: Path, adapter_dir: Optional[Path], dtype: torch.dtype) -> None:
    """final/: a plain Hugging Face model directory (LoRA merged); adapter/: the LoRA adapter alone."""
    import shutil

    from peft import PeftModel

    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, PeftModel):
        if adapter_dir is not None:
            model.save_pretrained(str(adapter_dir))
            tokenizer.save_pretrained(str(adapter_dir))
        model = model.merge_and_unload()
    model.config.use_cache = True
    model.to(dtype).save_pretrained(str(tmp), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    # Swap in whole: a reader never sees a half-written final/.
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)


class CausalLMLoss(torch.nn.Module):
    """Summed next-token loss, with the vocabulary projection only where a label exists.

    Prompt tokens (masked out of the loss) and padding need hidden states but no logits: projecting
    only the labelled positions skips a large share of the lm_head matmul and never materialises
    a [batch, length, vocab] fp32 logits tensor (gigabytes at 32k-128k vocabularies on GPU).
    transformers has no per-row selection of logits (`logits_to_keep` keeps the same positions in
    every row), so this is done here. DDP/FSDP wrap this module, so it is what their hooks see.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model  # the HF (or peft) model: the only registered child, so state dicts stay "model.*"
        hf = model.get_base_model() if hasattr(model, "get_base_model") else model
        # Plain attributes, not submodules: the same modules registered twice would duplicate keys.
        object.__setattr__(self, "_body", hf.get_decoder() if hasattr(hf, "get_decoder") else hf.model)
        object.__setattr__(self, "_lm_head", hf.get_output_embeddings())

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor):
        hidden = self._body(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self._lm_head(hidden[:, :-1][keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
        return loss, keep.sum()
