"""At the size people train: the presets' shapes on this machine, ours beside the Hugging Face Trainer.

    make bench-scale                                   # both shapes, results in bench/results/scale-cpu.json
    python bench/scale.py --only lora7b --steps 4      # the Llama-2-7B LoRA preset's shape alone

Shapes (random weights generated at run time by bench/shapes.py, never downloaded):
- lora7b: Llama-2-7B (hidden 4096, 32 layers, vocabulary 32000; 6.74 B parameters, ~13.5 GB in
  bf16), LoRA r=16 on q/k/v/o, bf16, one process, one example per step, max_seq_length 256 — the
  medical-meadow preset per process. Then ours quantizes final/ (4-bit RTN) as the preset does.
  On a CPU without fast bf16 (measured: trainer/model/compute.py) ours keeps the base in bf16 and computes
  in fp32; the physical limit is the node's fp32 matmul rate at this shape (MFU); the Hugging Face
  Trainer runs with bf16=True for --hf-limit seconds, and its fp32 alternative is checked against the
  machine's memory.
- qlora7b, qlora13b: QLoRA (lora.base_bits: 4, NF4 with double quantization through bitsandbytes) on the
  Llama-2-7B shape and on a Llama-2-13B shape (hidden 5120, 40 layers, MLP 13824; ~26 GB of bf16 files:
  built, measured and deleted with --delete-13b), LoRA as lora7b; the Hugging Face Trainer + PEFT +
  bitsandbytes beside it (BitsAndBytesConfig as its docs show it; compute in bf16 where the CPU is fast
  at it, else fp32, as ours).
- fsdp1b: TinyLlama-1.1B (hidden 2048, 22 layers), full fine-tune, bf16 compute with fp32 master
  weights, FSDP2 over 2 processes (ours) against the Hugging Face Trainer (DDP, 2 processes).

Each run is its own process tree (torchrun included); its peak RSS is the largest sum of the tree's
resident set sizes, sampled every 50 ms. Both trainers see the same tokenized examples in the same
order. Ours logs its memory plan before loading anything large; the plan's estimate is printed beside
every measured peak. Timings are for reading, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from trainer.config import TrainerConfig  # noqa: E402

GIB = 1 << 30


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """The tree's resident bytes, and of them those not backed by a file (anonymous: what cannot be
    dropped and re-read; a model file's pages mapped while loading are the difference)."""
    total = anon = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            info = p.memory_info()
            total += info.rss
            anon += info.rss - info.shared
        except psutil.Error:
            pass
    return total, anon


class MemoryCgroup:
    """A cgroup (v1 memory controller) with a hard limit that a run starts in: the bench's answer to
    whether a run fits where its plan says it fits (the trainer reads the limit as the container's)."""

    ROOT = Path("/sys/fs/cgroup/memory")

    def __init__(self, limit_bytes: int):
        self.path = self.ROOT / f"llm-finetune-bench-{os.getpid()}"
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        self.limit = limit_bytes

    def enter(self) -> None:  # in the child, before exec
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def result(self) -> dict:
        def read(name: str) -> str:
            return (self.path / name).read_text().strip()

        oom = dict(line.split() for line in read("memory.oom_control").splitlines())
        return {"limit_gib": round(self.limit / GIB, 2), "max_usage_gib": round(int(read("memory.max_usage_in_bytes")) / GIB, 3),
                "failcnt": int(read("memory.failcnt")), "oom_kills": int(oom.get("oom_kill", 0))}

    def close(self) -> None:
        try:
            self.path.rmdir()
        except OSError:
            pass


def run(cmd: list[str], log: Path, env: dict | None = None, timeout: float = 3600,
        cgroup: "MemoryCgroup | None" = None) -> dict:
    """Run `cmd` to completion; its wall seconds, exit code and the peak RSS of its process tree (all of
    it, and its anonymous part), in `cgroup` when given."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True,
                                preexec_fn=cgroup.enter if cgroup else None)
        watched = psutil.Process(proc.pid)
        peak = [0, 0]
        done = threading.Event()

        timeline = []  # (seconds since start, GiB) every half second: where in the run the peak falls

        def sample():
            last = 0.0
            while not done.is_set():
                try:
                    now, anon = tree_rss(watched)
                    peak[0] = max(peak[0], now)
                    peak[1] = max(peak[1], anon)
                    t = time.perf_counter() - start
                    if t - last >= 0.5:
                        timeline.append((round(t, 1), round(now / GIB, 2), round(anon / GIB, 2)))
                        last = t
                except psutil.Error:
                    pass
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        finally:
            done.set()
            sampler.join()
    log.with_suffix(".rss").write_text("".join(f"{t} {g} {a}\n" for t, g, a in timeline))
    result = {"rc": rc, "seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(peak[0] / GIB, 3),
              "peak_anon_rss_gib": round(peak[1] / GIB, 3),
              "log": str(log.relative_to(ROOT) if log.is_relative_to(ROOT) else log)}
    if cgroup:
        result["cgroup"] = cgroup.result()
    return result


def plan_lines(log: Path) -> dict:
    """The memory plan ours logged: its total and the stage lines."""
    text = log.read_text()
    out = {}
    for stage, pattern in (("train", r"memory plan: ([\d.]+) GiB"), ("quantize", r"memory plan \(quantize\): ([\d.]+) GiB")):
        found = re.findall(pattern, text)
        if found:
            out[stage] = float(found[0])
    return out


def write_config(work: Path, model: Path, data: Path, shape: str, steps: int, world: int) -> Path:
    if shape in ("lora7b", "qlora7b", "qlora13b"):
        training = {"max_steps": steps, "per_device_train_batch_size": 1, "learning_rate": 1e-4, "logging_steps": 1,
                    "save_steps": 10_000, "seed": 1, "optim": "adamw_torch_fused", "lr_scheduler_type": "constant"}
        lora = {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
        if shape.startswith("qlora"):
            lora["base_bits"] = 4
    else:
        training = {"max_steps": steps, "per_device_train_batch_size": 1, "learning_rate": 2e-5, "logging_steps": 1,
                    "save_steps": 10_000, "seed": 1, "optim": "adamw_torch_fused", "lr_scheduler_type": "constant",
                    "fsdp": True, "save_total_limit": 1}
        lora = {"enabled": False}
    # 13B: no validation rows (evaluating the random base before and after would take ~18 minutes on 2
    # cores, and the Hugging Face side does not evaluate either: neither is what is measured).
    validation = 0.0 if shape == "qlora13b" else 0.02
    cfg = TrainerConfig.from_dict({
        "model": {"name_or_path": str(model), "dtype": "bf16", "attn_implementation": "sdpa"},
        "data": {"file": str(data), "template": "alpaca", "max_seq_length": 256, "validation_fraction": validation,
                 "packing": False},
        "training": training, "lora": lora,
        "quantize": {"enabled": False, "bits": 4, "algorithm": "rtn", "group_size": 128, "eval_samples": 4,
                     "sample_prompts": 1, "max_new_tokens": 4},
        "output_dir": str(work / f"ours-{shape}"),
    })
    path = work / f"{shape}.yaml"
    path.write_text(cfg.to_yaml())
    return path


def bench_shape(shape: str, args, work: Path, earlier: dict) -> dict:
    from bench.shapes import write
    from trainer.dev.tiny import flashcards, write_json

    world = 2 if shape == "fsdp1b" else 1
    name = {"lora7b": "llama-2-7b", "qlora7b": "llama-2-7b", "qlora13b": "llama-2-13b"}.get(shape, "tinyllama")
    single = world == 1  # the LoRA shapes: one process, the CPU's limits measured
    built = time.perf_counter()
    model = write(name, work / name)
    build_seconds = round(time.perf_counter() - built, 1)
    data = write_json(work / "flashcards.json", flashcards(400, seed=3))
    config = write_config(work, model, data, shape, args.steps, world)
    py = sys.executable
    launch = ([py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"] if world > 1 else [py])
    # A run of one side (--order) keeps the other side's figures from the file.
    result: dict = {**earlier, "model": name, "processes": world, "steps": args.steps, "build_seconds": build_seconds}
    if single:
        result["cpu"] = cpu_limits(model)
    for who in args.order:
        if who == "hf":
            out = work / f"hf-{shape}"
            slow = single and not result["cpu"]["bf16_fast"]
            r = run(launch + [str(ROOT / "bench/hf_baseline.py"), "--config", str(config), "--mode", "padded",
                              "--out", str(out)], work / f"hf-{shape}.log", timeout=args.hf_limit if slow else 3600)
            if r["rc"] == 0:
                r.update(json.loads((out / "summary.json").read_text()))
            elif slow and r["seconds"] >= args.hf_limit:
                r["failure"] = (f"bf16=True on this CPU (bf16 matmul {result['cpu']['bf16_gflops']} GFLOP/s): "
                                f"stopped after {args.hf_limit} s, {hf_steps(work / f'hf-{shape}.log')} steps done")
            result["hf"] = r
            if slow and shape == "lora7b":  # what a user would try next: the base in fp32 (HF computes in its dtype)
                result["hf_fp32"] = fp32_fit(model)
        elif who in ("ours", "ours-limited"):
            out_dir = work / f"ours-{shape}"
            import shutil

            shutil.rmtree(out_dir, ignore_errors=True)
            cgroup = MemoryCgroup(int(args.limit_gib * GIB)) if who == "ours-limited" else None
            try:
                r = run(launch + ["-m", "trainer", "finetune", "--config", str(config)], work / f"{who}-{shape}.log",
                        cgroup=cgroup)
            finally:
                if cgroup:
                    cgroup.close()
            r["plan_gib"] = plan_lines(work / f"{who}-{shape}.log").get("train")
            if r["rc"] == 0:
                report = json.loads((out_dir / "report.json").read_text())["training"]
                r.update({k: report.get(k) for k in ("train_seconds", "first_step_seconds", "steps",
                                                     "num_input_tokens_seen", "startup_seconds",
                                                     "final_save_seconds", "step_seconds")})
            metrics = out_dir / "metrics.jsonl"
            if metrics.exists():
                losses = [json.loads(line).get("loss") for line in metrics.read_text().splitlines()]
                r["first_step_loss"] = next((x for x in losses if x is not None), None)
            result["ours_limited" if r.get("cgroup") else "ours"] = r
        if who == "quantize" and shape == "lora7b":
            q = run([py, "-m", "trainer", "quantize", "--config", str(config), "--set", "quantize.enabled=true"],
                    work / f"ours-{shape}-quantize.log")
            q["plan_gib"] = plan_lines(work / f"ours-{shape}-quantize.log").get("quantize")
            result["ours_quantize"] = q
    for who in ("hf", "ours", "ours_limited"):
        r = result.get(who)
        if r and r.get("step_seconds"):
            steady = r["step_seconds"][1:] or r["step_seconds"]
            r["seconds_per_step"] = round(sum(steady) / len(steady), 2)
            r["tokens_per_second"] = round(r["num_input_tokens_seen"] / max(1e-9, sum(r["step_seconds"])), 1)
    ratios: dict = {}
    ours, hf, q = result.get("ours"), result.get("hf"), result.get("ours_quantize")
    if ours and ours["rc"] == 0 and ours.get("plan_gib"):
        # The plan is per process; the tree holds every process (and torchrun's agent, and shared pages twice).
        ratios["plan_over_measured_peak"] = round(ours["plan_gib"] * world / ours["peak_rss_gib"], 3)
        # The plan counts what a process holds; a model file's pages mapped while loading are the kernel's
        # to drop (they are read once): the anonymous peak is what a limit has to hold.
        ratios["plan_over_measured_anon_peak"] = round(ours["plan_gib"] * world / ours["peak_anon_rss_gib"], 3)
    limited = result.get("ours_limited")
    if limited and limited["rc"] == 0 and limited.get("plan_gib"):
        ratios["limited_plan_over_cgroup_max_usage"] = round(limited["plan_gib"] / limited["cgroup"]["max_usage_gib"], 3)
    if q and q["rc"] == 0 and q.get("plan_gib"):
        ratios["quantize_plan_over_measured_peak"] = round(q["plan_gib"] / q["peak_rss_gib"], 3)
    if result.get("cpu"):
        # The physical limit is the best the node showed: measured again after the runs, the larger kept
        # (a measurement taken while anything else ran on the node reads low).
        after = cpu_limits(work / name)["fp32_gflops_at_shape"]
        result["cpu"]["fp32_gflops_at_shape_before_after"] = [result["cpu"]["fp32_gflops_at_shape"], after]
        result["cpu"]["fp32_gflops_at_shape"] = max(result["cpu"]["fp32_gflops_at_shape"], after)
    if ours and ours["rc"] == 0 and ours.get("seconds_per_step") and result.get("cpu"):
        # Model FLOPs of a LoRA step: the decoder layers' matmuls forward and again for the inputs'
        # gradients (the frozen weights get none): 4 x layer parameters x tokens. The embedding lookup
        # and the head (logits over labelled positions only) are left out, so MFU is if anything low.
        tokens = ours["num_input_tokens_seen"] / ours["steps"]
        achieved = 4 * result["cpu"]["layer_parameters"] * tokens / ours["seconds_per_step"] / 1e9
        ratios["mfu_vs_measured_fp32_matmul"] = round(achieved / result["cpu"]["fp32_gflops_at_shape"], 3)
        result["cpu"]["achieved_gflops"] = round(achieved, 1)
    if hf and hf["rc"] != 0 and "failure" not in hf:
        text = (ROOT / hf["log"]).read_text(errors="replace")
        hf["failure"] = ("killed by the kernel's OOM killer (SIGKILL)" if "SIGKILL" in text or hf["rc"] == -9
                         else text.strip().splitlines()[-1][:300] if text.strip() else f"exit {hf['rc']}")
    if hf and ours and hf["rc"] == 0 and ours["rc"] == 0:
        ratios["peak_rss_ours_over_hf"] = round(ours["peak_rss_gib"] / hf["peak_rss_gib"], 3)
        ratios["seconds_per_step_ours_over_hf"] = round(ours["seconds_per_step"] / hf["seconds_per_step"], 3)
    result["ratios"] = ratios
    if shape == "qlora13b" and args.delete_13b:
        import shutil

        shutil.rmtree(work / name, ignore_errors=True)
        result["deleted"] = str(work / name)
    return result


def cpu_limits(model: Path) -> dict:
    """This node's physical limit for the 7B shape: the fp32 matmul rate of one decoder projection at
    the bench's tokens per step (with every core), and the trainer's own bf16-vs-fp32 measurement."""
    import torch

    from trainer.model.compute import measure
    from trainer.model.memplan import read_shape

    shape = read_shape(model)
    rates = measure(budget_s=0.2)
    x, w = torch.randn(160, shape.hidden), torch.randn(shape.intermediate, shape.hidden)
    x @ w.t()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0:
        x @ w.t()
        reps += 1
    at_shape = 2 * 160 * shape.hidden * shape.intermediate * reps / (time.perf_counter() - start) / 1e9
    return {"fp32_gflops": round(rates.fp32, 1), "bf16_gflops": round(rates.bf16, 2), "bf16_fast": rates.bf16_fast,
            "fp32_gflops_at_shape": round(at_shape, 1), "threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "layer_parameters": shape.layers * shape.layer_params}


def fp32_fit(model: Path) -> dict:
    """Whether the base in fp32 (the Hugging Face Trainer's other choice on a CPU without fast bf16)
    fits this machine: its weights alone, from the model's files."""
    from trainer.model.memplan import read_shape

    weights = read_shape(model).params * 4
    total = psutil.virtual_memory().total
    return {"weights_gib": round(weights / GIB, 2), "machine_gib": round(total / GIB, 2), "fits": weights < total,
            "failure": None if weights < total else
            f"not run: the fp32 weights alone ({weights / GIB:.1f} GiB) exceed this machine's {total / GIB:.1f} GiB"}


def hf_steps(log: Path) -> int:
    """Optimizer steps the Hugging Face Trainer logged before it was stopped."""
    return len(re.findall(r"'loss':", log.read_text(errors="replace")))


def table(results: dict) -> str:
    rows = ["| shape | who | exit | peak RSS GiB | plan GiB | s/step | tokens/s | first step s | final save s | wall s |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape, r in results["shapes"].items():
        for who in ("hf", "ours", "ours_quantize"):
            x = r.get(who)
            if not x:
                continue
            rows.append(f"| {shape} | {who} | {x['rc']} | {x['peak_rss_gib']} | {x.get('plan_gib') or ''} | "
                        f"{x.get('seconds_per_step', '')} | {x.get('tokens_per_second', '')} | "
                        f"{round(x['first_step_seconds'], 1) if x.get('first_step_seconds') else ''} | "
                        f"{round(x['final_save_seconds'], 1) if x.get('final_save_seconds') else ''} | {x['seconds']} |")
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("lora7b", "qlora7b", "qlora13b", "fsdp1b"), action="append")
    p.add_argument("--delete-13b", action="store_true", help="delete the ~26 GB 13B shape after measuring it")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--order", nargs="+", default=["hf", "ours", "quantize"],
                   choices=("hf", "ours", "ours-limited", "quantize"),
                   help="which runs, in order (quantize: ours on final/ of the last `ours` run; lora7b only; "
                        "ours-limited: ours in a memory cgroup of --limit-gib, as a container's limit)")
    p.add_argument("--limit-gib", type=float, default=10.0, help="the memory limit of ours-limited")
    p.add_argument("--hf-limit", type=float, default=600,
                   help="seconds the Hugging Face Trainer gets on a CPU without fast bf16 (bf16=True crawls there)")
    p.add_argument("--work", default=str(ROOT / "bench/work/scale"))
    p.add_argument("--out", default=str(ROOT / "bench/results/scale-cpu.json"))
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results.update({"machine": {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / GIB, 1),
                                "processor": platform.processor() or platform.machine()},
                    "command": " ".join(["python", "bench/scale.py"] + sys.argv[1:])})
    results.setdefault("shapes", {})
    for shape in args.only or ["lora7b", "fsdp1b"]:
        results["shapes"][shape] = bench_shape(shape, args, work, results["shapes"].get(shape, {}))
        lora, this = results["shapes"].get("lora7b", {}).get("ours"), results["shapes"][shape].get("ours")
        if shape == "qlora7b" and lora and this and lora["rc"] == 0 and this["rc"] == 0:
            # QLoRA against LoRA with the base in bf16, the same shape on the same machine (lora7b's run).
            results["shapes"][shape]["ratios"]["peak_rss_over_bf16_lora"] = round(
                this["peak_rss_gib"] / lora["peak_rss_gib"], 3)
            if this.get("seconds_per_step") and lora.get("seconds_per_step"):
                results["shapes"][shape]["ratios"]["seconds_per_step_over_bf16_lora"] = round(
                    this["seconds_per_step"] / lora["seconds_per_step"], 3)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(json.dumps(results["shapes"][shape], indent=1), flush=True)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
