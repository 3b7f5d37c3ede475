"""``locality=True``: each rank reads only the partitions held on its own node (Ignite's mode).

The dataset says which partitions each rank reads (``rank_partitions(world_size)``: a grid of several
servers gives each partition to a rank on a node holding one of its replicas; server/placement.py). A rank
then reads its share alone, shuffled within, as a plan of world size 1 (plan.py), padded with its own
repeated rows (flagged padding) to the batch count of the rank with the most rows, so that every rank
takes as many steps; with ``drop_last`` every rank stops at the batch count of the one with the fewest.

The trade-offs against the default global-batch partitioning: the shuffle mixes rows of one rank's share
only, the ranks' shares may differ in size (padding: repeated rows that weigh nothing in the loss), and a
run resumes only under the same world size and the same placement (another would give ranks other shares).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..errors import ArgumentError, ResumeError
from ..store.dataset import Dataset
from ..store.subsets import SubsetDataset
from .plan import Layout


@dataclass(frozen=True)
class Share:
    """What every rank reads under ``locality=True`` (the same object computed on every rank)."""

    partitions: tuple[tuple[int, ...], ...]  # rank -> its partitions (the dataset's shards), sorted
    rows: tuple[int, ...]  # rank -> its rows
    batches: int  # batches every rank takes per epoch
    batch_size: int
    drop_last: bool
    digest: str  # of the assignment and the dataset's blocks: a state saved under another is refused

    @classmethod
    def of(cls, dataset: Dataset, world_size: int, batch_size: int, drop_last: bool) -> Share:
        grid = placed(dataset)
        if grid is None:
            raise ArgumentError("locality=True reads the partitions held on each rank's node: it needs a dataset of a "
                                "grid of several servers (tg.connect(member).dataset(name), or start_on_ray(...)"
                                f".connect().dataset(name)), not a {type(dataset).__name__}")
        parts = tuple(tuple(int(k) for k in p) for p in grid.rank_partitions(world_size))
        shard_rows = dataset.shard_rows
        rows = tuple(sum(int(shard_rows[k]) for k in p) for p in parts)
        empty = [r for r, n in enumerate(rows) if n == 0]
        if empty:
            raise ArgumentError(f"locality=True: {len(empty)} of {world_size} ranks would read no rows "
                                f"({dataset.num_shards} partitions): load the dataset with more partitions "
                                "(load(..., partitions=N)) or train on fewer workers")
        if drop_last:
            batches = min(n // batch_size for n in rows)
            if batches == 0:
                raise ArgumentError(f"locality=True with drop_last: a rank's share holds {min(rows)} rows, fewer than "
                                    f"one batch of {batch_size}: no batch is left")
        else:
            batches = max(-(-n // batch_size) for n in rows)
        blocks = Layout(tuple(int(n) for n in shard_rows), tuple(tuple(b) for b in dataset.blocks())).digest
        digest = hashlib.blake2b(f"{parts!r}|{blocks}".encode(), digest_size=8).hexdigest()
        return cls(parts, rows, batches, batch_size, drop_last, digest)

    def dataset(self, dataset: Dataset, rank: int) -> Dataset:
        """Rank ``rank``'s partitions of ``dataset``, as a dataset of their shards."""
        return SubsetDataset(dataset, None, None, f"partitions {list(self.partitions[rank])}",
                             shards=list(self.partitions[rank]))

    def real_rows(self, k: int) -> int:
        """Rows of global batch ``k`` that are real (not padding), over all ranks."""
        if self.drop_last:
            return self.batch_size * len(self.rows)
        return sum(min(self.batch_size, max(0, n - k * self.batch_size)) for n in self.rows)

    def state(self) -> dict:
        return {"world_size": len(self.partitions), "placement": self.digest}


def placed(dataset: Dataset):
    """The grid dataset under ``dataset`` that says where its partitions are (``rank_partitions``,
    ``rank_nodes``): itself, or the base of a view that only selects columns; None for other kinds."""
    while isinstance(dataset, SubsetDataset) and dataset.same_shards:
        dataset = dataset.base
    return dataset if callable(getattr(dataset, "rank_partitions", None)) else None


def check_resume(state: dict, mine: dict) -> None:
    """A loader state and this loader agree on locality: both off, or both on over the same world size and
    placement of partitions."""
    theirs, ours = state.get("locality"), mine.get("locality")
    if not theirs and not ours:
        return
    if not theirs or not ours:
        on, off = ("the state", "this loader") if theirs else ("this loader", "the state")
        raise ResumeError(f"cannot resume: {on} reads with locality=True (each rank its own node's partitions), "
                          f"{off} does not: their rows per rank differ; resume with the locality it was saved with")
    if theirs.get("world_size") != ours["world_size"]:
        raise ResumeError(f"cannot resume: with locality=True a run resumes only under the same world size (each "
                          f"rank reads its own partitions): the state's had {theirs.get('world_size')!r} ranks, this "
                          f"loader has {ours['world_size']}")
    if theirs.get("placement") != ours["placement"]:
        raise ResumeError("cannot resume: with locality=True a run resumes only under the same placement of "
                          "partitions, and this one differs (servers added or removed, or the dataset loaded "
                          "again with other partitions)")
