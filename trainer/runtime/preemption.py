"""Preemption: a stop asked for by the pod (SIGTERM, or the launcher's stop file) becomes a complete
checkpoint at the next step boundary, every rank agreeing, and an exit that makes the restart
resume there.

Kubernetes stops a pod with SIGTERM and, after `terminationGracePeriodSeconds`, SIGKILL. Two ways
reach the workers:
- the pod's launcher (trainer/runtime/launch.py) creates the file named by LLM_FINETUNE_STOP_FILE and waits
  for every local rank's "saved" marker before it stops torchrun (the grace period is the limit);
- a plain torchrun sends SIGTERM to its workers itself (and SIGKILL 30 s later, a torchrun constant).
Ranks on other pods learn of it through one small all-reduce per step and save too, then exit with
EXIT_RESTART so that their torchrun agents restart them into the next rendezvous round, where the
replacement pod joins.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

from trainer import envvars

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what Kubernetes reports for a terminated container
EXIT_RESTART = 75  # EX_TEMPFAIL: another pod was preempted; torchrun restarts this worker group


class Preempted(Exception):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class StopRequest:
    def __init__(self, local_rank: int = 0):
        self.local_rank = local_rank
        self.signalled = False
        self.in_loop = False
        path = os.environ.get(envvars.STOP_FILE)
        self.file = Path(path) if path else None
        try:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread (a test driving the trainer from a thread)
            pass

    def _on_sigterm(self, signum, frame) -> None:
        if not self.in_loop:  # nothing trained yet, nothing to save: stop now
            os._exit(EXIT_PREEMPTED)
        self.signalled = True

    def local(self) -> Optional[str]:
        """Why this process was asked to stop: "signal", "file", or None."""
        if self.signalled:
            return "signal"
        if self.file is not None and self.file.exists():
            return "file"
        return None

    def training_started(self) -> None:
        """From here on a stop means a save worth waiting for (and the launcher is told so)."""
        self.in_loop = True
        if self.file is not None:
            _touch(self.file.with_name(f"{self.file.name}.training.{self.local_rank}"))

    def finish(self, reason: Optional[str], step: int) -> Preempted:
        """After the agreed save: the exception that ends this worker, with the right exit code."""
        if reason == "file":
            assert self.file is not None  # "file" is the reason only when the launcher named one
            # The launcher waits for every local rank's marker, then stops torchrun, which ends us.
            _touch(self.file.with_name(f"{self.file.name}.saved.{self.local_rank}"))
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not self.signalled:
                time.sleep(0.2)
            return Preempted(f"preempted: checkpoint step {step} saved", EXIT_PREEMPTED)
        if reason == "signal":
            return Preempted(f"preempted: checkpoint step {step} saved", EXIT_PREEMPTED)
        return Preempted(f"another pod was preempted: checkpoint step {step} saved; restarting to rejoin", EXIT_RESTART)


def _touch(path: Path) -> None:
    try:
        path.touch()
    except OSError:
        pass
