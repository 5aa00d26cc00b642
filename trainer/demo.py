"""`make demo`: the whole pipeline locally on a tiny model, no cluster, no token, no downloads.

    python -m trainer.demo [--out demo-output] [--rendezvous c10d|etcd] [--nproc 2]

Writes a tiny Llama-architecture model and a Medical Meadow flashcards-schema dataset, renders the
trainer config exactly as the Pulumi stack does (the same TrainerConfig -> YAML), then runs the
command the PyTorchJob runs — torchrun with 2 processes -> fine-tune -> evaluate -> quantize — and
prints where the results are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from trainer import local
from trainer.config import TrainerConfig

ROOT = Path(__file__).resolve().parent.parent


def demo_config(out: Path) -> TrainerConfig:
    return TrainerConfig.from_dict({
        "model": {"name_or_path": str(out / "tiny-llama")},
        "data": {"file": str(out / "medical_meadow_flashcards.json"), "template": "alpaca", "max_seq_length": 256,
                 "validation_fraction": 0.05},
        "training": {"num_train_epochs": 1, "per_device_train_batch_size": 4, "learning_rate": 0.002,
                     "lr_scheduler_type": "cosine", "warmup_ratio": 0.05, "logging_steps": 10, "save_steps": 50,
                     "eval_steps": 50, "seed": 42},
        # A full fine-tune: LoRA needs a pretrained base, and this base is random (see README).
        "lora": {"enabled": False},
        "quantize": {"enabled": True, "bits": 4, "algorithm": "rtn", "group_size": 128, "eval_samples": 64,
                     "sample_prompts": 3, "max_new_tokens": 24},
        "output_dir": str(out / "output"),
    })


def prepare(out: Path, examples: int) -> Path:
    from trainer.tiny import corpus, flashcards, write_json, write_model

    records = flashcards(examples, seed=7)
    write_json(out / "medical_meadow_flashcards.json", records)
    if not (out / "tiny-llama" / "config.json").exists():
        write_model(out / "tiny-llama", corpus(records), hidden=128, layers=4, heads=4, kv_heads=2,
                    intermediate=256, vocab_size=1024)
    cfg = demo_config(out)
    path = out / "config.yaml"
    path.write_text(cfg.to_yaml())
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m trainer.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "demo-output"), help="working directory (default: demo-output/)")
    p.add_argument("--rendezvous", choices=("c10d", "etcd"), default=os.environ.get("DEMO_RENDEZVOUS", "c10d"),
                   help="c10d (default) or etcd: a local etcd with the v2 API, as the stack runs in the cluster")
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (default 2)")
    p.add_argument("--examples", type=int, default=2000, help="synthetic flashcards to write (default 2000)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"==> writing a tiny Llama model and {args.examples} flashcards under {out}", flush=True)
    config = prepare(out, args.examples)
    cfg = demo_config(out)
    import shutil

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
    report = json.loads(cfg.report_path.read_text())
    t, q = report["training"], report["quantize"]
    print(f"""
==> done in {time.perf_counter() - started:.0f}s
    fine-tuned model   {cfg.final_dir}
    quantized model    {cfg.quantized_dir}   ({q.get('format', 'inc')}: AutoModelForCausalLM.from_pretrained, vllm serve)
    report             {cfg.report_path}  and  {cfg.out / 'report.md'}
    plots              {cfg.out / 'loss_curve.png'}  {cfg.out / 'quantization.png'}
    metrics            {cfg.metrics_path}

    training           {t['steps']} steps on {t['world_size']} processes, {t['train_seconds']:.0f}s, \
validation loss {t['eval_loss']:.3f} (perplexity {t['eval_perplexity']:.2f})
    quantization       {q['bits']}-bit {q['algorithm'].upper()} {q.get('format', 'inc')}, measured in {q.get('engine', 'INC')}: size {q['size_bytes_before'] / 1e6:.2f} MB -> \
{q['size_bytes_after'] / 1e6:.2f} MB, perplexity {q['perplexity_before']:.2f} -> {q['perplexity_after']:.2f} \
({q['perplexity_after'] / q['perplexity_before'] - 1:+.1%})
""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
