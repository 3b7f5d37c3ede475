"""Vacuum never deletes a file a committed version references, whatever the timing: versions committed
while it scans, conflicts retried after it ran, writes it removed, claims left by dead processes."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pyarrow as pa
import pytest

import tensorgrid as tg
from tensorgrid.store import claims, manifest, vacuum, writer


@pytest.fixture
def hooks():
    yield
    writer._before_commit = None
    vacuum._after_scan = None


def test_a_version_committed_during_the_scan_keeps_its_shards(tmp_path, hooks):
    """The scan has read every manifest; then a write whose shards are old (it took an hour) commits."""
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [0]}))

    def commit_an_old_write(fs, root):
        ds = tg.write(url, pa.table({"a": [1, 2]}), mode="append")
        for shard in ds.shards[1:]:
            os.utime(os.path.join(root, shard.path), (time.time() - 3600,) * 2)

    vacuum._after_scan = commit_an_old_write
    r = tg.open(url).vacuum(min_age_s=60)
    assert r["removed"] == 0
    ds = tg.open(url)
    assert ds.version == 2 and ds.to_arrow().column("a").to_pylist() == [0, 1, 2]
    ds.verify()


def test_a_write_vacuumed_before_its_commit_publishes_nothing(any_url, hooks):
    tg.write(any_url, pa.table({"a": [0]}))

    def vacuum_now(fs, root, version):
        writer._before_commit = None
        assert tg.vacuum(any_url, min_age_s=0)["removed"] == 1  # this write's shard, not yet committed

    writer._before_commit = vacuum_now
    with pytest.raises(tg.ConflictError, match="removed 1 of this write's shards.*write the data again") as e:
        tg.write(any_url, pa.table({"a": [1]}), mode="append")
    assert not e.value.retryable
    with pytest.raises(tg.TensorGridError, match="cannot be retried"):
        e.value.retry()
    ds = tg.open(any_url)
    assert ds.version == 1
    ds.verify()


def test_a_conflict_retried_after_a_vacuum_removed_its_shards_publishes_nothing(any_url, hooks):
    tg.write(any_url, pa.table({"a": [0]}))

    def sneak_in(fs, root, version):
        writer._before_commit = None
        tg.write(any_url, pa.table({"a": [1]}), mode="append")

    writer._before_commit = sneak_in
    with pytest.raises(tg.ConflictError) as e:
        tg.write(any_url, pa.table({"a": [2]}), mode="append")
    assert tg.vacuum(any_url, min_age_s=0)["removed"] == 1  # the conflicted write's kept shard
    with pytest.raises(tg.ConflictError, match="removed 1 of this write's shards"):
        e.value.retry()
    ds = tg.open(any_url)
    assert ds.version == 2
    ds.verify()


def test_a_commit_under_way_holds_off_vacuum_and_stale_claims_are_broken(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [0]}))
    fs, root = tg.open(url).fs, tg.open(url).root
    orphan = tmp_path / "d" / "data" / "part-0123456789ab-00000.parquet"
    orphan.write_bytes(b"PAR1 killed writer PAR1")
    assert claims.take(fs, root, "0123456789ab", "commit")  # a live commit of that write
    r = tg.vacuum(url, min_age_s=0)
    assert r["removed"] == 0 and r["kept_young"] == 1 and orphan.exists()
    claim = tmp_path / "d" / "_tensorgrid" / "claims" / "0123456789ab"
    body = json.loads(claim.read_text())
    body["time"] -= claims.STALE_S + 1  # its holder died long ago
    claim.write_text(json.dumps(body))
    r = tg.vacuum(url, min_age_s=0)
    assert r["removed"] == 1 and not orphan.exists() and not claim.exists()


def test_vacuum_cleans_a_folder_holding_only_an_interrupted_first_write(tmp_path):
    url = str(tmp_path / "d")
    (tmp_path / "d" / "_tensorgrid").mkdir(parents=True)
    (tmp_path / "d" / "data").mkdir()
    shard = tmp_path / "d" / "data" / "part-0123456789ab-00000.parquet"
    shard.write_bytes(b"half a shard")
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(url)
    assert tg.vacuum(url)["kept_young"] == 1  # the default spares a write that may still be running
    assert tg.vacuum(url, min_age_s=0)["removed"] == 1 and not shard.exists()
    assert tg.write(url, pa.table({"a": [1]})).version == 1  # the path is usable again
    with pytest.raises(tg.DatasetNotFoundError, match="no TensorGrid dataset"):
        tg.vacuum(str(tmp_path / "elsewhere"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1, "5", True, None])
def test_min_age_must_be_a_finite_number_of_seconds(tmp_path, bad):
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [1]}))
    with pytest.raises(tg.ArgumentError, match="min_age_s"):
        tg.open(url).vacuum(min_age_s=bad)
    with pytest.raises(ValueError):
        tg.vacuum(url, min_age_s=bad)


APPENDER = textwrap.dedent("""
    import sys, time, pyarrow as pa, tensorgrid as tg
    url, n = sys.argv[1], int(sys.argv[2])
    committed = 0
    def slow(i):  # a write that takes ~0.1 s: a vacuum can start while its first shards wait for the commit
        for _ in range(5):
            yield pa.record_batch({"a": [i] * 10, "pad": [b"x" * 200] * 10})
            time.sleep(0.02)
    for i in range(n):
        try:
            tg.write(url, slow(i), mode="append", shard_rows=10)
            committed += 1
        except tg.ConflictError:
            pass  # a vacuum with min_age_s=0 took this write's shards: nothing was committed
    print(committed)
""")


def test_vacuum_with_a_slow_scan_racing_a_real_writer_process_loses_no_committed_shard(tmp_path, monkeypatch):
    """A vacuum whose every manifest read takes 20 ms (a remote store), min_age_s=0, every 0.1 s while
    another process appends: every version any reader ever sees stays whole."""
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [-1] * 50, "pad": [b"x" * 200] * 50}), shard_rows=20)
    real_load = manifest.load

    def slow_load(*args, **kwargs):
        time.sleep(0.02)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(manifest, "load", slow_load)
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, url, "40"], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    removed = 0
    while proc.poll() is None:
        removed += tg.vacuum(url, min_age_s=0)["removed"]
        time.sleep(0.1)
    assert proc.returncode == 0
    committed = int(proc.stdout.read())
    monkeypatch.setattr(manifest, "load", real_load)
    ds = tg.open(url)
    assert ds.version == 1 + committed and committed >= 5
    for v in range(1, ds.version + 1):
        tg.open(url, version=v).verify()  # every committed version still has every shard
    assert ds.num_rows == 50 * (1 + committed)
    assert removed > 0  # the race was real: the vacuum did remove in-flight shards of uncommitted writes


def test_an_old_failed_runs_staging_folder_goes_once_its_files_are_removed(tmp_path):
    """Removing a folder's files makes the folder look new; its age is read before (it was kept before)."""
    ds = tg.write(str(tmp_path / "d"), pa.table({"x": [1, 2, 3]}))
    staging = os.path.join(ds.url, "data", ".stage-0123456789ab")
    os.makedirs(staging)
    for name in ("part-00000.parquet", "part-00000.json"):
        with open(os.path.join(staging, name), "wb") as f:
            f.write(b"x")
    old = time.time() - 60
    for path in (os.path.join(staging, "part-00000.parquet"), os.path.join(staging, "part-00000.json"), staging):
        os.utime(path, (old, old))
    assert tg.vacuum(ds.url, min_age_s=30)["removed"] == 2
    assert not os.path.exists(staging) and tg.open(ds.url).to_arrow().column("x").to_pylist() == [1, 2, 3]
