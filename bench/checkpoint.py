"""Checkpoint save and SHA-256 verification at size, against the raw write of the same bytes.

    make bench-checkpoint                        # TinyLlama-1.1B full fine-tune state, ~13 GB
    python bench/checkpoint.py --shape tinyllama --out bench/results/checkpoint-cpu.json

The state is what a full fine-tune checkpoints: fp32 weights of the model's shape plus AdamW's two fp32
moments (16 bytes a parameter with the gradients not saved: 12 here), built at run time. One process
saves it through trainer/train/checkpoint.py's Checkpointer (DCP, several files written by parallel
threads, then hashed in parallel), then verifies it as a resume does (`problem`: every file read and
hashed). The physical limit is the volume: the same number of bytes written with one sequential
write and fsync. Ratios are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def state(shape: str, scale: float):
    import torch
    from transformers import LlamaForCausalLM

    from bench.shapes import llama_config
    from trainer.dev.tiny import build_tokenizer

    tok = build_tokenizer(["a b c"], 64)
    cfg = llama_config(shape, tok)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    keys = list(shapes)[: max(1, int(len(shapes) * scale))]
    model = {k: torch.randn(shapes[k]) for k in keys}
    optim = {f"state.{k}.exp_avg": torch.randn(shapes[k]) for k in keys}
    optim.update({f"state.{k}.exp_avg_sq": torch.rand(shapes[k]) for k in keys})
    return model, optim


class _Dist:
    rank, world_size, local_rank, is_main, enabled = 0, 1, 0, True, False

    def barrier(self):
        pass

    def all_true(self, flag):
        return bool(flag)

    def all_gather_object(self, obj):
        return [obj]



def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="tinyllama")
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the model's tensors (tests use a sliver)")
    p.add_argument("--work", default=str(ROOT / "bench/work/checkpoint"))
    p.add_argument("--out", default=str(ROOT / "bench/results/checkpoint-cpu.json"))
    args = p.parse_args()
    import torch.distributed.checkpoint as dcp

    from trainer.train import checkpoint as C

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    model, optim = state(args.shape, args.scale)
    nbytes = sum(t.numel() * t.element_size() for t in list(model.values()) + list(optim.values()))

    # The volume's limit: the same bytes, one sequential write, fsync.
    raw = work / "raw.bin"
    block = bytearray(os.urandom(64 << 20))
    started = time.perf_counter()
    with open(raw, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())
    raw_seconds = time.perf_counter() - started
    raw.unlink()

    # Our save: DCP with parallel writer threads, then the manifest's SHA-256 of every file.
    ckpt = C.Checkpointer(work / "checkpoints", 2, _Dist(), print)
    path = ckpt.root / "step-00000001"
    path.mkdir(parents=True)
    started = time.perf_counter()
    writer = dcp.FileSystemWriter(str(path), thread_count=C.io_threads())
    dcp.save({"model": model, "optim": optim}, storage_writer=writer)
    write_seconds = time.perf_counter() - started
    started = time.perf_counter()
    hashed = C.hash_files([path / n for n in C._files(path)])
    hash_seconds = time.perf_counter() - started
    C.fsync_write(path / C.MARKER, json.dumps({"step": 1, "files": hashed}).encode())
    del model, optim
    # Verification as a resume does it (the files may still be in the page cache, as after a save).
    started = time.perf_counter()
    problem = ckpt.problem(path)
    verify_seconds = time.perf_counter() - started
    assert problem is None, problem
    # Cold: as a resume on another node reads it, from the volume (page cache dropped, where allowed).
    cold = None
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        started = time.perf_counter()
        assert ckpt.problem(path) is None
        cold = time.perf_counter() - started
    except OSError:
        pass
    one = sha256_one = None
    if len(hashed) > 1:  # the same bytes hashed by one thread: what parallel hashing gains
        started = time.perf_counter()
        for n in hashed:
            C.sha256(path / n)
        one = time.perf_counter() - started
        sha256_one = round(one, 2)
    result = {
        "shape": args.shape, "bytes": nbytes, "files": len(hashed), "threads": C.io_threads(), "cpus": os.cpu_count(),
        "raw_write_seconds": round(raw_seconds, 2), "save_write_seconds": round(write_seconds, 2),
        "save_hash_seconds": round(hash_seconds, 2), "verify_seconds": round(verify_seconds, 2),
        "verify_one_thread_seconds": sha256_one, "verify_cold_seconds": round(cold, 2) if cold else None,
        "ratios": {"save_write_over_raw_write": round(write_seconds / raw_seconds, 3),
                   "save_hash_over_raw_write": round(hash_seconds / raw_seconds, 3),
                   "verify_over_raw_write": round(verify_seconds / raw_seconds, 3),
                   "verify_cold_over_raw_write": round(cold / raw_seconds, 3) if cold else None,
                   "parallel_hash_speedup": round(one / verify_seconds, 2) if one else None},
        "command": " ".join(["python", "bench/checkpoint.py"] + sys.argv[1:]),
    }
    shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    print(f"\n{nbytes / 1e9:.1f} GB: raw write {raw_seconds:.1f} s ({nbytes / raw_seconds / 1e9:.2f} GB/s); save "
          f"{write_seconds:.1f} s + SHA-256 {hash_seconds:.1f} s; verify {verify_seconds:.1f} s = "
          f"{verify_seconds / raw_seconds:.2f}x the raw write (target <= 1.5x)"
          + (f"; cold (page cache dropped) {cold:.1f} s = {cold / raw_seconds:.2f}x" if cold else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
