"""Where each rank ran and what it read there: ``FitResult.placement``, one ``RankPlacement`` per rank."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class RankPlacement:
    """One rank of a finished ``fit``: its node (the Ray node id on Ray, else the host name), the partitions it
    was given with ``locality=True`` (None otherwise), and, over a grid of several servers, the partitions it
    read rows of from a server on its own node and the rows it read on its node and across nodes (reads in
    its loader workers included)."""

    rank: int
    node: str
    partitions: tuple[int, ...] | None = None
    local_partitions: tuple[int, ...] = ()
    rows_local: int = 0
    rows_remote: int = 0


def node_id() -> str:
    """This process's node: its Ray node id inside Ray, else the host name."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        return ray.get_runtime_context().get_node_id()
    return socket.gethostname()


def here(rank: int, loader) -> RankPlacement:
    """This rank's record, from its loader (its locality share) and its dataset's read counts."""
    share = loader.share
    reads = loader.dataset.network_reads() or {}
    parts = reads.get("partitions", {})
    return RankPlacement(rank, node_id(), None if share is None else share.partitions[rank],
                         tuple(sorted(int(k) for k, (local, _) in parts.items() if local)),
                         int(reads.get("local", 0)), int(reads.get("remote", 0)))


def gather(rank: int, world: int, loader) -> list[RankPlacement]:
    """Every rank's record (every rank calls it: a collective when world > 1)."""
    mine = here(rank, loader)
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out
