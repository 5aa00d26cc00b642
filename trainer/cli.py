"""Command line: python -m trainer finetune|evaluate|quantize|report ...

    python -m trainer finetune --config config.yaml --set training.max_steps=20
    torchrun --nproc-per-node 2 -m trainer finetune --config config.yaml
    python -m trainer quantize --config config.yaml
    python -m trainer evaluate --config config.yaml
    python -m trainer report OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from trainer.errors import UserError
from trainer.preemption import Preempted

SET_HELP = ("override one config value, e.g. --set training.max_steps=20 --set lora.enabled=false "
            "(values parsed as YAML; repeatable)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description="Distributed LLM fine-tuning, evaluation and "
                                "quantization. The config file has sections model, data, training (Hugging Face "
                                "TrainingArguments names), lora, quantize and output_dir; see trainer/config.py.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("finetune", "fine-tune (resumes from the newest complete checkpoint), save final/, "
                                    "then quantize when quantize.enabled"),
                       ("evaluate", "perplexity, size, latency and sample generations of final/ (and quantized/)"),
                       ("quantize", "quantize final/ with Intel Neural Compressor into quantized/ and report")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--config", required=True, metavar="FILE", help="trainer config YAML (the stack renders it)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)
    r = sub.add_parser("report", help="regenerate plots and print the summary table of an output directory")
    r.add_argument("output_dir", metavar="OUTPUT_DIR")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "report":
            from trainer import report

            print(report.regenerate(args.output_dir))
            return 0
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command == "finetune":
            from trainer.train import finetune

            finetune(cfg)
        elif args.command == "quantize":
            from trainer import quantize

            quantize.run(cfg)
        elif args.command == "evaluate":
            from trainer import evaluate

            evaluate.run(cfg)
        return 0
    except Preempted as exc:
        print(f"{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        stop_torchrun_agent()
        return 2


def stop_torchrun_agent() -> None:
    """An input error must not burn torchrun's restarts: the same config fails the same way every time.
    torchrun restarts its workers after any failure, so the worker asks its agent to stop instead
    (SIGTERM: the agent terminates the workers and exits non-zero without restarting them, and leaves
    the rendezvous open for a later run). Only when the parent really is a torchrun agent."""
    import os
    import signal

    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "torch.distributed.run" in cmdline or "torchrun" in cmdline:
        print("error: input error; asking torchrun not to restart", file=sys.stderr, flush=True)
        marker = os.environ.get("LLM_FINETUNE_INPUT_ERROR_FILE")
        if marker:  # tells the pod's launcher to exit 2 (a permanent failure), not to retry
            try:
                open(marker, "a").close()
            except OSError:
                pass
        os.kill(parent, signal.SIGTERM)
