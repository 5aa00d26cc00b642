"""The fine-tuning loop over the parts trainer/train/build.py builds: resume, step, log, evaluate,
checkpoint, then save final/.

The loop is hand-written rather than the Hugging Face Trainer because the product needs what that
Trainer does not give: verified checkpoints on shared network volumes with a resume guard and an
output-directory lease, exact token accounting over packed micro-batches without padding, loss
normalised by trained tokens across ranks and accumulation steps, probes that pick the packing and
loss paths per model, and a CPU path on upstream PyTorch alone (bf16 autocast where the CPU has it,
gloo). Models, tokenizers, schedulers (transformers), LoRA (peft) and sharded checkpoints
(torch.distributed.checkpoint) come from the libraries.

Each part owns its cadence and its state: the step log (`due`: logging steps), the evaluator
(evaluation steps), the saver (checkpoint steps, resume); the loop's state is one LoopState, which
is also what a checkpoint keeps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from trainer.config import TrainerConfig
from trainer.data import Prepared
from trainer.model import memplan, modeling
from trainer.monitor import kubeflow_status, samples
from trainer.monitor.metrics import MetricsWriter, gain_line, perplexity
from trainer.monitor.tracking import Trackers
from trainer.runtime import distributed as D
from trainer.runtime.preemption import StopRequest
from trainer.train import optim
from trainer.train.evaluator import Evaluator
from trainer.train.final import FinalSaver
from trainer.train.net import Training
from trainer.train.placement import Placement
from trainer.train.saving import Saver
from trainer.train.state import LoopState
from trainer.train.step import NonFinite, Stepper, StepResult
from trainer.train.steplog import StepLog, eval_fields
from trainer.train.steps import StepPlan, step_batches


@dataclass
class Trainer:
    """A built fine-tune (trainer/train/build.py) and the loop that steps it."""

    cfg: TrainerConfig
    dist: D.Dist
    log: Any
    stop: StopRequest
    started: float  # when building began: startup_seconds in the report
    tokenizer: Any
    model_path: str  # the base's files
    data: Prepared
    steps: StepPlan
    placement: Placement
    training: Training  # model, optimizer, schedule: released once final/ is saved
    saver: Saver
    metrics: MetricsWriter
    trackers: Optional[Trackers] = None  # opened by train() on rank 0
    finished: bool = False  # final/ saved: the trackers close the run as finished
    final_save_seconds: float = 0.0
    evaluator: Evaluator = field(init=False)

    def __post_init__(self) -> None:
        self.evaluator = Evaluator(
            self.cfg, self.dist, self.data, self.tokenizer, self.training, self.placement.precision, self.log
        )

    def train(self) -> dict[str, Any]:
        cfg, t, d, p, tr = self.cfg, self.cfg.training, self.dist, self.steps, self.training
        state = self.saver.resume(tr.net.wrapped, tr.optimizer)
        if state.step:
            tr.scheduler = optim.schedule(tr.optimizer, t, p.total_steps, state.step)
        self.log(
            f"training {p.total_steps} steps ({p.steps_per_epoch} per epoch, {t.per_device_train_batch_size} x "
            f"{t.gradient_accumulation_steps} examples per process per step, {tr.net.probe.packing})"
            + (f", from step {state.step}" if state.step else "")
        )
        steplog = self._step_log(state.step)
        startup_seconds = steplog.started - self.started  # load, probes, fingerprint, data, resume
        stepper = Stepper(
            tr.net,
            tr.optimizer,
            tr.scheduler,
            self.data,
            self.tokenizer.pad_token_id,
            d,
            self.placement.precision,
            t.max_grad_norm,
        )
        nonfinite = NonFinite(d.device, state.skipped_steps)
        if state.step == 0:
            for key, value in self.evaluator.on_start().items():
                setattr(state, key, value)
        tr.net.model.train()
        self.stop.training_started()
        compute_seconds, last_eval, last_eval_step = 0.0, None, None
        clock = time.perf_counter()  # training time since it was last counted (evaluation and saves excluded)
        while state.step < p.total_steps:
            state.epoch, micro, global_tokens = step_batches(p, cfg, state.step, d.rank, d.world_size)
            # Whether any pod was asked to stop (SIGTERM, the launcher's file): one small all-reduce,
            # started now and read after the step, so it overlaps the step instead of stalling it.
            reason = self.stop.local()
            stop_vote = d.any_async(reason is not None)
            result = stepper.step(micro, global_tokens)
            compute_seconds += result.compute_seconds
            nonfinite.add(result.bad)
            state.step += 1
            steplog.add(result, global_tokens)
            last = state.step == p.total_steps
            stopping = stop_vote.result()  # preemption anywhere: every rank saves this step
            saving = self.saver.due(state.step, last, stopping)
            evaluating = self.evaluator.due(state.step, last)
            if steplog.due(state.step, last, evaluating, saving):
                state.train_seconds += time.perf_counter() - clock
                eval_loss = self._log_step(state, steplog, nonfinite, result, evaluating, last_eval)
                if eval_loss is not None:
                    last_eval, last_eval_step = eval_loss, state.step
                clock = time.perf_counter()
            steplog.progress.update(1)
            if saving:
                self._save(state, nonfinite.streak(), stopping, reason)
                clock = time.perf_counter()
        state.train_seconds += time.perf_counter() - clock
        eval_loss = last_eval if last_eval_step == state.step else (self.evaluator.loss() if len(self.data.val) else None)
        steplog.close(state.step, eval_loss)
        summary = _summary(self, state, steplog, eval_loss, startup_seconds, compute_seconds if stepper.timed else None)
        self.log(f"done: {state.step} steps in {state.train_seconds:.1f}s, {gain_line(state.base_eval_loss, eval_loss)}")
        return summary

    def _step_log(self, start_step: int) -> StepLog:
        """The step log, with the trackers (rank 0, where asked) and the TrainJob's status (rank 0, on a
        TrainJob with the TrainJobStatus gate: progress in `kubectl get trainjob`)."""
        d, p = self.dist, self.steps
        if d.is_main and self.cfg.training.trackers:
            from trainer.monitor import tracking

            net = self.training.net
            trainable, total = modeling.trainable_parameters(net.base)
            params = {
                "world_size": d.world_size,
                "model_class": net.arch,
                "precision": self.placement.precision.describe(),
                "parameters": total,
                "trainable_parameters": trainable,
                "packing": net.probe.packing,
                "total_steps": p.total_steps,
                "training_examples": len(self.data.train),
                **{
                    f"memory_plan.{k}": v
                    for k, v in memplan.as_dict(self.placement.memory).items()
                    if not isinstance(v, (dict, list))
                },
            }
            self.trackers = tracking.Trackers(self.cfg, params, start_step, self.log)
        status = kubeflow_status.from_env(self.log) if d.is_main else None
        if status is not None:
            self.log(f"TrainJob status: reporting progress to {status.url} (at most every {kubeflow_status.MIN_INTERVAL:.0f} s)")
        return StepLog(self.cfg, d, self.log, self.metrics, p.total_steps, p.steps_per_epoch, start_step, self.trackers, status)

    def _log_step(
        self,
        state: LoopState,
        steplog: StepLog,
        nonfinite: NonFinite,
        result: StepResult,
        evaluating: bool,
        last_eval: Optional[float],
    ) -> Optional[float]:
        """A logging step: the window reduced over the ranks (the loop's host syncs are here and at
        saves), divergence refused, the row written; the validation loss where evaluation is due."""
        loss_total, real_total = steplog.reduce()
        streak, state.skipped_steps = nonfinite.streak(), nonfinite.skipped()
        if streak > self.cfg.training.max_nonfinite_steps:
            raise self.saver.diverged(state.step, streak, state.skipped_steps)
        state.tokens_seen += real_total
        row = steplog.row(state, loss_total, real_total, result.grad_norm, self.training.scheduler.get_last_lr()[0])
        eval_loss = self.evaluator.loss() if evaluating else None
        if eval_loss is not None:
            row.update(eval_fields(eval_loss))
        steplog.write(row, eval_loss if eval_loss is not None else last_eval)
        return eval_loss

    def _save(self, state: LoopState, streak: int, stopping: bool, reason: Optional[str]) -> None:
        if stopping:
            if reason:  # logged by the rank whose pod was asked, whatever rank the rendezvous gave it
                self.log(
                    f"stop requested ({reason}) at step {state.step} on rank {self.dist.rank}: saving a checkpoint",
                    every_rank=True,
                )
            else:
                self.log(f"stop requested on another pod at step {state.step}: saving a checkpoint")
        self.saver.save(state, self.training.net.wrapped, self.training.optimizer, streak)
        if stopping:
            raise self.stop.finish(reason, state.step)

    def save_final(self) -> None:
        """final/ and adapter/; the training model released on the way (trainer/train/final.py)."""
        started = time.perf_counter()
        FinalSaver(self.cfg, self.dist, self.log, self.model_path, self.tokenizer, self.placement).save(self.training)
        self.final_save_seconds = time.perf_counter() - started
        self.finished = True

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close(ok=self.finished)


def _summary(
    self: Trainer,
    state: LoopState,
    steplog: StepLog,
    eval_loss: Optional[float],
    startup_seconds: float,
    compute_seconds: Optional[float],
) -> dict[str, Any]:
    d, data, net = self.dist, self.data, self.training.net
    before = state.base_eval_loss
    return {
        "steps": state.step,
        "train_seconds": state.train_seconds,
        "first_step_seconds": steplog.first_step_seconds,
        "eval_loss_before": before,
        "eval_perplexity_before": perplexity(before),
        "samples": samples.table(self.evaluator.prompts(), state.base_samples, self.evaluator.answers()),
        "startup_seconds": round(startup_seconds, 2),
        "step_seconds": steplog.step_seconds,
        "memory_plan": memplan.as_dict(self.placement.memory),
        "peak_device_memory_gib": (
            round(torch.cuda.max_memory_allocated(d.device) / 2**30, 3) if d.device.type == "cuda" else None
        ),
        "gradient_checkpointing": self.placement.gradient_checkpointing,
        # Forward and backward alone (CPU): the rest of train_seconds is per-step overhead.
        "compute_seconds": compute_seconds,
        "attention": net.attention,
        "packing": net.probe.packing,
        "num_input_tokens_seen": state.tokens_seen,
        "eval_loss": eval_loss,
        "eval_perplexity": perplexity(eval_loss) if eval_loss is not None else None,
        "skipped_steps": state.skipped_steps,
        "world_size": d.world_size,
        "data": {
            "format": data.format,
            **vars(data.stats),
            "validation_examples": len(data.val),
            "validation_records": data.val_stats.records,
            "invalid_skipped": data.invalid(),
            "invalid_records": data.invalid_named(),
        },
    }
