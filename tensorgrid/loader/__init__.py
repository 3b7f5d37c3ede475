"""The loader: stream any Dataset into PyTorch, partitioned exactly once, shuffled, resumable.

``Loader`` (and with it torch) loads on first use: the cache commands and the store never import torch."""

from ..errors import CacheRebuiltWarning
from .plan import Layout, Plan

__all__ = ["Loader", "Plan", "Layout", "CacheRebuiltWarning"]


def __getattr__(name: str):
    if name == "Loader":
        from .stream import Loader

        return Loader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
