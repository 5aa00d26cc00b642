"""Logging (rank 0 only), metrics.jsonl and report.json sections."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional


def plain_logs() -> bool:
    """Plain log lines in pods (the stack sets LLM_FINETUNE_LOG_FORMAT=plain) or without a TTY."""
    return os.environ.get("LLM_FINETUNE_LOG_FORMAT") == "plain" or not sys.stderr.isatty()


class Logger:
    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, message: str) -> None:
        if self.enabled:
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
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint (they will be logged again)."""
        if not self.enabled or not self.path.exists():
            return
        rows = read_metrics(self.path)
        with open(self.path, "w") as f:
            for row in rows:
                if row.get("step", 0) <= step:
                    f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def update_report(path: Path, section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Read-modify-write one section of report.json (training, evaluation, quantize)."""
    path = Path(path)
    report: dict[str, Any] = {}
    if path.exists():
        try:
            report = json.loads(path.read_text())
        except json.JSONDecodeError:
            report = {}
    report[section] = values
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    return report


def fmt(value: Optional[float], digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"
