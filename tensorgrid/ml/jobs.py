"""Jobs of many independent pieces (inference parts, learning-curve runs) on the Trainer's engines, or on
children forked from this process: each worker runs ``job.run_rank(rank, world, take=None)`` and writes its
pieces whole into a shared folder, so a rerun does only what is missing. A worker's TensorGrid error is
kept in that folder and raised in the driver as itself (the engines themselves only say that a worker
failed); a forked child's error comes back directly.

``job.run_rank`` does ``todo[rank::world]``, or, given ``take``, the pieces ``take()`` hands out until it
returns None (forked children share one queue: a slow piece does not hold up the others)."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import struct
import sys
import tempfile

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


def can_fork(workers: int, *datasets) -> bool:
    """Whether ``workers`` can be children forked from this process (they start in milliseconds with torch,
    the model and the data already loaded; nothing of ``__main__`` runs again, so flat scripts and notebooks
    work): on Linux, over fork-safe datasets, with neither Ray, gRPC (a Flight client or server, ever) nor
    CUDA initialised here (forking their threads or contexts hangs or breaks the child), and one torch
    thread per child (as many workers as torch's threads here: a forked child whose parent ran OpenMP hangs
    in its first parallel region with more than one thread, measured; fresh interpreters use more)."""
    ray = sys.modules.get("ray")
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else 1
    return (sys.platform == "linux" and all(ds.fork_safe for ds in datasets) and workers >= threads
            and not (ray is not None and getattr(ray, "is_initialized", lambda: False)())
            and not _grpc_started()
            and not (torch is not None and torch.cuda.is_initialized()))


def _grpc_started() -> bool:
    """Whether gRPC's threads run in this process (a Flight client or server, Ray): they stay once it ran,
    and a child forked while one holds a lock hangs. Read from the threads' names (/proc)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return True  # cannot tell: do not fork
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("grpc") or name in ("event_engine", "lifeguard"):
            return True
    return False


def forked(job, workers: int, order: list[int], folder: str, what: str, pieces: str,
           around=None) -> None:
    """``job`` on ``workers`` children forked from this process, one torch thread each (``can_fork``),
    taking pieces from one queue (a pipe) in ``order``. A child's exception comes back as itself; a child
    killed by a signal, or Ctrl-C here, stops the others (the pieces done stay in ``folder``: a rerun
    resumes). ``around``: a context entered once the children run (a progress bar's thread must not be
    forked)."""
    import torch

    read, write = os.pipe()
    errors = tempfile.mkdtemp(prefix="tensorgrid-job-")
    children: dict[int, int] = {}

    def take():
        chunk = os.read(read, 4)
        return struct.unpack("<I", chunk)[0] if chunk else None

    try:
        sys.stdout.flush(), sys.stderr.flush()
        for i in range(workers):
            pid = os.fork()
            if pid == 0:  # the child: never returns
                os.close(write)
                code = 0
                try:
                    torch.set_num_threads(1)
                    job.run_rank(i, workers, take)
                except KeyboardInterrupt:
                    code = 130
                except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
                    code = 1
                    try:
                        blob = pickle.dumps(e)
                    except Exception:  # noqa: BLE001 - an unpicklable exception comes back as its text
                        blob = pickle.dumps(RuntimeError(f"{type(e).__name__}: {e}"))
                    with open(os.path.join(errors, str(i)), "wb") as f:
                        f.write(blob)
                finally:
                    sys.stdout.flush(), sys.stderr.flush()
                    os._exit(code)
            children[pid] = i
        os.close(read)
        try:
            for start in range(0, len(order), 1024):  # a pipe holds 64 KiB: the children read while this writes
                os.write(write, b"".join(struct.pack("<I", k) for k in order[start:start + 1024]))
        except BrokenPipeError:  # every child has ended already: their statuses say why
            pass
        os.close(write)
        write = None
        with around or contextlib.nullcontext():
            while children:
                pid, status = os.wait()
                i = children.pop(pid, None)
                code = os.waitstatus_to_exitcode(status)
                if i is None or code == 0:
                    continue
                path = os.path.join(errors, str(i))
                if os.path.exists(path):
                    with open(path, "rb") as f:
                        raise pickle.load(f)
                if code == 130:
                    raise KeyboardInterrupt
                raise WorkerFailedError(f"{what}: worker {i} was killed by {signal.Signals(-code).name}; the "
                                        f"{pieces} it finished are kept in {folder}: run it again to resume")
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{what} interrupted: the {pieces} done are kept in {folder}: run it again to "
                                "resume") from None
    finally:
        if write is not None:
            os.close(write)
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        shutil.rmtree(errors, ignore_errors=True)
