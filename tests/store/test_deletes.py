"""Deletes: a new version without the matching rows, copy-on-write (untouched shards kept as they are); every
reader sees the same rows; races with appends (rebased, appended rows filtered too) and overwrites
(ConflictError); a delete killed with SIGKILL; the CLI."""

import os
import subprocess
import sys
import textwrap
import time

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import tensorgrid as tg
from tensorgrid.store import rewrite
from tests.procs import kill_once_it_writes


def rows(start, n, pad=b"p" * 100):
    a = np.arange(start, start + n)
    return pa.table({"a": a, "label": (a % 4).astype(np.int64), "pad": [pad] * n})


def data_files(ds):
    ds.fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in ds.fs.ls(ds.root + "/data", detail=False))


def referenced(ds):
    return sorted({s.path.rsplit("/", 1)[-1] for v in ds.versions() for s in tg.open(ds.url, version=v.version).shards})


def values(ds, column="a"):
    return ds.to_arrow().column(column).to_pylist()


def test_delete_rewrites_only_the_shards_with_matches(any_url):
    ds = tg.write(any_url, rows(0, 40), shard_rows=10)  # shards 0-9, 10-19, 20-29, 30-39
    new = ds.delete("(a >= 10 AND a < 20) OR a = 25")
    assert new.deleted_rows == 11 and new.version == 2
    assert values(new) == [a for a in range(40) if not (10 <= a < 20 or a == 25)]
    assert new.shard_rows == [10, 9, 10]  # the emptied shard dropped, one rewritten without its row
    assert new.shards[0] == ds.shards[0] and new.shards[2] == ds.shards[3]  # untouched shards kept as they are
    last = new.versions()[-1]
    assert (last.operation, last.added_rows, last.rows, last.shards) == ("delete", 0, 29, 3)
    # every reader sees the same rows: the loader, SQL, verify; the version before still has them
    latest = tg.open(any_url)
    assert [a for b in latest.to_torch(batch_size=8) for a in b["a"].tolist()] == values(new)
    assert tg.sql("SELECT count(*) AS n, max(a) AS m FROM t WHERE a BETWEEN 5 AND 25", t=latest).to_pandas() \
        .values.tolist() == [[10, 24]]
    assert latest.verify()["rows"] == 29
    assert values(tg.open(any_url, version=1)) == list(range(40))
    # the files of a version hold exactly its rows: what a reader given shard_urls() reads in place
    in_place = pa.concat_tables(pq.read_table(pa.BufferReader(latest.fs.cat_file(u))) for u in latest.shard_urls())
    assert in_place.column("a").to_pylist() == values(new)


def test_shard_urls_read_by_duckdb_in_place_hold_exactly_the_versions_rows(tmp_path):
    ds = tg.write(str(tmp_path / "d"), rows(0, 100), shard_rows=25)
    new = ds.delete("label = 3")
    got = duckdb.sql(f"SELECT a FROM read_parquet({new.shard_urls()!r}) ORDER BY a").fetchall()
    assert [a for (a,) in got] == [a for a in range(100) if a % 4 != 3]


def test_delete_with_a_pyarrow_expression_and_on_tensor_columns(any_url):
    images = np.arange(30 * 4, dtype=np.uint8).reshape(30, 2, 2)
    tg.write(any_url, pd.DataFrame({"a": np.arange(30), "img": list(images)}), shard_rows=10)
    new = tg.open(any_url).delete(pc.field("a").isin(list(range(0, 30, 3))))
    assert new.deleted_rows == 10
    kept = [a for a in range(30) if a % 3]
    assert values(new) == kept
    got = new.to_arrow().column("img").combine_chunks().to_numpy_ndarray()
    assert np.array_equal(got, images[kept]) and new.schema.field("img").type.shape == [2, 2]


def test_no_matching_row_makes_no_version(any_url):
    ds = tg.write(any_url, rows(0, 20), shard_rows=10)
    files = data_files(ds)
    same = ds.delete("a > 1000")
    assert same.version == 1 and same.deleted_rows == 0 and values(same) == list(range(20))
    assert same.delete("label IS NULL").version == 1  # NULL rows only: nothing here
    assert tg.open(any_url).version == 1 and data_files(ds) == files


@pytest.mark.parametrize("where, error, message", [
    ("nosuch = 1", tg.errors.ColumnNotFoundError, "nosuch"),
    ("a = = 1", tg.errors.SQLError, "syntax"),
    ("", tg.ArgumentError, "condition"),
    ("   ", tg.ArgumentError, "condition"),
    (3, tg.ArgumentError, "SQL condition"),
    (None, tg.ArgumentError, "SQL condition"),
    (pc.field("nosuch") > 1, tg.errors.ColumnNotFoundError, "nosuch"),
    (pc.field("pad") > 1, tg.ArgumentError, "types"),
    ("a = 1) OR (1 = 1", tg.errors.SQLError, None),
    ("a IN (SELECT 1 FROM read_csv('/etc/passwd'))", tg.errors.SQLError, None),
])
def test_bad_filters_are_named_errors_and_write_nothing(tmp_path, where, error, message):
    url = str(tmp_path / "d")
    ds = tg.write(url, rows(0, 20), shard_rows=10)
    files = data_files(ds)
    with pytest.raises(error, match=message):
        ds.delete(where)
    assert tg.open(url).version == 1 and data_files(ds) == files


def test_deleting_every_row_leaves_an_empty_version_that_still_checks_filters(any_url):
    ds = tg.write(any_url, rows(0, 20), shard_rows=10)
    empty = ds.delete("a >= 0")
    assert (empty.deleted_rows, empty.num_rows, empty.num_shards) == (20, 0, 0)
    assert tg.open(any_url).to_arrow().num_rows == 0 and tg.open(any_url).verify()["rows"] == 0
    with pytest.raises(tg.errors.ColumnNotFoundError):
        empty.delete("nosuch = 1")
    with pytest.raises(tg.errors.SQLError):
        empty.delete("a = = 1")
    assert empty.delete("a = 1").version == 2
    tg.write(any_url, rows(100, 2), mode="append")
    assert values(tg.open(any_url)) == [100, 101]


def test_an_append_during_a_delete_is_rebased_and_its_rows_filtered_too(any_url):
    tg.write(any_url, rows(0, 20), shard_rows=10)

    def append_first(fs, root, version):
        rewrite._before_commit = None
        tg.write(any_url, rows(100, 8), mode="append")  # rows 100..107: two of them have label 3

    rewrite._before_commit = append_first
    try:
        new = tg.open(any_url).delete("label = 3")
    finally:
        rewrite._before_commit = None
    assert [v.operation for v in new.versions()] == ["create", "append", "delete"]
    assert new.version == 3 and new.deleted_rows == 5 + 2
    assert values(new) == [a for a in [*range(20), *range(100, 108)] if a % 4 != 3]
    assert new.verify()["rows"] == 21
    assert data_files(new) == referenced(new)


def test_an_overwrite_during_a_delete_is_conflict_and_retry_deletes_from_the_latest(any_url):
    tg.write(any_url, rows(0, 20), shard_rows=10)

    def overwrite_first(fs, root, version):
        rewrite._before_commit = None
        tg.write(any_url, rows(200, 8), mode="overwrite")

    rewrite._before_commit = overwrite_first
    try:
        with pytest.raises(tg.ConflictError, match="retry") as e:
            tg.open(any_url).delete("label = 3")
    finally:
        rewrite._before_commit = None
    ds = tg.open(any_url)
    assert ds.version == 2 and values(ds) == list(range(200, 208))  # nothing committed
    assert data_files(ds) == referenced(ds)  # the delete's shards were removed
    new = e.value.retry()
    assert new.version == 3 and new.deleted_rows == 2 and values(new) == [200, 201, 202, 204, 205, 206]


APPENDER = textwrap.dedent("""
    import sys, numpy as np, pyarrow as pa, tensorgrid as tg
    url, who, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        a = who * 1000 + i
        t = pa.table({"a": [a], "label": [a % 4], "pad": [b"q" * 100]})
        try:
            tg.write(url, t, mode="append")
        except tg.ConflictError as e:
            while True:
                try:
                    e.retry()
                    break
                except tg.ConflictError as again:
                    e = again
        print(a, flush=True)  # acknowledged
""")


def test_appenders_racing_deletes_lose_and_duplicate_no_row(tmp_path):
    """Each delete version holds exactly the rows of the version before it without the matches (as if it ran
    alone, after every append committed before it); no appended row is lost or stored twice."""
    url = str(tmp_path / "race")
    tg.write(url, rows(0, 8))
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, url, str(w), "25"], stdout=subprocess.PIPE, text=True)
             for w in (1, 2)]
    while any(p.poll() is None for p in procs):
        try:
            tg.open(url).delete("label = 3")
        except tg.ConflictError:
            pass
        time.sleep(0.02)
    acked = [int(line) for p in procs for line in p.communicate(timeout=60)[0].split()]
    assert all(p.returncode == 0 for p in procs) and len(acked) == 50
    history = tg.open(url).versions()
    deletes = [v.version for v in history if v.operation == "delete"]
    assert deletes
    for v in deletes:
        before, after = values(tg.open(url, version=v - 1)), values(tg.open(url, version=v))
        assert after == [a for a in before if a % 4 != 3]
    deleted = set()
    for v in deletes:
        deleted |= {a for a in values(tg.open(url, version=v - 1)) if a % 4 == 3}
    final = values(tg.open(url))
    assert len(final) == len(set(final))  # none twice
    assert sorted(final) == sorted(a for a in [*range(8), *acked] if a not in deleted)  # none lost
    tg.open(url).vacuum(min_age_s=0)
    for v in history:
        tg.open(url, version=v.version).verify()


KILLED_DELETE = textwrap.dedent("""
    import sys, time, tensorgrid as tg
    from tensorgrid.store.versioned import StoreDataset
    read = StoreDataset.read_shard
    def slow(self, *a, **k):
        time.sleep(0.01)
        return read(self, *a, **k)
    StoreDataset.read_shard = slow
    tg.open(sys.argv[1]).delete("label = 3")
""")


def test_delete_killed_mid_way_leaves_the_previous_version_and_orphans_vacuum_removes(tmp_path):
    url = str(tmp_path / "k")
    ds = tg.write(url, rows(0, 4000), shard_rows=20)  # 200 shards, each with rows to delete
    before = ds.to_arrow()
    data_dir = tmp_path / "k" / "data"
    listed = set(os.listdir(data_dir))
    orphans = kill_once_it_writes(KILLED_DELETE, url, data_dir, listed)
    ds = tg.open(url)
    assert ds.version == 1 and ds.to_arrow().equals(before)
    ds.verify()
    r = ds.vacuum(min_age_s=0)
    assert r["removed"] == len(orphans) and set(os.listdir(data_dir)) == listed
    new = ds.delete("label = 3")  # and deletes work again
    assert new.deleted_rows == 1000 and new.num_shards == 200 and new.verify()["rows"] == 3000


def test_cli_delete_prints_the_rows_deleted_and_the_new_version(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, rows(0, 40), shard_rows=10)
    p = subprocess.run([sys.executable, "-m", "tensorgrid.cli", "delete", url, "--where", "label = 3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "deleted 10 rows" in p.stdout and "version 2 has 30 rows" in p.stdout
    from tensorgrid.cli import main

    assert main(["delete", url, "--where", "label = 3"]) == 0  # nothing matches now: no version
    assert tg.open(url).version == 2
    p = subprocess.run([sys.executable, "-m", "tensorgrid.cli", "delete", url, "--where", "nosuch = 1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1
    assert "nosuch" in p.stderr
    assert main(["delete", url]) == 2  # --where is required
    assert tg.open(url).version == 2
