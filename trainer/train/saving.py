"""Checkpoints on their cadence (training.save_steps, the last step, a stop request) and resuming from
them: the resume guard (what a checkpoint holds cannot change), a fresh start moving the previous
results aside, the space on the volume checked against a real checkpoint's size."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from trainer.config import TrainerConfig
from trainer.errors import UserError
from trainer.monitor.metrics import MetricsWriter
from trainer.runtime import distributed as D
from trainer.train import identity
from trainer.train.checkpoint import Checkpointer, NonFiniteState
from trainer.train.state import LoopState

# What a run writes into output_dir: a fresh start moves them (and quantize.also's quantized-*) aside.
RESULTS = (
    "checkpoints",
    "final",
    "adapter",
    "quantized",
    "metrics.jsonl",
    "report.json",
    "report.md",
    "loss_curve.png",
    "quantization.png",
    "progress.txt",
    "tracking.json",
    "tensorboard",
    "wandb",
)


class Saver:
    def __init__(
        self,
        cfg: TrainerConfig,
        d: D.Dist,
        log,
        ckpt: Checkpointer,
        metrics: MetricsWriter,
        run_identity: dict[str, Any],
        outputs_estimate: int,
    ):
        self.cfg, self.d, self.log, self.ckpt, self.metrics = cfg, d, log, ckpt, metrics
        self.identity = run_identity
        self.outputs_estimate = outputs_estimate
        self.measured_space = False

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        return step % self.cfg.training.save_steps == 0 or last or stopping

    def save(self, state: LoopState, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer, streak: int) -> Optional[Path]:
        """A checkpoint of this step; none where the last steps were not finite (nothing non-finite is saved)."""
        if streak:
            self.log(f"not saving step {state.step}: its last {streak} step(s) had a non-finite loss or gradient")
            return None
        self.metrics.flush_to_disk()
        try:
            path = self.ckpt.save(
                state.step, wrapped, optimizer, state.train_state(self.d.world_size, self.identity, identity.schedule(self.cfg))
            )
        except NonFiniteState as exc:
            raise self.diverged(state.step, streak, state.skipped_steps, str(exc)) from None
        saved = self.ckpt.timing
        self.log(
            f"saved checkpoint {path} ({saved.get('bytes', 0) / 1e9:.2f} GB: written in "
            f"{saved.get('write_seconds', 0):.1f} s, SHA-256 in {saved.get('hash_seconds', 0):.1f} s)"
        )
        if not self.measured_space:  # the estimate replaced by the size of a real checkpoint
            self.measured_space = True
            size = D.on_main(self.d, lambda: self.ckpt.bytes_on_disk(path))
            self.log("space: " + D.on_main(self.d, lambda: self.ckpt.check_space(size, self.outputs_estimate, measured=True)))
        return path

    def diverged(self, step: int, streak: int, skipped: int, detail: str = "") -> UserError:
        newest = self.ckpt.complete()
        kept = f"the newest checkpoint is step {newest[-1][0]}" if newest else "no checkpoint was written"
        lr = self.cfg.training.learning_rate
        return UserError(
            f"training diverged at step {step}: {streak} step(s) in a row had a non-finite loss or "
            f"gradient norm ({skipped} skipped in all){'; ' + detail if detail else ''}. Nothing "
            f"non-finite was saved; {kept}. Fix: a lower training.learning_rate (now {lr:g}), more "
            f"warm-up (training.warmup_ratio), or training.max_grad_norm"
        )

    def resume(self, wrapped: torch.nn.Module, optimizer: torch.optim.Optimizer) -> LoopState:
        """The state to start from: a checkpoint's (training.resume_from_checkpoint: auto, the newest
        complete one; or a path), its weights and optimizer state loaded; else a fresh start."""
        choice = self.cfg.training.resume_from_checkpoint
        path = self.ckpt.latest() if choice == "auto" else None
        if choice is None or (choice == "auto" and path is None):
            D.on_main(self.d, self._archive_previous)
            return LoopState()
        if path is None:
            path = Path(str(choice))
            if not (path / "COMPLETE").exists():
                raise UserError(f"training.resume_from_checkpoint {path} is not a complete checkpoint")
            problem = self.ckpt.problem(path)
            if problem:
                raise UserError(f"training.resume_from_checkpoint {path} cannot be used: {problem}")
        saved = self.ckpt.read_state(path)
        changed = identity.differences(saved.get("identity", {}), self.identity)
        if changed:
            what = "; ".join(identity.describe(*c) for c in changed[:3])
            raise UserError(
                f"cannot resume {path}: {what}. What a checkpoint holds cannot change on resume. Fix: set "
                "it back, or training.resume_from_checkpoint: null to start over (this output_dir's "
                "results are moved to previous-<time>/), or another output_dir"
            )
        self.ckpt.load(path, wrapped, optimizer)
        step = saved["step"]
        for key, old, new in identity.differences(saved.get("schedule", {}), identity.schedule(self.cfg)):
            self.log(f"resume: {key} {old} -> {new}, applied from step {step}")
        self.log(f"resumed from checkpoint step {step} ({path})")
        self.metrics.truncate_after(step, self.log)
        return LoopState.from_train_state(saved)

    def _archive_previous(self) -> None:
        """A fresh start in an output_dir holding another run's results moves them aside, whole."""
        out = self.cfg.out
        names = RESULTS + tuple(sorted(p.name for p in out.glob("quantized-*")))  # quantize.also's formats
        present = [n for n in names if (out / n).exists() and not ((out / n).is_dir() and not any((out / n).iterdir()))]
        if not present:
            return
        target = out / time.strftime("previous-%Y%m%dT%H%M%S", time.gmtime())
        target.mkdir(parents=True, exist_ok=True)
        for n in present:
            (out / n).rename(target / n)
        self.log(f"starting fresh: the previous results in {out} ({', '.join(present)}) were moved to {target}")
