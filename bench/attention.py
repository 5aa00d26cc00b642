"""Attention paths for one packed micro-batch, forward + backward, on the bench's model shape.

    python bench/attention.py            # CPU, 1 thread (as each of the bench's 2 processes)

For a long-tailed micro-batch of 8 examples (~2,300 real tokens, padded to 8 x 512) and a short
uniform one (8 x 70), the median seconds of:

- padded        one row per example, SDPA's causal kernel, padding computed (the padded recipe);
- dense         packed in one row, transformers' block-diagonal mask, SDPA's masked path;
- varlen        packed, this trainer's variable-length attention (trainer/model/attention.py), the example
                boundaries planned once per micro-batch (trainer/model/attention.py `plan`, timed with the step);
- varlen/layer  the same attention with the boundaries rebuilt in every layer's forward (the previous
                implementation: a host-built index tensor per layer and example length), the baseline
                for "once per micro-batch must not be slower on CPU";
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

from trainer.model import attention  # noqa: E402

SHAPES = {"long-tailed": [250, 210, 230, 512, 190, 240, 480, 220], "short-uniform": [70] * 8}


def per_layer_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """The previous trainer/model/attention.py varlen_attention, verbatim: the boundaries arrive as a list and
    every layer builds its index tensors from it on the host (the baseline of `varlen/layer`)."""
    if kwargs.get("softcap") is not None:
        raise NotImplementedError("varlen attention has no logit softcapping")
    if attention_mask is not None:
        raise NotImplementedError("varlen attention takes example boundaries, not a mask")
    bounds = kwargs.get(attention.SEGMENTS)
    window = kwargs.get("sliding_window")
    if query.shape[0] != 1 or bounds is None:
        bounds = None
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])] if bounds else [query.shape[2]]
    if window is not None and max(lengths) > window:
        raise NotImplementedError("varlen attention has no sliding window (an example is longer than it)")
    gqa = query.shape[1] != key.shape[1]

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                                is_causal=q.shape[2] > 1, enable_gqa=gqa)

    if bounds is None:  # one sequence per row (padded rows: the padding comes last, after every real token)
        return sdpa(query, key, value).transpose(1, 2).contiguous(), None
    # Examples of the same length go through one batched call (all of them, for uniform data).
    by_length: dict[int, list[int]] = {}
    for a, n in zip(bounds[:-1], lengths):
        by_length.setdefault(n, []).append(a)
    if len(by_length) == 1 and len(lengths) == 1:
        return sdpa(query, key, value).transpose(1, 2).contiguous(), None
    pieces, order = [], []
    for n, starts in by_length.items():
        index = torch.tensor([a + i for a in starts for i in range(n)], device=query.device)
        def take(t):  # [1, H, L, D] -> [len(starts), H, n, D]
            return t[0].index_select(1, index).unflatten(1, (len(starts), n)).transpose(0, 1)
        out = sdpa(take(query), take(key), take(value))  # [k, H, n, D]
        pieces.append(out.transpose(0, 1).flatten(1, 2))  # [H, k*n, D]
        order.append(index)
    joined = torch.cat(pieces, dim=1)  # the kernel's dtype (bf16 under autocast)
    out = query.new_empty(query.shape[1:], dtype=joined.dtype)
    out.index_copy_(1, torch.cat(order), joined)
    return out[None].transpose(1, 2).contiguous(), None


PER_LAYER = "bench_varlen_per_layer"


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
    ids, pos = inputs(lengths, packed)
    per_layer = impl == "varlen/layer"
    m.set_attn_implementation(PER_LAYER if per_layer else impl)
    times = []
    for _ in range(reps + 1):
        m.zero_grad(set_to_none=True)
        start = time.perf_counter()
        kw = {}
        if per_layer:
            kw = {attention.SEGMENTS: attention.segments(pos)}
        elif impl == attention.VARLEN:  # planned once for the micro-batch, inside the timing
            kw = {attention.SEGMENTS: attention.plan(pos)}
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
    from transformers import AttentionInterface

    AttentionInterface.register(PER_LAYER, per_layer_attention)
    m = model(args.hidden, args.layers)
    paths = [("padded", "sdpa", False), ("dense", "sdpa", True), ("varlen", attention.VARLEN, True),
             ("varlen/layer", "varlen/layer", True), ("flex", "flex_attention", True)]
    for shape, lengths in SHAPES.items():
        real, padded_tokens = sum(lengths), max(lengths) * len(lengths)
        print(f"\n{shape}: {len(lengths)} examples, {real} real tokens, {padded_tokens} padded "
              f"(limit {padded_tokens / real:.2f}x)")
        results = {}
        for name, impl, packed in paths:
            try:
                results[name] = timed(m, impl, lengths, packed, args.reps)
            except Exception as exc:  # flex needs inductor (a C++ compiler) on CPU
                print(f"  {name:12s} unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
        base = results["padded"][1]
        for name, (first, median) in results.items():
            print(f"  {name:12s} {median * 1000:8.1f} ms  {base / median:5.2f}x padded"
                  + (f"   (first call {first:.1f} s: compile)" if name == "flex" else "")
                  + (f"   {results['varlen/layer'][1] / median:5.2f}x varlen/layer" if name == "varlen" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
