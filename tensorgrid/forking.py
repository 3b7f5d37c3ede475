"""Whether a child forked from this process could hang before running a line of Python.

CPython up to 3.11.9 (and 3.12.0) re-creates the child's thread states in ``PyOS_AfterFork_Child`` under the
runtime's thread-state lock (HEAD_LOCK) *before* resetting that lock (CPython gh-112275). A native thread
that was creating a Python thread state at the moment of the fork (``PyGILState_Ensure`` or pybind11's
``gil_scoped_acquire`` in a thread that has none: this happens without the GIL, so holding the GIL while
forking does not exclude it) leaves the lock held in the child, which then waits for it forever. Seen in a
training rank: gloo's ``pt_gloo_runloop`` threads free each finished collective's tensors and thread-local
state through ``gil_scoped_acquire`` (a new thread state every time), so a DataLoader worker forked right
after an all-reduce hung in ``_PyThreadState_DeleteExcept`` and its rank waited for its batch forever.
gRPC's threads (a Flight client or server, Ray) are a hazard for their own locks as well.

Such a process starts its workers from a fork server instead: a fresh, single-threaded process that forks
them (``multiprocessing``'s "forkserver")."""

from __future__ import annotations

import os
import sys

# thread names (/proc/self/task/*/comm, 15 characters at most) of native threads that call into Python
# or hold locks a forked child needs; the name of what runs them
_THREADS = (("grpc", "gRPC"), ("event_engine", "gRPC"), ("lifeguard", "gRPC"),
            ("pt_gloo", "gloo"), ("gloo_", "gloo"), ("pt_nccl", "NCCL"))
# the module our local engine runs as each rank's __main__ (guarded: importing it runs nothing)
_RANK_MAIN = "tensorgrid.train.engines.worker"


def thread_names() -> list[str] | None:
    """The names of this process's threads; None when they cannot be read (not Linux)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # the thread ended meanwhile
            continue
    return names


def grpc_started() -> bool:
    """Whether gRPC's threads run in this process (some outlive a closed server); True when unknown."""
    names = thread_names()
    return names is None or any(n.startswith("grpc") or n in ("event_engine", "lifeguard") for n in names)


def hazard() -> str | None:
    """Why a child forked from this process now could hang (what runs threads that make fork unsafe), or
    None. A torch.distributed process group counts even before its threads are seen."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return f"a torch.distributed process group ({dist.get_backend()})"
    names = thread_names()
    if names is None:
        return None
    for name in names:
        for prefix, what in _THREADS:
            if name.startswith(prefix):
                return f"{what} threads ({name})"
    return None


def main_reimportable() -> bool:
    """Whether a worker started by a fork server (or spawned) can set up ``__main__`` without running the
    user's code again: ``multiprocessing`` re-runs a main script or module as ``__mp_main__`` in every such
    worker, which a flat script (no ``__main__`` guard) would turn into a second training. True for our
    engines' rank worker and for code with no file (``python -c``, a notebook)."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name == _RANK_MAIN
    return getattr(main, "__file__", None) is None
