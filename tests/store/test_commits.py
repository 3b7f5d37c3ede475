"""Atomic commits, conflicts between real writer processes, a writer killed with SIGKILL, time travel, vacuum."""

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import tensorgrid as tg
from tensorgrid.store import writer


def test_modes_and_history(any_url):
    tg.write(any_url, pa.table({"a": [1, 2]}))
    with pytest.raises(tg.DatasetExistsError, match="append"):
        tg.write(any_url, pa.table({"a": [3]}))
    tg.write(any_url, pa.table({"a": [3]}), mode="append")
    tg.write(any_url, pa.table({"a": [9]}), mode="overwrite")
    ds = tg.open(any_url)
    assert ds.version == 3
    assert ds.to_arrow().column("a").to_pylist() == [9]
    hist = ds.versions()
    assert [(v.version, v.operation, v.rows, v.added_rows) for v in hist] == [
        (1, "create", 2, 2), (2, "append", 3, 1), (3, "overwrite", 1, 1)]
    assert all(v.timestamp for v in hist)
    # time travel
    assert tg.open(any_url, version=1).to_arrow().column("a").to_pylist() == [1, 2]
    assert tg.open(any_url, version=2).to_arrow().column("a").to_pylist() == [1, 2, 3]
    with pytest.raises(tg.DatasetNotFoundError, match="no version 7"):
        tg.open(any_url, version=7)


def test_append_and_overwrite_create_missing_dataset(any_url):
    ds = tg.write(any_url, pa.table({"a": [1]}), mode="append")
    assert ds.version == 1 and ds.versions()[0].operation == "create"


def _race_writer(url, barrier, value, results):
    def wait(fs, root, version):
        barrier.wait(timeout=30)

    writer._before_commit = wait
    try:
        tg.write(url, pa.table({"a": [value] * 10}), mode="append")
        results.put(("ok", value))
    except tg.ConflictError as e:
        writer._before_commit = None
        ds = e.retry()
        results.put(("conflict-retried", value, ds.version))


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_two_writer_processes_race_exactly_one_wins(tmp_path, method):
    url = str(tmp_path / "race")
    tg.write(url, pa.table({"a": [0]}))
    ctx = mp.get_context(method)
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_race_writer, args=(url, barrier, v, results)) for v in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    outcomes = sorted([results.get(timeout=5) for _ in procs], key=lambda r: r[0])
    assert [o[0] for o in outcomes] == ["conflict-retried", "ok"]
    assert outcomes[0][2] == 3  # the loser committed on top of the winner's version 2
    ds = tg.open(url)
    vals = sorted(ds.to_arrow().column("a").to_pylist())
    assert vals == [0] + [1] * 10 + [2] * 10  # nothing lost
    assert [v.version for v in ds.versions()] == [1, 2, 3]


def test_conflict_in_process_keeps_shards_and_retries(any_url):
    tg.write(any_url, pa.table({"a": [0]}))

    def sneak_in(fs, root, version):
        writer._before_commit = None
        tg.write(any_url, pa.table({"a": [1]}), mode="append")  # another writer wins this version

    writer._before_commit = sneak_in
    try:
        with pytest.raises(tg.ConflictError, match="retry") as exc:
            tg.write(any_url, pa.table({"a": [2]}), mode="append")
    finally:
        writer._before_commit = None
    assert tg.open(any_url).to_arrow().column("a").to_pylist() == [0, 1]
    ds = exc.value.retry()
    assert ds.version == 3
    assert sorted(tg.open(any_url).to_arrow().column("a").to_pylist()) == [0, 1, 2]


def test_losing_a_create_race_is_exists_error_and_keeps_nothing(any_url):
    """The loser of two creates can never commit: it is told the dataset now exists (not to retry), and
    its shards are gone."""
    def sneak_in(fs, root, version):
        writer._before_commit = None
        tg.write(any_url, pa.table({"a": [1]}))

    writer._before_commit = sneak_in
    try:
        with pytest.raises(tg.DatasetExistsError, match="at the same moment.*mode='append'"):
            tg.write(any_url, pa.table({"a": [2]}))
    finally:
        writer._before_commit = None
    ds = tg.open(any_url)
    assert ds.to_arrow().column("a").to_pylist() == [1]
    fs, root = ds.fs, ds.root
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root + "/data", detail=False))
    assert names == sorted(s.path.rsplit("/", 1)[-1] for s in ds.shards)


KILLED_WRITER = textwrap.dedent("""
    import sys, time, numpy as np, pyarrow as pa, tensorgrid as tg
    url = sys.argv[1]
    def batches():
        for i in range(10_000):
            yield pa.record_batch({"a": np.arange(i * 100, (i + 1) * 100), "pad": [b"x" * 1000] * 100})
            time.sleep(0.005)
    tg.write(url, batches(), mode="append", shard_rows=200)
""")


def test_writer_killed_mid_write_leaves_previous_version(tmp_path):
    url = str(tmp_path / "k")
    tg.write(url, pa.table({"a": np.arange(5), "pad": [b"y"] * 5}))
    data_dir = tmp_path / "k" / "data"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url])
    try:
        deadline = time.time() + 60
        while len(os.listdir(data_dir)) < 4 and time.time() < deadline:  # several shards are written
            time.sleep(0.05)
        assert len(os.listdir(data_dir)) >= 4, "the writer never got going"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    ds = tg.open(url)
    assert ds.version == 1
    assert ds.to_arrow().column("a").to_pylist() == list(range(5))
    ds.verify()
    orphans = len(os.listdir(data_dir)) - ds.num_shards
    assert orphans >= 3
    young = ds.vacuum()  # default keeps young files: a writer may still be at work
    assert young["removed"] == 0 and young["kept_young"] == orphans
    r = ds.vacuum(min_age_s=0)
    assert r["removed"] == orphans and r["bytes"] > 0
    assert len(os.listdir(data_dir)) == 1
    assert tg.open(url).to_arrow().column("a").to_pylist() == list(range(5))
    # the dataset still takes writes
    tg.write(url, pa.table({"a": [5], "pad": [b"z"]}), mode="append")
    assert tg.open(url).num_rows == 6


def test_killed_first_write_is_not_mistaken_for_foreign_parquet(tmp_path):
    url = str(tmp_path / "fresh")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (os.path.isdir(f"{url}/data") and len(os.listdir(f"{url}/data")) >= 2):
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(url)


def test_manifests_are_never_overwritten(tmp_path):
    url = str(tmp_path / "m")
    tg.write(url, pa.table({"a": [1]}))
    path = tmp_path / "m" / "_tensorgrid" / "v0000000001.json"
    before = path.read_bytes()
    tg.write(url, pa.table({"a": [2]}), mode="overwrite")
    assert path.read_bytes() == before


def test_vacuum_keeps_every_versions_shards(any_url):
    tg.write(any_url, pd.DataFrame({"a": [1]}))
    tg.write(any_url, pd.DataFrame({"a": [2]}), mode="overwrite")
    r = tg.open(any_url).vacuum(min_age_s=0)
    assert r["removed"] == 0
    assert tg.open(any_url, version=1).to_arrow().column("a").to_pylist() == [1]


def test_a_failed_first_write_never_breaks_a_concurrent_one(tmp_path):
    """Writer B has made the dataset's folders and is between shards when writer A, creating the same
    dataset, fails and cleans up after itself: B still commits."""
    import threading

    url = str(tmp_path / "d")
    started, go = threading.Event(), threading.Event()

    def slow_rows():  # B's folders exist, its first shard (10 rows) does not yet
        yield pa.record_batch({"a": list(range(5))})
        started.set()
        go.wait(30)
        yield pa.record_batch({"a": list(range(5, 20))})

    result = {}
    b = threading.Thread(target=lambda: result.setdefault("b", tg.write(url, slow_rows(), shard_rows=10)))
    b.start()
    assert started.wait(30)
    with pytest.raises(tg.SchemaMismatchError):
        tg.write(url, iter([{"a": i} for i in range(5000)] + [{"a": "x"}]), shard_rows=1000)
    go.set()
    b.join(60)
    assert sorted(tg.open(url).to_pandas()["a"]) == list(range(20))
    tg.open(url).verify()


def test_a_commit_fsyncs_shards_and_directories_before_and_after_the_manifest(tmp_path, monkeypatch):
    """On a power loss a manifest must never outlive the shards it names, nor vanish after commit
    returned: shards, data/ and the manifest's folder are fsynced, in that order."""
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    url = tmp_path / "d"
    tg.write(str(url), pa.table({"a": [0]}))
    monkeypatch.setattr(os, "fsync", spy)
    ds = tg.write(str(url), pa.table({"a": list(range(100))}), mode="append", shard_rows=40)
    new_shards = [str(url / s.path) for s in ds.shards[1:]]
    assert len(new_shards) == 3 and all(p in synced for p in new_shards)
    data_dir, meta_dir = synced.index(str(url / "data")), len(synced) - 1 - synced[::-1].index(str(url / "_tensorgrid"))
    assert max(synced.index(p) for p in new_shards) < data_dir < meta_dir
    manifest_tmp = [i for i, p in enumerate(synced) if "/_tensorgrid/.tmp-" in p]
    assert manifest_tmp and data_dir < manifest_tmp[-1] < meta_dir
