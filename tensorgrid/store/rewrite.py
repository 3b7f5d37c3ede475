"""Rewrites: a new version that is the latest one with some runs of its shards replaced by new shards
(``compaction.py`` merges runs of small shards; ``deletes.py`` rewrites the shards that hold deleted rows).

The new shards are written as ``tg.write`` writes them (``writer._ShardWriter``: row groups, encodings,
fsync), all as one transaction, and published under that transaction's claim (``writer._publish``), so
vacuum's guarantee (vacuum.py) holds unchanged: a killed rewrite leaves orphans a vacuum removes, never a
version naming a missing file. A rewrite adds no rows (``added_rows`` 0).

When another writer commits first, the rewrite is rebased onto the newer version if every run it replaced
is still there, one shard after the other (an append: Delta does the same); the caller may also rewrite
shards that appeared meanwhile (a delete filters appended rows too). Otherwise ConflictError: nothing
committed, this rewrite's shards removed, and ``retry()`` does the whole operation again on the latest
version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa

from .. import fs as tgfs
from ..errors import ConflictError, UnsupportedDataError
from . import encoding, writer
from .manifest import Manifest, Shard
from .versioned import StoreDataset

# Test hook: called as _before_commit(fs, root, version) right before each attempt to publish.
_before_commit = None


@dataclass(frozen=True)
class Run:
    """Shards ``start:stop`` of a version, replaced by ``rows()`` (logical batches, in order) cut into shards
    of about ``shard_bytes`` in memory (None: one shard); no rows at all: the run is dropped."""
    start: int
    stop: int
    rows: Callable[[], Iterable[pa.RecordBatch]]
    shard_bytes: int | None = None


def latest(ds: StoreDataset) -> StoreDataset:
    """The latest version of ``ds``'s dataset, on ``ds``'s filesystem (its storage options kept)."""
    m = writer.latest(ds.fs, ds.root)
    return ds if m is None or m.version == ds.version else StoreDataset(ds.fs, ds.root, m)


class Rewrite:
    """One rewrite of ``ds`` (a version, normally the latest): ``write`` the new shards of some runs (more
    than once when rebasing), then ``commit``."""

    def __init__(self, ds: StoreDataset, operation: str):
        self.fs, self.root, self.url, self.operation = ds.fs, ds.root, ds.url, operation
        self.base = ds._m
        self.physical = encoding.physical_schema(ds.schema)  # as tg.write would store its rows (no alter history)
        self.seen = {s.path for s in ds._m.shards}  # shards this rewrite has taken into account
        self.writers: list[writer._ShardWriter] = []
        self.txn: str | None = None
        self.seq = 0
        self.done: list[tuple[tuple[str, ...], list[Shard], int]] = []  # (a run's paths, its new shards, its rows)

    def write(self, m: Manifest, runs: list[Run]) -> None:
        """Write the new shards of ``runs`` (over ``m``'s shards, in list order) in this rewrite's
        transaction, numbered after those written before (the manifest wants a write's shards in order)."""
        w = writer._ShardWriter(self.fs, self.root, self.physical)
        self.txn = self.txn or w.txn
        w.txn, w.seq = self.txn, self.seq
        self.writers.append(w)
        counts = []
        try:
            try:
                for run in runs:
                    first = w.seq
                    batches = (b for t in run.rows() for b in _batches(t))
                    for group in (writer._split(batches, None, run.shard_bytes) if run.shard_bytes
                                  else _whole(batches)):
                        if w.seq >= writer.MAX_SHARDS:
                            raise UnsupportedDataError(f"the rewrite would make over {writer.MAX_SHARDS} shards")
                        w.add(group)
                    counts.append(w.seq - first)
            finally:
                shards = w.finish()
                self.seq = w.seq
        except BaseException:
            self._remove()  # nothing of this rewrite is committed yet
            raise
        at = 0
        for run, n in zip(runs, counts):
            old = m.shards[run.start:run.stop]
            self.done.append((tuple(s.path for s in old), shards[at:at + n], sum(s.rows for s in old)))
            at += n

    def keep(self, wanted: Callable[[tuple[str, ...], list[Shard]], bool]) -> None:
        """Drop the replacements ``wanted(paths, new)`` refuses (their new files deleted: never committed)."""
        dropped = [d for d in self.done if not wanted(d[0], d[1])]
        self.done = [d for d in self.done if wanted(d[0], d[1])]
        writer._remove_paths(self.fs, [tgfs.join(self.root, s.path) for _, new, _ in dropped for s in new])

    @property
    def new_shards(self) -> list[Shard]:
        return [s for _, new, _ in self.done for s in new]

    @property
    def removed_rows(self) -> int:
        """Rows the replaced runs held that their new shards do not."""
        return sum(rows - sum(s.rows for s in new) for _, new, rows in self.done)

    def commit(self, retry: Callable[[], StoreDataset],
               more: Callable[[Manifest, list[int]], list[Run] | None] | None = None) -> StoreDataset:
        """Publish the base with each run replaced. Lost to another writer: rebase onto the newer version
        (every run still there, in one piece, and ``more(latest, indices of shards not seen before)`` giving
        the runs to rewrite among those, or None when it cannot rebase), else ConflictError whose
        ``retry()`` calls ``retry``. Any failure before a manifest may exist removes the new shards."""
        publisher = self.writers[0]
        try:
            new = self._swap(self.base)
            while True:
                if _before_commit is not None:
                    _before_commit(self.fs, self.root, new.version)
                publisher.shards = self.new_shards  # what _publish checks under the claim
                publisher.sync()
                if writer._publish(self.fs, self.root, self.url, new, publisher):
                    return StoreDataset(self.fs, self.root, new)
                publisher.committing = False  # another writer has that version: ours was never created
                new = self._rebase(more)
                if new is None:  # (its shards are removed below)
                    raise ConflictError(
                        f"another writer changed the shards this {self.operation} rewrote in {self.url} (an "
                        f"overwrite, a delete or a compaction) before it committed; nothing was committed and its "
                        f"new shards were removed: call .retry() on this error to {self.operation} the latest "
                        "version again", retry=retry)
        except BaseException:
            if not publisher.committing:  # else a manifest naming them may exist: they stay for vacuum
                self._remove()
            raise

    def _rebase(self, more) -> Manifest | None:
        m = writer.latest(self.fs, self.root)
        if m is None or not writer._same_schema(m.schema, self.base.schema) or self._swap(m) is None:
            return None
        unseen = [i for i, s in enumerate(m.shards) if s.path not in self.seen]
        self.seen |= {s.path for s in m.shards}
        if more is not None and unseen:
            runs = more(m, unseen)
            if runs is None:
                return None
            if runs:
                self.write(m, runs)
        return self._swap(m)

    def _swap(self, m: Manifest) -> Manifest | None:
        """``m`` with every replaced run swapped for its new shards, as the next version; None if a run is
        no longer in ``m`` in one piece, or if this write's shards would go out of their order."""
        where = {s.path: i for i, s in enumerate(m.shards)}
        starts = {}
        for paths, new, _ in self.done:
            i = where.get(paths[0])
            if i is None or tuple(s.path for s in m.shards[i:i + len(paths)]) != paths:
                return None
            starts[i] = (len(paths), new)
        shards, i = [], 0
        while i < len(m.shards):
            if i in starts:
                n, new = starts[i]
                shards += new
                i += n
            else:
                shards.append(m.shards[i])
                i += 1
        written = set(self.new_shards)
        mine = [s.path for s in shards if s in written]
        if mine != sorted(mine):  # a run rewritten later sits before an earlier one: cannot rebase so
            return None
        return Manifest(m.version + 1, self.operation, m.schema, shards, added_rows=0)

    def _remove(self) -> None:
        for w in self.writers:
            w.remove_files()
        self.done = []


def _batches(t) -> list[pa.RecordBatch]:
    return t.to_batches() if isinstance(t, pa.Table) else [t]


def _whole(batches: Iterator[pa.RecordBatch]) -> Iterator[list[pa.RecordBatch]]:
    """All of ``batches`` as one shard (none if they hold no row)."""
    got = [b for b in batches if b.num_rows]
    if got:
        yield got
