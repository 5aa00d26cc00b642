"""Resumable checkpoints on the shared volume, behind a small interface: latest valid, save, load.

A checkpoint directory `step-NNNNNNNN/` holds the trainable weights and the optimizer state as a
torch.distributed.checkpoint (DCP) directory (every rank writes its own shards — FSDP2 never gathers
a 7B model on one rank, DDP's replicas are written once — and DCP reshards on load when the world
size changed), the training state (`state.json`: step, tokens seen, the run's identity) and one RNG
file per rank.

It counts only once `COMPLETE` exists: a manifest, written by rank 0 last (temporary name, fsync,
rename) after every rank has flushed its files, with the size and SHA-256 of every file it covers.
Loading verifies them (the ranks share the hashing), so a truncated, zeroed or bit-flipped file is
found before anything is loaded: that checkpoint is skipped with one log line naming the file, and
the next complete one is used. A non-finite state is never saved (the weights and optimizer state
are checked first), so a verified checkpoint is also a finite one. Old checkpoints are pruned only
after a new one is complete, and never the last complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import time
import types
from pathlib import Path
from typing import Callable, Optional

import torch

from trainer import atomic
from trainer.errors import UserError

MARKER = "COMPLETE"
STATE = "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class NonFiniteState(RuntimeError):
    """The weights or optimizer state hold NaN/inf: not saved, the previous checkpoint stays."""


# One implementation of atomic writes and hashes (trainer/atomic.py); the names stay for their callers.
fsync_write = atomic.write_bytes
_fsync_dir = atomic.fsync_dir
sha256 = atomic.sha256_file


def io_threads() -> int:
    """Threads for writing and hashing a rank's checkpoint files: hashlib releases the GIL on large
    buffers, so files hash in parallel, one core each (SHA-256 with SHA-NI runs at ~1.8 GB/s a core,
    faster than most volumes write)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


def hash_files(files: list[Path]) -> dict[str, dict]:
    """{name: {size, sha256}} of `files`, hashed in parallel threads."""
    from concurrent.futures import ThreadPoolExecutor

    def one(f: Path):
        return f.name, {"size": f.stat().st_size, "sha256": sha256(f)}

    with ThreadPoolExecutor(max_workers=max(1, min(io_threads(), len(files)))) as pool:
        return dict(pool.map(one, files))


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp"))


@contextlib.contextmanager
def _frozen_modules_plain(model):
    """Frozen modules that serialize themselves their own way (bitsandbytes' quantized layers of a QLoRA
    base add their quantization state, which torch's state-dict helpers cannot map to attributes) save as
    a plain module would while a checkpoint's state dict is taken: their weights are dropped anyway."""
    patched = []
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if (
            own
            and not any(p.requires_grad for p in own)
            and type(module)._save_to_state_dict is not torch.nn.Module._save_to_state_dict
        ):
            module._save_to_state_dict = types.MethodType(torch.nn.Module._save_to_state_dict, module)
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module._save_to_state_dict


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Frozen parameters (the base model under LoRA) are the base model's own: not saved again.
    with _frozen_modules_plain(model):
        return get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))


def _local_tensors(obj):
    """Every tensor of a (possibly sharded) state dict, as this rank's local data."""
    if isinstance(obj, torch.Tensor):
        yield obj.to_local() if hasattr(obj, "to_local") else obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _local_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _local_tensors(v)


def finite(model_state: dict, optim_state: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in _local_tensors([model_state, optim_state]) if t.is_floating_point())


class Checkpointer:
    """`dist` is trainer.runtime.distributed.Dist (rank, world, barrier, collectives); `log` logs on rank 0."""

    def __init__(self, root: Path, keep: int, dist, log: Callable[[str], None]):
        self.root = Path(root)
        self.keep = max(1, keep)
        self.dist = dist
        self.log = log
        self.timing: dict = {}  # the last save's write and hash seconds

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

    def _manifest(self, path: Path) -> Optional[dict]:
        try:
            manifest = json.loads((path / MARKER).read_text())
        except (OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None

    def problem(self, path: Path) -> Optional[str]:
        """Why `path` cannot be trusted, or None. Collective: the ranks share the hashing."""
        d = self.dist
        manifest = self._manifest(path)
        if manifest is None:
            return f"{path / MARKER} is unreadable or has no file manifest"
        names = sorted(manifest["files"])
        mine = names[d.rank :: d.world_size]
        found, whole = [], []
        for name in mine:
            f, expected = path / name, manifest["files"][name]
            try:
                size = f.stat().st_size
            except OSError:
                found.append(f"{f} is missing")
                continue
            if size != expected["size"]:
                found.append(f"{f} has {size} bytes, {expected['size']} were written")
            else:
                whole.append(f)
        for name, got in hash_files(whole).items():  # this rank's share, in parallel threads
            if got["sha256"] != manifest["files"][name]["sha256"]:
                found.append(f"{path / name} is damaged (its SHA-256 differs from the one recorded at save)")
        found = sorted(p for part in d.all_gather_object(found) for p in part)
        return found[0] if found else None

    def latest(self) -> Optional[Path]:
        """The newest checkpoint that is complete and verifies; damaged ones are named and skipped."""
        for step, path in reversed(self._dirs()):
            if not (path / MARKER).exists():
                self.log(f"ignoring incomplete checkpoint {path} (no {MARKER} marker: interrupted save)")
                continue
            problem = self.problem(path)
            if problem is None:
                return path
            self.log(f"skipping checkpoint step {step}: {problem}")
        return None

    # ---- save / load ---------------------------------------------------------------------

    def save(self, step: int, model, optimizer, train_state: dict) -> Path:
        """Collective: every rank calls it. Raises NonFiniteState (nothing written) on NaN/inf."""
        import torch.distributed.checkpoint as dcp

        d = self.dist
        path = self.root / f"step-{step:08d}"
        model_state, optim_state = _state_dicts(model, optimizer)
        if not d.all_true(finite(model_state, optim_state)):
            raise NonFiniteState(f"the weights or optimizer state at step {step} are not finite (NaN/inf)")
        if d.is_main:
            if path.exists():  # left by a crash before resuming from an older step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        d.barrier()
        started = time.perf_counter()
        error: Optional[BaseException] = None
        try:  # dcp.save is collective and raises on every rank when one rank's write fails
            # Several files per rank, written by parallel threads, so they also hash in parallel.
            writer = dcp.FileSystemWriter(str(path), thread_count=io_threads())
            dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
            with open(path / f"rng-rank{d.rank:05d}.pt", "wb") as f:
                torch.save(rng_state(), f)
                f.flush()
                os.fsync(f.fileno())
            if d.is_main:
                fsync_write(path / STATE, json.dumps(train_state, indent=1).encode())
        except Exception as exc:  # noqa: BLE001 - every rank must learn of it before anyone moves on
            error = exc
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            if type(exc).__name__ != "CheckpointException":
                raise
            failures = list(getattr(exc, "failures", {}).values())
            error = failures[0][0] if failures else RuntimeError(str(exc))
        if not d.all_true(error is None):
            if d.is_main:
                shutil.rmtree(path, ignore_errors=True)
            self._save_failed(step, path, error)
        written = time.perf_counter()
        names = _files(path)
        hashed = {}
        for part in d.all_gather_object(hash_files([path / n for n in names[d.rank :: d.world_size]])):
            hashed.update(part)
        self.timing = {
            "write_seconds": round(written - started, 3),
            "hash_seconds": round(time.perf_counter() - written, 3),
            "bytes": sum(v["size"] for v in hashed.values()),
        }
        if d.is_main:
            fsync_write(path / MARKER, json.dumps({"step": step, "files": hashed}, indent=1).encode())
        if d.is_main:
            self._prune(step)
        d.barrier()
        return path

    def _save_failed(self, step: int, path: Path, error: Optional[BaseException]) -> None:
        previous = self.complete()
        kept = f"checkpoint step {previous[-1][0]} is intact" if previous else "there is no earlier checkpoint"
        what = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if error else "another rank failed"
        if error is None or isinstance(error, OSError) or "No space left" in str(error):
            # Out of space, or a write the volume refused: retrying the same save cannot help.
            raise UserError(
                f"saving checkpoint step {step} to {path} failed ({what}); the partial checkpoint was "
                f"removed and {kept}. Fix: free space on the volume (storage.size), "
                "training.save_total_limit, or LoRA (smaller checkpoints)"
            ) from None
        raise error

    def _prune(self, newest: int) -> None:
        """Keep the `keep` newest complete checkpoints (at least the one just written); drop debris
        older than it. Checkpoints without a manifest (another version's) are left alone."""
        complete = [(s, p) for s, p in self.complete() if self._manifest(p) is not None]
        for step, path in complete[: -self.keep]:
            shutil.rmtree(path, ignore_errors=True)
        for step, path in self._dirs():
            if step < newest and not (path / MARKER).exists():
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model, optimizer) -> dict:
        """Load a verified checkpoint into the model and optimizer (in place); its training state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        model_state, optim_state = _state_dicts(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        # Not strict: the frozen base weights are not in a checkpoint (dcp.load above already failed if
        # any trainable weight was missing from it).
        set_state_dict(
            model,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
        rng_file = path / f"rng-rank{self.dist.rank:05d}.pt"
        if rng_file.exists():  # absent when the world size grew (elastic): seeds stay as set
            set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
        return json.loads((path / STATE).read_text())

    def read_state(self, path: Path) -> dict:
        return json.loads((path / STATE).read_text())

    # ---- space ---------------------------------------------------------------------------

    def bytes_on_disk(self, path: Path) -> int:
        return sum(p.stat().st_size for p in Path(path).iterdir() if p.is_file())

    def check_space(self, checkpoint_bytes: int, other_bytes: int, measured: bool) -> str:
        """Refuse a run whose checkpoints (keep + 1 during a save: old ones are pruned only after the
        new one completes) and outputs do not fit in the free space of the volume; the numbers."""
        existing = len(self.complete())
        where = self.root
        while not where.exists() and where.parent != where:
            where = where.parent  # the volume, before the run created its directories
        free = shutil.disk_usage(where).free
        need = max(1, self.keep + 1 - existing) * checkpoint_bytes + other_bytes
        how = "measured" if measured else "estimated"
        summary = (
            f"each checkpoint {_gb(checkpoint_bytes)} ({how}), {self.keep} kept + 1 being written, "
            f"{existing} already there; final outputs {_gb(other_bytes)}; needs {_gb(need)} more, "
            f"free {_gb(free)}"
        )
        if free < need:
            raise UserError(
                f"not enough space on the volume of {self.root}: {summary}. Fix: a larger volume "
                "(storage.size), training.save_total_limit: 1, or LoRA (smaller checkpoints)"
            )
        return summary


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def estimate_checkpoint_bytes(model) -> int:
    """Trainable weights and AdamW's two moments, in the weights' dtype, plus the format's overhead."""
    total = sum(p.numel() * p.element_size() * 3 for p in model.parameters() if p.requires_grad)
    return int(total * 1.02) + 64 * 1024


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
