"""This process's share of the machine's cores, and one thread pool per process to use it.

Pillow's decoders release the GIL, so a batch of images split over threads decodes on several cores. A
process gets the cores it may run on (its CPU affinity, e.g. a container's limit) divided by the training
processes on this machine (``LOCAL_WORLD_SIZE``) and, inside a DataLoader worker, by that loader's
workers: several processes never oversubscribe the machine between them.
"""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def share() -> int:
    """Threads this process should use for work split over cores."""
    from torch.utils.data import get_worker_info

    info = get_worker_info()
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) * (info.num_workers if info is not None else 1)
    return max(1, available_cores() // procs)


def pool() -> ThreadPoolExecutor:
    return _pool(os.getpid())


@functools.lru_cache(maxsize=1)
def _pool(pid: int) -> ThreadPoolExecutor:  # per process: a forked child must not use its parent's threads
    return ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="tensorgrid")


def run_split(fn, n: int, parts: int) -> None:
    """``fn(lo, hi)`` over ``parts`` consecutive ranges covering [0, n), on this process's pool (here when
    one part); exceptions propagate."""
    if parts <= 1:
        fn(0, n)
        return
    bounds = np.linspace(0, n, parts + 1).astype(int)
    for f in [pool().submit(fn, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]:
        f.result()
