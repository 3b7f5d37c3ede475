"""The embedded engine: ``workers`` processes on this machine through PyTorch's own elastic launcher
(c10d rendezvous on loopback, gloo on CPU / nccl on CUDA). A dead worker stops the group (the launcher
kills the survivors: no hang); with ``max_restarts`` a new group resumes from the last checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import uuid

import cloudpickle

from ...errors import WorkerFailedError
from .. import checkpoint as ckpt
from ..watch import Watch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(payload: bytes, restarted: bool = False, watch_address: str | None = None):
    """Runs in each worker process (module level: spawn imports it by name)."""
    from ..loop import train
    from ..watch import Reporter

    rank = int(os.environ["RANK"])
    report = Reporter(watch_address, rank) if watch_address else None
    spec = cloudpickle.loads(payload)
    return train(spec, rank, int(os.environ["WORLD_SIZE"]), restarted=restarted, report=report)


def run(payload: bytes, workers: int, max_restarts: int, timeout_s: float, checkpoint_dir: str | None):
    """Launch the group; on a failure, launch a fresh group (new rendezvous, new store: nothing stale from
    the dead one) that resumes from the newest checkpoint, up to ``max_restarts`` times."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one machine: keep every socket on loopback
    attempt = 0
    while True:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=workers, run_id=uuid.uuid4().hex,
                              rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}",
                              rdzv_configs={"timeout": int(timeout_s)}, max_restarts=0,
                              monitor_interval=0.2, start_method="spawn")
        watch = Watch()  # each rank reports its progress, error or end: the one that stopped first is named
        try:
            out = elastic_launch(config, entry)(payload, attempt > 0, watch.address)[0]
            if out is not None:
                return out
            failure = None  # every rank exited 0, rank 0 without its result
        except ChildFailedError as e:
            failure = e
        finally:
            watch.close()
        if attempt < max_restarts:
            attempt += 1
            continue
        died = {rank: _how(f) for rank, f in failure.failures.items()} if failure is not None else {}
        raise _failed(failure, ckpt.latest(checkpoint_dir), watch.culprit(timeout_s, died)) from None


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
    where = f"last checkpoint: {last}; fit(resume=True) continues from it" if last else "no checkpoint was written"
    return WorkerFailedError("; ".join(parts) + f" ({where})", checkpoint=last)


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
