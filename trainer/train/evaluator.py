"""Validation during training: the loss over the held-out rows (all ranks sharing the work), when it is
due, and the model's greedy answers to the held-out sample prompts (before and after training)."""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from trainer.config import TrainerConfig
from trainer.data import Prepared, collate
from trainer.data.batches import BatchOrder
from trainer.monitor import samples
from trainer.monitor.metrics import perplexity
from trainer.runtime import distributed as D
from trainer.train.net import Net, Training


class Evaluator:
    def __init__(self, cfg: TrainerConfig, d: D.Dist, data: Prepared, tokenizer, training: Training, precision: D.Precision, log):
        self.cfg, self.d, self.data, self.tokenizer = cfg, d, data, tokenizer
        # The holder, not the model: Training.release() must leave nothing here keeping the model alive.
        self.training, self.precision, self.log = training, precision, log

    @property
    def net(self) -> Net:
        return self.training.net

    def due(self, step: int, last: bool) -> bool:
        every = self.cfg.training.eval_steps
        return len(self.data.val) > 0 and (last or (every is not None and step % every == 0))

    @torch.no_grad()
    def loss(self) -> float:
        """Mean loss per trained token over the validation rows, all ranks sharing the work."""
        d, t = self.d, self.cfg.training
        model = self.net.loss_module  # outside DDP (no gradient hooks needed); FSDP's root itself
        was_training = model.training
        model.eval()
        order = BatchOrder(len(self.data.val), t.per_device_eval_batch_size, t.seed)
        batches = [order[b] for b in range(len(order))]
        mine = batches[d.rank :: d.world_size]
        rounds = math.ceil(len(batches) / d.world_size)
        loss, count = 0.0, 0.0
        for i in range(rounds):
            # Every rank runs the same number of forwards (FSDP's collectives need it); extra ones weigh 0.
            batch = mine[i] if i < len(mine) else batches[0]
            tensors, _ = collate([self.data.val.labels(int(j)) for j in batch], self.tokenizer.pad_token_id, self.net.probe.packs)
            extra = self.net.probe.extra(tensors["position_ids"], d.device)
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

    def prompts(self) -> list[tuple[str, str]]:
        return [(p[0], p[1]) for p in self.data.prompts[: self.cfg.quantize.sample_prompts]]

    def answers(self) -> list[str]:
        """The model's greedy answers to the held-out sample prompts (rank 0; every rank gets them).
        Under FSDP the weights are sharded and generation is left to the quantize stage (final/)."""
        prompts = [p for p, _ in self.prompts()]
        if not prompts or (self.cfg.training.fsdp and self.d.enabled):
            return []
        return D.on_main(
            self.d,
            lambda: samples.answers(
                self.net.base, self.tokenizer, prompts, self.cfg.quantize.max_new_tokens, self.precision.autocast(self.d.device)
            ),
        )

    def on_start(self) -> dict[str, Any]:
        """The base model's validation loss and its sample answers, before the first step; kept in the
        checkpoints, so a resumed run still reports them. Not a metrics.jsonl row: every row there is a
        logging step with its training loss (the contract trackers and tools read); report.json has it
        (training.eval_loss_before) and the loss curve plots it at step 0."""
        if not self.cfg.training.eval_on_start or len(self.data.val) == 0:
            return {}
        started = time.perf_counter()
        loss = self.loss()
        answers = self.answers()
        self.log(
            f"base model before training: validation loss {loss:.4f} (perplexity {perplexity(loss):.2f}) on "
            f"{len(self.data.val)} examples, {len(answers)} sample answers, "
            f"{time.perf_counter() - started:.1f}s"
        )
        return {"base_eval_loss": loss, "base_samples": answers}
