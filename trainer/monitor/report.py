"""Human-readable results of an output directory: report.md, loss_curve.png, quantization.png.

python -m trainer report OUTPUT_DIR
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from trainer.errors import UserError
from trainer.monitor.metrics import gain_line, read_metrics, rewrite


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
    report = out / "report.json"
    base = (json.loads(report.read_text()).get("training") or {}).get("eval_loss_before") if report.exists() else None
    timed = all("train_seconds" in r for r in rows) and rows
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 7, 4), squeeze=False)
    for ax, x, label in (
        (axes[0][0], "step", "optimizer step"),
        *(((axes[0][1], "train_seconds", "training time (s, evaluation excluded)"),) if timed else ()),
    ):
        train = [(r[x], r["loss"]) for r in rows if "loss" in r]
        evals = [(r[x], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if base is not None:  # the base model's, measured before the first step (training.eval_on_start)
            evals = [(0, base)] + evals
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
    import matplotlib.pyplot as plt

    from trainer.atomic import write_with

    write_with(target, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return target


def plot_quantize(out: Path, q: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("size (MB)", q["size_bytes_before"] / 1e6, q["size_bytes_after"] / 1e6),
        ("perplexity", q["perplexity_before"], q["perplexity_after"]),
        ("latency (ms/token)", q["latency_ms_before"], q["latency_ms_after"]),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, (name, before, after) in zip(axes, metrics):
        bars = ax.bar(["fine-tuned", f"{q['bits']}-bit {q['algorithm']}"], [before, after], color=["tab:blue", "tab:green"])
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
        lines += [
            f"| size on disk | {_mb(q['size_bytes_before'])} | {_mb(q['size_bytes_after'])} "
            f"({q['size_bytes_after'] / q['size_bytes_before']:.2f}x) |",
            f"| perplexity | {_num(q['perplexity_before'])} | {_num(q['perplexity_after'])} "
            f"({q['perplexity_after'] / q['perplexity_before'] - 1:+.1%}) |",
            f"| latency per token | {_num(q['latency_ms_before'], 3)} ms | {_num(q['latency_ms_after'], 3)} ms |",
            f"| method | | {q['bits']}-bit {q['algorithm'].upper()}, {q['scheme']}, group {q['group_size']} |",
        ]
    else:
        lines.append(f"| validation perplexity | {_num(t.get('eval_perplexity'))} | not quantized |")
    if t:
        lines.append(
            f"| training | {t.get('steps')} steps, {_num(t.get('train_seconds'), 3)} s, "
            f"{t.get('num_input_tokens_seen')} tokens, eval loss {_num(t.get('eval_loss'))} | |"
        )
    return "\n".join(lines)


def gain(report: dict[str, Any]) -> Optional[str]:
    """The fine-tune's headline: validation loss and perplexity before -> after (None if not measured)."""
    t = report.get("training") or {}
    if t.get("eval_loss") is None:
        return None
    return gain_line(t.get("eval_loss_before"), t["eval_loss"])


def sample_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per held-out prompt: the reference and the base, fine-tuned and quantized answers, as far as
    they were generated (the base and fine-tuned ones by the trainer, the quantized ones by the
    quantize stage in the engine that serves the format)."""
    t, q = report.get("training") or {}, report.get("quantize") or {}
    rows = [dict(r) for r in t.get("samples") or []]
    quantized = q.get("samples") or []
    if not rows:  # a run without the trainer's samples (FSDP, older reports): the quantize stage's
        rows = [{"prompt": s["prompt"], "reference": s["reference"], "base": None, "fine_tuned": s["before"]} for s in quantized]
    for row, s in zip(rows, quantized):
        if row["prompt"] == s["prompt"]:
            row["quantized"] = s["after"]
            row["fine_tuned"] = row.get("fine_tuned") or s["before"]
    for fmt, section in (report.get("quantize_also") or {}).items():
        for row, s in zip(rows, section.get("samples") or []):
            if row["prompt"] == s["prompt"]:
                row.setdefault("also", {})[f"{fmt} in {section.get('engine')}"] = s["after"]
    return rows


def quantized_sections(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The quantize section and each of quantize_also's, in the order they were written."""
    return ([report["quantize"]] if report.get("quantize") else []) + list((report.get("quantize_also") or {}).values())


def stored_table(report: dict[str, Any]) -> Optional[str]:
    """Per written model: the bytes of the embeddings, the head, the layers and the norms, and how each is
    stored (trainer/quantsize.stored)."""
    sections = quantized_sections(report)
    rows: list[Any] = []
    for i, q in enumerate(sections):
        if not q.get("stored"):
            continue
        if i == 0 or not rows:
            rows.append(("final/", q["stored"]["final"]))
        rows.append((q.get("format", "inc"), q["stored"]["quantized"]))
    if not rows:
        return None
    names = ("embeddings", "head", "layers", "norms and biases")
    lines = ["| model | " + " | ".join(names) + " | total | head |", "|---" * (len(names) + 3) + "|"]
    for label, s in rows:
        cells = [f"{s['parts'][n]['bytes'] / 1e6:.1f} MB {s['parts'][n]['stored_as']}" if n in s["parts"] else "-" for n in names]
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {s['bytes'] / 1e6:.1f} MB | {'tied' if s['head_tied'] else 'own'} |"
        )
    return "\n".join(lines)


def formats_table(report: dict[str, Any]) -> Optional[str]:
    """quantize and quantize_also side by side: size, perplexity and generation speed per format."""
    sections = quantized_sections(report)
    if len(sections) < 2:
        return None
    first = sections[0]
    lines = [
        "| model | engine | size | perplexity | tokens/s |",
        "|---|---|---|---|---|",
        f"| fine-tuned (final/) | transformers | {_mb(first['size_bytes_before'])} | "
        f"{_num(first['perplexity_before'])} | {_num(first['tokens_per_second_before'], 3)} |",
    ]
    for q in sections:
        lines.append(
            f"| {q.get('format', 'inc')} ({q['bits']}-bit) | {q.get('engine', 'INC')} | "
            f"{_mb(q['size_bytes_after'])} ({q['size_bytes_after'] / q['size_bytes_before']:.2f}x) | "
            f"{_num(q['perplexity_after'])} ({q['perplexity_after'] / q['perplexity_before'] - 1:+.1%}) | "
            f"{_num(q['tokens_per_second_after'], 3)} |"
        )
    return "\n".join(lines)


def write_markdown(out: Path, report: dict[str, Any], images: list[Path]) -> Path:
    parts = [f"# Fine-tuning report: {out}", ""]
    headline = gain(report)
    if headline:
        parts += [f"**What the fine-tune gained**: {headline}.", ""]
    parts += [summary_table(report), ""]
    for img in images:
        parts += [f"![{img.stem}]({img.name})", ""]
    q = report.get("quantize")
    if q and q.get("breakdown"):
        b = q["breakdown"]
        parts += ["## What was quantized and what was kept", "", "| part | parameters | stored as | bytes |", "|---|---|---|---|"]
        for name, p in b["parts"].items():
            parts.append(f"| {name} | {p['parameters']:,} | {p['dtype']} | {p['bytes']:,} |")
        parts += ["", b["explanation"] + ".", ""]
    stored = stored_table(report)
    if stored:
        parts += ["## Where the bytes went, per format (read from the written files)", "", stored, ""]
    formats = formats_table(report)
    if formats:
        parts += ["## Every quantized format, measured in the engine that serves it", "", formats, ""]
    rows = sample_rows(report)
    if rows:
        engine = f" ({q.get('format', 'inc')} in {q.get('engine', 'its engine')})" if q else ""
        parts += ["## Held-out prompts answered greedily: base, fine-tuned, quantized", ""]
        for i, s in enumerate(rows, 1):
            parts += [f"### Prompt {i}", "```", s["prompt"].strip(), "```", f"- **reference**: {s['reference'].strip()}"]
            for key, label in (("base", "base model"), ("fine_tuned", "fine-tuned"), ("quantized", f"quantized{engine}")):
                if s.get(key) is not None:
                    parts.append(f"- **{label}**: {s[key]}")
            for label, answer in (s.get("also") or {}).items():
                parts.append(f"- **quantized ({label})**: {answer}")
            parts.append("")
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
