"""Retention: expire retires old versions (never the latest), time travel to them says so, and vacuum frees
the shards only they referenced once min_age_s has passed since the expiry, never before (a reader that
opened one just before may still be reading it). Racing writers, racing expires and SIGKILLs lose nothing."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

import tensorgrid as tg
from tensorgrid.cli import main as cli
from tensorgrid.store import manifest, retention, writer


@pytest.fixture
def hooks():
    yield
    retention._before_mark = None
    retention._before_forget = None
    writer._before_commit = None
    manifest._before_create = None


def _rows(start: int, n: int) -> pa.Table:
    return pa.table({"a": np.arange(start, start + n), "pad": [b"p" * 2000] * n})


def _files(ds, sub: str) -> dict[str, int]:
    """Relative path -> bytes of every file under the dataset's ``sub`` folder, listed afresh."""
    folder = ds.root.rstrip("/") + "/" + sub
    ds.fs.invalidate_cache(folder)
    try:
        found = ds.fs.find(folder, detail=True)
    except FileNotFoundError:
        return {}
    return {p.rsplit("/", 1)[-1]: int(info["size"]) for p, info in found.items()}


def _shard_names(ds) -> set[str]:
    return {s.path.rsplit("/", 1)[-1] for s in ds.shards}


def _five_versions(url: str) -> list:
    """create, append, overwrite, append, append: versions 1-2 share shards no kept version has."""
    tg.write(url, _rows(0, 40), shard_rows=20)  # 2 shards
    tg.write(url, _rows(40, 10), mode="append")
    tg.write(url, _rows(100, 30), mode="overwrite")
    tg.write(url, _rows(130, 5), mode="append")
    tg.write(url, _rows(135, 5), mode="append")
    return [tg.open(url, version=v) for v in range(1, 6)]


def test_keep_last_hides_old_versions_and_vacuum_frees_their_shards_only_after_the_delay(any_url):
    versions = _five_versions(any_url)
    latest_rows = versions[-1].to_arrow()
    reader = tg.open(any_url, version=2)  # opened before the expiry: still at work afterwards
    before = _files(reader, "data")

    assert tg.open(any_url).expire(keep_last=2) == {"expired": [1, 2, 3], "kept": [4, 5]}
    ds = tg.open(any_url)
    assert [v.version for v in ds.versions()] == [4, 5]
    for v in (1, 2, 3):
        with pytest.raises(tg.VersionExpiredError, match=f"version {v} of .* has expired.*oldest version kept is 4"):
            tg.open(any_url, version=v)
    with pytest.raises(tg.DatasetNotFoundError, match="no version 9"):
        tg.open(any_url, version=9)
    assert ds.version == 5 and ds.to_arrow().equals(latest_rows)

    # the expiry is seconds old: a vacuum that waits min_age_s after it keeps every shard for the reader
    r = tg.vacuum(any_url, min_age_s=3600)
    assert r["removed"] == 0 and _files(ds, "data") == before
    assert reader.to_arrow().column("a").to_pylist() == list(range(50))

    # once the delay has passed (min_age_s=0): the shards only versions 1-3 named go, and their manifests
    only_expired = set(before) - _shard_names(versions[3]) - _shard_names(versions[4])
    assert len(only_expired) == 3  # version 1's two shards, version 2's appended one
    r = tg.vacuum(any_url, min_age_s=0)
    after = _files(ds, "data")
    assert set(after) == set(before) - only_expired
    assert r["bytes"] >= sum(before[n] for n in only_expired) and sum(after.values()) < sum(before.values())
    assert sorted(manifest.list_versions(ds.fs, ds.root, expired=True)) == [4, 5]  # manifests 1-3 removed
    for v in (4, 5):
        assert tg.open(any_url, version=v).verify()["shards"] == len(versions[v - 1].shards)
    with pytest.raises(tg.VersionExpiredError, match="version 2 .* oldest version kept is 4"):
        tg.open(any_url, version=2)  # still "expired", not "no such version", with its manifest gone
    with pytest.raises(tg.CorruptShardError, match="missing"):
        reader.to_arrow()  # min_age_s is the reader's time: past it, its shards may go (here they did)

    # writers still find the latest and commit the next number; nothing else moves
    assert tg.write(any_url, _rows(140, 1), mode="append").version == 6
    assert tg.open(any_url).to_arrow().column("a").to_pylist() == list(range(100, 141))
    assert tg.vacuum(any_url, min_age_s=0)["removed"] == 0


def test_older_than_expires_versions_committed_before_it_and_never_the_latest(any_url):
    for i in range(3):
        tg.write(any_url, _rows(i, 1), mode="append")
    time.sleep(0.05)
    tg.write(any_url, _rows(3, 1), mode="append")
    stamps = [datetime.fromisoformat(v.timestamp) for v in tg.open(any_url).versions()]

    assert tg.expire(any_url, older_than=timedelta(hours=1)) == {"expired": [], "kept": [1, 2, 3, 4]}
    between = stamps[2] + (stamps[3] - stamps[2]) / 2  # after version 3, before version 4
    assert tg.expire(any_url, older_than=between)["expired"] == [1, 2, 3]
    tg.write(any_url, _rows(4, 1), mode="append")
    assert tg.expire(any_url, older_than=0) == {"expired": [4], "kept": [5]}  # even age 0 keeps the latest
    future = datetime.now(timezone.utc) + timedelta(days=1)
    assert tg.expire(any_url, older_than=future) == {"expired": [], "kept": [5]}
    assert tg.open(any_url).to_arrow().column("a").to_pylist() == [0, 1, 2, 3, 4]


def test_older_than_stops_at_a_version_stamped_young_by_a_clock_running_ahead(mem_url, monkeypatch):
    """Expired versions are always the oldest ones: a version whose writer's clock ran an hour ahead is kept,
    and so is every version after it (keeping is the safe side of clocks that disagree)."""
    tg.write(mem_url, _rows(0, 1), mode="append")

    class Ahead(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(hours=1)

    monkeypatch.setattr(manifest, "datetime", Ahead)
    tg.write(mem_url, _rows(1, 1), mode="append")
    monkeypatch.undo()
    for i in range(2, 4):
        tg.write(mem_url, _rows(i, 1), mode="append")
    # older_than=0: versions 1, 3 and 4 are older than now, version 2 says an hour from now
    assert tg.expire(mem_url, older_than=0) == {"expired": [1], "kept": [2, 3, 4]}


def test_the_delay_counts_from_the_expiry_not_from_the_shards_age(tmp_path):
    """Shards a year old, expired a second ago: min_age_s=60 keeps them; min_age_s=1 (passed) frees them."""
    url = str(tmp_path / "d")
    tg.write(url, _rows(0, 10))
    tg.write(url, _rows(10, 10), mode="overwrite")
    year_ago = time.time() - 365 * 86400
    for name in os.listdir(tmp_path / "d" / "data"):
        os.utime(tmp_path / "d" / "data" / name, (year_ago, year_ago))
    assert tg.expire(url, keep_last=1)["expired"] == [1]
    time.sleep(1.2)
    assert tg.vacuum(url, min_age_s=60)["removed"] == 0
    assert len(os.listdir(tmp_path / "d" / "data")) == 2
    assert tg.vacuum(url, min_age_s=1)["removed"] == 2  # version 1's shard and manifest
    assert len(os.listdir(tmp_path / "d" / "data")) == 1


def test_a_commit_during_expire_is_never_expired_and_racing_expires_agree(mem_url, hooks):
    for i in range(4):
        tg.write(mem_url, _rows(i, 1), mode="append")

    def racing(fs, root, floor):
        retention._before_mark = None
        assert floor == 2
        assert tg.write(mem_url, _rows(9, 1), mode="append").version == 5  # commits while expire decides
        assert tg.expire(mem_url, keep_last=2)["expired"] == [1, 2, 3]  # another expire, newer listing, wins

    retention._before_mark = racing
    assert tg.expire(mem_url, keep_last=2) == {"expired": [1, 2], "kept": [4, 5]}  # its marker changes nothing
    assert [v.version for v in tg.open(mem_url).versions()] == [4, 5]
    assert tg.expire(mem_url, keep_last=2) == {"expired": [], "kept": [4, 5]}  # idempotent
    tg.vacuum(mem_url, min_age_s=0)
    fs, root = tg.open(mem_url).fs, tg.open(mem_url).root
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root + "/_tensorgrid", detail=False))
    assert [n for n in names if n.startswith("expired-")] == ["expired-v0000000003"]  # the lower one was pruned
    with pytest.raises(tg.VersionExpiredError, match="version 1 .* oldest version kept is 4"):
        tg.open(mem_url, version=1)


def test_a_slow_write_whose_base_was_expired_and_vacuumed_never_reuses_a_freed_version_number(any_url, hooks):
    """A write based on version 2 computes for long before its first rows (a Spark job, a slow query):
    meanwhile versions 3 and 4 are committed, all but 4 expire and are vacuumed, so manifest 3's name is
    free again. Its commit must not take number 3 (born expired: its rows silently lost): it is a
    ConflictError whose retry commits on the latest."""
    tg.write(any_url, _rows(0, 1))
    tg.write(any_url, _rows(1, 1), mode="append")

    def slow_input():
        tg.write(any_url, _rows(2, 1), mode="append")
        tg.write(any_url, _rows(3, 1), mode="append")
        assert tg.expire(any_url, keep_last=1)["expired"] == [1, 2, 3]
        time.sleep(2.2)
        writer._before_commit = vacuum_now
        yield from _rows(9, 1).to_batches()

    def vacuum_now(fs, root, version):  # its shard is written, its commit not yet made
        writer._before_commit = None
        assert version == 3
        tg.vacuum(any_url, min_age_s=1.5)  # the expiry is older than that, this write's shard is not
        assert manifest.list_versions(fs, root, expired=True) == [4]  # manifests 1-3 removed

    with pytest.raises(tg.ConflictError) as e:
        tg.write(any_url, slow_input(), mode="append")
    assert e.value.retryable
    assert e.value.retry().version == 5
    assert tg.open(any_url).to_arrow().column("a").to_pylist() == [0, 1, 2, 3, 9]


def test_a_commit_paused_until_its_number_was_freed_says_so_loudly(mem_url, hooks):
    """The same, but the write pauses between its check and its create (SIGSTOP, a frozen VM): never silence."""
    tg.write(mem_url, _rows(0, 1))

    def meanwhile(fs, root, version):
        manifest._before_create = None
        tg.write(mem_url, _rows(1, 1), mode="append")
        tg.write(mem_url, _rows(2, 1), mode="append")
        tg.expire(mem_url, keep_last=1)
        tg.vacuum(mem_url, min_age_s=0)

    manifest._before_create = meanwhile
    with pytest.raises(tg.CorruptShardError, match="version 2 of .* was committed, but is expired already.*paused.*write the data again"):
        tg.write(mem_url, _rows(9, 1), mode="append")
    assert tg.open(mem_url).to_arrow().column("a").to_pylist() == [0, 1, 2]


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of keep_last"),
    ({"keep_last": 2, "older_than": 60}, "exactly one of keep_last"),
    ({"keep_last": 0}, "keep_last must be an int >= 1"),
    ({"keep_last": -3}, "keep_last must be an int >= 1"),
    ({"keep_last": 1.5}, "keep_last must be an int"),
    ({"keep_last": "2"}, "keep_last must be an int"),
    ({"keep_last": True}, "keep_last must be an int"),
    ({"older_than": -1}, "older_than must be a finite age >= 0"),
    ({"older_than": timedelta(seconds=-5)}, "older_than must be a finite age >= 0"),
    ({"older_than": float("nan")}, "older_than must be a finite age"),
    ({"older_than": float("inf")}, "older_than must be a finite age"),
    ({"older_than": datetime(2020, 1, 1)}, "naive datetime"),
    ({"older_than": "30d"}, "older_than must be a timedelta"),
    ({"older_than": True}, "older_than must be a timedelta"),
])
def test_bad_arguments_are_argument_errors_and_change_nothing(tmp_path, kwargs, match):
    url = str(tmp_path / "d")
    for i in range(3):
        tg.write(url, _rows(i, 1), mode="append")
    ds = tg.open(url)
    listing = (_files(ds, "_tensorgrid"), _files(ds, "data"))
    with pytest.raises(tg.ArgumentError, match=match):
        tg.expire(url, **kwargs)
    with pytest.raises(tg.ArgumentError, match=match):
        ds.expire(**kwargs)
    assert (_files(ds, "_tensorgrid"), _files(ds, "data")) == listing
    with pytest.raises(tg.DatasetNotFoundError, match="no TensorGrid dataset"):
        tg.expire(str(tmp_path / "nothing"), keep_last=1)


def test_cli_expire_prints_one_line_and_bad_input_is_one_line_exit_1(tmp_path, capsys):
    url = str(tmp_path / "d")
    for i in range(4):
        tg.write(url, _rows(i, 1), mode="append")
    assert cli(["expire", url, "--keep-last", "2"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("expired 2 version(s) (1, 2); kept 2 (3, 4)")
    assert cli(["expire", url, "--older-than", "30d"]) == 0
    assert capsys.readouterr().out.startswith("nothing to expire; kept 2 (3, 4)")
    assert cli(["versions", url]) == 0
    table = capsys.readouterr().out
    assert "append" in table and "create" not in table  # version 1 (the create) is no longer listed
    for args, needles in [
        (["info", url, "--version", "1"], ["version 1 of", "has expired", "the oldest version kept is 3"]),
        (["expire", url], ["one of --keep-last N or --older-than AGE"]),
        (["expire", url, "--keep-last", "1", "--older-than", "1d"], ["one of --keep-last"]),
        (["expire", url, "--keep-last", "0"], ["--keep-last must be an int >= 1, got 0"]),
        (["expire", url, "--keep-last", "two"], ["--keep-last must be an int >= 1, got 'two'"]),
        (["expire", url, "--older-than", "-5"], ["--older-than takes an age like"]),
        (["expire", url, "--older-than", "3w"], ["--older-than takes an age like"]),
        (["expire", url, "--older-than", "1" + "0" * 400], ["too large"]),
        (["expire", str(tmp_path / "none"), "--keep-last", "1"], ["no TensorGrid dataset"]),
    ]:
        assert cli(args) == 1, args
        captured = capsys.readouterr()
        err = captured.err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in captured.err, (args, captured.err)
        assert err[0].startswith("error: ") and all(n in err[0] for n in needles), (args, err[0])
    assert [v.version for v in tg.open(url).versions()] == [3, 4]  # the bad commands changed nothing
    assert cli(["expire", url, "--older-than", "0s"]) == 0
    assert capsys.readouterr().out.startswith("expired 1 version(s) (3); kept 1 (4)")


APPENDER = textwrap.dedent("""
    import json, sys, time, numpy as np, pyarrow as pa, tensorgrid as tg
    url, seconds, out = sys.argv[1], float(sys.argv[2]), open(sys.argv[3], "w")
    rng, value, end = np.random.default_rng(7), 0, time.time() + seconds
    while time.time() < end:
        value += 1
        mode = "overwrite" if rng.random() < 0.2 else "append"
        rows = pa.table({"a": [value] * 3, "pad": [b"w" * 3000] * 3})
        while True:
            try:
                ds = tg.write(url, rows, mode=mode)
                print(json.dumps(["commit", ds.version, mode, value]), file=out, flush=True)
                break
            except tg.ConflictError as e:  # a vacuum (min_age_s=0) took this write's shards: write again
                print(json.dumps(["conflict", e.retryable]), file=out, flush=True)
                if time.time() > end + 20:  # starved by min_age_s=0 on a loaded machine: stop, do not hang
                    print(json.dumps(["starved", value]), file=out, flush=True)
                    sys.exit(0)
            except Exception as e:
                print(json.dumps(["error", repr(e)]), file=out, flush=True)
                raise
""")


def test_expire_and_vacuum_racing_a_writer_process_lose_nothing_kept(tmp_path):
    """A process appends (sometimes overwrites) for ~6 s while this one expires and vacuums with min_age_s=0
    in a loop and another thread expires too: every kept version verifies whole, every version the writer
    committed reads its exact rows or is expired, the latest holds every row since the last overwrite."""
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [0] * 3, "pad": [b"w" * 3000] * 3}))
    out = tmp_path / "writer.log"  # a file, not a pipe: a chatty writer never blocks on a full pipe
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, url, "6", str(out)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    stop, failures, rounds = threading.Event(), [], {"expire": 0, "vacuum": 0, "verified": 0}

    def other_expirer():
        rng = np.random.default_rng(3)
        while not stop.is_set():
            try:
                tg.expire(url, keep_last=int(rng.integers(1, 5)))
            except Exception as e:  # noqa: BLE001 - any error is a failure of the test
                failures.append(repr(e))
            time.sleep(0.05)

    thread = threading.Thread(target=other_expirer)
    thread.start()
    try:
        while proc.poll() is None:
            tg.expire(url, keep_last=3)
            removed = tg.vacuum(url, min_age_s=0)["removed"]
            rounds["expire"] += 1
            rounds["vacuum"] += removed > 0
            for v in tg.open(url).versions():
                try:
                    kept = tg.open(url, version=v.version)
                except tg.VersionExpiredError:
                    continue  # the other thread expired it meanwhile
                kept.verify()  # only this thread vacuums: a version opened here stays whole while it reads
                rounds["verified"] += 1
            time.sleep(0.1)  # lets the writer's stage-then-commit through between vacuums
    finally:
        stop.set()
        thread.join()
        try:
            proc.wait(60)
        finally:
            proc.kill()
    log = [json.loads(line) for line in out.read_text().splitlines()]
    assert proc.returncode == 0 and not failures, (failures, [e for e in log if e[0] == "error"])
    assert all(e[0] in ("commit", "conflict", "starved") for e in log)
    commits = [e for e in log if e[0] == "commit"]
    assert len(commits) >= 3 and rounds["vacuum"] >= 1, (len(commits), rounds)
    expected, values = {1: [0] * 3}, [0] * 3
    for _, version, mode, value in commits:  # one writer: its commits are the versions, in order
        values = (values if mode == "append" else []) + [value] * 3
        expected[version] = values
    assert sorted(expected) == list(range(1, len(commits) + 2))
    for version, rows in expected.items():
        try:
            ds = tg.open(url, version=version)
        except tg.VersionExpiredError:
            continue
        assert ds.to_arrow().column("a").to_pylist() == rows
    latest = tg.open(url)
    assert latest.version == max(expected) and latest.to_arrow().column("a").to_pylist() == expected[latest.version]


KILLED = textwrap.dedent("""
    import os, sys, time, tensorgrid as tg
    from tensorgrid.store import manifest, retention
    url, where = sys.argv[1], sys.argv[2]
    def pause(*args):
        print("paused", flush=True)
        time.sleep(60)
    if where == "reading":  # mid-way through the manifests expire reads
        real, count = manifest.read, [0]
        def read(*args):
            count[0] += 1
            if count[0] == 40:
                pause()
            return real(*args)
        manifest.read = read
        tg.expire(url, older_than=0)
    elif where == "marking":
        retention._before_mark = pause
        tg.expire(url, older_than=0)
    else:  # a vacuum once the expired versions' shards are gone, before their manifests are
        retention._before_forget = pause
        tg.vacuum(url, min_age_s=0)
""")


def _run_until_paused_then_kill(url: str, where: str) -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILLED, url, where], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "paused"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL


def test_expire_and_vacuum_killed_mid_way_leave_a_readable_dataset_that_a_second_run_finishes(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, _rows(0, 1))
    for i in range(1, 80):  # 80 versions; every 10th an overwrite
        tg.write(url, _rows(i, 1), mode="overwrite" if i % 10 == 0 else "append")
    latest = tg.open(url).to_arrow()
    for where in ("reading", "marking"):
        _run_until_paused_then_kill(url, where)
        ds = tg.open(url)
        assert ds.version == 80 and ds.to_arrow().equals(latest)
        assert len(ds.versions()) == 80  # killed before its one marker: nothing expired, nothing half-done
    assert tg.expire(url, older_than=0) == {"expired": list(range(1, 80)), "kept": [80]}

    data = tmp_path / "d" / "data"
    shards_before = len(os.listdir(data))
    _run_until_paused_then_kill(url, "vacuum")
    assert len(os.listdir(data)) == 10  # the shards only expired versions used are gone, manifests not yet
    assert tg.open(url).to_arrow().equals(latest)
    with pytest.raises(tg.VersionExpiredError, match="oldest version kept is 80"):
        tg.open(url, version=79)
    r = tg.vacuum(url, min_age_s=0)  # the second run removes the expired manifests left behind
    assert [f for f in r["files"] if f.startswith("_tensorgrid/v")] == [
        f"_tensorgrid/v{v:010d}.json" for v in range(1, 80)]
    assert shards_before == 80 and len(os.listdir(data)) == 10
    assert tg.open(url).verify()["rows"] == 10
    assert [v.version for v in tg.open(url).versions()] == [80]
