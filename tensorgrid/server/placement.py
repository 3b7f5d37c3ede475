"""Where a grid's partitions live: rendezvous (highest-random-weight) hashing, a pure function.

Every client and server computes the same answer from (dataset, partition, members, replicas) alone: no
directory to keep, nothing to agree on. Each member scores a partition with a 64-bit hash of (member,
dataset, partition); the ``replicas`` highest scores hold it, the highest first (the replica a reader tries
first). Removing a member moves only the partitions it held (each to the member with the next score);
adding one moves to it only the partitions it now scores highest on, about 1/n of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import xxhash

from ..args import check_int
from ..errors import ArgumentError


def score(member: str, dataset: str, partition: int) -> int:
    return xxhash.xxh3_64_intdigest(f"{member}\x00{dataset.lower()}\x00{partition}".encode())


def replicas_of(dataset: str, partition: int, members: Sequence[str], replicas: int) -> list[str]:
    """The members holding ``partition`` of ``dataset``, best first: ``min(replicas, len(members))`` of them."""
    replicas = check_int("replicas", replicas, 1)
    if not members:
        raise ArgumentError("a grid needs at least one server")
    if len(set(members)) != len(members):
        raise ArgumentError(f"a grid's servers must be distinct, got {list(members)}")
    ranked = sorted(members, key=lambda m: score(m, dataset, partition), reverse=True)
    return ranked[:replicas]


def assignment(dataset: str, partitions: int, members: Sequence[str], replicas: int) -> dict[str, list[int]]:
    """For each member, the partitions of ``dataset`` it holds (sorted)."""
    held: dict[str, list[int]] = {m: [] for m in members}
    for k in range(partitions):
        for m in replicas_of(dataset, k, members, replicas):
            held[m].append(k)
    return held


def rank_nodes(members: Sequence[str], member_nodes: Mapping[str, str], world_size: int) -> list[str]:
    """The node each of ``world_size`` ranks should run on to read locally (``locality=True``): rank r beside
    member r mod n, so ranks spread over the members' nodes as evenly as the members do."""
    world_size = check_int("world_size", world_size, 1)
    return [member_nodes[members[r % len(members)]] for r in range(world_size)]


def rank_partitions(dataset: str, partition_rows: Sequence[int], members: Sequence[str], replicas: int,
                    member_nodes: Mapping[str, str], world_size: int) -> list[list[int]]:
    """Which partitions each rank reads with ``locality=True``: every partition exactly once, to a rank on a
    node holding one of its replicas when there is one (else to any rank: read across nodes), balancing
    rows: partitions with the fewest eligible ranks first, then the largest, each to the eligible rank with
    the fewest rows so far (lowest rank on ties); a rank left without rows then takes the smallest partition of the rank with the most rows (read
    across nodes), as long as partitions with rows go round. A pure function of its inputs, like placement:
    every rank computes the same answer."""
    nodes = rank_nodes(members, member_nodes, world_size)
    load = [0] * world_size
    out: list[list[int]] = [[] for _ in range(world_size)]
    eligible = {}
    for k in range(len(partition_rows)):
        holders = {member_nodes[m] for m in replicas_of(dataset, k, members, replicas)}
        eligible[k] = [r for r in range(world_size) if nodes[r] in holders] or list(range(world_size))
    # the most constrained first (fewest ranks could take them), then the largest: the flexible ones even
    # the shares out afterwards (largest-first alone split 7/5 what could be 6/6, measured)
    for k in sorted(eligible, key=lambda k: (len(eligible[k]), -int(partition_rows[k]), k)):
        r = min(eligible[k], key=lambda i: (load[i], i))
        out[r].append(k)
        load[r] += int(partition_rows[k])
    for r in range(world_size):  # a rank left without rows takes the smallest partition of the fullest rank
        if load[r] == 0:
            donors = [d for d in range(world_size) if sum(1 for k in out[d] if partition_rows[k]) > 1]
            if donors:
                d = max(donors, key=lambda i: (load[i], -i))
                k = min((k for k in out[d] if partition_rows[k]), key=lambda k: (int(partition_rows[k]), k))
                out[d].remove(k)
                out[r].append(k)
                load[d] -= int(partition_rows[k])
                load[r] += int(partition_rows[k])
    return [sorted(p) for p in out]
