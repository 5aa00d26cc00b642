"""The loop's state: what a step advances and a checkpoint keeps (its train state), in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class LoopState:
    """Where the run is. Saved in every checkpoint (with the run's identity and schedule beside it)
    and read back on resume, so a resumed run reports what the uninterrupted one would."""

    step: int = 0
    epoch: int = 0
    tokens_seen: int = 0  # trained tokens, every rank's, up to the last logging step
    train_seconds: float = 0.0  # training time so far, evaluation excluded
    skipped_steps: int = 0  # non-finite steps skipped, up to the last logging step
    base_eval_loss: Optional[float] = None  # the base model's validation loss before the first step
    base_samples: list[str] = field(default_factory=list)  # its answers to the held-out prompts

    def train_state(self, world_size: int, identity: dict[str, Any], schedule: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint holds besides the weights and the optimizer (checkpoint.Checkpointer.save)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "tokens_seen": self.tokens_seen,
            "world_size": world_size,
            "train_seconds": self.train_seconds,
            "skipped_steps": self.skipped_steps,
            "identity": identity,
            "base_eval_loss": self.base_eval_loss,
            "base_samples": self.base_samples,
            "schedule": schedule,
        }

    @classmethod
    def from_train_state(cls, saved: dict[str, Any]) -> "LoopState":
        return cls(
            step=saved["step"],
            epoch=saved.get("epoch", 0),
            tokens_seen=saved.get("tokens_seen", 0),
            train_seconds=saved.get("train_seconds", 0.0),
            skipped_steps=saved.get("skipped_steps", 0),
            base_eval_loss=saved.get("base_eval_loss"),
            base_samples=list(saved.get("base_samples") or []),
        )
