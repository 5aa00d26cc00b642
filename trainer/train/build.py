"""A fine-tune built from its config, in the order each part needs the last: the model's files and
tokenizer, the data and the step plan, the placement (precision, storage, memory plan: refused here
where nothing fits, before anything large is loaded), the model and its identity, the optimizer and
schedule, the checkpointer. trainer/train/loop.py steps what this builds.
"""

from __future__ import annotations

import random
import time

import torch

from trainer import data as data_module
from trainer.config import TrainerConfig, world_problem
from trainer.data import Prepared
from trainer.errors import UserError
from trainer.model import modeling
from trainer.monitor.metrics import MetricsWriter
from trainer.runtime import allocator
from trainer.runtime import distributed as D
from trainer.runtime.preemption import StopRequest
from trainer.train import identity, net, optim
from trainer.train.checkpoint import Checkpointer, estimate_checkpoint_bytes
from trainer.train.loop import Trainer
from trainer.train.placement import Placement, choose
from trainer.train.saving import Saver
from trainer.train.steps import plan


def prepare(cfg: TrainerConfig, d: D.Dist) -> None:
    """Before anything is read: seeds, this process's threads and allocator, the world size checked
    against the config, QLoRA's library importable."""
    allocator.configure()
    torch.manual_seed(cfg.training.seed)
    random.seed(cfg.training.seed)
    if d.device.type == "cpu":
        torch.set_num_threads(cfg.training.cpu_threads or D.default_threads(d.local_world_size))
    problem = world_problem(cfg, d.world_size)
    if problem:
        raise UserError(problem)
    if cfg.lora.enabled and cfg.lora.base_bits:
        from trainer.model import qlora

        qlora.require()


def build(cfg: TrainerConfig, d: D.Dist, log, stop: StopRequest) -> Trainer:
    """Every part of the fine-tune (`prepare` done and the output lock held). `stop`: the stop request
    installed when the process started (a SIGTERM before training ends the process at once)."""
    started = time.perf_counter()
    if cfg.training.trackers:  # a tracker that cannot be reached is refused now, not at step N
        from trainer.monitor import tracking

        D.on_main(d, lambda: tracking.check(cfg))
    token = modeling.read_token()
    path = modeling.resolve(cfg.model, token, d, data_module.cache_root(cfg), log)
    tokenizer = modeling.load_tokenizer(path)
    log(
        f"world {d.world_size} (backend {d.backend or 'none'}, device {d.device.type}, "
        f"{torch.get_num_threads()} threads/process); {allocator.configure()}"
    )
    data = data_module.for_config(cfg, tokenizer, path, token, d, log)
    _log_data(cfg, data, log)
    steps = plan(data.train, cfg, d.world_size)
    placement = choose(cfg, d, path, data, steps, log)
    loaded = net.load(cfg, d, path, placement, log)
    # What the checkpoints of this run hold (the resume guard compares it; rank 0 reads the files).
    weights = D.on_main(d, lambda: identity.weights_fingerprint(path))
    run_identity = identity.guarded(
        cfg, weights, data.content, str(placement.precision.params), net.lora_names(cfg, loaded.targets)
    )
    assembled, optimizer = net.assemble(cfg, d, loaded, placement, log)
    training = net.Training(assembled, optimizer, optim.schedule(optimizer, cfg.training, steps.total_steps))
    ckpt = Checkpointer(cfg.checkpoints_dir, cfg.training.save_total_limit, d, log)
    outputs = _outputs_bytes(cfg, assembled.base, placement)
    estimate = estimate_checkpoint_bytes(assembled.base)
    log("space: " + D.on_main(d, lambda: ckpt.check_space(estimate, outputs, measured=False)))
    metrics = MetricsWriter(cfg.metrics_path, d.is_main)
    saver = Saver(cfg, d, log, ckpt, metrics, run_identity, outputs)
    return Trainer(
        cfg=cfg,
        dist=d,
        log=log,
        stop=stop,
        started=started,
        tokenizer=tokenizer,
        model_path=path,
        data=data,
        steps=steps,
        placement=placement,
        training=training,
        saver=saver,
        metrics=metrics,
    )


def _log_data(cfg: TrainerConfig, data: Prepared, log) -> None:
    log(
        f"data: {data.summary()}; validation: {len(data.val)} examples "
        f"({data.val_stats.records} records, {data.invalid()['validation']} invalid skipped)"
    )
    if data.stats.truncated:
        log(f"data: {data.stats.truncated} examples longer than data.max_seq_length={cfg.data.max_seq_length} were truncated")
    data.log_invalid(log)


def _outputs_bytes(cfg: TrainerConfig, base: torch.nn.Module, placement: Placement) -> int:
    """final/ (in its dtype), adapter/ and quantized/ (about a third of final/)."""
    total = sum(modeling.weights(p) for p in base.parameters())
    width = torch.empty((), dtype=placement.save_dtype).element_size()
    adapter = sum(p.numel() * 4 for p in base.parameters() if p.requires_grad) if cfg.lora.enabled else 0
    return int(total * width * (1.4 if cfg.quantize.enabled else 1.0)) + adapter
