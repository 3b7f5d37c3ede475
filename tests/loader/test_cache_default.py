"""The Arrow cache is on by default: where it goes, how to turn it off, its limit, sharing between processes,
and the ``tensorgrid cache`` command."""

import os
import subprocess
import sys
import textwrap

import pyarrow as pa
import pytest
import torch

import tensorgrid as tg
from tensorgrid.errors import ArgumentError
from tensorgrid.loader import cache
from tests.loader.helpers import make

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def root(tmp_path, monkeypatch):
    """A fresh default cache root for this test."""
    monkeypatch.setenv("TENSORGRID_CACHE_DIR", str(tmp_path / "tgcache"))
    return tmp_path / "tgcache" / cache.FORMAT


def one_epoch(ds, **kw) -> list[int]:
    loader = ds.to_torch(batch_size=64, shuffle=True, **kw)
    got = sorted(i for b in loader for i in b["id"].tolist())
    assert loader.source.wait_filled(60)
    return got


def test_a_store_dataset_is_cached_by_default_in_the_env_folder(tmp_path, root):
    ds = make(str(tmp_path / "d"), n=500, shard_rows=100)
    assert one_epoch(ds) == list(range(500))  # the first epoch reads Parquet while the cache fills
    assert len(list(root.glob("*.arrow"))) == 5 and len(list(root.glob("*.arrow.json"))) == 5
    loader = ds.to_torch(batch_size=64, shuffle=True)
    assert loader.source.cache_dir == str(root)  # every read of this epoch is a slice of the mapped cache
    assert sorted(i for b in loader for i in b["id"].tolist()) == list(range(500))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a thread's own nice value is Linux's")
def test_the_fill_runs_at_the_lowest_priority_and_the_reader_does_not(tmp_path, root):
    """The background fill must not compete with the epoch it serves (the first epoch ran 2-4x slower than
    with the cache off): its thread, and only it, is niced."""
    import threading

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    ds = make(str(tmp_path / "d"), n=300, shard_rows=100)
    assert one_epoch(ds) == list(range(300))
    (fill,) = [t for t in threading.enumerate() if t.name == "tensorgrid-cache-fill"]
    assert os.getpriority(os.PRIO_PROCESS, fill.native_id) == 19
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine
    assert len(list(root.glob("*.arrow"))) == 3


def test_local_foreign_parquet_is_cached_and_a_changed_file_is_never_served_stale(tmp_path, root):
    import pyarrow.parquet as pq

    folder = tmp_path / "foreign"
    folder.mkdir()
    for k in range(2):
        pq.write_table(pa.table({"id": list(range(k * 100, k * 100 + 100))}), folder / f"part-{k}.parquet")
    ds = tg.open(str(folder))
    assert one_epoch(ds) == list(range(200))
    assert len(list(root.glob("files-*.arrow"))) == 2
    pq.write_table(pa.table({"id": list(range(1000, 1100))}), folder / "part-1.parquet")  # rewritten in place
    again = tg.open(str(folder))
    assert one_epoch(again) == list(range(100)) + list(range(1000, 1100))  # the new rows, not the cached ones
    assert len(list(root.glob("files-*.arrow"))) == 3


def test_the_default_root_follows_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.delenv("TENSORGRID_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.resolve_dir(None) == str(tmp_path / "xdg" / "tensorgrid" / cache.FORMAT)
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.resolve_dir(None) == str(tmp_path / "home" / ".cache" / "tensorgrid" / cache.FORMAT)


def test_cache_dir_false_and_env_off_turn_it_off(tmp_path, root, monkeypatch):
    ds = make(str(tmp_path / "d"), n=300, shard_rows=100)
    loader = ds.to_torch(batch_size=64, cache_dir=False)
    assert loader.source.cache is None and one_epoch(ds, cache_dir=False) == list(range(300))
    monkeypatch.setenv("TENSORGRID_CACHE", "off")
    assert ds.to_torch(batch_size=64).source.cache is None and one_epoch(ds) == list(range(300))
    assert not root.exists()
    explicit = tmp_path / "mine"  # an explicit folder still works with the default turned off
    assert one_epoch(ds, cache_dir=str(explicit)) == list(range(300))
    assert len(list(explicit.glob("*.arrow"))) == 3
    monkeypatch.setenv("TENSORGRID_CACHE", "maybe")
    with pytest.raises(ArgumentError, match="TENSORGRID_CACHE must be on or off"):
        ds.to_torch(batch_size=64)


def test_in_memory_data_is_never_cached(root):
    ds = tg.from_arrow(pa.table({"id": list(range(100))}))
    assert ds.to_torch(batch_size=10).source.cache is None  # its reads are zero-copy views already
    assert not root.exists()


@pytest.mark.parametrize("text,expected", [("20G", 20 << 30), ("512 MiB", 512 << 20), ("1.5k", 1536), ("7", 7),
                                           (123, 123), ("2TB", 2 << 40)])
def test_sizes(text, expected):
    assert cache.parse_size("x", text) == expected


@pytest.mark.parametrize("bad", ["-1", "20X", "", -5, 1.5, None])
def test_bad_sizes_are_refused(bad):
    with pytest.raises(ArgumentError, match="must be an int >= 0 or a size such as '20G'"):
        cache.parse_size("cache_limit", bad)


def test_the_limit_evicts_the_least_recently_used_files_of_other_datasets(tmp_path, root, monkeypatch):
    a = make(str(tmp_path / "a"), n=300, shard_rows=100, dim=64)
    b = tg.write(str(tmp_path / "b"), a.to_pandas().assign(name="other"), shard_rows=100)  # other bytes, other keys
    one_epoch(a)
    files = sorted(root.glob("*.arrow"))
    size = max(p.stat().st_size for p in files)
    for i, p in enumerate(files):  # a's files last used in this order (atime is the LRU clock)
        os.utime(p, ns=(1_000_000_000 * (i + 1), p.stat().st_mtime_ns))
    monkeypatch.setenv("TENSORGRID_CACHE_LIMIT", str(4 * size + size // 2))
    assert one_epoch(b) == list(range(300))
    left = set(root.glob("*.arrow"))
    assert len(left) == 4 and files[-1] in left and not {files[0], files[1]} & left  # b's 3 + a's newest
    assert {p.name + ".json" for p in left} == {p.name for p in root.glob("*.arrow.json")}


def test_a_dataset_bigger_than_the_limit_is_cached_in_part_without_evicting_itself(tmp_path, root):
    ds = make(str(tmp_path / "d"), n=400, shard_rows=100, dim=64)
    one_epoch(ds, cache_dir=str(tmp_path / "probe"))
    size = max(p.stat().st_size for p in (tmp_path / "probe").glob("*.arrow"))
    for _ in range(2):  # no thrashing: the second epoch builds nothing
        assert one_epoch(ds, cache_limit=2 * size) == list(range(400))
        assert len(list(root.glob("*.arrow"))) == 2
    n = cache.fills["files"]
    assert one_epoch(ds, cache_limit=2 * size) == list(range(400)) and cache.fills["files"] == n


FILL = textwrap.dedent("""
    import sys, json, time, tensorgrid as tg
    from tensorgrid.loader import cache
    t0 = time.perf_counter()
    loader = tg.open(sys.argv[1]).to_torch(batch_size=50, rank=int(sys.argv[2]), world_size=2, shuffle=True)
    rows = sum(int(b["_valid"].sum()) for b in loader)
    loader.source.wait_filled(120)
    print(json.dumps({"rows": rows, "fills": cache.fills["files"], "s": time.perf_counter() - t0}))
""")


def run_ranks(url, ranks, together=True) -> list[dict]:
    import json

    def start(r):
        return subprocess.Popen([sys.executable, "-c", FILL, url, str(r)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
    outs = []
    procs = [start(r) for r in ranks] if together else []
    for r in ranks if not together else []:
        p = start(r)
        outs.append(p.communicate(timeout=120))
        assert p.returncode == 0, outs[-1][1]
    for p in procs:
        outs.append(p.communicate(timeout=120))
        assert p.returncode == 0, outs[-1][1]
    return [json.loads(o) for o, _ in outs]


def test_two_processes_filling_at_once_build_each_file_once(tmp_path, root):
    ds = make(str(tmp_path / "d"), n=3000, shard_rows=250, dim=256)  # 12 shards
    got = run_ranks(ds.url, [0, 1])
    assert sum(g["rows"] for g in got) == 3000
    assert sum(g["fills"] for g in got) == 12  # shared: each shard converted by one of them
    assert len(list(root.glob("*.arrow"))) == 12
    again = run_ranks(ds.url, [1], together=False)  # rank 1 coming later reuses it all
    assert again[0]["fills"] == 0


def test_the_cache_command_lists_sizes_and_clears(tmp_path, root, capsys):
    from tensorgrid.cli import main

    ds = make(str(tmp_path / "d"), n=300, shard_rows=100)
    one_epoch(ds)

    def cli(*args):
        capsys.readouterr()
        assert main(list(args)) == 0
        return " ".join(capsys.readouterr().out.split())

    listed = cli("cache")
    assert str(tmp_path / "d") in listed and "3 file(s)" in listed and "limit" in listed
    assert "loader cache: 3 of 3 shards" in cli("info", ds.url)
    assert "removed 3 file(s)" in cli("cache", "clear")
    assert [p.name for p in root.iterdir()] == [cache.MARKER]  # only the mark of a folder the cache made
    assert "loader cache: 0 of 3 shards" in cli("info", ds.url)
    assert "0 file(s)" in cli("cache", "--dir", str(root))


def test_a_killed_fill_leaves_nothing_that_is_served(tmp_path, root):
    """A temporary file left by a killed process is removed by the next fill of that shard."""
    ds = make(str(tmp_path / "d"), n=100, shard_rows=100)
    root.mkdir(parents=True)
    leftover = root / (ds.cache_key(0) + ".arrow.tmp-dead")
    leftover.write_bytes(b"half a file")
    assert one_epoch(ds) == list(range(100))
    assert not leftover.exists() and len(list(root.glob("*.arrow"))) == 1
    again = torch.cat([b["id"] for b in ds.to_torch(batch_size=100)])
    assert torch.equal(again, torch.arange(100))


def test_a_single_pass_reads_the_cache_but_builds_none(tmp_path, root):
    """cache_fill=False (predict, the trainer's look at one batch): no file is built for a one-off read, and
    files already there are read."""
    ds = make(str(tmp_path / "d"), n=500, shard_rows=100)
    loader = ds.to_torch(batch_size=64, shuffle=True, cache_fill=False)
    assert sorted(i for b in loader for i in b["id"].tolist()) == list(range(500))
    loader.source.wait_filled(10)
    assert list(root.glob("*.arrow")) == []
    model = torch.nn.Linear(4, 2)
    tg.predict(model, ds, features="x")
    assert list(root.glob("*.arrow")) == []
    assert one_epoch(ds) == list(range(500))  # a training-style loader fills it
    assert len(list(root.glob("*.arrow"))) == 5
    again = ds.to_torch(batch_size=64, shuffle=True, cache_fill=False)
    assert again.source.cache_complete()  # and a single pass then reads the files that are there
    assert sorted(i for b in again for i in b["id"].tolist()) == list(range(500))


def test_clearing_a_folder_of_someone_elses_files_deletes_nothing(tmp_path, root, capsys):
    """Only files the cache built (with their checksum record) are listed, evicted or cleared; stray locks and
    temporaries only in a folder the cache made."""
    from tensorgrid import cli

    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("mydata.arrow", "notes.lock", "draft.tmp-1"):
        (mine / name).write_text("user data")
    assert cli.main(["cache", "clear", "--dir", str(mine)]) == 0
    assert sorted(p.name for p in mine.iterdir()) == ["draft.tmp-1", "mydata.arrow", "notes.lock"]
    ds = make(str(tmp_path / "d"), n=200, shard_rows=100)
    assert one_epoch(ds, cache_dir=str(mine), cache_limit=1) == list(range(200))  # a limit that evicts
    assert (mine / "mydata.arrow").read_text() == "user data"


def test_a_killed_fills_temporary_is_swept_when_room_is_made(tmp_path, root):
    """A training rank leaves with os._exit: a fill cut short leaves <key>.arrow.tmp-*, outside the limit's
    count; the next eviction pass removes it (its lock is free)."""
    ds = make(str(tmp_path / "d"), n=200, shard_rows=100)
    assert one_epoch(ds) == list(range(200))
    leftover = root / "xxh3_64-0123456789abcdef-99.arrow.tmp-dead"
    leftover.write_bytes(b"\0" * 1000)
    cache.Cache(str(root), None).make_room(0)
    assert not leftover.exists() and len(list(root.glob("*.arrow"))) == 2
