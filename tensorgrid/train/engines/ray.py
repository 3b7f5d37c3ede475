"""Ray engine: one actor per worker (spread across nodes), torch.distributed between them (rendezvous at
rank 0's node). A dead actor stops the group: the others are killed (no hang), then the group restarts from
the last checkpoint (``max_restarts``) or ``WorkerFailedError`` is raised."""

from __future__ import annotations

import os
import socket

from ...errors import TrainingConfigError, WorkerFailedError
from .. import checkpoint as ckpt


class _Worker:
    def address(self) -> tuple[str, int]:
        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind(("", 0))
            return ip, s.getsockname()[1]

    def train(self, payload: bytes, rank: int, world: int, addr: str, port: int, restarted: bool):
        import cloudpickle

        from ..loop import train

        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
                           "MASTER_ADDR": addr, "MASTER_PORT": str(port)})
        return train(cloudpickle.loads(payload), rank, world, restarted=restarted)


def run(payload: bytes, workers: int, max_restarts: int, timeout_s: float, checkpoint_dir: str | None,
        address: str | None = None, num_cpus_per_worker: float = 1, nodes: list[str] | None = None,
        **init_options):
    """``nodes``: the Ray node id to run each rank on (``locality=True`` over a grid on Ray gives them: each
    rank beside its partitions); a node that is gone or cannot fit a rank leaves it to Ray's choice."""
    try:
        import ray
    except ImportError:
        raise TrainingConfigError("engine='ray' needs Ray: pip install 'tensorgrid[ray]'") from None
    _check_init_options(ray, init_options)
    if not ray.is_initialized():
        opts = {"include_dashboard": False, "log_to_driver": True, **init_options}
        if address is None:
            opts.setdefault("_node_ip_address", "127.0.0.1")
        ray.init(address=address, **opts)
    if nodes is not None and len(nodes) != workers:
        raise TrainingConfigError(f"engine_options nodes: one Ray node id per worker ({workers}), got {len(nodes)}")
    remote = ray.remote(num_cpus=num_cpus_per_worker, scheduling_strategy="SPREAD")(_Worker)
    attempt = 0
    while True:
        actors = [remote.remote() if nodes is None else remote.options(scheduling_strategy=_on_node(nodes[r])).remote()
                  for r in range(workers)]
        failed = None
        try:
            addr, port = ray.get(actors[0].address.remote(), timeout=timeout_s)
            futures = [a.train.remote(payload, r, workers, addr, port, attempt > 0) for r, a in enumerate(actors)]
            pending = list(futures)
            while pending:  # fail fast: the first error stops everyone
                done, pending = ray.wait(pending, num_returns=1)
                failed = futures.index(done[0])
                ray.get(done)
            return ray.get(futures[0])
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.GetTimeoutError) as e:
            for a in actors:
                ray.kill(a, no_restart=True)
            if attempt < max_restarts:
                attempt += 1
                continue
            last = ckpt.latest(checkpoint_dir)
            where = f"last checkpoint: {last}; fit(resume=True) continues from it" if last else "no checkpoint was written"
            who = f"worker {failed}" if isinstance(e, ray.exceptions.RayError) and failed is not None else "a worker"
            raise WorkerFailedError(f"Ray training {who} failed: {_cause(e)} ({where})", checkpoint=last) from None
        finally:
            for a in actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass


def _on_node(node: str):
    """Run on ``node`` when it is alive and can fit the rank (waiting for its resources), else where Ray likes."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node_id=node, soft=True)


def _check_init_options(ray, options: dict) -> None:
    """Options beyond address and num_cpus_per_worker go to ``ray.init``: refuse a name it does not take
    here, before anything starts (ray.init would raise a TypeError, or ignore it when Ray is running)."""
    import inspect

    params = inspect.signature(ray.init).parameters
    accepted = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "address"]
    unknown = [k for k in options if k not in accepted and not k.startswith("_")]  # ray.init takes _private ones
    if unknown:
        raise TrainingConfigError(f"engine_options: engine='ray' has no option {unknown[0]!r}; it accepts address, "
                                  f"num_cpus_per_worker and ray.init's options: {', '.join(accepted)}")


def _cause(e: Exception) -> str:
    """The user's own exception inside a Ray error (its type and message), without Ray's colour codes."""
    import re

    cause = getattr(e, "cause", None)
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(e)
    text = re.sub(r"\x1b\[[0-9;]*m", "", text).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]
