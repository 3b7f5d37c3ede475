"""The loader: stream any Dataset into PyTorch, partitioned exactly once, shuffled, resumable."""

from .plan import Layout, Plan
from .source import CacheRebuiltWarning
from .stream import Loader

__all__ = ["Loader", "Plan", "Layout", "CacheRebuiltWarning"]
