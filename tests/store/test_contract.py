"""The Dataset contract, the same for every kind (and for a kind defined here, outside the package):
blocks cover every row once in order, row-range reads equal slices of the shard, pickling drops open
files, fingerprints survive pickling."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import tensorgrid as tg
from tensorgrid.store import Dataset


class TablesDataset(Dataset):
    """The smallest dataset kind: a list of Arrow tables, one per shard (only the three abstract members)."""

    def __init__(self, tables):
        self.tables = tables
        self.url = "tables://test"

    @property
    def schema(self):
        return self.tables[0].schema

    @property
    def shard_rows(self):
        return [t.num_rows for t in self.tables]

    def read_shard(self, i, columns=None, filter=None):
        t = self.tables[i]
        if filter is not None:
            t = t.filter(filter)
        return t.select(columns) if columns is not None else t


def _table(lo, hi):
    return pa.table({"id": np.arange(lo, hi), "x": np.arange(lo, hi) * 0.5, "s": [f"r{i}" for i in range(lo, hi)]})


@pytest.fixture(params=["store", "memory", "parquet", "csv", "hive", "own"])
def kind(request, tmp_path):
    full = _table(0, 5000)
    if request.param == "store":
        return tg.write(str(tmp_path / "d"), full, shard_rows=1700), full
    if request.param == "memory":
        return tg.from_arrow(full), full
    if request.param in ("parquet", "csv"):
        (tmp_path / "f").mkdir()
        for i, lo in enumerate(range(0, 5000, 2000)):
            part = full.slice(lo, 2000)
            if request.param == "parquet":
                pq.write_table(part, tmp_path / "f" / f"p{i}.parquet", row_group_size=300)
            else:
                part.to_pandas().to_csv(tmp_path / "f" / f"p{i}.csv", index=False)
        return tg.open(str(tmp_path / "f")), full
    if request.param == "hive":
        for k in (0, 1):
            (tmp_path / "h" / f"k={k}").mkdir(parents=True)
            pq.write_table(full.filter(pc.equal(pc.bit_wise_and(full["id"], 1), k)),
                           tmp_path / "h" / f"k={k}" / "p.parquet", row_group_size=500)
        return tg.open(str(tmp_path / "h")), None
    return TablesDataset([full.slice(0, 1234), full.slice(1234, 3000), full.slice(4234)]), full


def test_blocks_cover_every_row_once_and_read_rows_equals_the_shard_sliced(kind):
    ds, full = kind
    blocks = ds.blocks()
    by_shard = {}
    for s, a, b in blocks:
        by_shard.setdefault(s, []).append((a, b))
    for s, n in enumerate(ds.shard_rows):
        spans = by_shard.get(s, [])
        assert [a for a, _ in spans] == [0] + [b for _, b in spans[:-1]] and (spans[-1][1] if spans else 0) == n
    for s, a, b in blocks[::3]:
        want = ds.read_shard(s).slice(a, b - a)
        assert ds.read_rows(s, a, b).equals(want)
        assert ds.read_rows(s, a, b, columns=["id"]).equals(want.select(["id"]))
    if full is not None:
        got = pa.concat_tables([ds.read_rows(s, a, b) for s, a, b in blocks]).select(full.schema.names)
        assert got.column("id").to_pylist() == full.column("id").to_pylist()
    assert ds.bytes_per_row() >= 1.0
    copy = pickle.loads(pickle.dumps(ds))  # open handles never cross processes
    assert copy.fingerprint == ds.fingerprint
    assert copy.read_rows(*blocks[-1]).equals(ds.read_rows(*blocks[-1]))


def test_a_kind_with_only_the_abstract_members_gets_working_defaults():
    ds = TablesDataset([_table(0, 10), _table(10, 25)])
    assert ds.num_rows == 25 and ds.verify()["rows"] == 25 and not ds.is_remote and ds.cache_key(0) is None
    assert tg.sql("SELECT sum(id) AS s FROM t", t=ds).to_pandas()["s"][0] == sum(range(25))
    assert ds.fingerprint != TablesDataset([_table(0, 10), _table(10, 24)]).fingerprint
    with pytest.raises(tg.ReadOnlyError):
        ds.vacuum()
    with pytest.raises(TypeError, match="abstract"):
        type("Half", (Dataset,), {"schema": property(lambda self: None)})()


def test_in_memory_fingerprints_tell_slices_of_one_table_apart():
    t = _table(0, 1000)
    a, b = tg.from_arrow(t.slice(0, 500)), tg.from_arrow(t.slice(500, 500))
    assert a.fingerprint != b.fingerprint
    assert a.fingerprint == tg.from_arrow(t.slice(0, 500)).fingerprint
