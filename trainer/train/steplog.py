"""What the loop tells its user at logging steps: a metrics.jsonl row, the trackers, progress.txt, the
TrainJob's status, the log line and the progress bar. Owns the logging cadence and the window of steps
since the last row (whose loss is reduced across ranks only here: the loop's host syncs)."""

from __future__ import annotations

import time
from typing import Any, Optional

import torch

from trainer.config import TrainerConfig
from trainer.monitor.kubeflow_status import StatusReporter
from trainer.monitor.metrics import (
    PROGRESS_FILE,
    Eta,
    MetricsWriter,
    Progress,
    duration,
    perplexity,
    plain_logs,
    progress_text,
    read_metrics,
    rewrite,
)
from trainer.monitor.tracking import Trackers
from trainer.runtime import distributed as D
from trainer.train.state import LoopState
from trainer.train.step import StepResult


class StepLog:
    def __init__(
        self,
        cfg: TrainerConfig,
        d: D.Dist,
        log,
        metrics: MetricsWriter,
        total_steps: int,
        steps_per_epoch: int,
        start_step: int,
        trackers: Optional[Trackers],
        status: Optional[StatusReporter],
    ):
        self.cfg, self.d, self.log, self.metrics = cfg, d, log, metrics
        self.total, self.per_epoch = total_steps, steps_per_epoch
        self.trackers, self.status = trackers, status
        self.progress = Progress(d.is_main, total_steps, start_step)
        self.eta = Eta(total_steps)
        self.recent = read_metrics(cfg.metrics_path, log)[-5:] if d.is_main and cfg.metrics_path.exists() else []
        self.started = time.perf_counter()
        self.step_clock = self.started  # when the last step ended
        self.first_step_seconds: Optional[float] = None
        self.step_seconds: list[float] = []  # the first steps' wall times, for the report (bench/scale.py)
        self._reset()

    def _reset(self) -> None:
        self.loss: Any = 0.0  # a device tensor once a step is added: read at logging steps only
        self.real = 0
        self.tokens = 0
        self.window_start = time.perf_counter()

    def add(self, result: StepResult, global_tokens: int) -> None:
        """A step done: its loss and tokens into the window, its wall time into the ETA."""
        self.loss = self.loss + result.loss_sum
        self.real += result.real
        self.tokens += global_tokens
        now = time.perf_counter()
        if self.first_step_seconds is None:
            self.first_step_seconds = now - self.started
        self.eta.add(now - self.step_clock)
        if len(self.step_seconds) < 100:
            self.step_seconds.append(round(now - self.step_clock, 4))
        self.step_clock = now

    def due(self, step: int, last: bool, evaluating: bool, saving: bool) -> bool:
        # Flushed at save steps too, so a checkpoint's tokens_seen (and the metrics rows kept on resume)
        # account for every step up to it.
        return step % self.cfg.training.logging_steps == 0 or last or evaluating or saving

    def reduce(self) -> tuple[float, int]:
        """The window's loss sum and trained tokens over every rank (one all-reduce)."""
        loss_total, real_total = self.d.all_reduce_sum([float(self.loss), float(self.real)])
        return loss_total, int(real_total)

    def row(
        self, state: LoopState, loss_total: float, real_total: int, grad_norm: torch.Tensor, learning_rate: float
    ) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.window_start
        left, per_step = self.eta.seconds_left(state.step), self.eta.seconds_per_step()
        return {
            "step": state.step,
            "epoch": round(state.step / self.per_epoch, 4),
            "loss": loss_total / max(1, self.tokens),
            "learning_rate": learning_rate,
            "grad_norm": float(grad_norm),
            "tokens_per_second": real_total / max(elapsed, 1e-9),
            "num_input_tokens_seen": state.tokens_seen,
            "train_seconds": round(state.train_seconds, 3),
            "skipped_steps": state.skipped_steps,
            "eta_seconds": round(left, 1) if left is not None else None,
            "seconds_per_step": round(per_step, 4) if per_step is not None else None,
        }

    def write(self, row: dict[str, Any], last_eval: Optional[float]) -> None:
        self.metrics.write(row)
        if self.d.is_main:
            if self.trackers is not None:
                self.trackers.log_row(row)
            self.recent = (self.recent + [row])[-5:]
            rewrite(self.cfg.out / PROGRESS_FILE, progress_text(self.recent, self.total))
            if self.status is not None:
                self.status.update(row["step"], self.total, row["eta_seconds"], {**row, "eval_loss": last_eval})
            if plain_logs():
                self.log(
                    f"step {row['step']}/{self.total} loss {row['loss']:.4f} lr {row['learning_rate']:.3g} "
                    f"grad_norm {row['grad_norm']:.3g} tokens/s {row['tokens_per_second']:.0f}"
                    + (f" eval_loss {row['eval_loss']:.4f}" if "eval_loss" in row else "")
                    + (f" skipped(non-finite) {row['skipped_steps']}" if row["skipped_steps"] else "")
                    + f" eta {duration(row['eta_seconds'])}"
                )
        self.progress.update(0, loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
        self._reset()

    def close(self, step: int, eval_loss: Optional[float]) -> None:
        """Training over: the bar closed, progress.txt says trained, the TrainJob's last update sent
        (a bounded wait)."""
        self.progress.close()
        if self.d.is_main and self.recent:
            rewrite(self.cfg.out / PROGRESS_FILE, progress_text(self.recent, self.total, state="trained"))
        if self.status is not None:
            self.status.update(
                step, self.total, 0.0, {**(self.recent[-1] if self.recent else {}), "eval_loss": eval_loss}, final=True
            )
            self.status.close()


def eval_fields(loss: float) -> dict[str, Any]:
    return {"eval_loss": loss, "eval_perplexity": perplexity(loss)}
