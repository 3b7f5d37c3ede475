"""Seeding torch, numpy and Python's random together, from a tuple of keys."""

from __future__ import annotations

import contextlib
import random
import threading

import numpy as np
import torch


def seed_all(*keys: int) -> None:
    """Seed the three global generators from ``keys`` (e.g. seed, epoch, rank, batch): each tuple gets its
    own independent stream (numpy's SeedSequence mixes the keys)."""
    s = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


_batch = threading.local()


@contextlib.contextmanager
def batch_keys(*keys: int):
    """Inside: ``generator()`` gives streams that depend on ``keys`` only (the loader passes seed, epoch,
    rank and the batch's number), so a random transform draws the same for any number of workers, in the
    main process or not, and after a resume."""
    saved = getattr(_batch, "state", None)
    _batch.state = [keys, 0]
    try:
        yield
    finally:
        _batch.state = saved


def generator() -> torch.Generator | None:
    """A generator for one random transform of the current batch (each call in a batch gets its own stream,
    in call order); None outside ``batch_keys``: draw from torch's global generator."""
    state = getattr(_batch, "state", None)
    if state is None:
        return None
    keys, calls = state
    state[1] += 1
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([k & 0xFFFFFFFF for k in (*keys, calls)]).generate_state(1)[0]))
    return g
