"""The step plan: which micro-batches each rank runs at each optimizer step, and the global count of
trained tokens each step normalises its loss by. Pure (no model, no process group): the loop and
bench/hf_baseline.py (which replays it for the Hugging Face Trainer) share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trainer.config import TrainerConfig
from trainer.data import epoch_order, shard
from trainer.data.batches import BatchOrder
from trainer.data.cache import Split
from trainer.errors import UserError


@dataclass
class StepPlan:
    """Which micro-batches each rank runs, and the global label-token count of every step."""

    batches: BatchOrder
    label_counts: np.ndarray
    micro_per_epoch: int
    steps_per_epoch: int
    total_steps: int


def plan(split: Split, cfg: TrainerConfig, world: int) -> StepPlan:
    t = cfg.training
    batches = BatchOrder(len(split), t.per_device_train_batch_size, t.seed, split.lengths, t.tokens_per_micro_batch)
    micro_per_epoch = len(batches) // world
    steps_per_epoch = micro_per_epoch // t.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise UserError(
            f"data: {len(split)} training examples make {len(batches)} batches of "
            f"{t.per_device_train_batch_size}, too few for {world} processes x "
            f"{t.gradient_accumulation_steps} accumulation steps. Fix: more data, or smaller "
            "training.per_device_train_batch_size / gradient_accumulation_steps"
        )
    total = t.max_steps if t.max_steps > 0 else math.ceil(t.num_train_epochs * steps_per_epoch)
    # Labels are shifted by one inside the loss: an example's first token is never a target.
    return StepPlan(batches, batches.counts(split.trained), micro_per_epoch, steps_per_epoch, total)


def step_batches(p: StepPlan, cfg: TrainerConfig, step: int, rank: int, world: int) -> tuple[int, list[np.ndarray], int]:
    """(epoch, this rank's micro-batches, global label tokens) of optimizer step `step` (0-based).

    Every rank holds the same seeded order, so each can compute the global token count of a step
    locally: the loss is normalised without a collective per step."""
    accum = cfg.training.gradient_accumulation_steps
    epoch, index = divmod(step, p.steps_per_epoch)
    order = epoch_order(len(p.batches), cfg.training.seed, epoch)
    lo, hi = index * accum, (index + 1) * accum
    mine = None
    total = 0
    for r in range(world):
        ids = shard(order, r, world)[lo:hi]
        if r == rank:
            mine = [p.batches[int(b)] for b in ids]
        total += int(p.label_counts[ids].sum())
    assert mine is not None  # rank < world
    return epoch, mine, total


def micro_batch_tokens(split: Split, batches: BatchOrder) -> int:
    """Tokens of the largest micro-batch as the step computes it (padded to its longest example; a
    packed row is never longer): what activation memory scales with."""
    if len(batches) == 0 or len(split) == 0:
        return 1
    lengths = np.asarray(split.lengths)[batches.perm]
    starts = batches.starts[:-1]
    longest = np.maximum.reduceat(lengths, starts)
    sizes = np.diff(batches.starts)
    return int((longest * sizes).max())
