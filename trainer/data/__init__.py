"""Data: records from files or the hub, checked one by one, turned into exactly-labelled token ids,
tokenized once into a shared memory-mapped cache, batched and packed.

    from trainer.data import prepare
    data = prepare(cfg, tokenizer, model_path)        # -> Prepared(train, val, stats, ...)

Modules: sources (reading, with file:line), formats (what a record is, validation), encode (ids and
the trained-token mask), cache (the tokenize-once store), batches (order, packing, collation).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, cast

import numpy as np

from trainer.config import DataConfig, TrainerConfig
from trainer.data import cache as C
from trainer.data.batches import IGNORE, collate, epoch_order, shard  # noqa: F401  (the package's API)
from trainer.data.encode import Dropped, Encoder, render_prompt
from trainer.data.formats import FORMATS, Invalid, detect, export_record, normalize, renders_as_chat
from trainer.data.sources import HubDataset, Item, JsonLines, Source, first_record, open_sources
from trainer.errors import UserError

BATCH = 2048  # records encoded at a time per builder: bounds a builder's memory
PROMPTS_KEPT = 8


@dataclass
class Prepared:
    train: C.Split
    val: C.Split
    stats: C.Stats
    val_stats: C.Stats
    format: str
    cache: Path
    content: str  # fingerprint of the data's content (the resume guard compares it)
    prompts: list = field(default_factory=list)  # (prompt, reference) of the first validation samples
    hit: bool = False

    def summary(self) -> str:
        s = self.stats
        lengths = self.train.lengths
        pct = (
            (
                f"; lengths p50 {int(np.percentile(lengths, 50))}, p90 {int(np.percentile(lengths, 90))}, "
                f"p99 {int(np.percentile(lengths, 99))}, max {int(lengths.max())}"
            )
            if len(lengths)
            else ""
        )
        dropped = sum(s.dropped.values())
        invalid = self.invalid()
        return (
            f"{s.records + self.val_stats.records} records ({self.format}) -> {s.examples} training examples, "
            f"{s.tokens} tokens ({s.trained_tokens} "
            f"trained), {s.truncated} truncated to max_seq_length, {dropped} dropped"
            + (f" ({', '.join(f'{k}: {v}' for k, v in s.dropped.items())})" if dropped else "")
            + f", invalid skipped: {invalid['training']} training, {invalid['validation']} validation"
            + pct
        )

    def invalid(self) -> dict[str, int]:
        """Records skipped as invalid (data.skip_invalid), per split."""
        return {"training": sum(self.stats.invalid.values()), "validation": sum(self.val_stats.invalid.values())}

    def invalid_named(self) -> dict[str, list[str]]:
        """The first skipped records of each split, by file:line and reason."""
        return {"training": list(self.stats.invalid_first), "validation": list(self.val_stats.invalid_first)}

    def log_invalid(self, log) -> None:
        for split, named in self.invalid_named().items():
            for line in named:
                log(f"data: skipped invalid {split} record {line}")
            more = self.invalid()[split] - len(named)
            if more > 0:
                log(f"data: ... and {more} more invalid {split} record(s) skipped")


SKIP = "or data.skip_invalid: true to skip such records (counted per split in the log and report)"


def one_fix(problem: str, default_fix: str) -> str:
    """A record's problem with exactly one `Fix:`: the reader's own fix where it gave one (re-encode
    the file, one JSON object per line...), else `default_fix`; then the option to skip such records."""
    what, _, fix = problem.partition(" Fix: ")
    fix = (fix or default_fix).rstrip(". ")
    return f"{what.rstrip('. ')}. Fix: {fix}, {SKIP}"


def _content(cfg: DataConfig, train: Source, val: Optional[Source]) -> str:
    parts = []
    for src in (train, val):
        if src is None:
            continue
        if isinstance(src, HubDataset):
            parts.append(f"hub:{src.name}:{src.fingerprint()}")
        else:
            parts.append(f"file:{C.sha256_file(Path(getattr(src, 'path')))}")
    return C.fingerprint({"content": parts})[:16]


def _key(cfg: DataConfig, content: str, tokenizer_fp: str) -> str:
    settings = {
        k: v
        for k, v in cfg.__dict__.items()
        if k not in ("file", "dataset", "validation_file", "file_wait_seconds", "file_settle_seconds", "cache_dir", "packing")
    }
    return C.fingerprint({"content": content, "tokenizer": tokenizer_fp, "settings": settings})


def _held_out(n: int, cfg: DataConfig) -> set:
    """Indices held out for validation: a seeded sample of validation_fraction of the records."""
    if cfg.validation_fraction <= 0 or n < 2:
        return set()
    order = list(range(n))
    random.Random(cfg.validation_seed).shuffle(order)
    return set(order[: max(1, int(round(n * cfg.validation_fraction)))])


@dataclass
class Job:
    """What one builder part does (picklable: runs in a pool process too)."""

    cfg: DataConfig
    model_path: str
    token: Optional[str]
    build: str
    part: int
    parts: int
    fmt: str
    n_train: int
    n_val: int
    export: Optional[str] = None
    export_max: Optional[int] = None


def _range(n: int, part: int, parts: int) -> tuple[int, int]:
    return n * part // parts, n * (part + 1) // parts


def build_part(job: Job, tokenizer=None) -> dict:
    """Build one part of the train and validation splits; its stats, prompts and first error."""
    from trainer.model.modeling import load_tokenizer

    tok = tokenizer if tokenizer is not None else load_tokenizer(job.model_path)
    cfg = job.cfg
    train_src, val_src = open_sources(cfg, job.token)
    for src in (train_src, val_src):
        if isinstance(src, JsonLines):  # where its records start, to read this part's range only
            src.count()
    held = _held_out(job.n_train, cfg) if val_src is None else set()
    encoder = Encoder(tok, cfg)
    out: dict[str, Any] = {"stats": {}, "prompts": [], "error": None, "exported": []}
    writers = {"train": C.PartWriter(Path(job.build) / "train", job.part), "val": C.PartWriter(Path(job.build) / "val", job.part)}
    stats = {"train": C.Stats(), "val": C.Stats()}
    dropped_prompts: list[int] = []
    coerce = train_src.__class__.__name__ == "Table"

    def run(src: Source, n: int, fixed_split: Optional[str]) -> Optional[tuple]:
        lo, hi = _range(n, job.part, job.parts)
        pending: list[tuple[Item, str, Any]] = []

        def flush() -> None:
            encoded = encoder.encode([sample for _, _, sample in pending])
            for (item, split, sample), results in zip(pending, encoded):
                st = stats[split]
                for r in results:
                    if isinstance(r, Dropped):
                        st.dropped[r.reason] = st.dropped.get(r.reason, 0) + 1
                        if r.prompt_tokens and len(dropped_prompts) < 1000:
                            dropped_prompts.append(r.prompt_tokens)
                        continue
                    writers[split].add(r.ids, r.mask)
                    st.examples += 1
                    st.tokens += len(r.ids)
                    st.trained_tokens += int(r.mask.sum())
                    st.truncated += int(r.truncated)
                if split == "val" and len(out["prompts"]) < PROMPTS_KEPT:
                    out["prompts"].append((item.index, *render_prompt(sample, tok, cfg)))
                if job.export and split == "train" and len(out["exported"]) < (job.export_max or 1 << 62):
                    out["exported"].append(export_record(sample, job.fmt, cfg, cast(dict, item.record)))
            pending.clear()

        for item in src.read(lo, hi):
            split = fixed_split or ("val" if item.index in held else "train")
            stats[split].records += 1
            problem = item.error
            sample = None
            if problem is None:
                try:
                    sample = normalize(cast(dict, item.record), job.fmt, cfg, coerce=coerce)  # read: no error
                except Invalid as bad:
                    problem = f"field {bad.field!r} {bad.message}"
            if problem is not None:
                if not cfg.skip_invalid:
                    flush()
                    return (1 if fixed_split == "val" else 0, item.index, f"{item.where}: {problem}")
                kind = problem.split(" (")[0] if problem.startswith("field") else problem.split(" (")[0][:60]
                stats[split].invalid[kind] = stats[split].invalid.get(kind, 0) + 1
                if len(stats[split].invalid_first) < C.INVALID_NAMED:
                    stats[split].invalid_first.append(f"{item.where}: {problem}")
                continue
            pending.append((item, split, sample))
            if len(pending) >= BATCH:
                flush()
        flush()
        return None

    error = run(train_src, job.n_train, None)
    if error is None and val_src is not None:
        error = run(val_src, job.n_val, "val")
    for w in writers.values():
        w.close()
    stats["train"].split_conversations = encoder.split_conversations
    out["stats"] = {k: C.stats_dict(v) for k, v in stats.items()}
    out["counts"] = {k: w.count for k, w in writers.items()}
    out["error"] = error
    out["dropped_prompts"] = dropped_prompts
    return out


def _pool_parts(n: int) -> int:
    """Builder processes for a single-process run: the cores, for data large enough to be worth
    starting them (each imports transformers and loads the tokenizer, ~5 s, and the fast tokenizer
    already uses two threads: measured, 2 parts lose to 1 below ~200k records on 2 cores)."""
    if n < 200_000:
        return 1
    return max(1, min(8, len(os.sched_getaffinity(0))))


def prepare(
    cfg: DataConfig,
    tokenizer,
    model_path: str,
    token: Optional[str] = None,
    dist=None,
    cache_root: Optional[Path] = None,
    log: Callable[[str], None] = lambda m: None,
    export: Optional[str] = None,
    export_max: Optional[int] = None,
    parts: Optional[int] = None,
) -> Prepared:
    """Tokenized train and validation splits of `cfg`, from the cache or built into it (collective)."""
    from trainer.runtime import distributed as D

    import torch

    d = dist or D.Dist(0, 0, 1, 1, None, torch.device("cpu"))
    root = Path(cache_root or "cache")
    # Rank 0 first: it downloads a hub dataset into the shared cache and reads the files' content.
    train_src, val_src = D.main_first(d, lambda: open_sources(cfg, token))
    plan = D.on_main(d, lambda: _plan(cfg, train_src, val_src, model_path, root))
    final = Path(plan["final"])
    log(
        f"data: format {plan['format']}"
        + (" (detected from the columns)" if not cfg.format else "")
        + f"; tokenized data {'found in' if plan['hit'] else 'building in'} {final}"
    )
    if renders_as_chat(plan["format"], cfg) and not getattr(tokenizer, "chat_template", None):
        log(
            "data: the tokenizer has no chat template: conversations are rendered in the Llama 2 [INST] form "
            "(the documented fallback; give the model directory a chat_template to use its own)"
        )
    if not plan["hit"] or export:
        n_parts = d.world_size if d.enabled else (parts or _pool_parts(plan["n_train"] + plan["n_val"]))
        build = plan["build"]
        jobs = [
            Job(cfg, model_path, token, build, k, n_parts, plan["format"], plan["n_train"], plan["n_val"], export, export_max)
            for k in range(n_parts)
        ]
        started = time.perf_counter()
        if d.enabled:
            results = d.all_gather_object(build_part(jobs[d.rank], tokenizer))
        elif n_parts == 1:
            results = [build_part(jobs[0], tokenizer)]
        else:
            import multiprocessing

            with ProcessPoolExecutor(n_parts, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(build_part, jobs))
        D.on_main(d, lambda: _finish(cfg, plan, results, final, Path(build), export, export_max, started, log))
    d.barrier()
    train, val, meta = C.load(final)
    prepared = Prepared(
        train,
        val,
        C.stats_from(meta["stats"]["train"]),
        C.stats_from(meta["stats"]["val"]),
        meta["format"],
        final,
        plan["content"],
        [tuple(p) for p in meta["prompts"]],
        plan["hit"],
    )
    if len(train) == 0:
        raise UserError(
            "data: no training examples are left after tokenization; check data.max_seq_length "
            f"and the records ({prepared.summary()})"
        )
    return prepared


def _plan(cfg: DataConfig, train_src: Source, val_src: Optional[Source], model_path: str, root: Path) -> dict:
    from trainer.data.cache import tokenizer_fingerprint

    content = _content(cfg, train_src, val_src)
    final = root / _key(cfg, content, tokenizer_fingerprint(model_path))
    n_train = train_src.count()
    if cfg.max_examples:
        n_train = min(n_train, cfg.max_examples)
    if n_train == 0:
        raise UserError(f"data: {train_src.name} has no records. Fix: point data at a non-empty file or split")
    n_val = val_src.count() if val_src is not None else 0
    if val_src is not None and n_val == 0:
        raise UserError(f"data: the validation data {val_src.name} has no records")
    record = first_record(train_src, min(n_train, 100))
    if record is None:
        raise UserError(
            f"data: none of the first records of {train_src.name} can be read; the first error is in "
            "its first lines. Fix: check the file's format"
        )
    fmt = detect(record, cfg)
    hit = C.complete(final) and C.verify(final, full=True) is None
    if not hit and final.exists():
        import shutil

        shutil.rmtree(final, ignore_errors=True)  # a damaged cache: built again
    root.mkdir(parents=True, exist_ok=True)
    return {
        "final": str(final),
        "build": str(C.build_dir(final)),
        "hit": hit,
        "format": fmt,
        "content": content,
        "n_train": n_train,
        "n_val": n_val,
    }


def _finish(
    cfg: DataConfig,
    plan: dict,
    results: list[dict],
    final: Path,
    build: Path,
    export: Optional[str],
    export_max: Optional[int],
    started: float,
    log,
) -> None:
    import shutil

    errors = sorted(r["error"] for r in results if r["error"])
    if errors:
        shutil.rmtree(build, ignore_errors=True)
        raise UserError(one_fix(errors[0][2], "correct the record"))
    stats = {"train": C.Stats(), "val": C.Stats()}
    for r in results:
        for split in stats:
            stats[split].add(C.stats_from(r["stats"][split]))
    train = stats["train"]
    total = train.records - sum(train.invalid.values())
    too_long = train.dropped.get("prompt too long", 0)
    if total and too_long * 2 > total:
        shutil.rmtree(build, ignore_errors=True)
        lengths = sorted(p for r in results for p in r["dropped_prompts"])
        median = lengths[len(lengths) // 2] if lengths else cfg.max_seq_length
        suggest = 1 << max(6, math.ceil(math.log2(median + 64)))
        raise UserError(
            f"data.max_seq_length={cfg.max_seq_length} is too small for the prompts: {too_long} of "
            f"{total} examples have a prompt of at least that many tokens (median of those "
            f"{median}). Fix: set data.max_seq_length to {suggest} or more"
        )
    prompts = sorted(p for r in results for p in r["prompts"])[:PROMPTS_KEPT]
    meta = {
        "format": plan["format"],
        "stats": {k: C.stats_dict(v) for k, v in stats.items()},
        "parts": {k: [r["counts"][k] for r in results] for k in ("train", "val")},
        "prompts": [[p, ref] for _, p, ref in prompts],
        "content": plan["content"],
    }
    if export:
        records = [rec for r in results for rec in r["exported"]][:export_max]
        _write_export(Path(export), records)
        log(f"data: exported {len(records)} cleaned records to {export}")
    if plan["hit"]:
        shutil.rmtree(build, ignore_errors=True)
        return
    C.publish(build, final, meta)
    log(f"data: tokenized in {time.perf_counter() - started:.1f}s with {len(results)} part(s)")


def _write_export(path: Path, records: list[dict]) -> None:
    from trainer.atomic import write_with

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            if path.suffix == ".json":
                json.dump(records, f, ensure_ascii=False, indent=1)
            else:
                for r in records:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")

    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, write)


def cache_root(cfg: TrainerConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir).resolve().parent / "cache"


def for_config(
    cfg: TrainerConfig,
    tokenizer,
    model_path: str,
    token: Optional[str] = None,
    dist=None,
    log: Callable[[str], None] = lambda m: None,
    **kwargs,
) -> Prepared:
    return prepare(cfg.data, tokenizer, model_path, token, dist, cache_root(cfg), log, **kwargs)


__all__ = ["FORMATS", "IGNORE", "Prepared", "collate", "epoch_order", "for_config", "prepare", "shard"]
