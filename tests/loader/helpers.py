"""Shared helpers of the loader tests: a small dataset maker, and module-level transforms that spawned
workers can unpickle."""

import os
import signal

import numpy as np
import pandas as pd
import torch

import tensorgrid as tg


def make(url, n=1000, shard_rows=137, dim=4):
    """A dataset of ``n`` rows: id, a float vector x of ``dim``, a name."""
    df = pd.DataFrame({"id": np.arange(n, dtype=np.int64),
                       "x": list(np.arange(n * dim, dtype=np.float32).reshape(n, dim)),
                       "name": [f"r{i}" for i in range(n)]})
    return tg.write(url, df, mode="overwrite", shard_rows=shard_rows)


def ids(loader):
    return [b["id"].tolist() for b in loader]


def add_pid(batch):
    batch["pid"] = torch.full((len(batch["id"]),), os.getpid())
    return batch


def fail_on_id_13(batch):
    if (batch["id"] == 13).any():
        raise ValueError("unlucky row")
    return batch


def die_on_id_13(batch):
    if (batch["id"] == 13).any():
        os.kill(os.getpid(), signal.SIGKILL)
    return batch


def add_noise(batch):  # a random augmentation
    batch["x"] = batch["x"] + torch.rand(batch["x"].shape)
    return batch


def add_cache_checks(batch):
    """How many Arrow cache files this (worker) process has hashed so far, as a column."""
    from tensorgrid.loader import source

    batch["checks"] = torch.full((len(batch["id"]),), source.checks["files"])
    return batch
