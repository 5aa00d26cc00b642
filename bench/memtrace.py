"""Where a process's resident memory is: a timeline of RSS beside glibc malloc's own accounting.

    python bench/memtrace.py --out trace.tsv -- -m trainer finetune --config c.yaml
    python bench/memtrace.py --summarize trace.tsv ...     # each timeline's peak row

Runs the module (or script) in this process with a thread that samples, every --every seconds, the
RSS and anonymous RSS (/proc/self/status) and glibc's mallinfo2(): `arena` (heap bytes obtained with
brk/mmap'd arenas), `in_use` (allocated from them), `free` (held by malloc, not returned to the kernel:
fragmentation or caching), `mmapped` (chunks mmap'd one each, returned on free). RSS well above
in_use + mmapped + the interpreter means memory held by the allocator rather than by tensors. glibc
only (mallinfo2 is glibc 2.33+); written by hand because no library reads these counters.
"""

from __future__ import annotations

import argparse
import ctypes
import runpy
import sys
import threading
import time
from pathlib import Path

GIB = 1 << 30


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def sample(libc) -> dict:
    info = libc.mallinfo2()
    return {"rss": status_kib("VmRSS") * 1024, "anon": status_kib("RssAnon") * 1024, "arena": info.arena,
            "in_use": info.uordblks, "free": info.fordblks, "mmapped": info.hblkhd}


def summarize(path: str) -> dict:
    """A timeline's peak row (GiB) and its steadiest stretch: the figures bench/results keep."""
    lines = Path(path).read_text().splitlines()
    keys = lines[0].split("\t")
    rows = [dict(zip(keys, map(float, line.split("\t")))) for line in lines[1:]]
    peak = max(rows, key=lambda r: r["rss"])
    return {"samples": len(rows), "seconds": rows[-1]["t"], "peak": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--summarize", nargs="+", metavar="TSV", help="print each timeline's peak row as JSON")
    parser.add_argument("--out")
    parser.add_argument("--every", type=float, default=1.0)
    parser.add_argument("argv", nargs=argparse.REMAINDER, help="-- -m module args... | -- script.py args...")
    args = parser.parse_args()
    if args.summarize:
        import json

        print(json.dumps({path: summarize(path) for path in args.summarize}, indent=1))
        return
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    out = open(args.out, "w", buffering=1)
    keys = ("rss", "anon", "arena", "in_use", "free", "mmapped")
    out.write("t\t" + "\t".join(keys) + "\n")
    start = time.time()
    stop = threading.Event()

    peak: dict = {}

    def loop() -> None:
        while not stop.wait(args.every):
            s = sample(libc)
            if s["rss"] > peak.get("rss", 0):
                peak.update(s, t=round(time.time() - start, 1))
            out.write(f"{time.time() - start:.1f}\t" + "\t".join(f"{s[k] / GIB:.3f}" for k in keys) + "\n")

    threading.Thread(target=loop, daemon=True).start()
    print(f"memtrace: started at {time.strftime('%H:%M:%S', time.localtime(start))}", flush=True)
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1]] + argv[2:]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = argv
            runpy.run_path(argv[0], run_name="__main__")
    finally:
        stop.set()
        at = ", ".join(f"{k} {peak[k] / GIB:.2f}" for k in keys if k in peak)
        print(f"memtrace: peak RSS at {peak.get('t')} s: {at} GiB", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
