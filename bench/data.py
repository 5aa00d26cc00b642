"""Data preparation benchmark: time and memory per process, before and after the tokenize-once cache.

    python bench/data.py                      # 100k and 1M flashcard-shaped examples, 2 processes
    python bench/data.py --sizes 100000 --baseline-ref <commit>

For each size it generates flashcard-shaped records (JSON lines, nothing downloaded) and a tokenizer
with an 8,000-token vocabulary (100k records are 7.6M tokens, as the real flashcards with a Llama
tokenizer), then measures in the same run, each under torchrun with 2 processes:
- before: the trainer at --baseline-ref (checked out into a worktree): every rank reads and tokenizes
  the whole data set into Python lists (1M: one process only; two would need ~26 GB);
- after, cold: the cache directory empty, the two ranks tokenize half each into the memory-mapped cache;
- after, warm: the cache there, as every restart and every other rank finds it.
Per process: seconds of data preparation, seconds of the whole process, peak resident memory and the
part of it the data added. Ratios are against `before` measured here. Results: results/data-cpu.json.
Timings are for reading; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from trainer.runtime import local  # noqa: E402

BASELINE_REF = "b0f4b1bd5a92a6b8d86970db1bce386a65ca49e4"  # the last commit before the data cache
TARGETS = {"cold_1m_seconds": 180, "warm_start_seconds": 10, "data_rss_1m_mb": 300}


def inputs(work: Path, n: int) -> tuple[Path, Path]:
    from trainer.dev.tiny import corpus, flashcards, write_model

    work.mkdir(parents=True, exist_ok=True)
    data = work / f"cards-{n}.jsonl"
    if not data.exists():
        with open(data, "w") as f:
            for start in range(0, n, 100_000):
                for r in flashcards(min(100_000, n - start), seed=start):
                    f.write(json.dumps(r) + "\n")
    model = work / "tokenizer"
    if not (model / "config.json").exists():
        write_model(model, corpus(flashcards(20_000, seed=1)), hidden=64, layers=1, vocab_size=8000)
    return data, model


def baseline(work: Path, ref: str) -> Path:
    tree = work / f"baseline-{ref[:10]}"
    if not (tree / "trainer").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)
    return tree


def run(impl: str, root: Path, data: Path, model: Path, cache: Path, nproc: int, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob(f"{impl}-rank*.json"):
        f.unlink()
    cmd = local.torchrun(nproc, str(ROOT / "bench" / "data_worker.py"), "--impl", impl, "--root", str(root),
                         "--data", str(data), "--model", str(model), "--cache", str(cache), "--out", str(out))
    started = time.perf_counter()
    result = subprocess.run(cmd, env=local.run_env(), cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{impl} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    ranks = [json.loads(f.read_text()) for f in sorted(out.glob(f"{impl}-rank*.json"))]
    return {"impl": impl, "processes": nproc, "torchrun_seconds": wall, "ranks": ranks,
            "data_seconds": max(r["data_seconds"] for r in ranks),
            "process_seconds": max(r["process_seconds"] for r in ranks),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "data_rss_mb": max(r["data_rss_mb"] for r in ranks)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--baseline-ref", default=BASELINE_REF)
    p.add_argument("--work", default=str(ROOT / "bench" / "work" / "data"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "data-cpu.json"))
    args = p.parse_args(argv)
    work = Path(args.work)
    tree = baseline(work, args.baseline_ref)
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        data, model = inputs(work, n)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        scratch = work / f"ranks-{n}"
        before = run("before", tree, data, model, cache, 2 if n <= 200_000 else 1, scratch)
        cold = run("after", ROOT, data, model, cache, 2, scratch / "cold")
        warm = run("after", ROOT, data, model, cache, 2, scratch / "warm")
        row = {"examples": n, "before": before, "after_cold": cold, "after_warm": warm,
               "ratios": {"cold_vs_before_data_seconds": before["data_seconds"] / cold["data_seconds"],
                          "warm_vs_before_data_seconds": before["data_seconds"] / max(warm["data_seconds"], 1e-3),
                          "before_vs_cold_data_rss": before["data_rss_mb"] / max(cold["data_rss_mb"], 1.0)}}
        results.append(row)
        print(f"\n{n:,} examples (data seconds, whole-process seconds, peak RSS MB, RSS the data added MB; "
              f"worst process)")
        for label, r in (("before", before), ("after, cold", cold), ("after, warm", warm)):
            print(f"  {label:12s} x{r['processes']}  {r['data_seconds']:7.1f} s  {r['process_seconds']:7.1f} s  "
                  f"{r['peak_rss_mb']:7.0f}  {r['data_rss_mb']:7.0f}")
        print("  ratios vs before: " + ", ".join(f"{k} {v:.1f}x" for k, v in row["ratios"].items()))
    one_m = next((r for r in results if r["examples"] == 1_000_000), None)
    summary = {}
    if one_m:
        summary = {"cold_1m_seconds": one_m["after_cold"]["data_seconds"],
                   "warm_start_seconds": one_m["after_warm"]["process_seconds"],
                   "data_rss_1m_mb": one_m["after_cold"]["data_rss_mb"]}
        print("\ntargets (1M examples, 2 processes): " + ", ".join(
            f"{k} {summary[k]:.1f} (target < {TARGETS[k]}) {'met' if summary[k] < TARGETS[k] else 'NOT met'}"
            for k in TARGETS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"results": results, "targets": TARGETS, "summary": summary,
                                          "baseline_ref": args.baseline_ref, "command": " ".join(sys.argv),
                                          "machine": {"processor": platform.processor() or platform.machine(),
                                                      "cpu_count": __import__("os").cpu_count()}}, indent=1))
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
