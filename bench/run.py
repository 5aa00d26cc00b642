"""Throughput benchmark: our trainer against the seed's recipe, measured side by side.

    make bench                          # CPU, 2 processes, results in bench/results/cpu-2proc.json
    python bench/run.py --repeats 3 --model-dir DIR --data FILE   # any model directory and data file

In one invocation, on the same model, data and process count, it runs (a) our trainer
(`torchrun -m trainer finetune`), (b) the seed's recipe with per-batch padding and (c) the seed's
recipe with concatenation, interleaved over --repeats rounds, and reports medians: wall time of
one epoch (the training loop; process wall time beside it), effective (non-padding) tokens per
second, time to the first optimizer step, and the validation loss each reaches, measured by one
evaluator for all three on a fixed validation split. Each round uses its own training seed (batch
order), so medians average over both timing noise and data-order noise. Never part of the test suite: timings here are for reading, not asserting.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer import local  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402

RECIPES = ("ours", "hf_padded", "hf_concat")


def write_inputs(work: Path, args) -> tuple[Path, Path]:
    """A Llama-shaped random model big enough that compute dominates start-up, and long-tailed
    flashcards (mostly short, a few long), unless --model-dir / --data name others."""
    from trainer.tiny import corpus, flashcards, write_json, write_model

    data = Path(args.data) if args.data else write_json(work / "flashcards.json",
                                                        flashcards(args.examples, seed=11, long_tail=True))
    if args.model_dir:
        return Path(args.model_dir), data
    model = work / "model"
    if not (model / "config.json").exists():
        records = json.loads(data.read_text()) if data.suffix == ".json" else flashcards(args.examples, seed=11)
        write_model(model, corpus(records), hidden=args.hidden, layers=args.layers, heads=8, kv_heads=4,
                    intermediate=int(args.hidden * 2.75), vocab_size=2048, seed=0)
    return model, data


def config(model: Path, data: Path, out: Path, args, seed: int) -> Path:
    cfg = TrainerConfig.from_dict({
        "model": {"name_or_path": str(model)},
        "data": {"file": str(data), "max_seq_length": args.max_seq_length, "validation_fraction": 0.05},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": args.batch_size,
                     "learning_rate": args.learning_rate, "lr_scheduler_type": "linear", "logging_steps": 10,
                     "save_steps": 100000, "seed": seed},
        "lora": {"enabled": False}, "quantize": {"enabled": False},
        "output_dir": str(out),
    })
    path = out.parent / f"{out.name}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def run_one(recipe: str, cfg_path: Path, out: Path, nproc: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if recipe == "ours":
        cmd = local.torchrun(nproc, "-m", "trainer", "finetune", "--config", str(cfg_path))
    else:
        mode = recipe.split("_")[1]
        cmd = local.torchrun(nproc, str(ROOT / "bench" / "hf_baseline.py"), "--config", str(cfg_path),
                             "--mode", mode, "--out", str(out))
    env = local.run_env(LLM_FINETUNE_LOG_FORMAT="plain")
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "wb") as f:
        code = subprocess.run(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{recipe} failed (exit {code}); see {log}")
    if recipe == "ours":
        t = json.loads((out / "report.json").read_text())["training"]
        summary = {"train_seconds": t["train_seconds"], "first_step_seconds": t["first_step_seconds"],
                   "steps": t["steps"], "num_input_tokens_seen": t["num_input_tokens_seen"]}
    else:
        summary = json.loads((out / "summary.json").read_text())
    summary["process_seconds"] = wall
    summary["effective_tokens_per_second"] = summary["num_input_tokens_seen"] / summary["train_seconds"]
    return summary


def eval_loss(final: Path, cfg_path: Path) -> float:
    """One evaluator for all: mean loss per trained token on the held-out examples, one at a time."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.data import load_records, split_validation, tokenize
    from trainer.evaluate import perplexity
    from trainer.modeling import load_tokenizer

    cfg = load_config(cfg_path)
    tok = load_tokenizer(str(final))
    records, _ = load_records(cfg.data)
    _, val = split_validation(records, cfg.data.validation_fraction, cfg.data.validation_seed)
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    return perplexity(model, tokenize(val, cfg.data, tok))[0]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=None, help="results file name (default cpu-<nproc>proc)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--examples", type=int, default=1500)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--model-dir", help="use this model directory instead of the generated one")
    p.add_argument("--data", help="use this data file (instruction/input/output) instead of the generated one")
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, data = write_inputs(work, args)
    runs = {r: [] for r in RECIPES}
    for rep in range(args.repeats):
        order = RECIPES[rep % 3:] + RECIPES[:rep % 3]  # interleave, rotating who goes first
        for recipe in order:
            out = work / f"{recipe}-{rep}"
            # Each round trains with its own seed (batch order), the same for all three recipes, so the
            # eval-loss medians average over order noise; the validation split stays fixed.
            cfg_path = config(model, data, out, args, seed=42 + rep)
            result = run_one(recipe, cfg_path, out, args.nproc)
            result["eval_loss"] = eval_loss(out / "final", cfg_path)
            runs[recipe].append(result)
            print(f"round {rep + 1}/{args.repeats} {recipe:10s} epoch {result['train_seconds']:.1f}s "
                  f"({result['effective_tokens_per_second']:.0f} tok/s), eval loss {result['eval_loss']:.4f}",
                  flush=True)
    keys = ("train_seconds", "process_seconds", "effective_tokens_per_second", "first_step_seconds", "eval_loss",
            "steps", "num_input_tokens_seen")
    medians = {r: {k: statistics.median(x[k] for x in runs[r]) for k in keys} for r in RECIPES}
    ours, padded, concat = (medians[r] for r in RECIPES)
    ratios = {"epoch_speedup_vs_padded": padded["train_seconds"] / ours["train_seconds"],
              "epoch_speedup_vs_concat": concat["train_seconds"] / ours["train_seconds"],
              "tokens_per_second_vs_padded": ours["effective_tokens_per_second"] / padded["effective_tokens_per_second"],
              "tokens_per_second_vs_concat": ours["effective_tokens_per_second"] / concat["effective_tokens_per_second"],
              "eval_loss_minus_padded": ours["eval_loss"] - padded["eval_loss"]}
    targets = {"epoch >= 1.6x faster than padded": ratios["epoch_speedup_vs_padded"] >= 1.6,
               "epoch no slower than concat": ratios["epoch_speedup_vs_concat"] >= 1.0,
               "eval loss no worse than padded": ratios["eval_loss_minus_padded"] <= 0.0}
    print(f"\n{'recipe':12s}{'epoch s':>10s}{'process s':>11s}{'tok/s':>9s}{'1st step s':>12s}{'eval loss':>11s}")
    for r in RECIPES:
        m = medians[r]
        print(f"{r:12s}{m['train_seconds']:10.1f}{m['process_seconds']:11.1f}{m['effective_tokens_per_second']:9.0f}"
              f"{m['first_step_seconds']:12.2f}{m['eval_loss']:11.4f}")
    print(f"\nours vs padded: {ratios['epoch_speedup_vs_padded']:.2f}x epoch, "
          f"{ratios['tokens_per_second_vs_padded']:.2f}x tokens/s, eval loss {ratios['eval_loss_minus_padded']:+.4f}")
    print(f"ours vs concat: {ratios['epoch_speedup_vs_concat']:.2f}x epoch, "
          f"{ratios['tokens_per_second_vs_concat']:.2f}x tokens/s")
    for name, ok in targets.items():
        print(f"  [{'met' if ok else 'NOT met'}] {name}")
    name = args.name or f"cpu-{args.nproc}proc"
    result = {"name": name, "command": " ".join([sys.executable.rsplit('/', 1)[-1]] + sys.argv),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "python": platform.python_version()},
              "settings": {k: v for k, v in vars(args).items() if k != "work"}, "medians": medians, "ratios": ratios,
              "targets": targets, "runs": runs}
    target = ROOT / "bench" / "results" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
