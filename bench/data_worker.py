"""One process of the data benchmark (bench/data.py): prepare the data with one implementation and
write what it cost this process. Run under torchrun (or alone).

    python bench/data_worker.py --impl after --data F --model DIR --cache DIR --out DIR
    python bench/data_worker.py --impl before --root WORKTREE ...   # the code before the data cache
"""

import argparse
import json
import os
import resource
import sys
import time

STARTED = time.perf_counter()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=("before", "after"), required=True)
    p.add_argument("--root", required=True, help="the checkout whose trainer package is measured")
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    sys.path.insert(0, args.root)
    from trainer.config import DataConfig
    from trainer.model.modeling import load_tokenizer

    rank = int(os.environ.get("RANK", "0"))
    tokenizer = load_tokenizer(args.model)
    ready = time.perf_counter()
    before_rss = rss_mb()
    if args.impl == "before":  # every rank reads and tokenizes everything into Python lists
        from trainer.data import prepare

        prepared = prepare(DataConfig(file=args.data), tokenizer)
        examples = len(prepared.train_rows)
    else:
        from trainer.runtime import distributed as D
        from trainer.data import prepare

        d = D.init(None)
        prepared = prepare(DataConfig(file=args.data, file_settle_seconds=0), tokenizer, args.model, dist=d,
                           cache_root=args.cache)
        examples = len(prepared.train)
        # What a training process then holds: the batch order over the mapped examples.
        from trainer.data.batches import BatchOrder

        order = BatchOrder(len(prepared.train), 8, 0)
        order.counts(prepared.train.trained)
        d.close()
    done = time.perf_counter()
    result = {"impl": args.impl, "rank": rank, "examples": examples, "data_seconds": done - ready,
              "process_seconds": done - STARTED, "rss_before_data_mb": before_rss, "rss_after_data_mb": rss_mb(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3,
              "hit": getattr(prepared, "hit", None)}
    result["data_rss_mb"] = result["peak_rss_mb"] - before_rss
    with open(os.path.join(args.out, f"{args.impl}-rank{rank}.json"), "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
