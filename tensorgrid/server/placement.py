"""Where a grid's partitions live: rendezvous (highest-random-weight) hashing, a pure function.

Every client and server computes the same answer from (dataset, partition, members, replicas) alone: no
directory to keep, nothing to agree on. Each member scores a partition with a 64-bit hash of (member,
dataset, partition); the ``replicas`` highest scores hold it, the highest first (the replica a reader tries
first). Removing a member moves only the partitions it held (each to the member with the next score);
adding one moves to it only the partitions it now scores highest on, about 1/n of them.
"""

from __future__ import annotations

from collections.abc import Sequence

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
