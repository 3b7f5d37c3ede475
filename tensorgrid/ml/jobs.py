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
import time
import traceback
import warnings

import cloudpickle
from fsspec.implementations.memory import MemoryFileSystem

from .. import forking
from .. import fs as tgfs
from ..errors import TensorGridError, UnsupportedURLError, WorkerFailedError
from ..train import engines

TIMEOUT_S = 300.0  # how long the workers' rendezvous waits for a slow one
STALL_S = 60.0  # a forked worker none of whose threads or processes ran for this long is stuck (``Stalled``)
POLL_S = 5.0  # how often the parent looks, while no worker ends


class Stalled(WorkerFailedError):
    """A forked worker (with every process it started) has not run for ``STALL_S`` seconds: it waits for a lock
    that a thread of the parent held at the fork (a library's allocator or pool, mid-way) and that nobody in
    the child will ever release. ``forked_else_fresh`` then runs what is left in fresh interpreters."""


def pieces(todo: list[int], rank: int, world: int, take=None):
    """A worker's pieces: those ``take`` hands out (forked workers' one queue), else ``todo[rank::world]``."""
    return iter(take, None) if take else iter(todo[rank::world])


@contextlib.contextmanager
def errors_kept(fs, folder: str, rank: int, world: int, take=None):
    """Around a worker's pieces on an engine: its TensorGrid error is left in ``folder`` for the driver to
    raise as itself (``run``; the engines only say that a worker failed). A forked worker's comes back
    directly."""
    try:
        yield
    except TensorGridError as e:
        if world > 1 and take is None:
            tgfs.put_atomic(fs, tgfs.join(folder, f".error-{rank}"), pickle.dumps(e))
        raise


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
    work): on Linux, over fork-safe datasets, with neither Ray, gRPC (a Flight client or server, ever), a
    torch.distributed process group (its gloo threads: ``forking.hazard``) nor CUDA initialised here
    (forking their threads or contexts hangs or breaks the child), and one torch
    thread per child (as many workers as torch's threads here: a forked child whose parent ran OpenMP hangs
    in its first parallel region with more than one thread, measured; fresh interpreters use more)."""
    ray = sys.modules.get("ray")
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else 1
    return (sys.platform == "linux" and all(ds.fork_safe for ds in datasets) and workers >= threads
            and not (ray is not None and getattr(ray, "is_initialized", lambda: False)())
            and not _grpc_started()
            and forking.hazard() is None  # a process group's threads: forking.py
            and not (torch is not None and torch.cuda.is_initialized())
            and not os.path.exists("/dev/nvidiactl"))  # a GPU here: its workers' devices, not forked CPUs


def _grpc_started() -> bool:
    """Whether gRPC's threads run in this process (a Flight client or server, Ray; some outlive a closed
    server): a child forked while one holds a lock hangs. Read from the threads' names (/proc)."""
    return forking.grpc_started()


def forked(job, workers: int, order: list[int], folder: str, what: str, pieces: str,
           around=None) -> None:
    """``job`` on ``workers`` children forked from this process, one torch thread each (``can_fork``),
    taking pieces from one queue (a pipe) in ``order``. A child's exception comes back as itself (or as a
    ``WorkerFailedError`` with its traceback when it cannot be rebuilt here); a child killed by a signal,
    or Ctrl-C here, stops the others (the pieces done stay in ``folder``: a rerun resumes). Only our own
    children are waited for (a sentinel pipe each: other subprocesses of the caller keep their exit codes).
    ``around``: a context entered once the children run (a progress bar's thread must not be forked)."""
    import select

    read, write = os.pipe()
    errors = tempfile.mkdtemp(prefix="tensorgrid-job-")
    children: dict[int, tuple[int, int]] = {}  # sentinel's read end -> (pid, worker)

    def take():
        chunk = os.read(read, 4)
        return struct.unpack("<I", chunk)[0] if chunk else None

    # a child forked while the Arrow cache's background fill builds a file would inherit the filler's C-level
    # locks (Arrow's allocator, the IPC writer) and could hang: the fills of this process finish first
    from ..loader.cache import wait_filled

    wait_filled()
    try:
        _flush()
        for i in range(workers):
            sentinel, alive = os.pipe()  # EOF on the sentinel: the child has exited
            pid = os.fork()
            if pid == 0:
                _child(job, i, workers, take, (write, sentinel, *children), errors)  # never returns
            os.close(alive)
            children[sentinel] = (pid, i)
        os.close(read)
        read = None
        try:
            for start in range(0, len(order), 1024):  # a pipe holds 64 KiB: the children read while this writes
                os.write(write, b"".join(struct.pack("<I", k) for k in order[start:start + 1024]))
        except BrokenPipeError:  # every child has ended already: their statuses say why
            pass
        os.close(write)
        write = None
        with around or contextlib.nullcontext():
            idle: dict[int, tuple[int, float]] = {}  # pid -> (its tree's activity, since when unchanged)
            while children:
                ready, _, _ = select.select(list(children), [], [], POLL_S)
                if not ready:
                    _check_alive({pid: i for pid, i in children.values()}, idle, what)
                for sentinel in ready:
                    pid, i = children.pop(sentinel)
                    os.close(sentinel)
                    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                    if code:
                        _raise_for(i, code, errors, what, pieces, folder)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{what} interrupted: the {pieces} done are kept in {folder}: run it again to "
                                "resume") from None
    finally:
        for fd in (read, write):
            if fd is not None:
                os.close(fd)
        for sentinel, (pid, _) in children.items():
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
            os.close(sentinel)
        shutil.rmtree(errors, ignore_errors=True)


def forked_else_fresh(job, workers: int, order: list[int], folder: str, what: str, pieces: str, remaining,
                      around=None) -> None:
    """``forked``; should a child be stuck (``Stalled``: a lock held at the fork), the ``remaining()`` pieces
    (the job's ``todo`` then) on the local engine's fresh interpreters, with a warning saying why."""
    try:
        forked(job, workers, order, folder, what, pieces, around)
    except Stalled as e:
        warnings.warn(f"tensorgrid: {e}; the rest runs in fresh interpreters (slower to start)", RuntimeWarning,
                      stacklevel=3)
        job.todo = remaining()
        if job.todo:
            run(job, "local", min(workers, len(job.todo)), *tgfs.resolve(folder), what, pieces)


def _check_alive(pids: dict[int, int], idle: dict, what: str) -> None:
    """Raise ``Stalled`` for a child none of whose threads, nor of the processes it started (a DataLoader's
    workers), ran at all for ``STALL_S``: not a tick of CPU, not one wake-up. A worker at work computes, reads
    or at least sleeps and wakes; one blocked on a lock its parent's thread held at the fork never runs again."""
    now, activity = time.monotonic(), _tree_activity(set(pids))
    for pid, i in pids.items():
        seen = activity.get(pid)
        if seen is None:
            continue  # exiting: its sentinel says so next
        before, since = idle.get(pid, (None, now))
        if seen != before:
            idle[pid] = (seen, now)
        elif now - since >= STALL_S:
            raise Stalled(f"{what}: forked worker {i} has not run for {now - since:.0f} s (waiting for a lock a "
                          "thread of this process held when it was forked)")


def _tree_activity(roots: set[int]) -> dict[int, int]:
    """For each root pid: a number that grows whenever any thread of it or of a process under it runs (the
    scheduler's nanoseconds on CPU plus its count of time slices, /proc/<pid>/task/<tid>/schedstat; CPU ticks
    where the kernel keeps no schedstat)."""
    parent: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out = {}
    for root in roots & parent.keys():
        total, stack = 0, [root]
        while stack:
            pid = stack.pop()
            total += _activity(pid)
            stack.extend(children.get(pid, ()))
        out[root] = total
    return out


def _activity(pid: int) -> int:
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns, _, slices = f.read().split()[:3]
            total += int(ns) + int(slices)
        except FileNotFoundError:
            try:  # no schedstat in this kernel: CPU ticks (user + system)
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    total += sum(int(x) for x in f.read().rsplit(")", 1)[1].split()[11:13])
            except (OSError, IndexError, ValueError):
                pass
        except (OSError, ValueError):
            pass  # the thread ended meanwhile
    return total


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - None, a closed pipe, Ctrl-C: nothing to flush then
            pass


def _child(job, i: int, workers: int, take, close: tuple, errors: str):
    """A forked worker's whole life: it leaves through ``os._exit`` whatever happens (never back into the
    caller's code), its exception pickled for the parent (checked to load again, its traceback kept)."""
    code = 1
    try:
        _die_with_parent()
        for fd in close:  # the queue's write end, and the parent's ends of the sentinels
            os.close(fd)
        import torch

        torch.set_num_threads(1)
        job.run_rank(i, workers, take)
        code = 0
    except KeyboardInterrupt:
        code = 130
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        try:
            blob = pickle.dumps(e)
            pickle.loads(blob)  # an exception that pickles but cannot be rebuilt comes back as its text
        except Exception:  # noqa: BLE001
            blob = pickle.dumps(WorkerFailedError(f"{type(e).__name__}: {e}"))
        try:
            with open(os.path.join(errors, str(i)), "wb") as f:
                f.write(blob)
            with open(os.path.join(errors, f"{i}.txt"), "w") as f:
                f.write(traceback.format_exc())
        except BaseException:  # noqa: BLE001 - a full disk: the exit code still says it failed
            pass
    finally:
        _flush()
        os._exit(code)


def _die_with_parent() -> None:
    """SIGKILL this child when its parent dies (Linux's PR_SET_PDEATHSIG), rather than work through the rest
    of the queue for nobody."""
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # died before the call
        os._exit(1)


def _raise_for(i: int, code: int, errors: str, what: str, pieces: str, folder: str):
    kept = f"the {pieces} it finished are kept in {folder}: run it again to resume"
    path = os.path.join(errors, str(i))
    if os.path.exists(path):
        try:
            with open(path, "rb") as f:
                error = pickle.load(f)
        except Exception:  # noqa: BLE001
            error = None
        if isinstance(error, BaseException):
            try:
                with open(path + ".txt") as f:
                    error.__cause__ = _RemoteTraceback(f.read())
            except OSError:
                pass
            raise error
    if code == 130:
        raise KeyboardInterrupt
    if code < 0:
        raise WorkerFailedError(f"{what}: worker {i} was killed by {signal.Signals(-code).name}; {kept}")
    raise WorkerFailedError(f"{what}: worker {i} exited with code {code}; {kept}")


class _RemoteTraceback(Exception):
    """The traceback of a forked worker's exception, shown as its cause."""

    def __str__(self) -> str:
        return "\n\n(in the worker)\n" + self.args[0]
