"""Attention paths for one packed micro-batch, forward + backward, on the bench's model shape.

    python bench/attention.py            # CPU, 1 thread (as each of the bench's 2 processes)

For a long-tailed micro-batch of 8 examples (~2,300 real tokens, padded to 8 x 512) and a short
uniform one (8 x 70), the median seconds of:

- padded        one row per example, SDPA's causal kernel, padding computed (the padded recipe);
- dense         packed in one row, transformers' block-diagonal mask, SDPA's masked path;
- varlen        packed, this trainer's variable-length attention (trainer/attention.py);
- flex          packed, transformers' `flex_attention` (a document mask, compiled by inductor);
  its first call (the compile) is reported apart.

Ratios are against padded, measured in the same run; the physical limit for packing is padded
tokens / real tokens (the work padding adds). Timings are for reading, nothing asserts them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import attention  # noqa: E402

SHAPES = {"long-tailed": [250, 210, 230, 512, 190, 240, 480, 220], "short-uniform": [70] * 8}


def model(hidden: int, layers: int):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=2048, hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg)
    m.config.use_cache = False
    return m


def inputs(lengths: list[int], packed: bool):
    g = torch.Generator().manual_seed(1)
    if packed:
        ids = torch.randint(4, 2000, (1, sum(lengths)), generator=g)
        pos = torch.cat([torch.arange(n) for n in lengths])[None]
    else:
        width = max(lengths)
        ids = torch.randint(4, 2000, (len(lengths), width), generator=g)
        pos = torch.arange(width).expand(len(lengths), width)
    return ids, pos


def timed(m, impl: str, lengths: list[int], packed: bool, reps: int) -> tuple[float, float]:
    """(first call seconds, median of the rest)."""
    m.set_attn_implementation(impl)
    ids, pos = inputs(lengths, packed)
    kw = {attention.SEGMENTS: attention.segments(pos)} if impl == attention.VARLEN else {}
    times = []
    for _ in range(reps + 1):
        m.zero_grad(set_to_none=True)
        start = time.perf_counter()
        m(input_ids=ids, position_ids=pos, use_cache=False, **kw).logits.float().mean().backward()
        times.append(time.perf_counter() - start)
    return times[0], statistics.median(times[1:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    attention.register()
    m = model(args.hidden, args.layers)
    paths = [("padded", "sdpa", False), ("dense", "sdpa", True), ("varlen", attention.VARLEN, True),
             ("flex", "flex_attention", True)]
    for shape, lengths in SHAPES.items():
        real, padded_tokens = sum(lengths), max(lengths) * len(lengths)
        print(f"\n{shape}: {len(lengths)} examples, {real} real tokens, {padded_tokens} padded "
              f"(limit {padded_tokens / real:.2f}x)")
        results = {}
        for name, impl, packed in paths:
            try:
                results[name] = timed(m, impl, lengths, packed, args.reps)
            except Exception as exc:  # flex needs inductor (a C++ compiler) on CPU
                print(f"  {name:7s} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        base = results["padded"][1]
        for name, (first, median) in results.items():
            print(f"  {name:7s} {median * 1000:8.1f} ms  {base / median:5.2f}x padded"
                  + (f"   (first call {first:.1f} s: compile)" if name == "flex" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
