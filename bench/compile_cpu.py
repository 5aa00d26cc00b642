"""torch.compile on a CPU (training.torch_compile: Inductor's C++/OpenMP backend), measured for LoRA at
the Llama-2-7B layer shape, against the same run without it, in the same invocation.

    python bench/compile_cpu.py                  # results in bench/results/compile-cpu.json
    python bench/compile_cpu.py --layers 2 --steps 8

The model is Llama-2-7B's shape (hidden 4096, MLP 11008, 32 heads, vocabulary 32000) with --layers
decoder layers instead of 32, random bf16 weights built at run time: a step's time is the sum of its
layers', so the per-layer ratio is the 7B model's, and compiling 32 layers on 2 cores is not spent
twice. The config is bench/scale.py's lora7b preset (LoRA r=16 on q/k/v/o, model.dtype bf16, one
example per step): on a CPU without fast bf16 it runs fp32 compute on the bf16 base
(trainer/model/compute.py), with fast bf16 under bf16 autocast. Steady seconds per step leave out the first
two steps (compilation). Timings are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.scale import run, write_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--work", default=str(ROOT / "bench/work/compile"))
    p.add_argument("--out", default=str(ROOT / "bench/results/compile-cpu.json"))
    args = p.parse_args()
    from bench.shapes import write
    from trainer.model.compute import measure
    from trainer.dev.tiny import flashcards, write_json

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model = write("llama-2-7b", work / f"llama-2-7b-{args.layers}-layers", num_hidden_layers=args.layers)
    data = write_json(work / "flashcards.json", flashcards(400, seed=3))
    rates = measure(budget_s=0.2)
    results: dict = {"layers": args.layers, "steps": args.steps, "cpu": {"fp32_gflops": round(rates.fp32, 1),
                                                                       "bf16_gflops": round(rates.bf16, 2),
                                                                       "bf16_fast": rates.bf16_fast},
                     "command": " ".join(["python", "bench/compile_cpu.py"] + sys.argv[1:])}
    for compiled in (False, True):
        name = "compiled" if compiled else "eager"
        config = write_config(work, model, data, "lora7b", args.steps, 1)
        raw = yaml.safe_load(config.read_text())
        raw["training"]["torch_compile"] = compiled
        raw["training"]["eval_on_start"] = False
        raw["output_dir"] = str(work / name)
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        shutil.rmtree(work / name, ignore_errors=True)
        started = time.perf_counter()
        r = run([sys.executable, "-m", "trainer", "finetune", "--config", str(path)], work / f"{name}.log")
        r["wall_seconds"] = round(time.perf_counter() - started, 1)
        if r["rc"] == 0:
            report = json.loads((work / name / "report.json").read_text())["training"]
            steps = report["step_seconds"]
            r["step_seconds"] = steps
            r["seconds_per_step"] = round(sum(steps[2:]) / max(1, len(steps[2:])), 3)
            r["first_steps_seconds"] = round(sum(steps[:2]), 1)
        results[name] = r
    if results["eager"].get("seconds_per_step") and results["compiled"].get("seconds_per_step"):
        results["compiled_over_eager_seconds_per_step"] = round(
            results["compiled"]["seconds_per_step"] / results["eager"]["seconds_per_step"], 3)
    out = Path(args.out)
    out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
