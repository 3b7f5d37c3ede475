"""The Arrow cache is checked like the store: damaged files are rebuilt, never read."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch

from tensorgrid.loader import CacheRebuiltWarning, source
from tests.loader import helpers
from tests.loader.helpers import make

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def epoch(ds, cache, **kw) -> dict:
    """One epoch's columns; ``cache`` None: no cache. The background fill is waited for (the next epoch
    then reads the cache)."""
    cols = {"id": [], "x": [], "name": []}
    loader = ds.to_torch(batch_size=50, cache_dir=str(cache) if cache else False, **kw)
    for b in loader:
        for k in cols:
            cols[k].append(b[k])
    assert loader.source.wait_filled(60)
    return {"id": torch.cat(cols["id"]), "x": torch.cat(cols["x"]), "name": sum(cols["name"], [])}


def same(a: dict, b: dict) -> bool:
    return torch.equal(a["id"], b["id"]) and torch.equal(a["x"], b["x"]) and a["name"] == b["name"]


def forget_checks() -> None:
    """What a new process starts with: no cache file checked yet."""
    source._verified.clear()


def flip(path, value: int) -> None:
    """Flip one bit of an id value inside the file, keeping its size and mtime (no size check can see it)."""
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    at = data.find(np.int64(value).tobytes())
    assert at > 0
    data[at] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def damage(kind: str, path) -> str:
    """Damage one cache file; returns what the warning should say."""
    record = path.with_name(path.name + ".json")
    if kind == "flipped":
        flip(path, 250)
        return "fails its checksum"
    if kind == "truncated":
        os.truncate(path, path.stat().st_size // 2)
        return "bytes"
    if kind == "empty":
        path.write_bytes(b"")
        return "is empty"
    if kind == "record missing":
        record.unlink()
        return "no readable checksum record"
    if kind == "record garbled":
        record.write_bytes(b'{"bytes": 12, "xx')
        return "no readable checksum record"
    if kind == "record of other bytes":
        r = json.loads(record.read_text())
        record.write_text(json.dumps({**r, "xxh3": "0" * 16}))
        return "fails its checksum"
    raise AssertionError(kind)


@pytest.fixture
def ds(tmp_path):
    return make(str(tmp_path / "d"), n=600, shard_rows=200)  # ids 200..399 in the second shard


@pytest.mark.parametrize("kind", ["flipped", "truncated", "empty", "record missing", "record garbled",
                                  "record of other bytes"])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_damaged_cache_file_is_rebuilt_with_a_warning_and_right_values(ds, tmp_path, kind, workers):
    """Before: a flipped byte returned a wrong id, a truncated file raised ArrowInvalid, an empty one
    'ValueError: cannot mmap an empty file'. With workers (a transform) the main process checks the
    cache before starting them."""
    cache = tmp_path / "cache"
    kw = dict(transform=helpers.add_pid, num_workers=workers) if workers else {}
    truth = epoch(ds, None)  # no cache: read from the verified shards
    assert torch.equal(truth["id"], torch.arange(600))
    assert same(epoch(ds, cache, **kw), truth)
    path = next(p for p in cache.glob("*.arrow") if np.int64(250).tobytes() in p.read_bytes())
    said = damage(kind, path)
    forget_checks()  # the next epoch as a new process sees it
    with pytest.warns(CacheRebuiltWarning, match=said) as caught:
        again = epoch(ds, cache, **kw)
    assert same(again, truth)
    assert len([w for w in caught if issubclass(w.category, CacheRebuiltWarning)]) == 1
    assert str(path) in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheRebuiltWarning)
        forget_checks()
        assert same(epoch(ds, cache, **kw), truth)  # rebuilt for good: no warning the next time


def test_a_damaged_cache_file_is_caught_by_a_new_process(ds, tmp_path):
    cache = tmp_path / "cache"
    epoch(ds, cache)
    path = next(p for p in cache.glob("*.arrow") if np.int64(250).tobytes() in p.read_bytes())
    flip(path, 250)
    script = textwrap.dedent("""
        import sys, tensorgrid as tg
        ids = [i for b in tg.open(sys.argv[1]).to_torch(batch_size=64, cache_dir=sys.argv[2]) for i in b["id"].tolist()]
        print(ids == list(range(600)))
    """)
    out = subprocess.run([sys.executable, "-c", script, ds.url, str(cache)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"
    assert "CacheRebuiltWarning" in out.stderr and "fails its checksum" in out.stderr


def test_each_cache_file_is_hashed_once_per_process_not_every_epoch(ds, tmp_path):
    cache = tmp_path / "cache"
    loader = ds.to_torch(batch_size=50, cache_dir=str(cache))
    n0 = source.checks["files"]
    list(loader)
    loader.source.wait_filled(60)
    assert source.checks["files"] - n0 == 3  # each file hashed as it is built
    forget_checks()
    list(loader)
    assert source.checks["files"] - n0 == 6  # a new process checks each file once
    for _ in range(3):
        list(loader)
    assert source.checks["files"] - n0 == 6  # and never again while size and mtime stay the same


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_do_not_hash_the_cache_again_each_epoch(ds, tmp_path, method):
    """The main process checks the files before starting workers; forked workers inherit that, spawned
    ones receive it with the loader."""
    cache = tmp_path / "cache"
    loader = ds.to_torch(batch_size=50, cache_dir=str(cache), transform=helpers.add_cache_checks,
                         num_workers=2, multiprocessing_context=method)
    list(loader)  # built (and hashed) in the background, in this process
    loader.source.wait_filled(60)
    forget_checks()
    for hashed_here in (3, 0):  # each file once in the main process, then never again
        before = source.checks["files"]
        counts = torch.cat([b["checks"] for b in loader]).unique().tolist()
        assert source.checks["files"] - before == hashed_here
        # the workers hashed nothing: forked ones count what the main process had, spawned ones start at 0
        assert counts == ([source.checks["files"]] if method == "fork" else [0])


def test_cache_limit_evicts_files_with_their_records(ds, tmp_path):
    cache = tmp_path / "cache"
    epoch(ds, tmp_path / "full")
    one = max(p.stat().st_size for p in (tmp_path / "full").glob("*.arrow"))
    got = epoch(ds, cache, cache_limit=one)
    assert torch.equal(got["id"], torch.arange(600))
    arrows = {p.name for p in cache.glob("*.arrow")}
    records = {p.name[:-len(".json")] for p in cache.glob("*.arrow.json")}
    assert len(arrows) == 1 and records == arrows


def test_two_processes_building_one_cache_at_once_never_warn(tmp_path):
    """Two ranks on one machine share a cache_dir: the record is written before the file it describes, and
    both write the same bytes, so a file is never seen without its record or with another's."""
    ds = make(str(tmp_path / "d"), n=4000, shard_rows=100)
    script = textwrap.dedent("""
        import sys, warnings, tensorgrid as tg
        warnings.simplefilter("error")
        loader = tg.open(sys.argv[1]).to_torch(batch_size=50, cache_dir=sys.argv[2], rank=int(sys.argv[3]),
                                               world_size=2, shuffle=True)
        print(sum(int(b["_valid"].sum()) for b in loader))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, ds.url, str(tmp_path / "cache"), str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for r in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    assert sum(int(o) for o, _ in outs) == 4000
