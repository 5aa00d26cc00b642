"""QLoRA's library choice, measured (issue 31): a frozen 4-bit NF4 linear layer's forward and input
gradient at the Llama-2-7B MLP shape, in bitsandbytes and in torchao, beside the fp32 weight (the
physical limit) and the bf16 weight widened per chunk (trainer/model/compute.py), in the same run.

    python bench/qlora_kernels.py                   # results in bench/results/qlora-kernels-cpu.json
    pip install --no-deps bitsandbytes==0.50.2      # where it is not installed (it is skipped otherwise)

Each row: bytes the weight is held in, seconds for forward + input gradient of [157 tokens x 4096] @
[4096 x 11008] (157: the lora7b preset's tokens per step), GFLOP/s, the ratio to the fp32 weight's
time, and the output's relative error against the fp32 matmul on the same (unquantized) weight.
Compute dtypes: fp32, and bf16 where this CPU computes bf16 fast (trainer/model/compute.py measures it) or
with --both (the QLoRA layer dequantized into bf16 on a CPU whose bf16 is slow: what the trainer avoids).
Timings are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

TOKENS, IN, OUT = 157, 4096, 11008


def timed(step: Callable[[], None], budget_s: float) -> float:
    step()  # warm-up: kernels' set-up, caches
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget_s or reps < 2:
        step()
        reps += 1
    return (time.perf_counter() - start) / reps


def forward_backward(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        inp = x.detach().requires_grad_()
        layer(inp).sum().backward()
    return step


def candidates(weight: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[Callable, int]]:
    """name -> (layer, bytes the weight is held in)."""
    from trainer.model.compute import widened_linear

    out: dict[str, tuple[Callable, int]] = {}
    wide = weight.to(dtype)
    out["fp32 weight" if dtype == torch.float32 else "bf16 weight"] = (
        lambda x: torch.nn.functional.linear(x, wide), wide.numel() * wide.element_size())
    narrow = weight.to(torch.bfloat16)
    if dtype == torch.float32:
        out["bf16 weight widened per chunk (ours)"] = (lambda x: widened_linear(x, narrow), narrow.numel() * 2)
    try:
        import bitsandbytes as bnb

        layer = bnb.nn.Linear4bit(IN, OUT, bias=False, compute_dtype=dtype, quant_type="nf4",
                                  compress_statistics=True)
        layer.weight = bnb.nn.Params4bit(weight.clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True)
        layer = layer.to("cpu")  # quantizes
        packed = layer.weight.numel() * layer.weight.element_size()
        state = layer.weight.quant_state
        stats = sum(t.numel() * t.element_size() for t in (state.absmax, getattr(state.state2, "absmax", None))
                    if isinstance(t, torch.Tensor))
        out[f"bitsandbytes {bnb.__version__} NF4 + double quant"] = (layer, packed + stats)
    except ImportError:
        print("bitsandbytes is not installed: skipped (pip install --no-deps bitsandbytes==0.50.2)", file=sys.stderr)
    try:
        import torchao
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4

        nf4 = to_nf4(weight.to(dtype).contiguous())
        held = sum(t.numel() * t.element_size() for t in (nf4.quantized_data, nf4.quantized_scalers,
                                                         nf4.quantization_factor))
        out[f"torchao {torchao.__version__} NF4 + double quant"] = (lambda x: linear_nf4(x, nf4), held)
    except ImportError as exc:
        print(f"torchao NF4 is not importable here: skipped ({exc})", file=sys.stderr)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    p.add_argument("--out", default=str(ROOT / "bench/results/qlora-kernels-cpu.json"))
    p.add_argument("--both", action="store_true",
                   help="bf16 compute too where this CPU's bf16 is slow (measured both ways: the trainer's choice)")
    args = p.parse_args()
    from trainer.model.compute import measure

    rates = measure(budget_s=0.2)
    torch.manual_seed(0)
    weight = torch.randn(OUT, IN) * 0.02
    x = torch.randn(TOKENS, IN)
    reference = x @ weight.t()
    flops = 2 * 2 * TOKENS * IN * OUT  # forward and the input's gradient
    rows = []
    dtypes = [torch.float32] + ([torch.bfloat16] if rates.bf16_fast or args.both else [])
    for dtype in dtypes:
        layers = candidates(weight, dtype)
        base = None
        for name, (layer, held) in layers.items():
            xin = x.to(dtype)
            with torch.no_grad():
                err = float((layer(xin).float() - reference).norm() / reference.norm())
            seconds = timed(forward_backward(layer, xin), args.budget)
            base = base or seconds
            rows.append({"compute": str(dtype).replace("torch.", ""), "weight": name, "held_mib": round(held / 2**20, 1),
                         "seconds": round(seconds, 4), "gflops": round(flops / seconds / 1e9, 1),
                         "time_over_first_row": round(seconds / base, 2), "relative_error": round(err, 4)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"shape": {"tokens": TOKENS, "in": IN, "out": OUT}, "threads": torch.get_num_threads(),
              "cpu": {"capability": torch.backends.cpu.get_cpu_capability(), "fp32_gflops_a_core": round(rates.fp32, 1),
                      "bf16_gflops_a_core": round(rates.bf16, 2), "bf16_fast": rates.bf16_fast},
              "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print("| compute | weight | held MiB | s (fwd + input grad) | GFLOP/s | x first row | rel. error |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['compute']} | {r['weight']} | {r['held_mib']} | {r['seconds']} | {r['gflops']} | "
              f"{r['time_over_first_row']} | {r['relative_error']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
