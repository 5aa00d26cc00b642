"""Resumable checkpoints on the shared volume, behind a small interface: latest, save, load.

A checkpoint directory `step-NNNNNNNN/` holds the trainable weights, the optimizer and scheduler,
the training state (step, epoch, position in the epoch, tokens seen) and one RNG file per rank.
It counts only once the marker `COMPLETE` exists; the marker is written by rank 0 last, after
every rank's files are flushed to disk and a barrier, so a crash mid-save (or a network volume
that flushed half the files) leaves a directory that is ignored and later removed.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


class Checkpointer:
    def __init__(self, root: Path, keep: int, rank: int, barrier: Callable[[], None], log: Callable[[str], None]):
        self.root = Path(root)
        self.keep = keep
        self.rank = rank
        self.barrier = barrier
        self.log = log

    # ---- discovery -------------------------------------------------------------------------

    def _dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def complete(self) -> list[tuple[int, Path]]:
        return [(s, p) for s, p in self._dirs() if (p / MARKER).exists()]

    def latest(self) -> Optional[Path]:
        """The newest complete checkpoint; incomplete ones are reported and skipped."""
        newest = None
        for step, path in self._dirs():
            if (path / MARKER).exists():
                newest = path
            elif self.rank == 0:
                self.log(f"ignoring incomplete checkpoint {path} (no {MARKER} marker: interrupted save)")
        return newest

    # ---- save / load ---------------------------------------------------------------------

    def save(self, step: int, model_state: Optional[dict], optim_state: Optional[dict], scheduler_state: dict,
             train_state: dict) -> Path:
        """Collective: every rank calls it. model/optim state may be None on ranks other than 0."""
        path = self.root / f"step-{step:08d}"
        if self.rank == 0:
            if path.exists():  # left by a crash before resuming from an older step
                shutil.rmtree(path)
            path.mkdir(parents=True)
            _torch_save(model_state, path / "model.pt")
            _torch_save(optim_state, path / "optimizer.pt")
            _torch_save(scheduler_state, path / "scheduler.pt")
            _fsync_write(path / "state.json", json.dumps(train_state, indent=1).encode())
        self.barrier()
        _torch_save(rng_state(), path / f"rng-rank{self.rank:05d}.pt")
        self.barrier()
        if self.rank == 0:
            _fsync_write(path / MARKER, json.dumps({"step": step}).encode())
            self._prune()
        self.barrier()
        return path

    def _prune(self) -> None:
        complete = self.complete()
        newest = complete[-1][0] if complete else -1
        for step, path in complete[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(path, ignore_errors=True)
        for step, path in self._dirs():
            if step < newest and not (path / MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path) -> tuple[dict, dict, dict, dict]:
        """(model state, optimizer state, scheduler state, training state) of a complete checkpoint."""
        model_state = torch.load(path / "model.pt", map_location="cpu", weights_only=True)
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        sched_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
        train_state = json.loads((path / "state.json").read_text())
        rng_file = path / f"rng-rank{self.rank:05d}.pt"
        if rng_file.exists():  # absent when the world size changed (elastic): seeds stay as set
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        return model_state, optim_state, sched_state, train_state


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
