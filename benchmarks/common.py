"""Shared helpers for benchmark scripts: ceilings measured in the same run, timing, tables."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time

import numpy as np

DATA = os.environ.get("TG_BENCH_DATA", os.path.join(os.path.dirname(os.path.abspath(__file__)), "_data"))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Python {platform.python_version()}"


def median_time(fn, repeat: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memcpy_gbs(nbytes: int = 1 << 30) -> float:
    """numpy memcpy between two already-touched buffers: the machine's copy ceiling."""
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    return nbytes / median_time(lambda: np.copyto(dst, src), repeat=5) / 1e9


def drop_caches() -> bool:
    """Drop the page cache (root only); False if this sandbox does not allow it."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def table(rows: list[tuple], header: tuple) -> str:
    cells = [tuple(str(c) for c in r) for r in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *map(fmt, cells[1:])])


def disk_write_gbs(path: str, nbytes: int = 1 << 30) -> float:
    """The disk's durable write ceiling: write ``nbytes`` and fsync (what dd conv=fdatasync measures)."""
    buf = np.ones(nbytes, dtype=np.uint8)

    def once():
        with open(path, "wb") as f:
            f.write(memoryview(buf))
            f.flush()
            os.fsync(f.fileno())
        os.unlink(path)

    return nbytes / 1e9 / median_time(once, repeat=3, warmup=0)
