"""Human-readable results of an output directory: report.md, loss_curve.png, quantization.png.

    python -m trainer report OUTPUT_DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError
from trainer.metrics import read_metrics, rewrite


def _mb(n: Optional[float]) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def _num(n: Optional[float], digits: int = 4) -> str:
    return "n/a" if n is None else f"{n:.{digits}g}"


def plot_loss(out: Path) -> Optional[Path]:
    """Loss against optimizer steps and against training time (evaluation excluded)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(path)
    timed = all("train_seconds" in r for r in rows) and rows
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4), squeeze=False)
    for ax, x, label in ((axes[0][0], "step", "optimizer step"),
                         *(((axes[0][1], "train_seconds", "training time (s, evaluation excluded)"),) if timed else ())):
        train = [(r[x], r["loss"]) for r in rows if "loss" in r]
        evals = [(r[x], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train loss", color="tab:blue")
        if evals:
            ax.plot(*zip(*evals), "o-", label="validation loss", color="tab:orange")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats per trained token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Fine-tuning loss")
    fig.tight_layout()
    return _save_figure(fig, out / "loss_curve.png")


def _save_figure(fig, target: Path) -> Path:
    """Written to a temporary name and renamed: a reader never sees half a PNG."""
    import os

    import matplotlib.pyplot as plt

    tmp = target.with_name(target.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, target)
    return target


def plot_quantize(out: Path, q: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("size (MB)", q["size_bytes_before"] / 1e6, q["size_bytes_after"] / 1e6),
               ("perplexity", q["perplexity_before"], q["perplexity_after"]),
               ("latency (ms/token)", q["latency_ms_before"], q["latency_ms_after"])]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, before, after) in zip(axes, metrics):
        bars = ax.bar(["fine-tuned", f"{q['bits']}-bit {q['algorithm']}"], [before, after],
                      color=["tab:blue", "tab:green"])
        ax.bar_label(bars, fmt="%.3g")
        ax.set_title(name)
        ax.margins(y=0.2)
    fig.suptitle("Quantization: before and after")
    fig.tight_layout()
    return _save_figure(fig, out / "quantization.png")


def summary_table(report: dict[str, Any]) -> str:
    lines = ["| | fine-tuned | quantized |", "|---|---|---|"]
    q = report.get("quantize")
    t = report.get("training", {})
    if q:
        lines += [f"| size on disk | {_mb(q['size_bytes_before'])} | {_mb(q['size_bytes_after'])} "
                  f"({q['size_bytes_after'] / q['size_bytes_before']:.2f}x) |",
                  f"| perplexity | {_num(q['perplexity_before'])} | {_num(q['perplexity_after'])} "
                  f"({q['perplexity_after'] / q['perplexity_before'] - 1:+.1%}) |",
                  f"| latency per token | {_num(q['latency_ms_before'], 3)} ms | {_num(q['latency_ms_after'], 3)} ms |",
                  f"| method | | {q['bits']}-bit {q['algorithm'].upper()}, {q['scheme']}, group {q['group_size']} |"]
    else:
        lines.append(f"| validation perplexity | {_num(t.get('eval_perplexity'))} | not quantized |")
    if t:
        lines.append(f"| training | {t.get('steps')} steps, {_num(t.get('train_seconds'), 3)} s, "
                     f"{t.get('num_input_tokens_seen')} tokens, eval loss {_num(t.get('eval_loss'))} | |")
    return "\n".join(lines)


def write_markdown(out: Path, report: dict[str, Any], images: list[Path]) -> Path:
    parts = [f"# Fine-tuning report: {out}", "", summary_table(report), ""]
    for img in images:
        parts += [f"![{img.stem}]({img.name})", ""]
    q = report.get("quantize")
    if q and q.get("breakdown"):
        b = q["breakdown"]
        parts += ["## What was quantized and what was kept", "",
                  "| part | parameters | stored as | bytes |", "|---|---|---|---|"]
        for name, p in b["parts"].items():
            parts.append(f"| {name} | {p['parameters']:,} | {p['dtype']} | {p['bytes']:,} |")
        parts += ["", b["explanation"] + ".", ""]
    if q and q.get("samples"):
        parts += ["## Sample generations (validation prompts)", ""]
        for i, s in enumerate(q["samples"], 1):
            parts += [f"### Prompt {i}", "```", s["prompt"].strip(), "```",
                      f"- **reference**: {s['reference'].strip()}",
                      f"- **fine-tuned**: {s['before']}",
                      f"- **quantized**: {s['after']}", ""]
    target = out / "report.md"
    rewrite(target, "\n".join(parts))
    return target


def regenerate(output_dir: str | Path) -> str:
    """Rewrite the plots and report.md from metrics.jsonl and report.json; return the summary."""
    out = Path(output_dir)
    if not out.is_dir():
        raise UserError(f"{out} is not an output directory (run `python -m trainer finetune` first)")
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    images = [p for p in [plot_loss(out)] if p]
    if report.get("quantize"):
        images.append(plot_quantize(out, report["quantize"]))
    md = write_markdown(out, report, images)
    return summary_table(report) + f"\n\nreport: {md}" + "".join(f"\nplot: {p}" for p in images)
