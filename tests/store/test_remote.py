"""Remote shard reads (store/remote.py): concurrent ranged GETs give the object's exact bytes, damage on the
store is CorruptShardError, and the loader reads an s3:// dataset from forked workers, exactly once, and
resumes after its process is killed mid-epoch."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.errors import CorruptShardError
from tensorgrid.store import remote, writer
from tests.conftest import new_bucket
from tests.loader.helpers import add_pid, make

PART = 1000  # bytes per range in these tests: shards of a few KiB are fetched as several ranges


@pytest.fixture
def small_ranges(monkeypatch):
    """Ranges of PART bytes (8 MiB in use): the tests' small shards take the concurrent path."""
    monkeypatch.setattr(remote, "RANGE_BYTES", PART)


_buckets: dict = {}


def _bucket(endpoint: str) -> str:
    """One bucket per S3 server for the tests of bare objects."""
    if endpoint not in _buckets:
        _buckets[endpoint] = new_bucket(endpoint)
    return _buckets[endpoint]


def _sizes():
    near_boundaries = st.builds(lambda k, d: max(1, k * PART + d), st.integers(0, 5), st.integers(-1, 1))
    return st.one_of(near_boundaries, st.integers(1, 5 * PART + 7))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(size=_sizes(), seed=st.integers(0, 2**32 - 1))
def test_ranged_fetch_gives_the_objects_exact_bytes_around_range_boundaries(s3_server, tmp_path, size, seed):
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    s3 = fsspec.filesystem("s3")
    bucket = _bucket(s3_server)
    for fs, path in ((s3, f"{bucket}/obj-{size}"), (LocalFileSystem(), str(tmp_path / f"obj-{size}"))):
        fs.pipe_file(path, data)  # s3: async ranges on one loop; local: a sync filesystem's thread pool
        got = remote.fetch(fs, path, size, part=PART)
        assert got.to_pybytes() == data
        assert remote.ranges(size, PART)[-1][1] == size and len(remote.ranges(size, PART)) == -(-size // PART)


def test_ranged_fetch_tells_a_longer_a_shorter_and_a_missing_object_apart(s3_server):
    s3 = fsspec.filesystem("s3")
    path = f"{_bucket(s3_server)}/sized-{uuid.uuid4().hex[:6]}"
    for actual in (3 * PART, 3 * PART + 1, 3 * PART - 1, PART // 2, 5 * PART):  # a range past the end: 416
        s3.pipe_file(path, b"x" * actual)
        if actual == 3 * PART:
            assert remote.fetch(s3, path, 3 * PART, part=PART).size == 3 * PART
            continue
        with pytest.raises(remote.WrongSize) as e:
            remote.fetch(s3, path, 3 * PART, part=PART)
        assert e.value.actual == actual
    with pytest.raises(FileNotFoundError):
        remote.fetch(s3, path + "-gone", 3 * PART, part=PART)


def test_the_range_size_comes_from_the_environment_and_a_bad_one_is_named(s3_url, monkeypatch):
    tg.write(s3_url, pa.table({"id": np.arange(3000)}))
    for value in ("0", "10000", " 4096 "):  # 0: one GET per shard
        monkeypatch.setenv(remote.RANGE_ENV, value)
        assert tg.open(s3_url).to_arrow().column("id").to_pylist() == list(range(3000))
    for value in ("8M", "-1", "many"):
        monkeypatch.setenv(remote.RANGE_ENV, value)
        with pytest.raises(tg.ArgumentError, match=rf"\$TENSORGRID_RANGE_BYTES must be an int >= 0 .*got '{value}'"):
            tg.open(s3_url).to_arrow()


def _shard(url: str):
    ds = tg.open(url)
    shard = ds.shards[0]
    return ds.fs, f"{ds.root}/{shard.path}", shard, ds.shard_urls()[0]


def test_a_dataset_read_by_ranges_equals_what_was_written(any_url, small_ranges):
    t = pa.table({"id": np.arange(4000), "blob": [os.urandom(50) for _ in range(4000)]})
    tg.write(any_url, t, shard_rows=1500)
    ds = tg.open(any_url)
    assert all(s.bytes > 3 * PART for s in ds.shards)  # several ranges per shard
    assert ds.to_arrow().equals(t)
    assert ds.verify()["rows"] == 4000
    assert ds.read_rows(1, 10, 20).column("id").to_pylist() == list(range(1510, 1520))


@pytest.mark.parametrize("damage", ["same size", "one byte more", "one byte less", "half", "deleted"])
def test_a_damaged_shard_is_corrupt_shard_error_naming_it(any_url, small_ranges, damage):
    tg.write(any_url, pa.table({"id": np.arange(3000), "f": np.random.rand(3000)}), shard_rows=1000)
    fs, path, shard, where = _shard(any_url)
    data = fs.cat_file(path)
    if damage == "deleted":
        fs.rm(path)
        message = f"shard {where} is missing"
    elif damage == "same size":  # other bytes, not a parse error: the footer is intact
        fs.pipe_file(path, data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
        message = f"shard {where} fails its checksum"
    else:
        size = {"one byte more": len(data) + 1, "one byte less": len(data) - 1, "half": len(data) // 2}[damage]
        fs.pipe_file(path, (data + b"\0")[:size])
        message = f"shard {where} has {size} bytes, the manifest says {shard.bytes}"
    for read in (lambda ds: ds.to_arrow(), lambda ds: ds.read_rows(0, 0, 10), lambda ds: ds.verify()):
        with pytest.raises(CorruptShardError, match=message) as e:
            read(tg.open(any_url))
        assert e.value.shards == [where]
    assert tg.open(any_url).read_rows(1, 0, 3).column("id").to_pylist() == [1000, 1001, 1002]  # the others read


def test_a_footer_read_from_the_tail_of_a_remote_shard(s3_url):
    """bytes_per_row reads one GET of the shard's tail; a footer over TAIL_BYTES (many columns) takes two."""
    for columns in (2, 3000):
        url = f"{s3_url}-{columns}"
        t = pa.table({f"c{i}": np.arange(500, dtype=np.int64) for i in range(columns)})
        tg.write(url, t)
        fs, path, shard, _ = _shard(url)
        whole = pq.read_metadata(pa.BufferReader(fs.cat_file(path)))
        got = remote.footer(fs, path, shard.bytes)
        assert (whole.serialized_size > remote.TAIL_BYTES) == (columns == 3000)
        assert got.num_rows == 500 and got.num_columns == columns
        sizes = [whole.row_group(i).total_byte_size for i in range(whole.num_row_groups)]
        assert [got.row_group(i).total_byte_size for i in range(got.num_row_groups)] == sizes
        assert tg.open(url).bytes_per_row() == pytest.approx(sum(sizes) / 500)
    fs.pipe_file(path, b"\0" * shard.bytes)  # no footer: the estimate falls back to the manifest's sizes
    assert tg.open(url).bytes_per_row() == pytest.approx(shard.bytes / 500)


@pytest.mark.parametrize("cache", [False, None])  # off, and the default Arrow cache (filled meanwhile)
def test_loader_on_s3_with_two_forked_workers_reads_every_row_once(s3_url, small_ranges, cache):
    """Forked workers inherit an async s3fs instance that refuses to run in them ("This class is not
    fork-safe"): each makes its own. The order is the in-process loader's, batch for batch."""
    n = 3000
    ds = make(s3_url, n=n, shard_rows=400)
    ds.to_arrow()  # the parent's filesystem has run its event loop before the fork
    kw = dict(batch_size=64, shuffle=True, seed=5, cache_dir=cache)
    loader = ds.to_torch(**kw, num_workers=2, transform=add_pid, timeout=60)
    in_process = ds.to_torch(**kw, cache_fill=False)
    for epoch in range(2):
        in_process.set_epoch(epoch)
        expected = [b["id"].tolist() for b in in_process]
        batches = list(loader)  # epoch 0, then 1
        got = [b["id"].tolist() for b in batches]
        assert got == expected, f"epoch {epoch}"
        assert sorted(i for b in got for i in b) == list(range(n))
        pids = {int(p) for b in batches for p in b["pid"]}
        assert len(pids) == 2 and os.getpid() not in pids
    assert tg.open(s3_url).to_arrow().num_rows == n  # the parent's own filesystem still works


KILLED_READER = textwrap.dedent("""
    import json, os, sys, time
    import tensorgrid as tg
    from tensorgrid.store import remote, writer
    url, out, stop_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    remote.RANGE_BYTES = 1000
    loader = tg.open(url).to_torch(batch_size=32, shuffle=True, seed=7, num_workers=2, cache_dir=False, timeout=60)
    seen = []
    for k, batch in enumerate(loader):
        seen.append(batch["id"].tolist())
        with open(out + ".tmp", "w") as f:  # the checkpoint: rows used, and where the loader is
            json.dump({"seen": seen, "state": loader.state_dict()}, f)
        os.replace(out + ".tmp", out)
        if k + 1 == stop_after:
            time.sleep(600)  # killed here, its workers mid-prefetch
""")


def test_a_loader_killed_mid_epoch_on_s3_resumes_exactly_once(s3_url, tmp_path):
    n = 2000
    make(s3_url, n=n, shard_rows=300)
    out = str(tmp_path / "ckpt.json")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_READER, s3_url, out, "17"], start_new_session=True,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(out) and len(json.load(open(out))["seen"]) == 17:
                break
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the reader and its two workers
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ckpt = json.load(open(out))
    assert ckpt["state"]["batch"] == 17
    kw = dict(batch_size=32, shuffle=True, seed=7, cache_dir=False)
    full = [b["id"].tolist() for b in tg.open(s3_url).to_torch(**kw)]
    loader = tg.open(s3_url).to_torch(**kw, num_workers=2, timeout=60)
    loader.load_state_dict(ckpt["state"])
    rest = [b["id"].tolist() for b in loader]
    assert ckpt["seen"] + rest == full
    assert sorted(i for b in ckpt["seen"] + rest for i in b) == list(range(n))


def test_a_shuffled_epoch_on_s3_fetches_each_shard_a_bounded_number_of_times(s3_url, caplog, monkeypatch):
    """A window draws pieces of every block of its span in random order; the dataset keeps two fetched
    shards. Read in that order, a shard was fetched again and again: 119 GETs here, measured. Read shard by
    shard (Source.read_all), about once per shard and span: 4 spans of 16 of the 64 blocks, each span drawing
    on all 8 shards, need ~32 (39 measured)."""
    monkeypatch.setattr(writer, "ROW_GROUP_BYTES", 64 << 10)  # 8 blocks per shard in a test-sized dataset
    n = 8 * 512
    t = pa.table({"id": np.arange(n), "x": pa.array([os.urandom(1024) for _ in range(n)], pa.binary(1024))})
    tg.write(s3_url, t, shard_rows=512)
    ds = tg.open(s3_url)
    with caplog.at_level("DEBUG", logger="s3fs"):
        got = [b["id"].tolist() for b in ds.to_torch(batch_size=64, shuffle=True, seed=2, cache_dir=False,
                                                     memory_budget=2 << 20)]
    gets = [r for r in caplog.records if "get_object" in r.getMessage() and "/data/part-" in r.getMessage()]
    assert sorted(i for b in got for i in b) == list(range(n))
    assert len(gets) <= 5 * ds.num_shards + 1, len(gets)  # + the first shard's footer (bytes_per_row)
