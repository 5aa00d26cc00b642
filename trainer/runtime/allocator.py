"""The C allocator of a training process: glibc malloc's mmap threshold, fixed.

glibc serves a block of at least M_MMAP_THRESHOLD bytes from a mapping of its own, returned to the kernel
when freed, and anything smaller from its heap. By default the threshold is dynamic: it rises to the size
of each mapped block freed, up to 32 MiB, so after the first large tensor is freed every tensor below
32 MiB is carved from the heap. A training process interleaves long-lived blocks (a QLoRA base's packed
weights, the adapters, the optimizer's state) with short-lived ones (tensors read while loading,
activations): the short-lived ones leave holes between the long-lived ones that malloc keeps and the
kernel still counts. Measured on the 7B preset's shape with QLoRA (bench/memtrace.py, bench/README.md):
1.0 GiB held free after loading and 2.1 GiB during the steps (peak RSS 7.45 GiB against 5.3 GiB
allocated); at 13B the same grew to 2.3 GiB more than the memory plan, which does not count the allocator.
A fixed threshold (mallopt, which also turns the dynamic one off) keeps every block of MMAP_THRESHOLD
bytes or more in its own mapping: what a process holds is what it has allocated.

Left alone where the user set the threshold (MALLOC_MMAP_THRESHOLD_ or glibc.malloc.mmap_threshold in
GLIBC_TUNABLES) or another allocator is preloaded (jemalloc, tcmalloc: LD_PRELOAD, e.g. the CPU image's
intelRuntime option), and on a C library other than glibc. Written by hand: Python and torch expose no
setting for it (ctypes calls glibc's mallopt).
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Mapping, Optional

MMAP_THRESHOLD = 1 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")
_done: Optional[str] = None


def configure() -> str:
    """Fix glibc's mmap threshold for this process (once) and say what the allocator is."""
    global _done
    if _done is None:
        _done = _configure(os.environ)
    return _done


def _configure(env: Mapping[str, str]) -> str:
    preloaded = next((name for name in _PRELOADED if name in env.get("LD_PRELOAD", "")), None)
    if preloaded:
        return f"allocator: {preloaded} (LD_PRELOAD), left as configured"
    if platform.libc_ver()[0] != "glibc":
        return "allocator: not glibc's malloc, left as it is"
    if "MALLOC_MMAP_THRESHOLD_" in env or "mmap_threshold" in env.get("GLIBC_TUNABLES", ""):
        return "allocator: glibc malloc, its mmap threshold as set in the environment"
    try:
        ok = ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        ok = 0
    if not ok:
        return "allocator: glibc malloc, its mmap threshold could not be set (dynamic: freed memory may be held)"
    return (
        f"allocator: glibc malloc, blocks of {MMAP_THRESHOLD >> 20} MiB and more in mappings of their own "
        "(M_MMAP_THRESHOLD fixed: freed memory goes back to the kernel)"
    )
