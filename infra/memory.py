"""The memory plan at preview: the trainer's own plan (trainer/model/memplan.py) against resources.memory.

Where the model's config.json can be read while previewing (a local model directory, or the hub when
reachable), `pulumi preview` plans each worker process as the trainer will, against the container's
memory limit shared by its processes: it warns when the trainer will have to turn on gradient
checkpointing or refuse, and stops the preview when not even every fix would make it fit, naming
resources.memory and the figure that would. Nothing is planned (and nothing is said against the
stack) where config.json cannot be read; the trainer plans again before loading in any case.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from trainer.model import memplan

quantity_bytes = memplan.quantity_bytes  # one parser, in the trainer's pure module


def model_config(name_or_path: str, revision: Optional[str] = None) -> tuple[Optional[dict], str]:
    """(config.json, where from), or (None, why not): a local directory, or the hub's file (public
    models; a gated model's config needs the token, which preview does not read)."""
    local = Path(name_or_path).expanduser()
    if name_or_path.lower().endswith(".gguf"):
        if not local.is_file():
            return None, (
                f"{name_or_path} is not readable here (a GGUF file on the volume or the hub: the trainer "
                "plans from its metadata at start-up)"
            )
        from trainer.model import gguf
        from trainer.errors import UserError

        try:
            return gguf.config_dict(local), f"{local} (GGUF metadata)"
        except UserError as exc:
            return None, str(exc)
    if (local / "config.json").exists():
        try:
            return json.loads((local / "config.json").read_text()), str(local / "config.json")
        except (OSError, ValueError) as exc:
            return None, f"{local / 'config.json'} cannot be read ({exc})"
    if name_or_path.startswith(("/", "./", "../")):
        return None, f"{name_or_path} is not readable here (a path on the volume)"
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(name_or_path, "config.json", revision=revision, etag_timeout=5)
        return json.loads(Path(path).read_text()), f"the hub ({name_or_path})"
    except Exception as exc:  # noqa: BLE001 - offline, gated, unknown: the trainer plans again anyway
        return None, f"the hub's config.json of {name_or_path} is not reachable ({type(exc).__name__})"


@dataclass
class Check:
    summary: str  # one line for the stack output
    warning: Optional[str] = None
    per_process: Optional[memplan.MemoryPlan] = None


def plan_for(trainer_cfg, config: dict, workers: int, procs: int, gpus: int) -> memplan.MemoryPlan:
    shape = memplan.Shape.from_config(config)
    # model.dtype auto: bf16 where the hardware has it; planned as fp32 compute (the larger) on CPUs,
    # as bf16 on GPUs (every GPU this product targets has bf16).
    mixed = trainer_cfg.model.dtype == "bf16" or (trainer_cfg.model.dtype == "auto" and gpus > 0)
    setting = memplan.setting_for(trainer_cfg, shape, workers * procs, procs, mixed, cuda=gpus > 0)
    compute = setting.compute_bytes
    return memplan.estimate(shape, setting, memplan.DEFAULT_RUNTIME + memplan.workspace(compute, gpus > 0))


def check(cfg, config: dict, where: str) -> Check:
    """Plan `cfg` (infra.config.StackConfig) for a model of `config`; raise StackConfigError when not
    even every fix makes it fit."""
    from infra.config import PROJECT, StackConfigError

    t = cfg.trainer
    if cfg.resources.gpus > 0:
        return Check(
            f"not planned against resources.memory: on GPUs the trainer plans against the device's "
            f"free memory at start-up (model config from {where})"
        )
    procs = cfg.procs_per_worker
    limit = quantity_bytes(cfg.resources.memory)
    budget = limit // procs
    plan = plan_for(t, config, cfg.workers, procs, cfg.resources.gpus)
    shape = memplan.Shape.from_config(config)
    s = plan.setting
    gib = memplan.GIB
    line = (
        f"{plan.peak / gib:.1f} GiB per process x {procs} of resources.memory {cfg.resources.memory} "
        f"({budget / gib:.1f} GiB each): {plan.describe()}"
    )
    decision = memplan.decide(shape, s, plan.terms["runtime"], budget, "resources.memory")
    if decision.fits and decision.turned_on_checkpointing is None:
        return Check("fits: " + line, per_process=plan)
    with_gc = decision.plan  # the plan with gradient checkpointing (decide turns it on, or quotes it)
    if decision.fits:
        return Check(
            "fits with gradient checkpointing: " + line,
            warning=f"memory plan: {plan.peak / gib:.1f} GiB per process does not fit resources.memory "
            f"{cfg.resources.memory} / {procs} process(es); the trainer will turn on gradient "
            f"checkpointing ({with_gc.peak / gib:.1f} GiB, slower steps). To avoid it: "
            f"pulumi config set --path resources.memory {_quantity(plan.peak * procs * 1.2)}",
            per_process=plan,
        )
    # Every fix the stack can make by itself: LoRA, FSDP over every process, checkpointing, one example
    # of 256 tokens per micro-batch.
    best = memplan.estimate(
        shape,
        replace(
            s,
            lora=True,
            fsdp=s.world > 1,
            gradient_checkpointing=True,
            tokens=min(s.tokens, 256),
            lora_trainable=memplan.lora_trainable(shape, 16, ("auto",)),
        ),
        plan.terms["runtime"],
    )
    need = _quantity(with_gc.peak * procs * 1.2)
    if best.peak > budget:
        raise StackConfigError(
            f"config key '{PROJECT}:resources.memory': {cfg.resources.memory} cannot hold this job: the trainer's "
            f"memory plan for {where} needs {with_gc.peak / gib:.1f} GiB per process ({procs} per worker) as "
            f"configured, and {best.peak / gib:.1f} GiB even with LoRA, FSDP over every process, gradient "
            f"checkpointing and 256-token micro-batches. Fix: pulumi config set --path resources.memory {need} "
            f"(or {_quantity(best.peak * procs * 1.2)} with those changes)"
        )
    fixes = memplan.fixes(t, s, shape)
    return Check(
        "does not fit as configured: " + line,
        warning=f"memory plan: {with_gc.peak / gib:.1f} GiB per process even with gradient checkpointing "
        f"does not fit resources.memory {cfg.resources.memory} / {procs} process(es): the trainer "
        f"will refuse to start. Fix: pulumi config set --path resources.memory {need}, or " + "; or ".join(fixes[:-1]),
        per_process=plan,
    )


def _quantity(nbytes: float) -> str:
    return f"{math.ceil(nbytes / memplan.GIB)}Gi"


def on_avx2(cfg, config: dict) -> Optional[str]:
    """A CPU stack in bf16 planned for nodes with fast bf16 (AMX, AVX512-BF16): what the same run needs on
    a node without it, where the trainer computes in fp32 (activations twice as wide) and keeps a LoRA
    base in bf16 (trainer/model/compute.py). None for GPUs and fp32 runs."""
    t = cfg.trainer
    if cfg.resources.gpus > 0 or t.model.dtype != "bf16":
        return None
    plan = plan_for(t, config, cfg.workers, cfg.procs_per_worker, 0)
    s = replace(plan.setting, mixed=False, compute_bytes=4, frozen_bytes=2 if t.lora.enabled else 4)
    slow = memplan.decide(
        memplan.Shape.from_config(config),
        s,
        memplan.DEFAULT_RUNTIME + memplan.workspace(4),
        quantity_bytes(cfg.resources.memory) // cfg.procs_per_worker,
        "resources.memory",
    )
    return (
        f"on CPUs without fast bf16 (AVX2-only: fp32 compute) {slow.plan.peak / memplan.GIB:.1f} GiB per process"
        + (", gradient checkpointing turned on" if slow.turned_on_checkpointing is not None else "")
        + ("" if slow.fits else ", does not fit: the trainer would refuse there")
    )


def preview(cfg) -> Check:
    """The check of a parsed stack config, where its model's config.json can be read."""
    config, where = model_config(cfg.trainer.model.name_or_path, cfg.trainer.model.revision)
    if config is None:
        return Check(f"not planned at preview: {where}; the trainer plans before loading and refuses a run that cannot fit")
    try:
        result = check(cfg, config, where)
        other = on_avx2(cfg, config)
    except (KeyError, TypeError, ValueError) as exc:  # a config.json of a shape the plan does not know
        return Check(f"not planned at preview: {where} has no shape the plan reads ({type(exc).__name__}: {exc})")
    if other:
        result.summary += f"; {other}"
    return result
