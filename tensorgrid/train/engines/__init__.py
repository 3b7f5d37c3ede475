"""Engines start ``workers`` processes that each run ``loop.train(spec, rank, world)``; one interface:
``run(spec_bytes, workers, max_restarts, timeout_s) -> rank 0's result``."""

from __future__ import annotations

ENGINES = ("local", "ray", "spark")


def get(name: str):
    if name == "local":
        from . import local

        return local.run
    if name == "ray":
        from . import ray

        return ray.run
    if name == "spark":
        from . import spark

        return spark.run
    from ...errors import TrainingConfigError

    raise TrainingConfigError(f"engine must be one of {ENGINES}, got {name!r}")
