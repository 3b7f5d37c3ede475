"""Keep glibc's malloc from handing tensor memory back to the kernel after every step.

By default glibc serves blocks above 128 KiB (a dynamic threshold) with fresh ``mmap`` calls and trims
the heap top as soon as 128 KiB are free, so a CPU training step that allocates and frees the same
activations every step pays page faults for all of them, every step. Measured here on a small CNN
(benchmarks/bench_train.py): 29 k samples/s with the defaults, 47 k with the thresholds below. The usual
remedy for PyTorch on CPU is to preload jemalloc or tcmalloc; raising the two glibc thresholds gets the
same effect without a dependency. Inference does the same (``tg.predict``, ``NNModel.transform``, in the
caller and in its workers): scoring in parts, 200k digits through a small CNN in a fresh process faulted
1.2 M pages a pass (2-3 s of system time, +20-40% over the in-memory pass, whose one large free happened to
raise glibc's dynamic threshold: benchmarks/bench_ml.py). Training and inference processes keep up to ``TRIM_BYTES`` of freed memory for reuse.
A grid client (``tg.connect``) does the same: gRPC receives every message into fresh glibc memory, and a
process whose freed buffers went back to the kernel faulted ~300 pages per MiB on each read (bench_grid.py:
a second 1 GiB read 0.56 -> 1.5-2.1 GB/s with the thresholds raised).

Users who set ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``glibc.malloc.*`` tunables
themselves (or preload another allocator) are left alone, as is every platform without glibc. With
``workers=1`` training (and ``tg.connect``) runs in the caller's process, so the setting stays for the rest of it.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_BYTES = 32 << 20  # glibc's largest allowed threshold on 64-bit
TRIM_BYTES = 256 << 20

_done = False


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (once). True when they were set."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ \
            or "MALLOC_TRIM_THRESHOLD_" in os.environ or "LD_PRELOAD" in os.environ \
            or "malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc's, already loaded in this process
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = bool(mallopt(M_MMAP_THRESHOLD, MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_BYTES))
    return _done
