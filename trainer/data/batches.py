"""Batch order, packing and collation over a memory-mapped split.

Packing (padding-free): the `per_device_train_batch_size` examples of a micro-batch are laid end to
end in one sequence, with `position_ids` restarting at 0 for every example, so no step computes on
padding; whether the model keeps them isolated is measured at start-up (trainer/model/probes.py), else
each example gets a padded row of its own. A step sees the same examples as the padded recipe would,
so training converges the same way (same number and size of updates) with less compute; packing
into fixed-length bins instead would put several times more examples into each step and, at the
same learning rate, make far fewer updates per epoch (bench/ measured it).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import numpy as np

IGNORE = -100


class BatchOrder:
    """Micro-batches drawn at random (seeded), as the padded recipe's sampler would: one permutation,
    cut into `batch_size` examples each — or, with a token budget, into as many consecutive examples as
    fit `token_budget` tokens (at least one), so every micro-batch carries about the same work.
    Memory: one index per example."""

    def __init__(self, n: int, batch_size: int, seed: int, lengths: Optional[np.ndarray] = None, token_budget: int = 0):
        self.perm = np.random.default_rng(seed).permutation(n)
        if token_budget and n:
            starts, used = [0], 0
            for i, length in enumerate(np.asarray(lengths)[self.perm].tolist()):
                if used and used + length > token_budget:
                    starts.append(i)
                    used = 0
                used += length
            self.starts = np.asarray(starts + [n], dtype=np.int64)
        else:
            self.starts = np.append(np.arange(0, n, batch_size), n).astype(np.int64) if n else np.zeros(1, np.int64)

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, b: int) -> np.ndarray:
        return self.perm[self.starts[b] : self.starts[b + 1]]

    def counts(self, per_example: np.ndarray) -> np.ndarray:
        """Per batch, the sum of a per-example quantity (e.g. trained tokens)."""
        values = per_example[self.perm]
        return np.add.reduceat(values, self.starts[:-1]) if len(values) else values


@lru_cache(maxsize=4)
def epoch_order(num_batches: int, seed: int, epoch: int) -> np.ndarray:
    """The order of the batches in an epoch (reshuffled every epoch, the same on every rank)."""
    return np.random.default_rng(seed * 1000003 + epoch).permutation(num_batches)


def shard(order: Sequence[int] | np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's batches; every rank gets the same count (the remainder is dropped)."""
    per_rank = len(order) // world
    return np.asarray(order[rank * per_rank : (rank + 1) * per_rank]) if world > 1 else np.asarray(order)


def collate(examples: Sequence[tuple[np.ndarray, np.ndarray]], pad_id: int, packing: bool = True):
    """Tensors for one micro-batch of (input ids, labels) examples: packed, one sequence of all its
    examples (no padding); else one row per example, shorter rows padded with a segment of their own
    position_ids (isolated like a packed example, so no attention mask is needed) and labels -100.
    Returns (tensors, real tokens)."""
    import torch

    lengths = [len(ids) for ids, _ in examples]
    real = int(sum(lengths))
    if packing:
        ids = np.concatenate([i for i, _ in examples])
        labels = np.concatenate([lab for _, lab in examples])
        positions = np.concatenate([np.arange(n) for n in lengths])
        return {
            "input_ids": torch.from_numpy(ids.astype(np.int64))[None],
            "labels": torch.from_numpy(labels.astype(np.int64))[None],
            "position_ids": torch.from_numpy(positions.astype(np.int64))[None],
        }, real
    width = max(lengths)
    ids = np.full((len(examples), width), pad_id, dtype=np.int64)
    labels = np.full((len(examples), width), IGNORE, dtype=np.int64)
    positions = np.empty((len(examples), width), dtype=np.int64)
    for row, ((i, lab), n) in enumerate(zip(examples, lengths)):
        ids[row, :n] = i
        labels[row, :n] = lab
        positions[row, :n] = np.arange(n)
        positions[row, n:] = np.arange(width - n)
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
    }, real
