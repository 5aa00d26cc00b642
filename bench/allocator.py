"""glibc malloc's mmap threshold in a QLoRA training step: peak memory and seconds, A/B in one process.

    python bench/allocator.py --layers 4 --rounds 4 --out bench/results/allocator-cpu.json

A Llama of the 7B preset's width (hidden 4096, MLP 11008, vocabulary 32000) with --layers decoder layers,
random bf16 weights written at run time, loaded the way the trainer loads a QLoRA base (bitsandbytes NF4,
fp32 compute, LoRA r=16 on the attention projections), then forward + backward + AdamW steps on 256-token
rows, alternating two allocator settings round by round (the same process, the same model):

- `dynamic`: glibc's default: the threshold rises to the largest block freed (32 MiB at most), so every
  tensor below it is carved from the heap (what a process gets unless it sets M_MMAP_THRESHOLD);
- `fixed`: the threshold the trainer sets (trainer/runtime/allocator.py): larger blocks in their own
  mappings, returned to the kernel when freed.

Per setting: seconds per step (median), the step's peak RSS above the RSS before it (VmHWM reset through
/proc/self/clear_refs), and the RSS it left behind (what malloc kept of the step's freed tensors). The ratio fixed/dynamic is the
cost of the setting; the physical limit is the step's matmul FLOPs at this CPU's measured fp32 rate.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1 << 30
DYNAMIC_MAX = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: where the dynamic threshold ends up


def main() -> int:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.memtrace import status_kib
    from bench.shapes import write
    from trainer.model import qlora
    from trainer.model.compute import rates
    from trainer.runtime import allocator

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-2-7b", help="a shape of bench/shapes.py (its width; --layers of it)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out")
    args = p.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write(args.shape, Path(tmp) / "m", num_hidden_layers=args.layers)
        with qlora.reading_not_mapping():
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=torch.bfloat16, quantization_config=qlora.quantization_config(4, torch.float32),
                device_map={"": "cpu"})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for prm in model.parameters():  # the adapters, and the head, embeddings and norms (bf16 matmuls crawl here)
        if prm.dtype in (torch.bfloat16, torch.float16):
            prm.data = prm.data.float()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(3, 500, (1, args.tokens))

    def step() -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", enabled=False):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    step()  # warm-up: the optimizer's state, the kernels' first calls
    settings = {"dynamic": DYNAMIC_MAX, "fixed": allocator.MMAP_THRESHOLD}
    seen: dict[str, dict[str, list[float]]] = {k: {"seconds": [], "peak_gib": [], "kept_gib": []} for k in settings}
    for _ in range(args.rounds):
        for name, threshold in settings.items():
            libc.mallopt(allocator.M_MMAP_THRESHOLD, threshold)
            libc.malloc_trim(0)  # each round starts from what the other setting left, returned
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = status_kib("VmRSS") * 1024
            seconds = step()
            seen[name]["seconds"].append(seconds)
            seen[name]["peak_gib"].append((status_kib("VmHWM") * 1024 - before) / GIB)
            seen[name]["kept_gib"].append((status_kib("VmRSS") * 1024 - before) / GIB)
    from bench.shapes import SHAPES

    shape = SHAPES[args.shape]
    h, i, t, v, layers = shape["hidden_size"], shape["intermediate_size"], args.tokens, shape["vocab_size"], args.layers
    flops = 2 * t * (layers * (4 * h * h + 3 * h * i) + h * v) * 3 - 2 * t * h * v  # fwd + 2x bwd, no head grad wrt weight
    rate = rates().fp32 * 1e9 * torch.get_num_threads()
    out = {
        "shape": f"{args.shape} width, {layers} layers, QLoRA NF4 (bitsandbytes), fp32 compute, {t} tokens",
        "threads": torch.get_num_threads(),
        "thresholds_bytes": settings,
        **{name: {"seconds_median": round(statistics.median(s["seconds"]), 3),
                  "seconds": [round(x, 3) for x in s["seconds"]],
                  "step_peak_above_start_gib": round(max(s["peak_gib"]), 3),
                  "rss_after_minus_before_gib": round(max(s["kept_gib"]), 3)} for name, s in seen.items()},
        "fp32_matmul_gflops_per_core": rates().fp32,
        "limit_seconds_at_measured_fp32": round(flops / rate, 3),
    }
    out["ratios"] = {
        "seconds_fixed_over_dynamic": round(out["fixed"]["seconds_median"] / out["dynamic"]["seconds_median"], 3),
        "peak_fixed_over_dynamic": round(out["fixed"]["step_peak_above_start_gib"]
                                         / max(1e-9, out["dynamic"]["step_peak_above_start_gib"]), 3),
        "seconds_dynamic_over_limit": round(out["dynamic"]["seconds_median"] / out["limit_seconds_at_measured_fp32"], 2),
    }
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
