"""Tiny random models of many architectures, written to disk with one shared tokenizer (no network).

The trainer must handle any causal LM transformers ships, not only Llama: these stand in for the
models users bring (dense, sliding-window, softcapped, fused-projection, Conv1D, learned-position,
ALiBi, mixture-of-experts, recurrent and hybrid). Shapes are tiny; the code paths are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import transformers as T

_ATTN = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
_DENSE = dict(_ATTN, intermediate_size=128, num_key_value_heads=2)

VARLEN, PACKED, PADDED = "varlen", "packed", "padded"

# name: (config class, tiny shapes, how the trainer trains it on CPU: packed under variable-length
# attention, packed under the model's own attention (transformers' block mask: a sliding window, or
# softcapping, which varlen does not do), or padded (packed examples would leak into each other))
ARCHITECTURES: dict[str, tuple[Any, dict, str]] = {
    "llama": (T.LlamaConfig, _DENSE, VARLEN),
    # A window longer than the probe's examples, shorter than training's: varlen (no window) is not used.
    "mistral-sliding-window": (T.MistralConfig, dict(_DENSE, sliding_window=16), PACKED),
    "qwen2": (T.Qwen2Config, _DENSE, VARLEN),
    "gemma2-softcap": (T.Gemma2Config, dict(_DENSE, head_dim=16, final_logit_softcapping=2.0,
                                            attn_logit_softcapping=5.0, sliding_window=8), PACKED),
    "phi3-fused-qkv": (T.Phi3Config, _DENSE, VARLEN),
    "gpt-neox": (T.GPTNeoXConfig, dict(_ATTN, intermediate_size=128), VARLEN),
    "gpt2-conv1d": (T.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512), VARLEN),
    # OPT's mask ignores position_ids (packing leaks under SDPA); without a mask, varlen isolates it.
    "opt-learned-positions": (T.OPTConfig, dict(_ATTN, ffn_dim=128, word_embed_proj_dim=64,
                                                max_position_embeddings=512), VARLEN),
    "falcon-rotary": (T.FalconConfig, dict(_ATTN, new_decoder_architecture=True, num_kv_heads=2), PADDED),
    "falcon-alibi": (T.FalconConfig, dict(_ATTN, alibi=True), PADDED),
    "mixtral-moe": (T.MixtralConfig, dict(_DENSE, num_local_experts=4, num_experts_per_tok=2), VARLEN),
    "mamba-recurrent": (T.MambaConfig, dict(hidden_size=64, state_size=8, num_hidden_layers=2), PADDED),
    "lfm2-hybrid-conv": (T.Lfm2Config, dict(_DENSE, num_hidden_layers=4,
                                            layer_types=["conv", "full_attention", "conv", "full_attention"]), PADDED),
}


def write(name: str, path: Path, tokenizer, seed: int = 0) -> Path:
    """A random-weight model of architecture `name` and the tokenizer, saved to `path` (fp32)."""
    import torch

    cls, shapes, _ = ARCHITECTURES[name]
    config = cls(**shapes, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                 tie_word_embeddings=name.startswith("gpt2"))
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def expected(name: str) -> str:
    return ARCHITECTURES[name][2]
