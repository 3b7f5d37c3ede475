"""Jobs of many independent pieces (inference parts, learning-curve runs) on the Trainer's engines: each
worker runs ``job.run_rank(rank, world)`` and writes its pieces whole into a shared folder, so a rerun does
only what is missing. A worker's TensorGrid error is kept in that folder and raised in the driver as itself
(the engines themselves only say that a worker failed)."""

from __future__ import annotations

import pickle

import cloudpickle
from fsspec.implementations.memory import MemoryFileSystem

from .. import fs as tgfs
from ..errors import TensorGridError, UnsupportedURLError, WorkerFailedError
from ..train import engines

TIMEOUT_S = 300.0  # how long the workers' rendezvous waits for a slow one


def keep_error(fs, folder: str, rank: int, error: TensorGridError) -> None:
    """In a worker: leave ``error`` for the driver to raise (``run``)."""
    tgfs.put_atomic(fs, tgfs.join(folder, f".error-{rank}"), pickle.dumps(error))


def run(job, engine: str, workers: int, fs, folder: str, what: str, pieces: str) -> None:
    """``job`` on ``workers`` of ``engine``; an error a worker kept in ``folder`` is raised as itself, else a
    ``WorkerFailedError`` saying that the ``pieces`` done are kept."""
    try:
        engines.get(engine)(cloudpickle.dumps(job), workers, 0, TIMEOUT_S, None)
    except WorkerFailedError as e:
        for path in sorted(fs.glob(tgfs.join(folder, ".error-*"))):
            try:
                error = pickle.loads(fs.cat_file(path))
            except Exception:  # noqa: BLE001 - unreadable: the engine's own error says enough
                continue
            finally:
                fs.rm_file(path)
            raise error from None
        raise WorkerFailedError(f"{what}: {str(e).split(' (last checkpoint')[0].split(' (no checkpoint')[0]}; "
                                f"the {pieces} done are kept: run it again") from None


def check_reachable(url: str, engine: str, workers: int, what: str) -> None:
    """Refuse a folder the workers cannot write to: memory:// lives in one process; a path on this machine
    suits local processes and clusters on this machine only."""
    if engine == "local" and workers == 1:
        return
    fs, _ = tgfs.resolve(url)
    if isinstance(fs, MemoryFileSystem):
        raise UnsupportedURLError(f"{what} is {url!r}: memory:// lives inside one process and the {workers} workers "
                                  "run in others; give a path or a URL they can all reach")
    if not tgfs.is_local(fs):
        return
    if engine == "spark":
        from pyspark.sql import SparkSession

        from ..store.spark import master_of, require_shared

        session = SparkSession.getActiveSession()
        if session is not None:  # none: the engine starts a local one
            require_shared(url, master_of(session), what)
    elif engine == "ray":
        import ray

        if ray.is_initialized():
            here = ray.util.get_node_ip_address()
            hosts = {n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}
            if hosts - {here}:
                raise UnsupportedURLError(f"{what} is {url!r}, a path on this machine, but the Ray cluster has "
                                          f"nodes on {sorted(hosts - {here})}: give a URL every node can reach")
