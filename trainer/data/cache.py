"""Tokenize once, share it, map it.

Tokenized examples are written once per fingerprint — the data's content, the tokenizer's files,
and every setting that changes the tokens — into `<cache_dir>/<fingerprint>/`, as flat NumPy arrays
read through memory maps: `ids` (int32 token ids of all examples end to end), `mask` (uint8: 1 where
a token is trained), `offsets` (int64, where each example starts) and `trained` (int32 trained tokens
per example), one set per builder part. Every rank and every restart maps the same files instead of
tokenizing again; the resident memory a process needs for the data is the batch order and these
offsets, not the data set.

The parts are built in parallel: by every rank of the job (each takes a contiguous range of the
records), or by a process pool in a single-process run (`python -m trainer prepare`). A cache
counts only once its `COMPLETE` manifest (the size and SHA-256 of every file) exists; it is built
under a temporary name and renamed into place, so a partial cache is never used. Hand-written on
NumPy rather than datasets' Arrow cache because the packer wants exactly these flat arrays (a
packed micro-batch is a few slices), and the cache identity must be ours: datasets fingerprints a
map function by hashing its closure, which a tokenizer object and a template do not survive.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from trainer.atomic import sha256_file  # one implementation; the data module reads it from here too

VERSION = 2  # bump when the encoding changes: old caches are then not reused
MARKER = "COMPLETE"
ARRAYS = (("ids", np.int32), ("mask", np.uint8), ("offsets", np.int64), ("trained", np.int32))


INVALID_NAMED = 20  # skipped records named (file:line) per split; the rest are counted


@dataclass
class Stats:
    records: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    truncated: int = 0
    dropped: dict = field(default_factory=dict)
    invalid: dict = field(default_factory=dict)
    invalid_first: list = field(default_factory=list)
    split_conversations: int = 0

    def add(self, other: "Stats") -> None:
        for name in ("records", "examples", "tokens", "trained_tokens", "truncated", "split_conversations"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("dropped", "invalid"):
            mine = getattr(self, name)
            for k, v in getattr(other, name).items():
                mine[k] = mine.get(k, 0) + v
        self.invalid_first = (self.invalid_first + other.invalid_first)[:INVALID_NAMED]


class PartWriter:
    """Appends encoded examples of one part to its arrays (written as they come: constant memory)."""

    def __init__(self, directory: Path, part: int):
        directory.mkdir(parents=True, exist_ok=True)
        self.files = {name: open(directory / f"part-{part:05d}.{name}", "wb") for name, _ in ARRAYS}
        self.position = 0
        self.count = 0
        self.files["offsets"].write(np.asarray([0], dtype=np.int64).tobytes())

    def add(self, ids: np.ndarray, mask: np.ndarray) -> None:
        self.files["ids"].write(ids.astype(np.int32, copy=False).tobytes())
        self.files["mask"].write(mask.astype(np.uint8, copy=False).tobytes())
        self.position += len(ids)
        self.files["offsets"].write(np.asarray([self.position], dtype=np.int64).tobytes())
        self.files["trained"].write(np.asarray([int(mask.sum())], dtype=np.int32).tobytes())
        self.count += 1

    def close(self) -> None:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


class Split:
    """One split (train or validation) of a cache, memory-mapped across its parts."""

    def __init__(self, directory: Path, parts: list[int]):
        self.parts = []
        for part in range(len(parts)):
            arrays = {}
            for name, dtype in ARRAYS:
                path = directory / f"part-{part:05d}.{name}"
                arrays[name] = np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype=dtype)
            self.parts.append(arrays)
        counts = [len(p["trained"]) for p in self.parts]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.trained = (np.concatenate([p["trained"] for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int32)).astype(
            np.int64
        )
        self.lengths = np.concatenate([np.diff(p["offsets"]) for p in self.parts]) if self.parts else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, trained mask) of example i, as views of the mapped files."""
        part = int(np.searchsorted(self.starts, i, side="right")) - 1
        local = i - int(self.starts[part])
        arrays = self.parts[part]
        lo, hi = int(arrays["offsets"][local]), int(arrays["offsets"][local + 1])
        return arrays["ids"][lo:hi], arrays["mask"][lo:hi]

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels: the id where trained, -100 elsewhere)."""
        ids, mask = self.example(i)
        ids = np.asarray(ids, dtype=np.int64)
        return ids, np.where(mask.astype(bool), ids, -100)


def fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:20]


def tokenizer_fingerprint(model_path: str) -> str:
    """The files that define the tokens: vocabulary, merges, special tokens, the chat template."""
    h = hashlib.sha256()
    root = Path(model_path)
    for name in sorted(
        (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "tokenizer.model",
            "chat_template.jinja",
            "chat_template.json",
            "vocab.json",
            "merges.txt",
            "added_tokens.json",
        )
    ):
        f = root / name
        if f.exists():
            h.update(name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def complete(directory: Path) -> bool:
    return (directory / MARKER).exists()


def verify(directory: Path, full: bool) -> Optional[str]:
    """Why a cache cannot be used, or None. `full` also checks every file's SHA-256."""
    try:
        manifest = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return f"{directory / MARKER} is unreadable"
    for name, expected in manifest["files"].items():
        f = directory / name
        if not f.exists() or f.stat().st_size != expected["size"]:
            return f"{f} is missing or has another size than recorded"
        if full and sha256_file(f) != expected["sha256"]:
            return f"{f} is damaged"
    return None


def publish(build: Path, final: Path, meta: dict) -> Path:
    """Write meta and the manifest into the build directory, then rename it into place."""
    (build / "meta.json").write_text(json.dumps(meta, indent=1))
    files = sorted(str(p.relative_to(build)) for p in build.rglob("*") if p.is_file() and p.name != MARKER)
    manifest = {"files": {n: {"size": (build / n).stat().st_size, "sha256": sha256_file(build / n)} for n in files}}
    with open(build / MARKER, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.rename(build, final)
    except OSError:  # built meanwhile by another job with the same fingerprint: keep theirs
        if complete(final):
            shutil.rmtree(build, ignore_errors=True)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(build, final)
    return final


def build_dir(final: Path) -> Path:
    return final.with_name(f"{final.name}.build-{uuid.uuid4().hex[:8]}")


def stats_dict(stats: Stats) -> dict:
    return asdict(stats)


def stats_from(d: dict) -> Stats:
    return Stats(**d)


def load(final: Path) -> tuple[Split, Split, dict]:
    meta = json.loads((final / "meta.json").read_text())
    train = Split(final / "train", meta["parts"]["train"])
    val = Split(final / "val", meta["parts"]["val"])
    return train, val, meta
