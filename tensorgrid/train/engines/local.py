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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entry(payload: bytes, restarted: bool = False):
    """Runs in each worker process (module level: spawn imports it by name)."""
    from ..loop import train

    spec = cloudpickle.loads(payload)
    return train(spec, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), restarted=restarted)


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
        try:
            return elastic_launch(config, entry)(payload, attempt > 0)[0]
        except ChildFailedError as e:
            if attempt < max_restarts:
                attempt += 1
                continue
            raise _failed(e, ckpt.latest(checkpoint_dir)) from None


def _failed(e, last: str | None) -> WorkerFailedError:
    parts = []
    for rank, f in sorted(e.failures.items()):
        how = f"signal {signal.Signals(-f.exitcode).name}" if f.exitcode < 0 else f"exit code {f.exitcode}"
        parts.append(f"worker rank {rank} (pid {f.pid}) died with {how}")
        msg = f.message.get("message") if isinstance(f.message, dict) else f.message
        if msg and f.exitcode > 0:
            parts[-1] += f": {str(msg).strip().splitlines()[-1]}"
    where = f"last checkpoint: {last}; fit(resume=True) continues from it" if last else "no checkpoint was written"
    return WorkerFailedError("; ".join(parts) + f" ({where})", checkpoint=last)
