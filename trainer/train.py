"""The fine-tuning loop over a fine-tune built by trainer/run.py: measure the base, resume, step, log,
evaluate, checkpoint, save final/ (then quantize, on rank 0).

    torchrun --nproc-per-node 2 -m trainer finetune --config config.yaml

The loop is hand-written rather than the Hugging Face Trainer because the product needs what that
Trainer does not give: verified checkpoints on shared network volumes with a resume guard and an
output-directory lease, exact token accounting over packed micro-batches without padding, loss
normalised by trained tokens across ranks and accumulation steps, probes that pick the packing and
loss paths per model, and a CPU path on upstream PyTorch alone (bf16 autocast where the CPU has it,
gloo). Models,
tokenizers, schedulers (transformers), LoRA (peft) and sharded checkpoints (torch.distributed
.checkpoint) come from the libraries; the state saved lives in trainer/checkpoint.py.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Optional, cast

import torch

from trainer import distributed as D
from trainer import identity, kubeflow_status, modeling, probes, samples
from trainer.checkpoint import NonFiniteState
from trainer.config import TrainerConfig
from trainer.data import collate
from trainer.data.batches import BatchOrder
from trainer.errors import UserError
from trainer.metrics import (PROGRESS_FILE, Eta, Progress, duration, gain_line, perplexity, plain_logs,
                             progress_text, read_metrics, rewrite, update_report)
from trainer.run import Run, step_batches

if TYPE_CHECKING:  # for the annotation; train() imports it where it opens the trackers (rank 0)
    from trainer.tracking import Trackers


class Trainer(Run):
    """The loop over a built Run: resume, step, log, evaluate, checkpoint, save final/."""

    def __init__(self, cfg: TrainerConfig, dist: Optional[D.Dist] = None):
        super().__init__(cfg, dist)
        self.trackers: Optional[Trackers] = None  # opened by train() on rank 0
        self.finished = False  # final/ saved: the trackers close the run as finished

    # ---- resume ----------------------------------------------------------------------------

    def resume(self) -> dict[str, Any]:
        fresh: dict[str, Any] = {"step": 0, "tokens_seen": 0, "train_seconds": 0.0, "skipped_steps": 0,
                                 "base_eval_loss": None, "base_samples": []}
        choice = self.t.resume_from_checkpoint
        if choice is None:
            D.on_main(self.dist, self._archive_previous)
            return fresh
        if choice == "auto":
            path = self.ckpt.latest()
            if path is None:
                D.on_main(self.dist, self._archive_previous)
                return fresh
        else:
            from pathlib import Path

            path = Path(choice)
            if not (path / "COMPLETE").exists():
                raise UserError(f"training.resume_from_checkpoint {path} is not a complete checkpoint")
            problem = self.ckpt.problem(path)
            if problem:
                raise UserError(f"training.resume_from_checkpoint {path} cannot be used: {problem}")
        state = self.ckpt.read_state(path)
        changed = identity.differences(state.get("identity", {}), self.identity)
        if changed:
            what = "; ".join(identity.describe(*c) for c in changed[:3])
            raise UserError(f"cannot resume {path}: {what}. What a checkpoint holds cannot change on resume. Fix: set "
                            "it back, or training.resume_from_checkpoint: null to start over (this output_dir's "
                            "results are moved to previous-<time>/), or another output_dir")
        self.ckpt.load(path, self.wrapped, self.optimizer)
        step = state["step"]
        for key, old, new in identity.differences(state.get("schedule", {}), identity.schedule(self.cfg)):
            self.log(f"resume: {key} {old} -> {new}, applied from step {step}")
        self.scheduler = self._scheduler(step)
        self.log(f"resumed from checkpoint step {step} ({path})")
        self.metrics.truncate_after(step, self.log)
        return {**fresh, **state}

    def _archive_previous(self) -> None:
        """A fresh start in an output_dir holding another run's results moves them aside, whole."""
        out = self.cfg.out
        names: tuple[str, ...] = ("checkpoints", "final", "adapter", "quantized", "metrics.jsonl", "report.json",
                                  "report.md", "loss_curve.png", "quantization.png", "progress.txt", "tracking.json",
                                  "tensorboard", "wandb")
        names += tuple(sorted(p.name for p in out.glob("quantized-*")))  # quantize.also's formats
        present = [n for n in names if (out / n).exists() and not ((out / n).is_dir() and not any((out / n).iterdir()))]
        if not present:
            return
        target = out / time.strftime("previous-%Y%m%dT%H%M%S", time.gmtime())
        target.mkdir(parents=True, exist_ok=True)
        for n in present:
            (out / n).rename(target / n)
        self.log(f"starting fresh: the previous results in {out} ({', '.join(present)}) were moved to {target}")

    # ---- loop ----------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        cfg, t, d, p = self.cfg, self.t, self.dist, self.plan
        state = self.resume()
        step, tokens_seen = state["step"], state["tokens_seen"]
        self.log(f"training {p.total_steps} steps ({p.steps_per_epoch} per epoch, "
                 f"{t.per_device_train_batch_size} x {t.gradient_accumulation_steps} examples per process per step, "
                 f"{self.probe.packing})"
                 + (f", from step {step}" if step else ""))
        progress = Progress(d.is_main, p.total_steps, step)
        eta = Eta(p.total_steps)
        recent_rows = read_metrics(cfg.metrics_path, self.log)[-5:] if d.is_main and cfg.metrics_path.exists() else []
        if d.is_main and t.trackers:
            from trainer import memplan, tracking

            trainable, total = modeling.trainable_parameters(self.base)
            params = {"world_size": d.world_size, "model_class": self.arch, "precision": self.precision.describe(),
                      "parameters": total, "trainable_parameters": trainable, "packing": self.probe.packing,
                      "total_steps": p.total_steps, "training_examples": len(self.data.train),
                      **{f"memory_plan.{k}": v for k, v in memplan.as_dict(self.memory).items()
                         if not isinstance(v, (dict, list))}}
            self.trackers = tracking.Trackers(cfg, params, step, self.log)
        # On a TrainJob with the TrainJobStatus gate: progress in `kubectl get trainjob` (trainer/kubeflow_status.py).
        status = kubeflow_status.from_env(self.log) if d.is_main else None
        if status is not None:
            self.log(f"TrainJob status: reporting progress to {status.url} (at most every {kubeflow_status.MIN_INTERVAL:.0f} s)")
        pad_id = self.tokenizer.pad_token_id
        window = {"loss": 0.0, "tokens": 0, "real": 0, "start": time.perf_counter()}
        first_step_seconds = None
        started = time.perf_counter()
        startup_seconds = started - self.started  # load, probes, fingerprint, data, resume
        step_seconds: list[float] = []  # the first steps' wall times, for the report (bench/scale.py)
        step_clock = started  # when the last step ended
        train_seconds = state["train_seconds"]  # training time so far, evaluation excluded
        clock = time.perf_counter()
        # Non-finite steps, counted on the device (read at logging and save steps, the only syncs).
        bad_streak = torch.zeros((), device=d.device)
        bad_total = torch.zeros((), device=d.device)
        skipped_before = state["skipped_steps"]
        measured_space = False
        last_eval = last_eval_step = None
        if step == 0:
            state.update(self._eval_on_start())
        self.model.train()
        self.stop.training_started()
        timing = d.device.type == "cpu"  # host clocks time CPU work exactly; on a GPU they would need syncs
        compute_seconds = 0.0
        while step < p.total_steps:
            epoch, micro, global_tokens = step_batches(p, cfg, step, d.rank, d.world_size)
            scale = d.world_size / max(1, global_tokens)  # DDP averages gradients over ranks
            # Whether any pod was asked to stop (SIGTERM, the launcher's file): one small all-reduce,
            # started now and read after the step, so it overlaps the step instead of stalling it.
            reason = self.stop.local()
            stop_vote = d.any_async(reason is not None)
            for i, batch in enumerate(micro):
                tensors, real = collate([self.data.train.labels(int(j)) for j in batch], pad_id, self.probe.packs)
                # Example boundaries from the host's position ids, once per micro-batch (no sync in the forward).
                extra = self.probe.extra(tensors["position_ids"], d.device)
                tensors = {k: v.to(d.device, non_blocking=True) for k, v in tensors.items()}
                sync = i == len(micro) - 1
                ctx = self.model.no_sync() if (not sync and hasattr(self.model, "no_sync")) else nullcontext()
                tick = time.perf_counter() if timing else 0.0
                with ctx:
                    with self.precision.autocast(d.device):
                        loss_sum, _ = self.model(tensors["input_ids"], tensors["position_ids"], tensors["labels"],
                                                 **extra)
                    (loss_sum * scale).backward()
                if timing:  # forward and backward (DDP's gradient all-reduce overlaps the backward)
                    compute_seconds += time.perf_counter() - tick
                window["loss"] += loss_sum.detach()
                window["real"] += real
            window["tokens"] += global_tokens
            max_norm = t.max_grad_norm if t.max_grad_norm > 0 else float("inf")
            grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
            if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor holding the global norm
                grad_norm = grad_norm.full_tensor()
            # The gradients are all-reduced, so every rank sees the same norm and takes the same branch.
            bad = (~torch.isfinite(grad_norm)).float()
            if self.skip_on_device:
                setattr(self.optimizer, "found_inf", bad)  # fused AdamW skips the update on the device
                self.optimizer.step()
            elif not bool(bad):
                self.optimizer.step()
            bad_streak = (bad_streak + 1) * bad
            bad_total += bad
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            step += 1
            if first_step_seconds is None:
                first_step_seconds = time.perf_counter() - started
            now = time.perf_counter()
            eta.add(now - step_clock)
            if len(step_seconds) < 100:
                step_seconds.append(round(now - step_clock, 4))
            step_clock = now
            last = step == p.total_steps
            # Preemption anywhere (SIGTERM, or the launcher's stop file): every rank saves this step.
            stopping = stop_vote.result()
            save = step % t.save_steps == 0 or last or stopping
            do_eval = len(self.data.val) > 0 and (last or (t.eval_steps is not None and step % t.eval_steps == 0))
            # Flush at save steps too, so a checkpoint's tokens_seen (and the metrics rows kept on
            # resume) account for every step up to it.
            if step % t.logging_steps == 0 or last or do_eval or save:
                # The host-device syncs of the loop: at logging and save steps only.
                loss_total, real_total = d.all_reduce_sum([float(window["loss"]), float(window["real"])])
                streak, skipped = int(bad_streak), skipped_before + int(bad_total)
                if streak > t.max_nonfinite_steps:
                    self._diverged(step, streak, skipped)
                tokens_seen += int(real_total)
                now = time.perf_counter()
                train_seconds += now - clock
                elapsed = now - window["start"]
                row = {"step": step, "epoch": round(step / p.steps_per_epoch, 4),
                       "loss": loss_total / max(1, window["tokens"]),
                       "learning_rate": self.scheduler.get_last_lr()[0],
                       "grad_norm": float(grad_norm), "tokens_per_second": real_total / max(elapsed, 1e-9),
                       "num_input_tokens_seen": tokens_seen, "train_seconds": round(train_seconds, 3),
                       "skipped_steps": skipped}
                left, per_step = eta.seconds_left(step), eta.seconds_per_step()
                row["eta_seconds"] = round(left, 1) if left is not None else None
                row["seconds_per_step"] = round(per_step, 4) if per_step is not None else None
                if do_eval:
                    row["eval_loss"] = last_eval = self.evaluate()
                    row["eval_perplexity"] = _ppl(last_eval)
                    last_eval_step = step
                self.metrics.write(row)
                if d.is_main:
                    if self.trackers is not None:
                        self.trackers.log_row(row)
                    recent_rows = (recent_rows + [row])[-5:]
                    rewrite(cfg.out / PROGRESS_FILE, progress_text(recent_rows, p.total_steps))
                    if status is not None:
                        status.update(step, p.total_steps, row["eta_seconds"], {**row, "eval_loss": last_eval})
                if d.is_main and plain_logs():
                    self.log(f"step {step}/{p.total_steps} loss {row['loss']:.4f} lr {row['learning_rate']:.3g} "
                             f"grad_norm {row['grad_norm']:.3g} tokens/s {row['tokens_per_second']:.0f}"
                             + (f" eval_loss {row['eval_loss']:.4f}" if do_eval else "")
                             + (f" skipped(non-finite) {skipped}" if skipped else "")
                             + f" eta {duration(row['eta_seconds'])}")
                progress.update(0, loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_second']:.0f}")
                window = {"loss": 0.0, "tokens": 0, "real": 0, "start": time.perf_counter()}
                clock = time.perf_counter()
            progress.update(1)
            if save:
                if stopping:
                    if reason:  # logged by the rank whose pod was asked, whatever rank the rendezvous gave it
                        self.log(f"stop requested ({reason}) at step {step} on rank {d.rank}: saving a checkpoint",
                                 every_rank=True)
                    else:
                        self.log(f"stop requested on another pod at step {step}: saving a checkpoint")
                if streak:
                    self.log(f"not saving step {step}: its last {streak} step(s) had a non-finite loss or gradient")
                    if stopping:
                        raise self.stop.finish(reason, step)
                    continue
                self.metrics.flush_to_disk()
                try:
                    path = self.ckpt.save(step, self.wrapped, self.optimizer,
                                          {"step": step, "epoch": epoch, "tokens_seen": tokens_seen,
                                           "world_size": d.world_size, "train_seconds": train_seconds,
                                           "skipped_steps": skipped, "identity": self.identity,
                                           "base_eval_loss": state["base_eval_loss"],
                                           "base_samples": state["base_samples"],
                                           "schedule": identity.schedule(cfg)})
                except NonFiniteState as exc:
                    self._diverged(step, streak, skipped, str(exc))
                saved = self.ckpt.timing  # not `timing` (the loop's bool: whether host clocks time the compute)
                self.log(f"saved checkpoint {path} ({saved.get('bytes', 0) / 1e9:.2f} GB: written in "
                         f"{saved.get('write_seconds', 0):.1f} s, SHA-256 in {saved.get('hash_seconds', 0):.1f} s)")
                if not measured_space:  # the estimate replaced by the size of a real checkpoint
                    measured_space = True
                    size = D.on_main(d, lambda: self.ckpt.bytes_on_disk(path))
                    self.log("space: " + D.on_main(d, lambda: self.ckpt.check_space(size, self.outputs_estimate,
                                                                                      measured=True)))
                if stopping:
                    raise self.stop.finish(reason, step)
                clock = time.perf_counter()
        progress.close()
        if d.is_main and recent_rows:
            rewrite(cfg.out / PROGRESS_FILE, progress_text(recent_rows, p.total_steps, state="trained"))
        train_seconds += time.perf_counter() - clock
        eval_loss = last_eval if last_eval_step == step else (self.evaluate() if len(self.data.val) else None)
        if status is not None:  # the last update always goes out (bounded wait)
            status.update(step, p.total_steps, 0.0, {**(recent_rows[-1] if recent_rows else {}), "eval_loss": eval_loss},
                          final=True)
            status.close()
        from trainer import memplan

        before = state["base_eval_loss"]
        summary = {"steps": step, "train_seconds": train_seconds, "first_step_seconds": first_step_seconds,
                   "eval_loss_before": before, "eval_perplexity_before": _ppl(before),
                   "samples": samples.table(self._sample_prompts(), state["base_samples"], self._answers()),
                   "startup_seconds": round(startup_seconds, 2), "step_seconds": step_seconds,
                   "memory_plan": memplan.as_dict(self.memory),
                   "peak_device_memory_gib": (round(torch.cuda.max_memory_allocated(d.device) / 2**30, 3)
                                              if d.device.type == "cuda" else None),
                   "gradient_checkpointing": self.gradient_checkpointing,
                   # Forward and backward alone (CPU): the rest of train_seconds is per-step overhead.
                   "compute_seconds": compute_seconds if timing else None,
                   "attention": probes._hf(self.base).config._attn_implementation, "packing": self.probe.packing,
                   "num_input_tokens_seen": tokens_seen, "eval_loss": eval_loss,
                   "eval_perplexity": _ppl(eval_loss) if eval_loss is not None else None,
                   "skipped_steps": skipped_before + int(bad_total),
                   "world_size": d.world_size, "data": {"format": self.data.format, **vars(self.data.stats),
                                                         "validation_examples": len(self.data.val),
                                                         "validation_records": self.data.val_stats.records,
                                                         "invalid_skipped": self.data.invalid(),
                                                         "invalid_records": self.data.invalid_named()}}
        self.log(f"done: {step} steps in {train_seconds:.1f}s, {gain_line(before, eval_loss)}")
        return summary

    # ---- what the fine-tune gained ---------------------------------------------------------

    def _sample_prompts(self) -> list[tuple[str, str]]:
        return [tuple(p) for p in self.data.prompts[: self.cfg.quantize.sample_prompts]]

    def _answers(self) -> list[str]:
        """The model's greedy answers to the held-out sample prompts (rank 0; every rank gets them).
        Under FSDP the weights are sharded and generation is left to the quantize stage (final/)."""
        prompts = [p for p, _ in self._sample_prompts()]
        if not prompts or (self.t.fsdp and self.dist.enabled):
            return []
        return D.on_main(self.dist, lambda: samples.answers(
            self.base, self.tokenizer, prompts, self.cfg.quantize.max_new_tokens,
            self.precision.autocast(self.dist.device)))

    def _eval_on_start(self) -> dict[str, Any]:
        """The base model's validation loss and its sample answers, before the first step; kept in the
        checkpoints, so a resumed run still reports them. Not a metrics.jsonl row: every row there is a
        logging step with its training loss (the contract trackers and tools read); report.json has it
        (training.eval_loss_before) and the loss curve plots it at step 0."""
        if not self.t.eval_on_start or len(self.data.val) == 0:
            return {}
        started = time.perf_counter()
        loss = self.evaluate()
        answers = self._answers()
        self.log(f"base model before training: validation loss {loss:.4f} (perplexity {_ppl(loss):.2f}) on "
                 f"{len(self.data.val)} examples, {len(answers)} sample answers, "
                 f"{time.perf_counter() - started:.1f}s")
        return {"base_eval_loss": loss, "base_samples": answers}

    def _diverged(self, step: int, streak: int, skipped: int, detail: str = "") -> None:
        newest = self.ckpt.complete()
        kept = f"the newest checkpoint is step {newest[-1][0]}" if newest else "no checkpoint was written"
        raise UserError(f"training diverged at step {step}: {streak} step(s) in a row had a non-finite loss or gradient "
                        f"norm ({skipped} skipped in all){'; ' + detail if detail else ''}. Nothing non-finite was "
                        f"saved; {kept}. Fix: a lower training.learning_rate (now {self.t.learning_rate:g}), more "
                        f"warm-up (training.warmup_ratio), or training.max_grad_norm")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per trained token over the validation rows, all ranks sharing the work."""
        d = self.dist
        model = self.loss_module  # outside DDP (no gradient hooks needed); FSDP's root itself
        was_training = model.training
        model.eval()
        order = BatchOrder(len(self.data.val), self.t.per_device_eval_batch_size, self.t.seed)
        batches = [order[b] for b in range(len(order))]
        mine = batches[d.rank::d.world_size]
        rounds = math.ceil(len(batches) / d.world_size)
        loss, count = 0.0, 0.0
        for i in range(rounds):
            # Every rank runs the same number of forwards (FSDP's collectives need it); extra ones weigh 0.
            batch = mine[i] if i < len(mine) else batches[0]
            tensors, _ = collate([self.data.val.labels(int(j)) for j in batch], self.tokenizer.pad_token_id,
                                 self.probe.packs)
            extra = self.probe.extra(tensors["position_ids"], d.device)
            tensors = {k: v.to(d.device) for k, v in tensors.items()}
            with self.precision.autocast(d.device):
                loss_sum, n = model(tensors["input_ids"], tensors["position_ids"], tensors["labels"], **extra)
            if i < len(mine):
                loss += float(loss_sum)
                count += int(n)
        loss, count = d.all_reduce_sum([loss, float(count)])
        if was_training:
            model.train()
        return loss / max(1.0, count)

    def save(self) -> None:
        cfg, d = self.cfg, self.dist
        if not d.all_true(all(bool(torch.isfinite(p).all()) for p in self.trainable)):
            raise UserError(f"the trained weights are not finite (NaN/inf): {cfg.final_dir} was not written. Fix: a "
                            f"lower training.learning_rate (now {self.t.learning_rate:g}) or training.max_grad_norm")
        started = time.perf_counter()
        adapter_dir = cfg.adapter_dir if cfg.lora.enabled else None
        # final/ must hold the base's own weights (plus the merged adapters): where training held them
        # rounded (a bf16 frozen base of an fp16/fp32 checkpoint), they are re-read from the files.
        # A QLoRA base was held quantized: always re-read (merging into it would round the base to 4 bits).
        exact = not cfg.lora.enabled or (modeling.exact_in(self.load_dtype, self.file_dtype)
                                         and not cfg.lora.base_bits)
        if self.t.fsdp and d.enabled:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if d.is_main:
                names = {n for n, q in self.loss_module.named_parameters() if q.requires_grad}
                trained = {k[len("model."):]: v for k, v in full.items()
                           if k.startswith("model.") and (not cfg.lora.enabled or k in names)}
                del full
                self.release()
                # Rebuilt unsharded on the CPU from the base's files, then merged and saved the usual way.
                model = modeling.rebuild(self.model_path, self.file_dtype if cfg.lora.enabled else self.precision.params,
                                         cfg.lora if cfg.lora.enabled else None, trained)
                modeling.save_final(model, self.tokenizer, cfg.final_dir, adapter_dir, self.save_dtype,
                                    base_dir=self.model_path)
        elif d.is_main:
            model = D.unwrap(self.base)
            if hasattr(model, "_orig_mod"):
                model = cast(torch.nn.Module, model._orig_mod)
            if cfg.lora.base_bits:
                self._save_qlora(model, adapter_dir)
                model = None
            elif not exact:
                trained = {n: q.detach().float().clone() for n, q in model.named_parameters() if q.requires_grad}
                model = None
                self.release()
                model = modeling.rebuild(self.model_path, self.file_dtype, cfg.lora, trained)
                held = f"{cfg.lora.base_bits} bits" if cfg.lora.base_bits else D._short(self.load_dtype)
                self.log(f"final/: the base's weights re-read from {self.model_path} in "
                         f"{D._short(self.file_dtype)} (training held them in {held})")
            if model is not None:
                modeling.save_final(model, self.tokenizer, cfg.final_dir, adapter_dir, self.save_dtype,
                                    base_dir=self.model_path)
        self.final_save_seconds = time.perf_counter() - started
        d.barrier()
        self.log(f"saved fine-tuned model to {cfg.final_dir}" + (f" and adapter to {cfg.adapter_dir}"
                                                                   if cfg.lora.enabled else ""))

    def _save_qlora(self, model, adapter_dir) -> None:
        """adapter/ from the trained model; final/ merged into the base re-read from its files (the base
        was held quantized), streamed a tensor at a time where the files are safetensors holding every
        adapted weight under the model's names, else rebuilt whole from them."""
        from trainer import merge

        cfg = self.cfg
        deltas, whole = merge.trained(model)
        files = merge.names(self.model_path)
        streamed = files is not None and set(deltas) | set(whole) <= files
        trained = None if streamed else {n: q.detach().float().clone() for n, q in model.named_parameters()
                                         if q.requires_grad}
        model.save_pretrained(str(adapter_dir))
        self.tokenizer.save_pretrained(str(adapter_dir))
        model = None
        self.release()
        read = f"final/: the base's weights re-read from {self.model_path} in {D._short(self.file_dtype)} " \
               f"(training held them in {cfg.lora.base_bits} bits)"
        if trained is None:
            merged = merge.write_final(self.model_path, deltas, whole, self.save_dtype, self.tokenizer,
                                       cfg.final_dir, modeling.SOURCE_TOKENIZER_FILES)
            self.log(f"{read}, a tensor at a time: {merged} adapted weights merged in fp32, saved as "
                     f"{D._short(self.save_dtype)}")
            return
        self.log(f"{read}, the whole model at once (its files are not safetensors under the model's names)")
        rebuilt = modeling.rebuild(self.model_path, self.file_dtype, cfg.lora, trained)
        modeling.save_final(rebuilt, self.tokenizer, cfg.final_dir, None, self.save_dtype, base_dir=self.model_path)

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.close(ok=self.finished)
        if self.lock is not None:
            self.lock.release()


_ppl = perplexity


def finetune(cfg: TrainerConfig, dist: Optional[D.Dist] = None) -> dict[str, Any]:
    """Train, save final/, then (rank 0, process group closed) quantize when enabled.

    `dist`: a process group already set up (several fine-tunes in one launch, as the architecture
    tests do); it is left open, and quantization is then left to the caller."""
    trainer = Trainer(cfg, dist)
    try:
        trainer.setup()
        summary = trainer.train()
        trainer.save()
        trainer.finished = True
        summary["final_save_seconds"] = round(trainer.final_save_seconds, 2)
        trainer.release()  # quantization below loads final/ again: the training copy must be gone first
        if trainer.dist.is_main:
            update_report(cfg.report_path, "training", summary)
            from trainer.report import regenerate

            regenerate(cfg.output_dir)  # loss curve and report.md (again after quantization)
        is_main = trainer.dist.is_main
        if dist is None:
            trainer.dist.close()
        if dist is None and is_main and cfg.quantize.enabled:
            # Other ranks have exited cleanly; rank 0 quantizes alone (a single-process stage), so it takes
            # the cores the pod's processes shared (training split them: 1 thread each with 2 on 2 cores).
            from trainer import quantize

            if trainer.dist.device.type == "cpu" and not cfg.training.cpu_threads:
                torch.set_num_threads(D.default_threads(1))
                trainer.log(f"quantize: {torch.get_num_threads()} threads (the training processes' cores)")
            quantize.run(cfg, log=trainer.log)
        trainer.log(f"fine-tune of {cfg.model.name_or_path}: "
                    f"{gain_line(summary.get('eval_loss_before'), summary.get('eval_loss'))}")
    finally:
        trainer.close()
        if dist is None:
            trainer.dist.close()
    return summary
