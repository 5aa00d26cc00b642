"""Throughput and time-to-quality benchmark: our trainer against the seed's recipe, side by side.

    make bench                          # CPU, 2 processes, both data shapes, results in bench/results/cpu-2proc.json
    python bench/run.py --repeats 3 --shapes long-tailed --model-dir DIR --data FILE --eval-data FILE

In one invocation, for each data shape (short uniform flashcards; long-tailed ones averaging ~250
tokens with a tail to 512), on the same model, tokenized examples, batch size (examples per step),
learning rate, schedule and process count (torchrun, 2 processes, gloo, fp32), interleaved over
--repeats rounds (who goes first rotates), medians reported:

- ours        `torchrun -m trainer finetune`: padding-free packing, variable-length attention where the
              probe accepts it, labelled-positions-only loss, fused AdamW;
- ours_dense  the same with `model.attn_implementation: sdpa`: packed rows under transformers' dense
              block-diagonal mask (what ours did before variable-length attention);
- hf_padded   the seed's recipe: Hugging Face Trainer, DataCollatorForSeq2Seq padding per batch, on
              ours's batches (same examples, micro-batch, rank and step), so eval losses pair up;
- hf_concat   the same Trainer on examples concatenated into 512-token blocks (group_texts);
- ours_time   ours for as many steps as fit in hf_concat's epoch time (the equal-time budget).

Per run: training seconds (the loop, not the process: start-up apart), real tokens per second,
tokens computed (padding included) per real token, steps, and the eval loss of the final model on a
held-out file — one evaluator for all (mean loss per trained token, one example at a time). For
ours, forward+backward seconds, so per-step overhead = 1 - compute/training. Against the physical
limit: padding-free speedup limit = tokens the padded recipe computes / real tokens; efficiency =
measured speedup over padded / that limit. Timings are for reading; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.runtime import local  # noqa: E402
from trainer.config import TrainerConfig  # noqa: E402

ROUND = ("ours", "ours_dense", "hf_padded", "hf_concat")


def flashcards_shaped(n: int, seed: int, shape: str) -> list[dict]:
    """Flashcards; long-tailed: answers with extra sentences, so examples average ~250 tokens with a
    tail to 512 (the padded recipe then computes ~1.7x the real tokens at 8 per batch)."""
    from trainer.dev.tiny import _EFFECTS, _FILLER, _ORGANS, flashcards

    records = flashcards(n, seed=seed, long_tail=False)
    if shape == "long-tailed":
        rng = np.random.default_rng(seed)
        extra = np.minimum(rng.gamma(1.4, 12, n).astype(int), 60)
        for r, k in zip(records, extra):
            r["output"] += "".join(f" It also {_EFFECTS[(i * 5 + k) % len(_EFFECTS)]} {_FILLER[i % len(_FILLER)]} in "
                                   f"the {_ORGANS[(i + k) % len(_ORGANS)]}." for i in range(int(k)))
    return records


def write_inputs(work: Path, args, shape: str) -> tuple[Path, Path, Path]:
    from trainer.dev.tiny import corpus, write_json, write_model

    if args.data:
        return Path(args.model_dir or work / "model"), Path(args.data), Path(args.eval_data)
    data = write_json(work / f"{shape}.jsonl", flashcards_shaped(args.examples, 11, shape), lines=True)
    held_out = write_json(work / f"{shape}-eval.jsonl", flashcards_shaped(args.eval_examples, 977, shape), lines=True)
    model = Path(args.model_dir) if args.model_dir else work / "model"
    if not (model / "config.json").exists():
        write_model(model, corpus(flashcards_shaped(4000, 1, "long-tailed")), hidden=args.hidden, layers=args.layers,
                    heads=8, kv_heads=4, intermediate=int(args.hidden * 2.75), vocab_size=2048, seed=0)
    return model, data, held_out


def config(model: Path, data: Path, out: Path, args, seed: int, recipe: str, max_steps: int = -1) -> Path:
    cfg = TrainerConfig.from_dict({
        "model": {"name_or_path": str(model), "dtype": "fp32",
                  "attn_implementation": "sdpa" if recipe == "ours_dense" else "auto"},
        "data": {"file": str(data), "max_seq_length": args.max_seq_length, "validation_fraction": 0.0,
                 "file_settle_seconds": 0, "cache_dir": str(out.parent / "cache")},
        "training": {"num_train_epochs": 1, "max_steps": max_steps, "per_device_train_batch_size": args.batch_size,
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
    if recipe.startswith("ours"):
        cmd = local.torchrun(nproc, "-m", "trainer", "finetune", "--config", str(cfg_path))
    else:
        cmd = local.torchrun(nproc, str(ROOT / "bench" / "hf_baseline.py"), "--config", str(cfg_path),
                             "--mode", recipe.split("_")[1], "--out", str(out))
    log = out.parent / f"{out.name}.log"
    start = time.perf_counter()
    with open(log, "wb") as f:
        code = subprocess.run(cmd, env=local.run_env(LLM_FINETUNE_LOG_FORMAT="plain"), cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT, timeout=7200).returncode
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{recipe} failed (exit {code}); see {log}")
    if recipe.startswith("ours"):
        t = json.loads((out / "report.json").read_text())["training"]
        summary = {"train_seconds": t["train_seconds"], "first_step_seconds": t["first_step_seconds"],
                   "steps": t["steps"], "real_tokens": t["num_input_tokens_seen"],
                   "computed_tokens": t["num_input_tokens_seen"], "compute_seconds": t.get("compute_seconds"),
                   "attention": t.get("attention"), "packing": t.get("packing")}
        if t.get("packing") == "padded":
            summary["computed_tokens"] = None  # not measured for our padded fallback
    else:
        s = json.loads((out / "summary.json").read_text())
        summary = {k: s[k] for k in ("train_seconds", "first_step_seconds", "steps", "computed_tokens", "order")}
        summary["real_tokens"] = s["real_tokens"]
    summary["process_seconds"] = wall
    summary["tokens_per_second"] = summary["real_tokens"] / summary["train_seconds"]
    if summary.get("computed_tokens"):
        summary["computed_per_real"] = summary["computed_tokens"] / summary["real_tokens"]
    if summary.get("compute_seconds"):
        summary["overhead_fraction"] = 1 - summary["compute_seconds"] / summary["train_seconds"]
    return summary


def eval_loss(final: Path, cfg_path: Path, held_out: Path) -> float:
    """One evaluator for all: mean loss per trained token on every record of the held-out file."""
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.config import load_config
    from trainer.post.measure import EvalSet, perplexity
    from trainer.model.modeling import load_tokenizer

    cfg = load_config(cfg_path)
    tok = load_tokenizer(str(final))
    evalset = EvalSet(cfg, tok, str(final), data_file=str(held_out))
    model = AutoModelForCausalLM.from_pretrained(str(final), dtype=torch.float32)
    return perplexity(model, evalset.split)[0]


def median(runs: list[dict], key: str):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def shape_bench(shape: str, args, work: Path) -> dict:
    model, data, held_out = write_inputs(work, args, shape)
    runs = {r: [] for r in ROUND + ("ours_time",)}
    for rep in range(args.repeats):
        order = ROUND[rep % len(ROUND):] + ROUND[:rep % len(ROUND)]
        results = {}
        for recipe in order:
            out = work / shape / f"{recipe}-{rep}"
            out.parent.mkdir(parents=True, exist_ok=True)
            # Each round trains with its own seed (batch order), the same for every recipe.
            cfg_path = config(model, data, out, args, seed=42 + rep, recipe=recipe)
            results[recipe] = run_one(recipe, cfg_path, out, args.nproc)
            results[recipe]["eval_loss"] = eval_loss(out / "final", cfg_path, held_out)
            runs[recipe].append(results[recipe])
            print(f"[{shape}] round {rep + 1}/{args.repeats} {recipe:10s} train {results[recipe]['train_seconds']:6.1f}s "
                  f"({results[recipe]['tokens_per_second']:6.0f} tok/s, {results[recipe]['steps']} steps), eval loss "
                  f"{results[recipe]['eval_loss']:.4f}", flush=True)
        # The equal-time budget: ours for as many steps as fit in this round's concatenation epoch.
        per_step = results["ours"]["train_seconds"] / results["ours"]["steps"]
        steps = max(1, min(results["ours"]["steps"], math.floor(results["hf_concat"]["train_seconds"] / per_step)))
        out = work / shape / f"ours_time-{rep}"
        cfg_path = config(model, data, out, args, seed=42 + rep, recipe="ours", max_steps=steps)
        timed = run_one("ours_time", cfg_path, out, args.nproc)
        timed["eval_loss"] = eval_loss(out / "final", cfg_path, held_out)
        runs["ours_time"].append(timed)
        print(f"[{shape}] round {rep + 1}/{args.repeats} ours_time  {steps} steps in {timed['train_seconds']:.1f}s "
              f"(concat's epoch {results['hf_concat']['train_seconds']:.1f}s), eval loss {timed['eval_loss']:.4f}",
              flush=True)
    keys = ("train_seconds", "process_seconds", "tokens_per_second", "first_step_seconds", "eval_loss", "steps",
            "real_tokens", "computed_tokens", "computed_per_real", "compute_seconds", "overhead_fraction")
    medians = {r: {k: median(runs[r], k) for k in keys} for r in runs}
    ours, dense, padded, concat, timed = (medians[r] for r in ("ours", "ours_dense", "hf_padded", "hf_concat",
                                                                "ours_time"))
    limit = padded["computed_per_real"]
    speedup = padded["train_seconds"] / ours["train_seconds"]
    ratios = {"speedup_vs_padded": speedup, "padding_free_limit": limit, "efficiency_vs_limit": speedup / limit,
              "speedup_vs_dense_packing": dense["train_seconds"] / ours["train_seconds"],
              "speedup_vs_concat": concat["train_seconds"] / ours["train_seconds"],
              # Paired: per round, on the same batches (hf_baseline --order ours), then the median.
              "eval_loss_gap": statistics.median((o["eval_loss"] - h["eval_loss"]) / h["eval_loss"]
                                                 for o, h in zip(runs["ours"], runs["hf_padded"])),
              "same_batches_as_padded": all(h.get("order") == "ours" for h in runs["hf_padded"]),
              # What the seed alone does to the padded recipe's eval loss, for scale (needs 2+ rounds).
              "seed_spread_padded": ((max(h["eval_loss"] for h in runs["hf_padded"])
                                      - min(h["eval_loss"] for h in runs["hf_padded"])) / padded["eval_loss"]
                                     if len(runs["hf_padded"]) > 1 else None),
              "equal_time_eval_loss_ours": timed["eval_loss"], "equal_time_eval_loss_concat": concat["eval_loss"],
              "overhead_fraction": ours["overhead_fraction"]}
    # Every target on every shape (the issue names the speed ones per shape; each holds on both here).
    targets = {"per-step overhead <= 15% of the epoch": (ratios["overhead_fraction"] or 1) <= 0.15,
               "lower eval loss than concat at concat's epoch time": timed["eval_loss"] < concat["eval_loss"],
               "never slower than padded (>= 0.95x)": speedup >= 0.95,
               ">= 85% of the padding-free limit vs padded": ratios["efficiency_vs_limit"] >= 0.85,
               "eval loss within 2% of padded (same batches)": (abs(ratios["eval_loss_gap"]) <= 0.02
                                                                and ratios["same_batches_as_padded"])}
    return {"medians": medians, "ratios": ratios, "targets": targets, "runs": runs,
            "inputs": {"model": str(model), "data": str(data), "held_out": str(held_out)}}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default=None, help="results file name (default cpu-<nproc>proc)")
    p.add_argument("--shapes", default="short-uniform,long-tailed")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nproc", type=int, default=2)
    # A multiple of the global batch (8 x 2): every micro-batch full, so the padded baseline can take ours.
    p.add_argument("--examples", type=int, default=1504)
    p.add_argument("--eval-examples", type=int, default=150)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--max-seq-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--model-dir", help="use this model directory instead of the generated one")
    p.add_argument("--data", help="a training data file (any format the trainer reads) instead of the generated one")
    p.add_argument("--eval-data", help="the held-out file the loss is measured on (with --data)")
    p.add_argument("--work", default=str(ROOT / "bench" / "work"))
    args = p.parse_args()
    if args.data and not args.eval_data:
        p.error("--data needs --eval-data (a held-out file)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shapes = ["custom"] if args.data else args.shapes.split(",")
    results = {shape: shape_bench(shape, args, work) for shape in shapes}
    for shape, r in results.items():
        print(f"\n== {shape}: medians of {args.repeats} rounds")
        print(f"{'recipe':12s}{'train s':>9s}{'process s':>11s}{'tok/s':>8s}{'computed/real':>15s}{'eval loss':>11s}"
              f"{'overhead':>10s}")
        for recipe, m in r["medians"].items():
            cpr = f"{m['computed_per_real']:.2f}" if m["computed_per_real"] else "-"
            ovh = f"{m['overhead_fraction']:.0%}" if m["overhead_fraction"] is not None else "-"
            print(f"{recipe:12s}{m['train_seconds']:9.1f}{m['process_seconds']:11.1f}{m['tokens_per_second']:8.0f}"
                  f"{cpr:>15s}{m['eval_loss']:11.4f}{ovh:>10s}")
        q = r["ratios"]
        spread = f"{q['seed_spread_padded']:.1%}" if q["seed_spread_padded"] is not None else "n/a, 1 round"
        print(f"ours vs padded {q['speedup_vs_padded']:.2f}x (padding-free limit {q['padding_free_limit']:.2f}x: "
              f"{q['efficiency_vs_limit']:.0%} of it), vs dense packing {q['speedup_vs_dense_packing']:.2f}x, "
              f"vs concat {q['speedup_vs_concat']:.2f}x; eval loss vs padded {q['eval_loss_gap']:+.2%} "
              f"({'same batches' if q['same_batches_as_padded'] else 'different batches'}; the seed alone moves "
              f"padded's by {spread}); equal time: "
              f"ours {q['equal_time_eval_loss_ours']:.4f} vs concat {q['equal_time_eval_loss_concat']:.4f}")
        for name, ok in r["targets"].items():
            print(f"  [{'met' if ok else 'NOT met'}] {name}")
    name = args.name or f"cpu-{args.nproc}proc"
    out = {"name": name, "command": " ".join(["python"] + sys.argv),
           "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "python": platform.python_version()},
           "settings": {k: v for k, v in vars(args).items() if k != "work"}, "shapes": results}
    target = ROOT / "bench" / "results" / f"{name}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(out, indent=1))
    print(f"\nwrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
