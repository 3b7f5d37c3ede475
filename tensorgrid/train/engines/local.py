"""The embedded engine: ``workers`` processes on this machine through PyTorch's own elastic launcher
(c10d rendezvous on loopback, gloo on CPU / nccl on CUDA). A dead worker stops the group (the launcher
kills the survivors: no hang); with ``max_restarts`` a new group resumes from the last checkpoint.

Each worker is a fresh interpreter running ``python -m tensorgrid.train.engines.worker`` (worker.py), never a
multiprocessing child: the user's ``__main__`` is not run again, so flat scripts, piped scripts and notebooks
train as guarded scripts do; the job goes by value in a private file."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import uuid

import cloudpickle

from ...errors import WorkerFailedError
from .. import checkpoint as ckpt
from ..watch import Watch
from .worker import write_job


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(payload: bytes, workers: int, max_restarts: int, timeout_s: float, checkpoint_dir: str | None):
    """Launch the group; on a failure, launch a fresh group (new rendezvous, new store: nothing stale from
    the dead one) that resumes from the newest checkpoint, up to ``max_restarts`` times."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: keep every socket on loopback
    folder = tempfile.mkdtemp(prefix="tensorgrid-job-")  # private (0700): the job may hold the user's data
    try:
        job, result = os.path.join(folder, "job"), os.path.join(folder, "result")
        write_job(job, payload)
        attempt = 0
        while True:
            if os.path.exists(result):  # an earlier attempt's: never taken for this one's
                os.remove(result)
            try:
                failure, watch = _launch(job, result, workers, timeout_s, attempt > 0)
            except KeyboardInterrupt:  # one line, not every worker's traceback
                raise KeyboardInterrupt(f"training interrupted: the {workers} workers were stopped "
                                        f"({_where(ckpt.latest(checkpoint_dir))})") from None
            if failure is None and os.path.exists(result):
                with open(result, "rb") as f:
                    return cloudpickle.load(f)
            if attempt < max_restarts:
                attempt += 1
                continue
            died = {rank: _how(f) for rank, f in failure.failures.items()} if failure is not None else {}
            raise _failed(failure, ckpt.latest(checkpoint_dir), watch.culprit(timeout_s, died)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _launch(job: str, result: str, workers: int, timeout_s: float, restarted: bool):
    """One group of ``workers`` processes until they all end: (the launcher's failure or None, the watch).
    Ctrl-C stops the group and raises ``KeyboardInterrupt`` with one line (not every worker's traceback)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                          rdzv_configs={"timeout": int(timeout_s)}, max_restarts=0, monitor_interval=0.2)
    watch = Watch()  # each rank reports its progress, error or end: the one that stopped first is named
    args = ("-m", "tensorgrid.train.engines.worker", job, result, "1" if restarted else "0", watch.address)
    try:
        with _quiet_launcher():
            elastic_launch(config, sys.executable)(*args)
        return None, watch
    except ChildFailedError as e:
        return e, watch
    except (KeyboardInterrupt, SignalException) as e:
        if getattr(e, "sigval", signal.SIGINT) == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise
    finally:
        watch.close()


@contextlib.contextmanager
def _quiet_launcher():
    """The launcher logs every failure at length (its own traceback and each worker's); TensorGrid reports
    the one that matters in the WorkerFailedError instead."""
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher"))]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _failed(e, last: str | None, culprit: tuple[int, str] | None = None) -> WorkerFailedError:
    """The error that names the worker at fault: the rank that stopped first (``culprit``: hung or exited
    early, its peers failing after it), else the ranks the launcher saw fail."""
    failures = dict(e.failures) if e is not None else {}
    if culprit is not None:
        parts = [culprit[1]]
    elif not failures:
        parts = ["worker rank 0 exited before the end of training without an error or a result"]
    else:
        parts = [_death(rank, f) for rank, f in sorted(failures.items())]
    return WorkerFailedError("; ".join(parts) + f" ({_where(last)})", checkpoint=last)


def _where(last: str | None) -> str:
    return f"last checkpoint: {last}; fit(resume=True) continues from it" if last else "no checkpoint was written"


def _death(rank: int, f) -> str:
    text = f"worker rank {rank} (pid {f.pid}) died with {_how(f)}"
    msg = f.message.get("message") if isinstance(f.message, dict) else f.message
    return text + (f": {str(msg).strip().splitlines()[-1]}" if msg and f.exitcode > 0 else "")


def _how(f) -> str:
    if f.exitcode >= 0:
        return f"exit code {f.exitcode}"
    try:
        return f"signal {signal.Signals(-f.exitcode).name}"
    except ValueError:
        return f"signal {-f.exitcode}"
