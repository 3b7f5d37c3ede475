"""Module-level functions so spawned workers can unpickle them."""

import os
import signal

import torch


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
