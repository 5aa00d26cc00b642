"""Models of the presets' shapes with random weights, written at run time (no download).

    python bench/shapes.py llama-2-7b bench/work/llama-2-7b     # ~13.5 GB, bf16, like the published checkpoint
    python bench/shapes.py tinyllama bench/work/tinyllama       # ~2.2 GB

The weights are generated tensor by tensor and written in safetensors shards, so building a 7B
model never holds more than one shard in memory. The tokenizer is the tiny BPE one of trainer/dev/tiny.py
(its ids are a subset of the 32000-entry vocabulary): shapes, not language, decide memory and time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {
    # meta-llama/Llama-2-7b-hf's config.json (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000)
    "llama-2-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32000, max_position_embeddings=4096),
    # meta-llama/Llama-2-13b-hf's config.json (hidden 5120, 40 layers, 40 heads, MLP 13824): ~26 GB in bf16
    "llama-2-13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        intermediate_size=13824, vocab_size=32000, max_position_embeddings=4096),
    # TinyLlama/TinyLlama-1.1B (hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632)
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
}
SHARD_BYTES = 2 << 30


def llama_config(name: str, tokenizer, **override):
    from transformers import LlamaConfig

    shape = {**SHAPES[name], **override}
    return LlamaConfig(**shape, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       tie_word_embeddings=False, dtype="bfloat16")


def write(name: str, out: str | Path, seed: int = 0, device=None, **override) -> Path:
    """Write a random-weight Llama of shape `name` in bf16 (plus its tokenizer) to `out`; the random
    numbers are drawn on `device` (a GPU draws 7B of them in seconds), one tensor at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from trainer.dev import tiny

    out = Path(out)
    if (out / "model.safetensors.index.json").exists() and (out / "config.json").exists():
        return out  # built before: the bench reuses it
    out.mkdir(parents=True, exist_ok=True)
    records = tiny.flashcards(2000)
    tokenizer = tiny.build_tokenizer(tiny.corpus(records), 512)
    config = llama_config(name, tokenizer, **override)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    device = torch.device(device or "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    files: list[str] = []
    size = 0

    def flush():
        nonlocal shard, size
        if shard:
            fname = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(out / fname), metadata={"format": "pt"})
            files.append(fname)
            index.update({k: fname for k in shard})
            shard, size = {}, 0

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensor = (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16).cpu()
        nbytes = tensor.numel() * 2
        if size + nbytes > SHARD_BYTES:
            flush()
        shard[key] = tensor
        size += nbytes
    flush()
    # Names the shards' final count (the shards were named as they were written).
    total = sum((out / f).stat().st_size for f in files)
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": index}, indent=1))
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


if __name__ == "__main__":
    name, target = sys.argv[1], sys.argv[2]
    path = write(name, target)
    print(f"wrote {name} to {path}")
