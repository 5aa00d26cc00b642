"""One writer per output_dir: a lease file, safe on NFS, broken only when its holder is provably gone.

Two runs on one output directory would resume each other's checkpoints and interleave their metrics.
Rank 0 of a run creates `output_dir/.lock` with O_CREAT|O_EXCL (atomic on local filesystems and on
NFSv3/v4) holding the run's identity, host and pid, and refreshes its modification time every
`heartbeat` seconds from a daemon thread. Another run finding the lease:

- the same run (torchrun's restart of this job, or a replaced pod: same rendezvous id) takes it over;
- a live holder — its pid alive on this host, or its lease refreshed within `ttl` seconds as watched
  from here — refuses the new run in one line;
- a holder provably gone — its pid dead on this same host, or no refresh seen for `ttl` seconds —
  is replaced (watched by observing the lease's own modification time, so clocks need not agree).

Hand-written because no library of the stack offers a lease on a shared POSIX/NFS directory.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from trainer.errors import UserError

LOCK = ".lock"


def holder_identity() -> str:
    """The run this process belongs to: torchrun's rendezvous id (shared by every restart and every
    pod of one job), else this process."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":
        return f"run:{run_id}"
    return f"process:{socket.gethostname()}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, out_dir: Path, identity: Optional[str] = None, ttl: float = 90.0, heartbeat: float = 15.0, log=print):
        self.path = Path(out_dir) / LOCK
        self.identity = identity or holder_identity()
        self.ttl = ttl
        self.heartbeat = heartbeat
        self.log = log
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> bytes:
        return json.dumps(
            {
                "run": self.identity,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        ).encode()

    def _holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # being written right now, or damaged: judged by its refreshes alone

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(self._record())
            f.flush()
            os.fsync(f.fileno())
        return True

    def _gone(self, holder: dict) -> bool:
        """Whether the holder is provably gone: dead pid on this host, or no refresh for ttl seconds."""
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"])
        try:
            seen = self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        deadline = time.monotonic() + self.ttl
        while time.monotonic() < deadline:
            time.sleep(min(1.0, self.heartbeat / 4))
            try:
                if self.path.stat().st_mtime != seen:
                    return False
            except FileNotFoundError:
                return True
        return True

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                break
            holder = self._holder()
            if holder is None:
                continue  # released in between
            if holder.get("run") == self.identity:
                self.path.write_bytes(self._record())  # the same job again (a restart): take it over
                break
            if not self._gone(holder):
                since = holder.get("since", "?")
                raise UserError(
                    f"output_dir {self.path.parent} is in use by another run ({holder.get('run', '?')} "
                    f"on {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {since}); two "
                    f"runs would resume each other's checkpoints. Fix: wait for it to finish, or give "
                    f"this run another output_dir"
                )
            self.log(
                f"output_dir lock: the previous holder ({holder.get('run', '?')} on {holder.get('host', '?')}) is "
                "gone; taking over"
            )
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        else:
            raise UserError(f"output_dir {self.path.parent}: could not take {self.path} (another run keeps taking it)")
        self._thread = threading.Thread(target=self._beat, name="output-dir-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("run") == self.identity:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


@contextmanager
def held(out_dir: Path, d, log) -> Iterator[None]:
    """The output lock for a whole run, its one owner: taken by rank 0 before anything in output_dir is
    read or written (every rank waits for the answer, and fails with rank 0's refusal), released on
    exit whatever happens. `d`: the run's process group (trainer/runtime/distributed.py)."""
    from trainer.runtime.distributed import on_main

    lock = OutputLock(out_dir, log=log) if d.is_main else None
    on_main(d, lambda: lock.acquire() if lock is not None else None)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()
