"""The worker pods' entry point, and the local multi-process one: torchrun, supervised.

    python -m trainer.runtime.launch finetune --config /etc/llm-finetune/config.yaml          # in a pod
    python -m trainer.runtime.launch --nproc-per-node 2 finetune --config config.yaml         # locally

Locally (`--nproc-per-node N`) it runs `torchrun --standalone` once; an input error ends with the
trainer's one line and exit 2 (torchrun's own report and traceback after it are not shown).

The container runs this; it runs torchrun (configured by the PET_* variables the Kubeflow operator
injects) and adds what a pod needs on a cluster's second day:

- **A rendezvous that can be used again.** torchrun closes its rendezvous for good whenever it exits
  other than by a signal (success, or workers out of restarts), and etcd keeps it closed for two
  hours. Each attempt therefore joins generation `<rdzvId>-gN`, the first one whose etcd state is not
  closed: every pod reads the same state and picks the same N, so a pod restarted after torchrun gave
  up, a re-created job, or a rendezvous closed by an etcd blip all meet in a fresh generation.
- **Retries.** When torchrun fails as a whole (its workers out of restarts, etcd unreachable), the
  next attempt starts after a back-off, in a new generation, up to LLM_FINETUNE_LAUNCH_ATTEMPTS.
- **Preemption.** On SIGTERM the workers are asked (a stop file) to save a checkpoint at the next step
  boundary; once every local rank has saved, or the grace period is nearly over, torchrun is stopped.
- **Exit codes for the job's ExitCode restart policy**: 0 done; 2 an input error (permanent: the same
  input fails the same way); 1 attempts used up (permanent); 143 preempted (retryable: the pod is
  replaced and resumes from the checkpoint it just saved).
- Workers host their own rendezvous store per round (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1): no stale
  addresses from a previous round reach gloo, whichever pod was replaced.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from trainer import envvars

EXIT_INPUT_ERROR = 2
EXIT_GAVE_UP = 1
EXIT_PREEMPTED = 143


def log(message: str) -> None:
    print(f"[launch {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _closed(endpoint: str, run_id: str) -> bool:
    """Whether torchrun's etcd-v2 rendezvous `run_id` is closed (read through torch's own backend)."""
    from torch.distributed.elastic.rendezvous import RendezvousParameters
    from torch.distributed.elastic.rendezvous.etcd_rendezvous_backend import create_backend

    backend, _ = create_backend(
        RendezvousParameters(backend="etcd-v2", endpoint=endpoint, run_id=run_id, min_nodes=1, max_nodes=1)
    )
    state = backend.get_state()
    return state is not None and bool(getattr(pickle.loads(state[0]), "closed", False))


def rendezvous_id(base: str, backend: str, endpoint: str, deadline: float) -> str:
    """`base-gN` for the first generation N not closed (etcd); `base` itself for c10d, whose store
    lives in the agents and starts empty. Retries while etcd is unreachable, until `deadline`."""
    if not backend.startswith("etcd"):
        return base
    while True:
        try:
            for generation in range(10_000):
                candidate = f"{base}-g{generation}"
                if not _closed(endpoint, candidate):
                    return candidate
            raise RuntimeError(f"no open rendezvous generation for {base}")
        except Exception as exc:  # etcd down or restarting: wait for it
            if time.monotonic() > deadline:
                raise
            log(f"rendezvous store at {endpoint} not reachable ({type(exc).__name__}); retrying in 5 s")
            time.sleep(5)


class Supervisor:
    def __init__(self, argv: list[str]):
        self.argv = argv
        tmp = Path(os.environ.get(envvars.RUN_DIR, "/tmp"))
        tmp.mkdir(parents=True, exist_ok=True)
        self.stop_file = tmp / "llm-finetune-stop"
        self.input_error = tmp / "llm-finetune-input-error"
        for stale in tmp.glob("llm-finetune-*"):  # left by this pod's previous attempt
            stale.unlink()
        self.grace = float(os.environ.get(envvars.GRACE_SECONDS, "30"))
        self.local_procs = int(os.environ.get("PET_NPROC_PER_NODE", "1") or 1)
        self.child: Optional[subprocess.Popen] = None
        self.preempted = False
        self.local_nproc = 0
        if argv[:1] == ["--nproc-per-node"] and len(argv) > 1 and argv[1].isdigit():
            self.local_nproc = int(argv[1])
            self.argv = argv[2:]
            self.local_procs = self.local_nproc

    def on_sigterm(self, signum, frame) -> None:
        if self.preempted:
            return
        self.preempted = True
        started = time.monotonic()
        log("SIGTERM: asking the workers to save a checkpoint at the next step")
        self.stop_file.touch()
        threading.Thread(target=self._stop_torchrun, args=(started,), daemon=True).start()

    def _stop_torchrun(self, started: float) -> None:
        """Wait for every local rank's saved marker (only if training had begun), then stop torchrun."""
        training = list(self.stop_file.parent.glob(self.stop_file.name + ".training.*"))
        budget = max(0.0, self.grace - 10.0)  # leave torchrun time to end its workers before SIGKILL
        if training:
            while time.monotonic() - started < budget:
                saved = list(self.stop_file.parent.glob(self.stop_file.name + ".saved.*"))
                if len(saved) >= self.local_procs:
                    log(f"all {len(saved)} local rank(s) saved in {time.monotonic() - started:.1f}s")
                    break
                time.sleep(0.2)
            else:
                log(f"no complete save within {budget:.0f}s of the grace period; the newest checkpoint stands")
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def torchrun(self, rdzv_id: str) -> list[str]:
        if self.local_nproc:
            return [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(self.local_nproc),
                "-m",
                "trainer",
                *self.argv,
            ]
        return [sys.executable, "-m", "torch.distributed.run", "--rdzv-id", rdzv_id, "-m", "trainer", *self.argv]

    def _pump(self, source, sink) -> None:
        """Copy torchrun's output (its workers' too) line by line. Once a worker has marked an input
        error, only the trainer's `error:` line passes (printed by one rank: cli.report_once):
        torchrun's own shutdown messages and its traceback for the stop the worker asked for would bury it."""
        for line in iter(source.readline, b""):
            if self.input_error.exists() and not line.startswith(b"error: "):
                continue
            sink.write(line)
            sink.flush()
        source.close()

    def _start(self, rdzv: str, env: dict) -> int:
        """torchrun to completion, its output through _pump; its exit code."""
        self.child = subprocess.Popen(self.torchrun(rdzv), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        pumps = [
            threading.Thread(target=self._pump, args=(self.child.stdout, sys.stdout.buffer), daemon=True),
            threading.Thread(target=self._pump, args=(self.child.stderr, sys.stderr.buffer), daemon=True),
        ]
        for t in pumps:
            t.start()
        code = self.child.wait()
        for t in pumps:
            t.join(timeout=30)
        return code

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_sigterm)
        base = os.environ.get("PET_RDZV_ID") or "llm-finetune"
        # Trainer v2's torch runtime injects a static rendezvous (PET_MASTER_ADDR/PORT, PET_NODE_RANK).
        backend = os.environ.get("PET_RDZV_BACKEND") or ("static" if os.environ.get("PET_MASTER_ADDR") else "c10d")
        endpoint = os.environ.get("PET_RDZV_ENDPOINT", "")
        attempts = 1 if self.local_nproc else max(1, int(os.environ.get(envvars.LAUNCH_ATTEMPTS, "3")))
        if self.local_nproc:  # the trainer sets its threads per process itself (torchrun warns when unset)
            os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // self.local_nproc)))
        env = {
            **os.environ,
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
            envvars.STOP_FILE: str(self.stop_file),
            envvars.INPUT_ERROR_FILE: str(self.input_error),
        }
        for attempt in range(1, attempts + 1):
            try:
                rdzv = base if self.local_nproc else rendezvous_id(base, backend, endpoint, deadline=time.monotonic() + 600)
            except Exception as exc:
                log(f"cannot reach the rendezvous store at {endpoint}: {exc}")
                return EXIT_GAVE_UP
            if self.preempted:
                return EXIT_PREEMPTED
            if not self.local_nproc:
                log(f"attempt {attempt}/{attempts}: torchrun, rendezvous {rdzv} ({backend})")
            code = self._start(rdzv, env)
            if self.preempted:
                log(f"preempted; torchrun exited {code}")
                return EXIT_PREEMPTED
            if code == 0:
                return 0
            if self.input_error.exists():  # the error line above says it all; the same input fails the same way
                return EXIT_INPUT_ERROR
            if attempt < attempts:
                backoff = min(60, 5 * attempt)
                log(f"torchrun exited {code}; retrying in {backoff}s in a new rendezvous generation")
                time.sleep(backoff)
        log(f"torchrun failed {attempts} times; giving up")
        return EXIT_GAVE_UP


def main(argv: Optional[list[str]] = None) -> int:
    return Supervisor(list(sys.argv[1:] if argv is None else argv)).run()


if __name__ == "__main__":
    sys.exit(main())
