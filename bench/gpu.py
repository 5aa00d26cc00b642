"""Fine-tuning speed on a GPU: ours beside the Hugging Face Trainer, against the hardware's limit.

    make bench-gpu                                   # on a CUDA machine: results in bench/results/gpu-<device>.json
    python bench/gpu.py --tiny --out /tmp/gpu.json   # tiny shapes on the CPU (the test suite runs this mode)

Shapes (random bf16 weights built at run time by bench/shapes.py, on the GPU when there is one):
- full1b: TinyLlama-1.1B (hidden 2048, 22 layers), full fine-tune, fp32 master weights, bf16 compute;
- lora7b: Llama-2-7B (hidden 4096, 32 layers, vocabulary 32000), LoRA r=16 on q/k/v/o, bf16 base.
Data: long-tailed examples (lengths log-normal, mean ~600 tokens, tail to 2048), the same file for
every run. Ours packs each micro-batch's examples into 2048-token rows (training.tokens_per_micro_batch,
variable-length attention); the Hugging Face Trainer gets the same examples (bf16) with
DataCollatorForSeq2Seq padding (as many examples per batch as ours packs on average), and padding-free
with DataCollatorWithFlattening.

Reported per run: real (non-padding) tokens/s over the steps after the first, time to the first step,
peak GPU memory, and model FLOPs utilisation: 6·N per token for a full fine-tune, 4·N_frozen +
6·N_trainable for LoRA, plus causal attention (6·n²·hidden·layers per example of n tokens, from the real
lengths), against the bf16 matmul rate measured in the same run and the datasheet's peak (989 TFLOP/s
dense bf16 for an H100/H200). Results go to one JSON file; the table is printed last. Timings are for
reading, never asserted (the suite asserts only that every field is there and finite).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scale import run  # noqa: E402  (process tree, wall time, exit code)
from trainer.config import TrainerConfig  # noqa: E402

DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
SHAPES = {"full1b": ("tinyllama", False), "lora7b": ("llama-2-7b", True)}
# Tiny mode: the same recipe at toy size (CPU), so the script itself is tested.
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=176, max_position_embeddings=512)


def lengths(n: int, mean: float, longest: int, seed: int = 0) -> list[int]:
    """Long-tailed example lengths: log-normal with the given mean (sigma 0.8), clipped to [16, longest]."""
    rng = np.random.default_rng(seed)
    sigma = 0.8
    raw = rng.lognormal(math.log(mean) - sigma ** 2 / 2, sigma, n)
    return [int(x) for x in np.clip(raw, 16, longest)]


def write_data(path: Path, sizes: list[int], tokenizer_dir: Path) -> Path:
    """Text records whose tokenized length is about the target (words drawn from the tokenizer's own
    vocabulary, one token each)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    words = [w for w, i in tok.get_vocab().items() if w.isalpha() and len(w) > 2][:400] or ["word"]
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        for n in sizes:
            f.write(json.dumps({"text": " ".join(rng.choice(words, max(1, n - 2)))}) + "\n")
    return path


def config(work: Path, model: Path, data: Path, shape: str, steps: int, row: int, batch: int,
           tiny: bool = False) -> dict:
    lora = SHAPES[shape][1]
    return {
        # --tiny on a CPU keeps the script working: fp32 there (bf16 matmuls crawl on AVX2-only CPUs).
        "model": {"name_or_path": str(model), "dtype": "fp32" if tiny else "bf16"},
        "data": {"file": str(data), "template": "text", "max_seq_length": row, "validation_fraction": 0.01,
                 "packing": True},
        "training": {"max_steps": steps, "per_device_train_batch_size": batch, "tokens_per_micro_batch": row,
                     "learning_rate": 1e-4 if lora else 2e-5, "logging_steps": 1, "save_steps": 100_000,
                     "lr_scheduler_type": "constant", "seed": 1, "optim": "adamw_torch_fused",
                     "eval_on_start": False},  # a training-throughput bench: no evaluation of the base
        "lora": ({"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0,
                  "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]} if lora else {"enabled": False}),
        "quantize": {"enabled": False, "sample_prompts": 0},
        "output_dir": str(work / f"ours-{shape}"),
    }


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(TrainerConfig.from_dict(raw).to_yaml())
    return path


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """The dense matmul rate measured here (the practical ceiling of a step's FLOPs)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    reps, start = 10, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * size ** 3 * reps / (time.perf_counter() - start) / 1e12


def flops_per_token(model_dir: Path, lora: bool, sizes: list[int]) -> tuple[float, dict]:
    """Model FLOPs per real token: 6·N (full) or 4·N_frozen + 6·N_trainable (LoRA), plus causal
    attention from the real lengths."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    h, layers = cfg.hidden_size, cfg.num_hidden_layers
    targets = 4  # q, k, v, o
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    trainable = layers * 16 * ((h + h) * 2 + (h + kv) * 2) if lora else n  # r=16 on q,k,v,o (A and B)
    dense = (4 * (n - trainable) + 6 * trainable) if lora else 6 * n
    attention = 6 * h * layers * sum(s * s for s in sizes) / max(1, sum(sizes))
    return dense + attention, {"parameters": n, "trainable": trainable, "targets": targets,
                               "attention_flops_per_token": attention}


def ours(args, work: Path, model: Path, data: Path, shape: str, sizes: list[int]) -> dict:
    cfg = write_config(work / f"{shape}-ours.yaml", config(work, model, data, shape, args.steps, args.row, 1,
                                                                     args.tiny))
    res = run([sys.executable, "-m", "trainer.runtime.launch", "--nproc-per-node", "1", "finetune", "--config", str(cfg)],
              work / f"{shape}-ours.log", timeout=args.timeout)
    out = work / f"ours-{shape}"
    if res["rc"] != 0:
        return {"error": f"exit {res['rc']}: see {work / f'{shape}-ours.log'}"}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    report = json.loads((out / "report.json").read_text())["training"]
    later = [r["tokens_per_second"] for r in rows[1:]] or [rows[0]["tokens_per_second"]]
    return {"tokens_per_second": statistics.median(later), "first_step_seconds": report["first_step_seconds"],
            "peak_gpu_gib": report.get("peak_device_memory_gib"), "attention": report.get("attention"),
            "packing": report.get("packing"), "steps": report["steps"]}


def hf(args, work: Path, model: Path, data: Path, shape: str, mode: str, batch: int) -> dict:
    cfg = write_config(work / f"{shape}-hf.yaml", {**config(work, model, data, shape, args.steps, args.row, batch,
                                                                    args.tiny),
                                                   "output_dir": str(work / f"hf-{shape}-{mode}")})
    out = work / f"hf-{shape}-{mode}"
    res = run([sys.executable, str(ROOT / "bench" / "hf_baseline.py"), "--config", str(cfg), "--mode", mode,
               "--order", "hf", "--out", str(out), "--attn", args.hf_attn],
              work / f"{shape}-hf-{mode}.log", env={"WORLD_SIZE": "1"}, timeout=args.timeout)
    if res["rc"] != 0:
        return {"error": f"exit {res['rc']}: see {work / f'{shape}-hf-{mode}.log'}"}
    s = json.loads((out / "summary.json").read_text())
    steps = s["step_seconds"][1:] or s["step_seconds"]
    per_step = s["num_input_tokens_seen"] / max(1, s["steps"])
    return {"tokens_per_second": per_step * len(steps) / max(1e-9, sum(steps)),
            "first_step_seconds": s["first_step_seconds"], "peak_gpu_gib": s.get("peak_device_memory_gib"),
            "steps": s["steps"], "computed_tokens": s["computed_tokens"], "real_tokens_seen": s["num_input_tokens_seen"]}


def table(results: dict) -> str:
    lines = ["| shape | run | tokens/s | x HF padded | x HF flattened | first step s | peak GPU GiB | MFU (measured) "
             "| MFU (datasheet) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, r in results["shapes"].items():
        base = r["runs"].get("hf-padded", {}).get("tokens_per_second")
        flat = r["runs"].get("hf-flatten", {}).get("tokens_per_second")
        for name, run_ in r["runs"].items():
            if "error" in run_:
                lines.append(f"| {shape} | {name} | {run_['error']} | | | | | | |")
                continue
            tps = run_["tokens_per_second"]

            def ratio(x):
                return f"{tps / x:.2f}" if x else "n/a"

            def pct(x):
                return f"{100 * x:.1f}%" if x is not None else "n/a"

            peak = run_.get("peak_gpu_gib")
            lines.append(f"| {shape} | {name} | {tps:,.0f} | {ratio(base)} | {ratio(flat)} | "
                         f"{run_['first_step_seconds']:.1f} | {peak if peak is not None else 'n/a'} | "
                         f"{pct(run_.get('mfu_measured'))} | {pct(run_.get('mfu_datasheet'))} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy shapes on the CPU (keeps the script working)")
    p.add_argument("--only", choices=sorted(SHAPES))
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--examples", type=int, default=None)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--hf-attn", default=None, help="the Trainer's attn_implementation (default: flash_attention_2 "
                                                   "where installed, else sdpa)")
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "gpu"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    args.row = 256 if args.tiny else 2048
    mean = 60 if args.tiny else 600
    args.steps = args.steps or (4 if args.tiny else 30)
    n_examples = args.examples or (200 if args.tiny else 4000)
    if args.hf_attn is None:
        import importlib.util

        args.hf_attn = "flash_attention_2" if cuda and importlib.util.find_spec("flash_attn") else "sdpa"
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    key = next((k for k in DATASHEET_BF16_TFLOPS if k in name), None)
    out = Path(args.out or ROOT / "bench" / "results" / f"gpu-{(key or 'cpu').lower()}{'-tiny' if args.tiny else ''}.json")
    work = Path(args.work) / ("tiny" if args.tiny else "full")
    work.mkdir(parents=True, exist_ok=True)
    # The ceiling measured here: bf16 matmuls on the GPU; on the CPU fp32 (bf16 matmuls are emulated on
    # CPUs without AVX512-BF16/AMX, which would understate the limit).
    measured = matmul_tflops(device, 8192 if cuda else 1024, torch.bfloat16 if cuda else torch.float32)
    results = {"device": name, "torch": torch.__version__, "tiny": args.tiny, "row_tokens": args.row,
               "steps": args.steps, "matmul_tflops_measured": measured,
               "datasheet_bf16_tflops": DATASHEET_BF16_TFLOPS.get(key) if key else None,
               "command": " ".join([Path(sys.executable).name, *sys.argv]), "shapes": {}}
    from shapes import write as write_shape

    for shape in [args.only] if args.only else list(SHAPES):
        base, lora = SHAPES[shape]
        model = write_shape(base, work / base, device=device, **(TINY if args.tiny else {}))
        sizes = lengths(n_examples, mean, args.row)
        data = write_data(work / f"{shape}-data.jsonl", sizes, model)
        per_token, counts = flops_per_token(model, lora, sizes)
        batch = max(1, round(args.row / statistics.mean(sizes)))  # HF padded: ours' examples per row, on average
        runs = {"ours": ours(args, work, model, data, shape, sizes),
                "hf-padded": hf(args, work, model, data, shape, "padded", batch),
                "hf-flatten": hf(args, work, model, data, shape, "flatten", batch)}
        for r in runs.values():
            if "tokens_per_second" in r:
                achieved = r["tokens_per_second"] * per_token / 1e12
                r["tflops"] = achieved
                r["mfu_measured"] = achieved / measured
                r["mfu_datasheet"] = achieved / results["datasheet_bf16_tflops"] if results["datasheet_bf16_tflops"] else None
        results["shapes"][shape] = {"model": base, "lora": lora, "examples": n_examples,
                                    "mean_tokens": statistics.mean(sizes), "longest": max(sizes),
                                    "hf_examples_per_batch": batch, "flops_per_token": per_token, **counts,
                                    "runs": runs}
        print(f"{shape}: {json.dumps(runs)}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\n{name}, {args.row}-token rows, {args.steps} steps; matmul {measured:.1f} TFLOP/s measured"
          + (f", {results['datasheet_bf16_tflops']} datasheet" if results["datasheet_bf16_tflops"] else "")
          + f"; results in {out}\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
