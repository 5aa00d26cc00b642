"""One optimizer step: forward and backward over this rank's micro-batches (DDP's gradient all-reduce on
the last), the loss normalised by the step's global count of trained tokens, the gradients clipped, the
update skipped where the gradient norm is not finite (on the device, with no host sync)."""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.data import Prepared, collate
from trainer.runtime import distributed as D
from trainer.train.net import Net


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # the summed loss over this rank's trained tokens (on the device: no sync)
    real: int  # tokens this rank computed, padding excluded
    grad_norm: torch.Tensor  # the global norm before clipping (every rank sees the same)
    bad: torch.Tensor  # 1.0 where the norm was not finite and the update was skipped, else 0.0
    compute_seconds: float  # forward and backward on host clocks (exact on a CPU; not measured on a GPU)


class Stepper:
    """Runs steps; holds what every step needs. `timed`: whether host clocks time the compute (on a CPU
    they time it exactly; on a GPU they would need syncs, so nothing is timed there)."""

    def __init__(
        self,
        net: Net,
        optimizer: torch.optim.Optimizer,
        scheduler,
        data: Prepared,
        pad_id: int,
        d: D.Dist,
        precision: D.Precision,
        max_grad_norm: float,
    ):
        self.net, self.optimizer, self.scheduler = net, optimizer, scheduler
        self.data, self.pad_id, self.d, self.precision = data, pad_id, d, precision
        self.max_norm = max_grad_norm if max_grad_norm > 0 else float("inf")
        # Fused AdamW can skip a non-finite step on the device (no host sync); others check on the host.
        self.skip_on_device = bool(optimizer.defaults.get("fused"))
        self.timed = d.device.type == "cpu"

    def step(self, micro: list[np.ndarray], global_tokens: int) -> StepResult:
        d, probe = self.d, self.net.probe
        model: Any = self.net.model
        scale = d.world_size / max(1, global_tokens)  # DDP averages gradients over ranks
        loss_total: torch.Tensor = torch.zeros((), device=d.device)
        real_total, compute = 0, 0.0
        for i, batch in enumerate(micro):
            tensors, real = collate([self.data.train.labels(int(j)) for j in batch], self.pad_id, probe.packs)
            # Example boundaries from the host's position ids, once per micro-batch (no sync in the forward).
            extra = probe.extra(tensors["position_ids"], d.device)
            tensors = {k: v.to(d.device, non_blocking=True) for k, v in tensors.items()}
            sync = i == len(micro) - 1
            ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else nullcontext()
            tick = time.perf_counter()
            with ctx:
                with self.precision.autocast(d.device):
                    loss_sum, _ = model(tensors["input_ids"], tensors["position_ids"], tensors["labels"], **extra)
                (loss_sum * scale).backward()
            compute += time.perf_counter() - tick  # forward and backward (DDP's all-reduce overlaps the backward)
            loss_total = loss_total + loss_sum.detach()
            real_total += real
        grad_norm = torch.nn.utils.clip_grad_norm_(self.net.trainable, self.max_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a replicated DTensor holding the global norm
            grad_norm = grad_norm.full_tensor()
        # The gradients are all-reduced, so every rank sees the same norm and takes the same branch.
        bad = (~torch.isfinite(grad_norm)).float()
        if self.skip_on_device:
            setattr(self.optimizer, "found_inf", bad)  # fused AdamW skips the update on the device
            self.optimizer.step()
        elif not bool(bad):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_total, real_total, grad_norm, bad, compute if self.timed else 0.0)


class NonFinite:
    """Non-finite steps counted on the device: the streak (steps in a row) and the total. Read on the
    host only at logging and save steps, the loop's only syncs."""

    def __init__(self, device: torch.device, skipped_before: int):
        self.streak_t = torch.zeros((), device=device)
        self.total_t = torch.zeros((), device=device)
        self.before = skipped_before

    def add(self, bad: torch.Tensor) -> None:
        self.streak_t = (self.streak_t + 1) * bad
        self.total_t += bad

    def streak(self) -> int:
        return int(self.streak_t)

    def skipped(self) -> int:
        return self.before + int(self.total_t)
