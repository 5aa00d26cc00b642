"""`python -m trainer finetune`: train, save final/, then (rank 0, the process group closed) quantize.

torchrun --nproc-per-node 2 -m trainer finetune --config config.yaml
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch

from trainer.config import TrainerConfig
from trainer.monitor.metrics import Logger, gain_line, update_report
from trainer.runtime import distributed as D
from trainer.runtime import lock
from trainer.runtime.preemption import StopRequest
from trainer.train.build import build, prepare
from trainer.train.loop import Trainer


@contextmanager
def session(cfg: TrainerConfig, dist: Optional[D.Dist] = None) -> Iterator[Trainer]:
    """A built Trainer inside its process group and output lock, every one of them let go on exit
    whatever happens (the trackers closed, the lock released, the process group closed if opened here).

    `dist`: a process group already set up (several fine-tunes in one launch, as the architecture
    tests do); it is left open."""
    d = dist or D.init(cfg.training.ddp_backend)
    log = Logger(d.is_main)
    stop = StopRequest(d.local_rank)  # from now on a SIGTERM before training ends the process at once
    try:
        prepare(cfg, d)
        with lock.held(cfg.out, d, log):  # one writer per output_dir, before anything in it is read
            trainer = build(cfg, d, log, stop)
            try:
                yield trainer
            finally:
                trainer.close()
    finally:
        if dist is None:
            d.close()


def finetune(cfg: TrainerConfig, dist: Optional[D.Dist] = None) -> dict[str, Any]:
    """Train, save final/, then (rank 0, process group closed) quantize when enabled; with `dist`
    given, quantization is left to the caller."""
    with session(cfg, dist) as trainer:
        summary = trainer.train()
        trainer.save_final()
        summary["final_save_seconds"] = round(trainer.final_save_seconds, 2)
        trainer.training.release()  # quantization below loads final/ again: the training copy must be gone first
        d = trainer.dist
        if d.is_main:
            update_report(cfg.report_path, "training", summary)
            from trainer.monitor.report import regenerate

            regenerate(cfg.output_dir)  # loss curve and report.md (again after quantization)
        if dist is None:
            d.close()
        if dist is None and d.is_main and cfg.quantize.enabled:
            # Other ranks have exited cleanly; rank 0 quantizes alone (a single-process stage), so it takes
            # the cores the pod's processes shared (training split them: 1 thread each with 2 on 2 cores).
            from trainer.post import quantize

            if d.device.type == "cpu" and not cfg.training.cpu_threads:
                torch.set_num_threads(D.default_threads(1))
                trainer.log(f"quantize: {torch.get_num_threads()} threads (the training processes' cores)")
            quantize.run(cfg, log=trainer.log)
        trainer.log(
            f"fine-tune of {cfg.model.name_or_path}: {gain_line(summary.get('eval_loss_before'), summary.get('eval_loss'))}"
        )
    return summary
