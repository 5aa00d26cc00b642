"""Logging (rank 0 only), metrics.jsonl and report.json sections."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from trainer import envvars


def plain_logs() -> bool:
    """Plain log lines in pods (the stack sets LLM_FINETUNE_LOG_FORMAT=plain) or without a TTY."""
    return os.environ.get(envvars.LOG_FORMAT) == "plain" or not sys.stderr.isatty()


class Logger:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str, *, every_rank: bool = False) -> None:
        """Rank 0 logs; `every_rank` for what only this rank knows (e.g. its pod was asked to stop)."""
        if self.enabled or every_rank:
            stamp = time.strftime("%H:%M:%S")
            print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar for local runs; nothing in pods (the log lines carry the numbers)."""

    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled and not plain_logs():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, n: int = 1, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsWriter:
    def __init__(self, path: Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, row: dict[str, Any]) -> None:
        """Append one row in a single write (a crash can only tear the last line, which readers drop)."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def flush_to_disk(self) -> None:
        """At checkpoints: the rows up to the checkpoint are on disk before it counts."""
        if self.enabled and self.path.exists():
            with open(self.path, "a") as f:
                os.fsync(f.fileno())

    def truncate_after(self, step: int, log=None) -> None:
        """On resume, keep the rows up to the checkpoint (later ones will be logged again); rewritten
        to a temporary file and renamed, so a crash leaves the old file or the new one, whole."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path, log) if r.get("step", 0) <= step]
        rewrite(self.path, "".join(json.dumps(r) + "\n" for r in rows))


def rewrite(path: Path, text: str) -> None:
    from trainer.atomic import write_text

    write_text(path, text)


def read_metrics(path: Path, log=None) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl; an incomplete last line (a crash mid-write) is dropped with a warning."""
    rows = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                (log or (lambda m: print(m, file=sys.stderr)))(
                    f"warning: {path}:{i}: dropped an incomplete last line (a crash while it was written)"
                )
                continue
            raise ValueError(f"{path}:{i}: not a JSON line; the file is damaged") from None
    return rows


def update_report(path: Path, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write one section of report.json (training, evaluation, quantize); a dotted name
    (quantize_also.gguf:q8_0) is a section inside a section."""
    path = Path(path)
    report: dict[str, Any] = {}
    if path.exists():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError:
            report = {}
    outer, dot, inner = section.partition(".")
    if dot:
        report.setdefault(outer, {})[inner] = values
    else:
        report[section] = values
    rewrite(path, json.dumps(report, indent=2))
    return report


def fmt(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


class Eta:
    """Time left from the recent steps' wall times (saves and evaluations included, as they recur)."""

    def __init__(self, total_steps: int, window: int = 50):
        from collections import deque

        self.total = total_steps
        self.recent: "deque[float]" = deque(maxlen=window)

    def add(self, seconds: float) -> None:
        self.recent.append(seconds)

    def seconds_per_step(self) -> Optional[float]:
        return sum(self.recent) / len(self.recent) if self.recent else None

    def seconds_left(self, step: int) -> Optional[float]:
        per = self.seconds_per_step()
        return None if per is None else per * max(0, self.total - step)


def duration(seconds: Optional[float]) -> str:
    """1h02m, 4m05s, 12s."""
    if seconds is None:
        return "n/a"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


PROGRESS_FILE = "progress.txt"


def progress_text(rows: list[dict[str, Any]], total_steps: int, state: str = "training") -> str:
    """What `cat output_dir/progress.txt` shows (the stack's `progress` command): step of total, time
    left, the last losses."""
    last = rows[-1]
    step = last["step"]
    losses = " ".join(f"{r['loss']:.4f}" for r in rows[-5:] if isinstance(r.get("loss"), (int, float)))
    evals = [r for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    lines = [
        f"{state}: step {step}/{total_steps} ({100.0 * step / max(1, total_steps):.0f}%), "
        f"{duration(last.get('eta_seconds')) if state == 'training' else '0s'} left"
        + (f" at {last['seconds_per_step']:.2f} s/step" if last.get("seconds_per_step") else ""),
        f"last losses (every {max(1, step - rows[-2]['step']) if len(rows) > 1 else 1} steps, newest last): {losses}",
    ]
    if evals:
        lines.append(f"eval_loss {evals[-1]['eval_loss']:.4f} at step {evals[-1]['step']}")
    lines.append(
        f"tokens/s {last.get('tokens_per_second', 0):.0f}; updated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
    )
    return "\n".join(lines) + "\n"


def perplexity(loss: Optional[float]) -> Optional[float]:
    return None if loss is None else math.exp(min(loss, 50.0))


def gain_line(before: Optional[float], after: Optional[float]) -> str:
    """'validation loss 2.31 -> 1.62 (perplexity 10.1 -> 5.1)': the run's headline."""
    if after is None:
        return "no validation data: nothing measured"
    if before is None:
        return f"validation loss {after:.4f} (perplexity {perplexity(after):.2f}); not measured before training"
    return (
        f"validation loss {before:.4f} -> {after:.4f} ({after / before - 1:+.1%}), perplexity "
        f"{perplexity(before):.2f} -> {perplexity(after):.2f}"
    )
