"""Compaction: runs of small shards merged into big ones as a new version, the same rows in the same order;
races with appends (rebased) and overwrites (ConflictError), a compaction killed with SIGKILL, the CLI."""

import datetime
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pyarrow as pa
import pytest

import tensorgrid as tg
from tensorgrid.store import rewrite
from tests.procs import kill_once_it_writes

PAD = b"p" * 100


def rows(start, n, pad=PAD):
    """Rows ``start..start+n``: 3 numeric columns and 100 bytes."""
    a = np.arange(start, start + n)
    return pa.table({"a": a, "x": a * 0.5, "y": (a % 7).astype(np.int32), "pad": [pad] * n})


def data_files(ds):
    ds.fs.invalidate_cache()
    return sorted(p.rsplit("/", 1)[-1] for p in ds.fs.ls(ds.root + "/data", detail=False))


def referenced(ds):
    return sorted({s.path.rsplit("/", 1)[-1] for v in ds.versions() for s in tg.open(ds.url, version=v.version).shards})


@pytest.fixture
def small_appends(any_url):
    """1 + 10 one-row appends, one big shard (2,000 rows), 10 one-row appends: 22 shards."""
    tg.write(any_url, rows(0, 1))
    for i in range(1, 11):
        tg.write(any_url, rows(i, 1), mode="append")
    tg.write(any_url, rows(11, 2000), mode="append")
    for i in range(2011, 2021):
        tg.write(any_url, rows(i, 1), mode="append")
    return any_url


TARGET = 64 << 10  # the big shard (~260 KB in memory) is over half of it; a one-row shard is far under


def test_compaction_merges_runs_of_small_shards_keeps_big_ones_and_the_row_order(small_appends):
    ds = tg.open(small_appends)
    before = ds.to_arrow()
    assert ds.num_shards == 22
    new = ds.compact(target_shard_bytes=TARGET)
    assert (new.version, new.num_shards, new.num_rows) == (ds.version + 1, 3, 2021)
    assert new.shard_rows == [11, 2000, 10]
    assert new.shards[1] == ds.shards[11]  # the big shard is kept as it is, not rewritten
    assert new.to_arrow().equals(before)  # the same rows in the same order
    latest = tg.open(small_appends)
    assert latest.version == new.version and latest.to_arrow().equals(before)
    last = latest.versions()[-1]
    assert (last.operation, last.added_rows, last.rows, last.shards) == ("compact", 0, 2021, 3)
    assert latest.verify() == {"shards": 3, "bytes": latest.size_bytes, "rows": 2021}
    assert tg.sql("SELECT count(*) AS n, sum(a) AS s FROM t", t=latest).to_pandas().values.tolist() == \
        [[2021, int(before.column("a").to_numpy().sum())]]
    old = tg.open(small_appends, version=ds.version)  # time travel: the small shards are still there
    assert old.num_shards == 22 and old.to_arrow().equals(before)
    # compacting the compacted version finds nothing to do: no new version
    again = latest.compact(target_shard_bytes=TARGET)
    assert again.version == latest.version and len(latest.versions()) == ds.version + 1


def test_compacted_shards_are_cut_and_encoded_as_tg_write_writes_them(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, rows(0, 1))
    for i in range(1, 100):
        tg.write(url, rows(i, 1), mode="append")
    old = tg.open(url)
    new = old.compact(target_shard_bytes=4 << 10)
    batches = (b for i in range(100) for b in old.read_shard(i).to_batches())  # the rows, as tg.write takes them
    fresh = tg.write(str(tmp_path / "w"), batches, shard_bytes=4 << 10)
    assert new.num_shards > 1 and new.shard_rows == fresh.shard_rows
    assert [(s.rows, s.bytes, s.checksum, s.row_group_rows) for s in new.shards] == \
        [(s.rows, s.bytes, s.checksum, s.row_group_rows) for s in fresh.shards]  # byte for byte


def test_nothing_to_compact_makes_no_version(any_url):
    tg.write(any_url, rows(0, 2000))  # one shard
    ds = tg.open(any_url)
    assert ds.compact(target_shard_bytes=TARGET).version == 1
    tg.write(any_url, rows(2000, 2000), mode="append")  # two big shards
    assert tg.open(any_url).compact(target_shard_bytes=TARGET).version == 2
    tg.write(any_url, rows(4000, 1), mode="append")  # one small shard alone between big ones: nothing gained
    assert tg.open(any_url).compact(target_shard_bytes=TARGET).version == 3
    assert [v.operation for v in tg.open(any_url).versions()] == ["create", "append", "append"]


def test_every_column_type_survives_compaction(tmp_path):
    def part(i):
        return pa.table({
            "ts": pa.array([datetime.datetime(2020, 1, 1, 0, 0, i)], pa.timestamp("s")),
            "d": pa.array([datetime.date(2020, 1, 1 + i)], pa.date64()),
            "s": pa.array([None if i % 2 else f"s{i}"], pa.string()),
            "l": pa.array([[i, i + 1]], pa.list_(pa.int16())),
            "m": pa.array([{"k": i}], pa.struct([("k", pa.int8())])),
            "dec": pa.array([i], pa.int64()).cast(pa.decimal128(22, 2)),
            "img": pa.FixedShapeTensorArray.from_numpy_ndarray(np.full((1, 2, 3), i, np.float32)),
        })
    url = str(tmp_path / "d")
    tg.write(url, part(0))
    for i in range(1, 8):
        tg.write(url, part(i), mode="append")
    ds = tg.open(url)
    new = ds.compact()
    assert new.num_shards == 1 and new.to_arrow().equals(ds.to_arrow())
    assert new.schema.equals(ds.schema, check_metadata=True)


def test_a_damaged_shard_stops_compaction_by_name_and_writes_nothing(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, rows(0, 1))
    for i in range(1, 10):
        tg.write(url, rows(i, 1), mode="append")
    ds = tg.open(url)
    path = tmp_path / "d" / ds.shards[4].path
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    files = data_files(ds)
    with pytest.raises(tg.CorruptShardError, match="checksum") as e:
        ds.compact()
    assert e.value.shards == [str(path)]
    assert tg.open(url).version == 10 and data_files(ds) == files


@pytest.mark.parametrize("bad", [0, -1, 1.5, "128", True, None])
def test_bad_target_is_argument_error_and_writes_nothing(tmp_path, bad):
    url = str(tmp_path / "d")
    tg.write(url, rows(0, 1))
    tg.write(url, rows(1, 1), mode="append")
    ds = tg.open(url)
    files = data_files(ds)
    with pytest.raises(tg.ArgumentError, match="target_shard_bytes"):
        ds.compact(target_shard_bytes=bad)
    assert tg.open(url).version == 2 and data_files(ds) == files


def test_loader_reads_the_same_sequence_and_a_state_saved_before_is_refused(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, rows(0, 1))
    for i in range(1, 40):
        tg.write(url, rows(i, 1), mode="append")
    old = tg.open(url)
    seq = [b["a"].tolist() for b in old.to_torch(batch_size=8)]
    loader = old.to_torch(batch_size=8, shuffle=True, seed=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    new = old.compact()
    assert [b["a"].tolist() for b in new.to_torch(batch_size=8)] == seq  # shuffle=False: the same sequence
    with pytest.raises(tg.errors.ResumeError, match="other data"):
        new.to_torch(batch_size=8, shuffle=True, seed=1).load_state_dict(state)
    again = tg.open(url, version=old.version).to_torch(batch_size=8, shuffle=True, seed=1)
    again.load_state_dict(state)  # the version the state was saved over still resumes
    assert sum(len(b["a"]) for b in again) == 32


def test_an_append_during_compaction_is_rebased_over(any_url):
    tg.write(any_url, rows(0, 1))
    for i in range(1, 6):
        tg.write(any_url, rows(i, 1), mode="append")

    def append_first(fs, root, version):
        rewrite._before_commit = None
        tg.write(any_url, rows(100, 3), mode="append")  # wins the version the compaction wanted

    rewrite._before_commit = append_first
    try:
        new = tg.open(any_url).compact()
    finally:
        rewrite._before_commit = None
    assert [v.operation for v in new.versions()][-2:] == ["append", "compact"]
    assert new.version == 8 and new.shard_rows == [6, 3]  # the appended shard kept as it is, after the run
    assert new.to_arrow().column("a").to_pylist() == [0, 1, 2, 3, 4, 5, 100, 101, 102]
    new.verify()
    assert data_files(new) == referenced(new)  # no stray file


def test_an_overwrite_during_compaction_is_conflict_and_retry_compacts_the_latest(any_url):
    tg.write(any_url, rows(0, 1))
    for i in range(1, 6):
        tg.write(any_url, rows(i, 1), mode="append")

    def overwrite_first(fs, root, version):
        rewrite._before_commit = None
        tg.write(any_url, rows(50, 4), mode="overwrite", shard_rows=1)  # 4 small shards, none of the run's

    rewrite._before_commit = overwrite_first
    try:
        with pytest.raises(tg.ConflictError, match="retry") as e:
            tg.open(any_url).compact()
    finally:
        rewrite._before_commit = None
    ds = tg.open(any_url)
    assert ds.version == 7 and ds.versions()[-1].operation == "overwrite"  # nothing committed
    assert data_files(ds) == referenced(ds)  # the compaction's shards were removed
    assert e.value.retryable
    new = e.value.retry()
    assert new.version == 8 and new.num_shards == 1
    assert new.to_arrow().column("a").to_pylist() == [50, 51, 52, 53]


APPENDER = textwrap.dedent("""
    import sys, numpy as np, pyarrow as pa, tensorgrid as tg
    url, who, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    for i in range(n):
        t = pa.table({"a": [who * 1000 + i], "x": [0.0], "y": np.array([who], np.int32), "pad": [b"q" * 100]})
        try:
            tg.write(url, t, mode="append")
        except tg.ConflictError as e:
            while True:
                try:
                    e.retry()
                    break
                except tg.ConflictError as again:
                    e = again
        print(who * 1000 + i, flush=True)  # acknowledged
""")


def test_appenders_racing_compactions_lose_and_duplicate_no_row(tmp_path):
    url = str(tmp_path / "race")
    tg.write(url, rows(0, 1))
    procs = [subprocess.Popen([sys.executable, "-c", APPENDER, url, str(w), "25"], stdout=subprocess.PIPE, text=True)
             for w in (1, 2)]
    compactions = 0
    while any(p.poll() is None for p in procs):
        try:
            before = tg.open(url).version
            compactions += tg.open(url).compact().version != before
        except tg.ConflictError:
            pass  # a rewrite of the same shards by the other side's retry: next round
        time.sleep(0.02)
    acked = sorted(int(line) for p in procs for line in p.communicate(timeout=60)[0].split())
    assert all(p.returncode == 0 for p in procs)
    assert len(acked) == 50
    final = tg.open(url).compact()
    got = final.to_arrow().column("a").to_pylist()
    assert sorted(got) == sorted([0] + acked)  # none lost, none twice
    for w in (1, 2):  # each writer's rows in the order it wrote them
        mine = [a for a in got if a // 1000 == w]
        assert mine == sorted(mine)
    assert compactions >= 1 and final.num_shards == 1
    final.verify()
    final.vacuum(min_age_s=0)
    for v in final.versions():  # every version still reads whole after a vacuum
        tg.open(url, version=v.version).verify()


KILLED_COMPACTION = textwrap.dedent("""
    import sys, time, tensorgrid as tg
    from tensorgrid.store.versioned import StoreDataset
    read = StoreDataset.read_shard
    def slow(self, *a, **k):
        time.sleep(0.01)
        return read(self, *a, **k)
    StoreDataset.read_shard = slow
    tg.open(sys.argv[1]).compact(target_shard_bytes=64 << 10)
""")


def test_compaction_killed_mid_way_leaves_the_previous_version_and_orphans_vacuum_removes(tmp_path):
    url = str(tmp_path / "k")
    ds = tg.write(url, rows(0, 6000, pad=b"k" * 1000), shard_rows=20)  # 300 shards of ~20 KB
    before = ds.to_arrow()
    data_dir = tmp_path / "k" / "data"
    listed = set(os.listdir(data_dir))
    orphans = kill_once_it_writes(KILLED_COMPACTION, url, data_dir, listed)
    ds = tg.open(url)
    assert ds.version == 1 and ds.to_arrow().equals(before)
    ds.verify()
    r = ds.vacuum(min_age_s=0)
    assert r["removed"] == len(orphans) and set(os.listdir(data_dir)) == listed
    new = ds.compact(target_shard_bytes=64 << 10)  # and compaction works again
    assert new.version == 2 and new.num_shards < 300 and new.to_arrow().equals(before)


def test_cli_compact_prints_shards_before_and_after(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, rows(0, 1))
    for i in range(1, 5):
        tg.write(url, rows(i, 1), mode="append")
    p = subprocess.run([sys.executable, "-m", "tensorgrid.cli", "compact", url, "--target-mb", "1"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "5 shards -> 1 in version 6" in p.stdout and "5 rows" in p.stdout
    from tensorgrid.cli import main

    assert main(["compact", url]) == 0  # nothing left to compact: exit 0, no version
    assert tg.open(url).version == 6
    assert main(["compact", url, "--target-mb", "0"]) == 1
    assert main(["compact", str(tmp_path / "missing")]) == 1
    import pandas as pd

    pd.DataFrame({"a": [1]}).to_parquet(tmp_path / "f.parquet")
    assert main(["compact", str(tmp_path / "f.parquet")]) == 1  # read in place: not ours to rewrite
