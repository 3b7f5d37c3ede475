"""Deletes: ``ds.delete(where)`` makes a new version (operation "delete", no rows added) without the rows
where ``where`` holds: an SQL condition (DuckDB) or a pyarrow compute expression, as ``Dataset.filter``
takes (rows where it is NULL are kept, as SQL's DELETE keeps them). The returned dataset's ``deleted_rows``
says how many went; the version before still holds them (time travel) until it is expired and vacuumed.

Copy-on-write: shards with no matching row are kept as they are; each shard with matches is rewritten
without them (as one new shard; none when no row is left). Not deletion vectors (Delta, Iceberg v2 and
Lance keep the files and list the deleted positions beside them): ``ds.shard_urls()`` are handed to DuckDB,
Spark or pandas to read in place, and they know nothing of our manifest, so a version's files must hold
exactly its rows. The price: a delete rewrites every shard it touches, whole.

A race with another writer: the delete is rebased (``rewrite.py``) while the shards it rewrote are still in
the latest version, and the shards that appeared meanwhile (an append) are filtered too, as if the append
had come first; an overwrite, or another rewrite of the same shards, is ConflictError with ``retry()``.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ArgumentError, ColumnNotFoundError
from . import rewrite, subsets
from .manifest import Manifest
from .rewrite import Rewrite, Run
from .versioned import StoreDataset


def delete(ds: StoreDataset, where) -> StoreDataset:
    """The latest version of ``ds``'s dataset without the rows matching ``where``, committed as a new
    version; with no row matching, the latest version itself (no new one). ``deleted_rows`` on the result."""
    base = rewrite.latest(ds)
    base = StoreDataset(base.fs, base.root, base._m)  # a fresh object: deleted_rows is set on it
    if not base._m.shards:
        _check_where(base, where)  # no shard to evaluate it on: checked on no rows
    runs = _runs(base, base._m, list(range(base.num_shards)), where)
    if not runs:
        base.deleted_rows = 0
        return base
    rw = Rewrite(base, "delete")
    rw.write(base._m, runs)
    new = rw.commit(retry=lambda: delete(rewrite.latest(base), where),
                    more=lambda m, unseen: _runs(base, m, unseen, where))
    new.deleted_rows = rw.removed_rows
    return new


def _runs(ds: StoreDataset, m: Manifest, indices: list[int], where) -> list[Run]:
    """One run per shard of ``m`` among ``indices`` that holds a matching row: that shard without them."""
    part = StoreDataset(ds.fs, ds.root, Manifest(m.version, m.operation, m.schema, [m.shards[i] for i in indices], 0))
    hits = subsets.filter(part, where)._rows  # sorted positions in ``part``, the columns it names read once
    if not len(hits):
        return []
    whole = StoreDataset(ds.fs, ds.root, m)
    bounds = np.concatenate([[0], np.cumsum(part.shard_rows, dtype=np.int64)])
    cuts = np.searchsorted(hits, bounds)
    return [Run(i, i + 1, partial(_kept, whole, i, hits[a:b] - bounds[k]))
            for k, (i, a, b) in enumerate(zip(indices, cuts[:-1], cuts[1:])) if b > a]


def _kept(ds: StoreDataset, shard: int, deleted: np.ndarray) -> list[pa.Table]:
    """Shard ``shard`` without the rows at positions ``deleted`` (verified on read)."""
    table = ds.read_shard(shard)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[deleted] = False
    return [table.filter(pa.array(keep))]


def _check_where(ds: StoreDataset, where) -> None:
    """``where`` evaluated on no rows of ``ds``: the errors ``filter`` gives on a shard (type, columns, SQL)."""
    schema = ds.schema
    if isinstance(where, pc.Expression):
        ds._check_filter(where)  # the Dataset contract's own check of an expression
        return
    if not isinstance(where, str) or not where.strip():
        raise ArgumentError(f"delete takes an SQL condition (a non-empty string) or a pyarrow.compute expression, "
                            f"got {where!r}"[:300])
    test = subsets._SQLTest(where)
    try:
        test(schema.empty_table().append_column("__row__", pa.array([], pa.int64())), "__row__")
    except subsets._MissingColumn as e:
        raise ColumnNotFoundError(f"filter {where!r}: {e}; columns: {schema.names}") from None
    finally:
        test.close()
