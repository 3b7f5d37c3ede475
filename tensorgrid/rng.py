"""Seeding torch, numpy and Python's random together, from a tuple of keys."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_all(*keys: int) -> None:
    """Seed the three global generators from ``keys`` (e.g. seed, epoch, rank, batch): each tuple gets its
    own independent stream (numpy's SeedSequence mixes the keys)."""
    s = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)
