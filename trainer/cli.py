"""Command line: python -m trainer finetune|evaluate|quantize|report ...

python -m trainer finetune --config config.yaml --set training.max_steps=20
torchrun --nproc-per-node 2 -m trainer finetune --config config.yaml
python -m trainer prepare --config config.yaml [--export subset.jsonl --max-examples 1000]
python -m trainer quantize --config config.yaml
python -m trainer evaluate --config config.yaml
python -m trainer report OUTPUT_DIR
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from trainer import envvars
from trainer.errors import UserError
from trainer.runtime.preemption import Preempted

SET_HELP = (
    "override one config value, e.g. --set training.max_steps=20 --set lora.enabled=false (values parsed as YAML; repeatable)"
)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m trainer",
        description="Distributed LLM fine-tuning, evaluation and "
        "quantization. The config file has sections model, data, training (Hugging Face "
        "TrainingArguments names), lora, quantize, tracking and output_dir; see trainer/config.py.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("finetune", "fine-tune (resumes from the newest complete checkpoint), save final/, then quantize when quantize.enabled"),
        (
            "prepare",
            "validate and tokenize the data into the shared cache without training; print "
            "statistics; optionally export a cleaned subset",
        ),
        (
            "evaluate",
            "perplexity, size, latency and sample generations of final/ (and quantized/), "
            "the base model or a checkpoint, on the validation data or a file",
        ),
        (
            "quantize",
            "quantize final/ into quantize.format (AutoRound; INC for format inc) in quantized/, "
            "each of quantize.also beside it, measured in its engine, and report",
        ),
    ):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("--config", required=True, metavar="FILE", help="trainer config YAML (the stack renders it)")
        s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)
        if name == "prepare":
            s.add_argument(
                "--export", metavar="FILE", help="write the valid records, cleaned, to FILE (.jsonl lines, .json an array)"
            )
            s.add_argument("--max-examples", type=int, metavar="N", help="export at most N records")
        if name == "evaluate":
            s.add_argument(
                "--model",
                default="final",
                metavar="WHICH",
                help="final (default), base, a model directory, or a checkpoint directory of this run",
            )
            s.add_argument("--data", metavar="FILE", help="score every record of FILE instead of the validation data")
    text = (
        "the memory plan of this config per process, from the model's config.json alone (no weights read), "
        "against what a process can have here or under --memory"
    )
    m = sub.add_parser("plan", help=text, description=text)
    m.add_argument("--config", required=True, metavar="FILE", help="trainer config YAML (the stack renders it)")
    m.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides", help=SET_HELP)
    m.add_argument("--processes", type=int, default=1, metavar="N", help="processes per worker (procsPerWorker)")
    m.add_argument("--workers", type=int, default=1, metavar="N", help="workers (FSDP shards over all processes)")
    m.add_argument(
        "--memory",
        metavar="QUANTITY",
        help="the container's limit (resources.memory, e.g. 46Gi); default: this machine's available memory",
    )
    r = sub.add_parser("report", help="regenerate plots and print the summary table of an output directory")
    r.add_argument("output_dir", metavar="OUTPUT_DIR")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "report":
            from trainer.monitor import report

            print(report.regenerate(args.output_dir))
            return 0
        from trainer.config import load_config

        cfg = load_config(args.config, args.overrides)
        if args.command in ("finetune", "quantize", "evaluate"):
            from trainer.runtime import allocator

            allocator.configure()  # before anything large is allocated (the fine-tune's log names it)
        if args.command == "finetune":
            from trainer.train import finetune

            finetune(cfg)
        elif args.command == "quantize":
            from trainer.post import quantize

            quantize.run(cfg)
        elif args.command == "evaluate":
            from trainer.post import evaluate

            evaluate.run(cfg, which=args.model, data_file=args.data)
        elif args.command == "prepare":
            prepare(cfg, args.export, args.max_examples)
        elif args.command == "plan":
            print(plan(cfg, args.processes, args.workers, args.memory))
        return 0
    except Preempted as exc:
        print(f"{exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except UserError as exc:
        report_once(f"error: {exc}")
        stop_torchrun_agent()
        return 2


def prepare(cfg, export: Optional[str], max_examples: Optional[int]) -> None:
    """Validate and tokenize (every rank under torchrun, a process pool otherwise); print statistics."""
    import time

    from trainer import data
    from trainer.runtime import distributed
    from trainer.model import modeling
    from trainer.monitor.metrics import Logger

    started = time.perf_counter()
    d = distributed.init(None)
    log = Logger(d.is_main)
    try:
        token = modeling.read_token()
        path = modeling.resolve(cfg.model, token, d, data.cache_root(cfg), log)
        tokenizer = modeling.load_tokenizer(path)
        prepared = data.for_config(cfg, tokenizer, path, token, d, log, export=export, export_max=max_examples)
    finally:
        d.close()
    if d.is_main:
        log(f"data: {prepared.summary()}")
        invalid = prepared.invalid()
        log(
            f"validation: {len(prepared.val)} examples ({prepared.val_stats.records} records, "
            f"{invalid['validation']} invalid skipped)"
        )
        log(f"invalid records skipped: {invalid['training']} training, {invalid['validation']} validation")
        prepared.log_invalid(log)
        if prepared.stats.split_conversations:
            log(
                f"{prepared.stats.split_conversations} conversations became one example per assistant turn (the "
                "chat template renders earlier turns differently)"
            )
        log(f"cache: {prepared.cache} ({'already there' if prepared.hit else 'written'}); {time.perf_counter() - started:.1f}s")


def plan(cfg, processes: int, workers: int, memory: Optional[str]) -> str:
    """The memory plan the trainer will log at start-up, without loading anything large. A hub model's
    config.json is read from the hub (or its cache); the precision `auto` is resolved on this machine."""
    from trainer.runtime import distributed
    from trainer.model import memplan, modeling

    from trainer.config import world_problem

    problem = world_problem(cfg, workers * processes)
    if problem:
        raise UserError(problem)
    from trainer.model import gguf
    from trainer.data import cache_root

    import torch

    single = distributed.Dist(0, 0, 1, 1, None, torch.device("cpu"))
    gguf_path = gguf.resolve_file(cfg.model.name_or_path, cfg.model.gguf_file, cfg.model.revision, modeling.read_token(), True)
    if gguf_path is not None:  # the shape from the file's metadata; nothing dequantized
        shape = memplan.Shape.from_config(gguf.config_dict(gguf_path))
    else:
        shape = memplan.read_shape(modeling.resolve(cfg.model, modeling.read_token(), single, cache_root(cfg)))
    from trainer.model.compute import rates

    measured = rates()
    precision = distributed.choose_precision(cfg.model.dtype, False, rates=measured, compute=cfg.model.compute_dtype)
    storage, reason = distributed.frozen_storage(precision, cfg.model.dtype, cfg.lora.enabled, False)
    if memory:
        try:
            limit = memplan.quantity_bytes(memory)
        except ValueError as exc:
            raise UserError(f"--memory {exc}. Fix: --memory 46Gi") from None
        budget, source = limit // processes, f"--memory {memory} / {processes} processes"
    else:
        budget, source = memplan.available_memory(processes, 0)
    plans = []  # per storage dtype of the frozen base, widest first, as the trainer plans them
    for dtype in storage:
        setting = memplan.setting_for(
            cfg,
            shape,
            workers * processes,
            processes,
            precision.mixed,
            compute_bytes=precision.compute.itemsize,
            frozen_bytes=dtype.itemsize,
        )
        runtime = memplan.DEFAULT_RUNTIME + memplan.workspace(setting.compute_bytes)
        plans.append((setting, memplan.decide(shape, setting, runtime, budget, source)))
    index, why = memplan.pick([(d.fits, d.turned_on_checkpointing is not None) for _, d in plans])
    if index is None:
        setting, decision = plans[-1]
        raise UserError(decision.refusal(memplan.fixes(cfg, setting, shape)))
    decision, dtype = plans[index][1], storage[index]
    if why:
        reason = f"memory: {distributed._short(storage[0])} would {why}"
    frozen = (
        f"; frozen base {distributed._short(dtype)}" + (f" ({reason})" if dtype != precision.compute else "")
        if cfg.lora.enabled
        else ""
    )
    if cfg.lora.enabled and cfg.lora.base_bits:
        from trainer.model.qlora import short_name

        frozen += (
            f", its linear layers in {short_name(cfg.lora.base_bits)} (lora.base_bits: "
            f"{cfg.lora.base_bits}, bitsandbytes), dequantized per layer into {distributed._short(precision.compute)}"
        )
    return f"compute: {precision.describe()}{frozen}; {measured.describe()}\n" + decision.log_line()


def report_once(line: str, wait_s: float = 20.0) -> None:
    """Under torchrun every rank raises the same input error (the ranks share their checks): the first
    local process to claim it (an exclusive file per run, restart and message) prints it; the others
    wait (bounded) until it has been printed before they exit or signal the agent, because either
    makes torchrun terminate the workers, the printing one included (seen in CI: the agent's SIGTERM
    arrived between the claim and the print, and the run ended without our line)."""
    import time

    claim = _claim_path(line)
    if claim is None:
        print(line, file=sys.stderr, flush=True)
        return
    try:
        os.close(os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        deadline = time.monotonic() + wait_s
        while not os.path.exists(claim + ".printed") and time.monotonic() < deadline:
            time.sleep(0.02)
        return
    except OSError:  # no shared temporary directory: every rank prints
        print(line, file=sys.stderr, flush=True)
        return
    print(line, file=sys.stderr, flush=True)
    try:
        os.close(os.open(claim + ".printed", os.O_CREAT | os.O_WRONLY, 0o600))
    except OSError:
        pass


def _claim_path(message: str) -> Optional[str]:
    import hashlib
    import tempfile

    run = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run:
        return None
    digest = hashlib.sha1(message.encode()).hexdigest()[:16]
    name = f"llm-finetune-error-{run}-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}-{digest}"
    return os.path.join(tempfile.gettempdir(), name)


def stop_torchrun_agent() -> None:
    """An input error must not burn torchrun's restarts: the same config fails the same way every time.
    The worker leaves a marker for the pod's launcher (which then exits 2 and shows this error alone).
    Where torchrun would restart the workers (--max-restarts > 0), the worker asks its agent to stop
    instead (SIGTERM: the agent terminates the workers and exits without restarting them, and leaves
    the rendezvous open for a later run); with no restarts left, torchrun ends with its own report."""
    import signal

    if not os.environ.get("TORCHELASTIC_RUN_ID"):
        return
    marker = os.environ.get(envvars.INPUT_ERROR_FILE)
    if marker:  # tells the pod's launcher to exit 2 (a permanent failure), not to retry
        try:
            open(marker, "a").close()
        except OSError:
            pass
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) == 0:
        return
    parent = os.getppid()
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "torch.distributed.run" in cmdline or "torchrun" in cmdline:
        os.kill(parent, signal.SIGTERM)
