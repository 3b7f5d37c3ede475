"""The loader end to end: real worker processes (fork and spawn), resume in new processes, killed workers."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.loader.cache import wait_filled
from tests.loader import helpers
from tests.loader.helpers import ids, make
from tests.procs import children_of


def flat(batches):
    return [i for b in batches for i in b]


@pytest.fixture
def ds(tmp_path):
    return make(str(tmp_path / "d"))


def test_batches_are_tensors_with_the_right_values(ds):
    batches = list(ds.to_torch(batch_size=64))
    b = batches[0]
    assert set(b) == {"id", "x", "name"}
    assert b["id"].dtype == torch.int64 and b["x"].dtype == torch.float32 and b["x"].shape == (64, 4)
    assert b["name"][:2] == ["r0", "r1"]
    allx = torch.cat([b["x"] for b in batches])
    assert torch.equal(allx, torch.arange(4000, dtype=torch.float32).reshape(1000, 4))
    assert len(batches) == len(ds.to_torch(batch_size=64)) == 16


def test_columns_selection(ds):
    b = next(iter(ds.to_torch(batch_size=8, columns=["x"])))
    assert list(b) == ["x"]
    with pytest.raises(tg.ColumnNotFoundError):
        ds.to_torch(batch_size=8, columns=["nope"])


@pytest.mark.parametrize("workers", [1, 2, 5])
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_order_is_the_same_for_any_workers_and_start_method(ds, workers, method):
    ref = ids(ds.to_torch(batch_size=32, shuffle=True, seed=7, shuffle_buffer=200))
    got = ids(ds.to_torch(batch_size=32, shuffle=True, seed=7, shuffle_buffer=200, num_workers=workers,
                          multiprocessing_context=method))
    assert got == ref
    assert sorted(flat(got)) == list(range(1000))


def test_transform_runs_in_worker_processes(ds):
    pids = set()
    for b in ds.to_torch(batch_size=50, transform=helpers.add_pid, num_workers=2, shuffle_buffer=100):
        pids.update(b["pid"].tolist())
    assert len(pids) == 2 and os.getpid() not in pids


def test_shuffle_epochs_and_seeds(ds):
    loader = ds.to_torch(batch_size=100, shuffle=True, seed=1)
    e0, e1 = ids(loader), ids(loader)  # one epoch per iteration, advancing
    assert e0 != e1 and sorted(flat(e0)) == sorted(flat(e1)) == list(range(1000))
    again = ds.to_torch(batch_size=100, shuffle=True, seed=1)
    assert ids(again) == e0
    again.set_epoch(1)
    assert ids(again) == e1
    assert ids(ds.to_torch(batch_size=100, shuffle=True, seed=2)) != e0
    assert flat(ids(ds.to_torch(batch_size=100))) == list(range(1000))


def test_ranks_partition_exactly_once_with_valid_mask(ds):
    seen, counts = [], set()
    for r in range(3):
        loader = ds.to_torch(batch_size=64, rank=r, world_size=3, shuffle=True)
        batches = list(loader)
        counts.add(len(batches))
        for b in batches:
            seen += b["id"][b["_valid"]].tolist()
    assert len(counts) == 1
    assert sorted(seen) == list(range(1000))


def test_rank_and_world_size_from_environment(ds, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = ds.to_torch(batch_size=10)
    assert (loader.rank, loader.world_size) == (1, 2)
    assert next(iter(loader))["id"].tolist() == list(range(10, 20))


@settings(max_examples=25, deadline=None)
@given(shards=st.lists(st.integers(0, 30), min_size=1, max_size=6).filter(lambda s: sum(s) > 0),
       world=st.integers(1, 3), workers=st.integers(0, 3), batch=st.integers(1, 7), drop_last=st.booleans(),
       shuffle=st.booleans())
def test_exactly_once_end_to_end(shards, world, workers, batch, drop_last, shuffle):
    n = sum(shards)
    table = pa.table({"id": np.arange(n)})
    ds = tg.from_arrow(table)
    # shards of random sizes (including empty and 1-row ones) through foreign Parquet files
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        start = 0
        for i, k in enumerate(shards):
            pq.write_table(table.slice(start, k), f"{d}/part-{i:03d}.parquet")
            start += k
        for source in (ds, tg.open(d)):
            seen, counts = [], set()
            for r in range(world):
                loader = source.to_torch(batch_size=batch, rank=r, world_size=world, num_workers=workers,
                                         drop_last=drop_last, shuffle=shuffle, shuffle_buffer=5)
                bs = list(loader)
                counts.add(len(bs))
                for b in bs:
                    seen += (b["id"][b["_valid"]] if "_valid" in b else b["id"]).tolist()
            assert len(counts) == 1
            if drop_last:
                assert len(set(seen)) == len(seen) and n - len(seen) < world * batch
            else:
                assert sorted(seen) == list(range(n))


RESUME = textwrap.dedent("""
    import json, sys, tensorgrid as tg
    url, state, workers, rank, world, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), \
        int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
    loader = tg.open(url).to_torch(batch_size=batch, shuffle=True, seed=5, shuffle_buffer=300,
                                   num_workers=workers, rank=rank, world_size=world, drop_last=True)
    loader.load_state_dict(state)
    print(json.dumps([b["id"].tolist() for b in loader]))
""")


def _resume_in_new_process(url, state, workers, rank=0, world=1, batch=32):
    out = subprocess.run([sys.executable, "-c", RESUME, url, json.dumps(state), str(workers), str(rank),
                          str(world), str(batch)], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("stop_at, workers", [(0, 0), (5, 0), (5, 2), (17, 3), (30, 1)])
def test_exact_resume_in_a_new_process(ds, stop_at, workers):
    loader = ds.to_torch(batch_size=32, shuffle=True, seed=5, shuffle_buffer=300, num_workers=1, drop_last=True)
    loader.set_epoch(3)
    full = ids(loader)  # the uninterrupted epoch
    loader.set_epoch(3)
    it = iter(loader)
    head = [next(it)["id"].tolist() for _ in range(stop_at)]
    state = json.loads(json.dumps(loader.state_dict()))  # survives serialisation
    del it
    assert state["epoch"] == 3 and state["batch"] == stop_at
    rest = _resume_in_new_process(ds.url, state, workers)
    assert head + rest == full


def test_resume_with_another_world_size_same_global_batch(ds):
    """2 ranks x 32 stopped after 6 batches, resumed as 1 rank x 64 (and 4 x 16): the remaining global
    batches hold exactly the rows the uninterrupted run would have given."""
    def run(world, batch, start=None):
        per_rank = []
        for r in range(world):
            loader = ds.to_torch(batch_size=batch, shuffle=True, seed=5, shuffle_buffer=300, rank=r,
                                 world_size=world, drop_last=True)
            if start is not None:
                loader.load_state_dict(start)
            per_rank.append(ids(loader))
        return [sorted(x for rank in per_rank for x in rank[k]) for k in range(len(per_rank[0]))]

    full = run(2, 32)
    loader = ds.to_torch(batch_size=32, shuffle=True, seed=5, shuffle_buffer=300, rank=0, world_size=2, drop_last=True)
    it = iter(loader)
    for _ in range(6):
        next(it)
    state = loader.state_dict()
    for world, batch in ((1, 64), (4, 16)):
        assert run(world, batch, state) == full[6:]
    with pytest.raises(tg.errors.ResumeError, match="global_batch"):
        ds.to_torch(batch_size=32, shuffle=True, seed=5).load_state_dict(state)


def test_state_after_a_full_epoch_starts_the_next(ds):
    loader = ds.to_torch(batch_size=100, shuffle=True)
    list(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batch"] == 0


def test_transform_error_surfaces_with_shard_and_rows(ds):
    for workers in (0, 2):
        loader = ds.to_torch(batch_size=10, transform=helpers.fail_on_id_13, num_workers=workers)
        with pytest.raises(tg.errors.TransformError, match=r"batch 1 .*shard 0 rows 10\.\.19.*unlucky row") as e:
            list(loader)
        assert "\n" not in str(e.value) and str(e.value).startswith("transform failed")  # one line, any workers


def test_random_transform_stays_reproducible_in_process(ds):
    def run():
        torch.manual_seed(0)
        out = []
        for b in ds.to_torch(batch_size=10, transform=helpers.add_noise):
            out.append(b["x"].sum().item() + torch.rand(1).item())  # the caller draws too (like dropout)
        return out

    assert run() == run()


def test_random_transform_in_workers_repeats_for_any_workers_and_after_resume(ds):
    kw = dict(batch_size=10, shuffle=True, transform=helpers.add_noise)
    ref = [b["x"] for b in ds.to_torch(num_workers=1, **kw)]
    assert len(ref) == len(ds.to_torch(**kw)) > 4
    for workers in (2, 3):
        got = [b["x"] for b in ds.to_torch(num_workers=workers, **kw)]
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(ref, got))
    first = ds.to_torch(num_workers=2, **kw)
    it = iter(first)
    for _ in range(4):
        next(it)
    state = first.state_dict()
    del it
    resumed = ds.to_torch(num_workers=1, **kw)
    resumed.load_state_dict(state)
    rest = [b["x"] for b in resumed]
    assert len(rest) == len(ref) - 4 and all(torch.equal(a, b) for a, b in zip(ref[4:], rest))
    second = ds.to_torch(num_workers=1, **kw)
    second.set_epoch(1)
    assert not torch.equal(ref[0], next(iter(second))["x"])  # another epoch, other draws


def test_killed_worker_is_a_clear_error_not_a_hang(ds):
    loader = ds.to_torch(batch_size=10, transform=helpers.die_on_id_13, num_workers=2, shuffle_buffer=10)
    t0 = time.time()
    with pytest.raises(tg.errors.LoaderWorkerError, match="worker"):
        list(loader)
    assert time.time() - t0 < 60


def test_break_out_of_the_loop_stops_workers(ds):
    before = set(children_of(os.getpid()))
    loader = ds.to_torch(batch_size=10, num_workers=2, shuffle_buffer=20)
    for i, _ in enumerate(loader):
        if i == 3:
            break
    deadline = time.time() + 20
    while set(children_of(os.getpid())) - before and time.time() < deadline:
        time.sleep(0.1)
    assert not set(children_of(os.getpid())) - before
    assert len(ids(loader)) == 100  # and it can iterate again


def test_works_on_every_dataset_kind(tmp_path, ds):
    t = pa.table({"id": np.arange(100), "v": np.arange(100) * 0.5})
    pq.write_table(t, tmp_path / "f.parquet", row_group_size=7)
    pd.DataFrame({"id": range(100)}).to_csv(tmp_path / "f.csv", index=False)
    kinds = [tg.open(str(tmp_path / "f.parquet")), tg.open(str(tmp_path / "f.csv")), tg.from_arrow(t),
             ds.sql("SELECT id FROM ds WHERE id < 100")]
    for k in kinds:
        got = sorted(flat(ids(k.to_torch(batch_size=16, shuffle=True, num_workers=1))))
        assert got == list(range(100)), type(k)


def test_memory_url_with_cache_dir_and_limit(tmp_path, mem_url):
    ds = make(mem_url, n=500, shard_rows=100)
    # remote without a cache: shards fetched into memory, the next chunk prefetched in a thread
    prefetched = ds.to_torch(batch_size=50, shuffle=True, shuffle_buffer=100)
    assert sorted(flat(ids(prefetched))) == list(range(500))
    assert ids(prefetched) != ids(ds.to_torch(batch_size=50))
    cache = tmp_path / "cache"
    loader = ds.to_torch(batch_size=50, cache_dir=str(cache), shuffle=True)
    assert sorted(flat(ids(loader))) == list(range(500))
    assert loader.source.wait_filled(60)  # filled in the background while the epoch read Parquet
    assert len(list(cache.glob("*.arrow"))) == 5
    one_shard = max(p.stat().st_size for p in cache.glob("*.arrow"))
    limited = ds.to_torch(batch_size=50, cache_dir=str(tmp_path / "c2"), cache_limit=2 * one_shard)
    assert flat(ids(limited)) == list(range(500))
    assert limited.source.wait_filled(60)
    assert len(list((tmp_path / "c2").glob("*.arrow"))) <= 2


def test_writing_into_a_zero_copy_batch_never_corrupts_the_cache(tmp_path):
    url = str(tmp_path / "big")
    x = np.arange(64 * 4096, dtype=np.uint8).reshape(64, 4096)
    tg.write(url, pd.DataFrame({"x": list(x)}), shard_rows=32)
    cache = tmp_path / "cache"
    loader = tg.open(url).to_torch(batch_size=16, cache_dir=str(cache))
    files_before = {p: p.read_bytes() for p in cache.glob("*.arrow")}
    for b in loader:
        b["x"].fill_(7)  # the user scribbles on the batch
    assert loader.source.wait_filled(60)
    files = {p: p.read_bytes() for p in cache.glob("*.arrow")}
    assert files and all(files_before.get(p, files[p]) == files[p] for p in files)
    again = torch.cat([b["x"] for b in tg.open(url).to_torch(batch_size=16, cache_dir=str(cache))])
    assert torch.equal(again, torch.from_numpy(x))
    second_epoch = torch.cat([b["x"] for b in loader])  # the same loader maps afresh each epoch
    assert torch.equal(second_epoch, torch.from_numpy(x))


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("kind", ["parquet", "cached", "in-memory"])
def test_writing_into_batches_never_changes_a_later_epoch(tmp_path, shuffle, kind):
    """Shuffled in-process loaders keep decoded row groups across epochs, and an in-memory dataset is the
    user's own table: no batch may be a view of either (including a rank's batch of padding rows only)."""
    n = 201  # global batch 8: the last window holds one real row (a view), rank 1's last batch only padding
    x = np.arange(n * 8, dtype=np.int64).reshape(n, 8)
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": list(x)}), shard_rows=50)
    if kind == "in-memory":
        table = ds.to_arrow()
        ds = tg.from_arrow(table)
    kw = dict(batch_size=4, shuffle=shuffle, seed=3, cache_dir=str(tmp_path / "c") if kind == "cached" else None)
    for rank in range(2):
        loader = ds.to_torch(rank=rank, world_size=2, shuffle_buffer=8, **kw)
        first = [b["x"].clone() for b in loader]
        for _ in range(2):  # scribble on every batch of an epoch, then check the next one
            for b in loader:
                b["x"].fill_(-1)
        loader.set_epoch(0)
        again = [b["x"] for b in loader]
        assert all(torch.equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)
    if kind == "in-memory":  # and the user's table itself is untouched
        assert np.array_equal(np.stack(table.column("x").to_numpy(zero_copy_only=False)), x)


def test_a_lambda_transform_runs_in_spawned_workers(ds):
    """Spawned workers (the default under Ray) get the transform by value: a lambda, or a function defined in
    a script's or a notebook's __main__, works there as in this process."""
    scale = 2.0
    loader = ds.to_torch(batch_size=8, transform=lambda b: {**b, "x": b["x"] * scale}, num_workers=2,
                         multiprocessing_context="spawn")
    plain = ds.to_torch(batch_size=8)
    got, want = [b["x"] for b in loader], [b["x"] * scale for b in plain]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_bad_arguments(ds, tmp_path):
    with pytest.raises(tg.TensorGridError, match="batch_size"):
        ds.to_torch(batch_size=0)
    with pytest.raises(tg.TensorGridError, match="rank"):
        ds.to_torch(batch_size=4, rank=2, world_size=2)
    lock = threading.Lock()  # nothing pickles a lock: refused before any worker starts
    with pytest.raises(tg.TensorGridError, match="picklable"):
        ds.to_torch(batch_size=4, transform=lambda b, lock=lock: b, num_workers=1, multiprocessing_context="spawn")
    with pytest.raises(tg.EmptyDataError):
        tg.from_arrow(pa.table({"a": pa.array([], pa.int64())})).to_torch(batch_size=4)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("cache", [False, True])
def test_memory_stays_flat_over_ten_epochs(tmp_path, cache):
    """A 64 MB dataset through an 8 MB budget: RSS after epoch 10 within a few % of after epoch 2."""
    url = str(tmp_path / "m")
    rng = np.random.default_rng(0)
    tg.write(url, pd.DataFrame({"x": list(rng.integers(0, 255, (16_000, 4096), dtype=np.uint8)),
                                "id": np.arange(16_000)}), shard_bytes=8 << 20)
    loader = tg.open(url).to_torch(batch_size=64, shuffle=True, memory_budget=8 << 20,
                                   cache_dir=str(tmp_path / "c") if cache else None)
    assert loader.window_rows * 4096 < 8 << 20
    rss = []
    for epoch in range(10):
        n = 0
        for b in loader:
            n += len(b["id"])
        assert n == 16_000
        if epoch == 0:  # the default Arrow cache's background fill (niced: slow on a busy host) maps its files
            assert wait_filled(120)  # when it is done: the steady state starts then
        rss.append(_rss())
    assert rss[-1] <= rss[1] * 1.05 + (4 << 20), [r >> 20 for r in rss]


EXIT_MIDWAY = textwrap.dedent("""
    import sys, tensorgrid as tg
    loader = tg.open(sys.argv[1]).to_torch(batch_size=10, num_workers=2, shuffle=True, shuffle_buffer=20)
    it = iter(loader)
    next(it); next(it)
    print("leaving with workers running", flush=True)
    # no cleanup: the interpreter exits with the iterator and its workers alive
""")


def test_interpreter_exit_with_live_workers_does_not_hang(ds):
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", EXIT_MIDWAY, ds.url], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "leaving" in out.stdout and time.time() - t0 < 30


@pytest.mark.parametrize("shuffle_buffer", [None, 37])
def test_cached_and_parquet_loaders_deliver_the_same_batches(tmp_path, shuffle_buffer):
    """The Arrow cache gathers a shuffle window its own way (pieces end to end, then one gather; or per
    shard when the window's rows are spread thin): same rows, same order, every column type."""
    n = 523
    rng = np.random.default_rng(1)
    df = pd.DataFrame({"id": np.arange(n), "name": [f"row-{i}" for i in range(n)],
                       "x": list(rng.random((n, 3), dtype=np.float32)), "w": rng.random(n)})
    ds = tg.write(str(tmp_path / "d"), df, shard_rows=60)
    for world, rank in [(2, 0), (2, 1), (4, 0), (4, 3)]:
        kw = dict(batch_size=8, shuffle=True, seed=5, rank=rank, world_size=world, shuffle_buffer=shuffle_buffer)
        plain = list(ds.to_torch(**kw))
        cached = list(ds.to_torch(cache_dir=str(tmp_path / "c"), **kw))
        assert len(plain) == len(cached) > 0
        for a, b in zip(plain, cached):
            assert a["name"] == b["name"] == [f"row-{i}" for i in a["id"].tolist()]
            assert torch.equal(a["id"], b["id"]) and torch.equal(a["w"], b["w"]) and torch.equal(a["x"], b["x"])
            assert torch.equal(b["x"], torch.from_numpy(np.stack(df["x"].to_numpy()[b["id"].numpy()])))


def test_bad_values_are_named(ds):
    for kw, needle in ((dict(memory_budget=-1), "memory_budget"), (dict(seed="a"), "seed")):
        with pytest.raises(tg.TensorGridError, match=needle):
            ds.to_torch(batch_size=4, **kw)
    for state in ({}, None, {"epoch": 0}):
        with pytest.raises(tg.errors.ResumeError, match="not a loader state"):
            ds.to_torch(batch_size=4).load_state_dict(state)
    assert len(ds.to_torch(batch_size=4, seed=np.int64(3), memory_budget=np.int64(1 << 20))) > 0


def test_columns_chunked_differently_in_memory():
    t = pa.concat_tables([pa.table({"id": [0]}), pa.table({"id": [1, 2, 3, 4, 5, 6]})])
    t = t.append_column("f", pa.array(np.arange(7.0)))  # one chunk, against id's two
    got = [(i, f) for r in range(3) for b in tg.from_arrow(t).to_torch(batch_size=1, world_size=3, rank=r)
           for i, f, v in zip(b["id"].tolist(), b["f"].tolist(), b["_valid"].tolist()) if v]
    assert sorted(got) == [(i, float(i)) for i in range(7)]


def test_order_and_resume_do_not_depend_on_workers_under_a_memory_budget(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"id": np.arange(300)}), shard_rows=100)
    kw = dict(batch_size=4, shuffle=True, memory_budget=4096)  # windows of a few dozen rows
    full = ids(ds.to_torch(**kw))
    for workers in (1, 3):
        assert ids(ds.to_torch(num_workers=workers, **kw)) == full
    first = ds.to_torch(**kw)
    it = iter(first)
    for _ in range(7):
        next(it)
    resumed = ds.to_torch(num_workers=2, **kw)
    resumed.load_state_dict(first.state_dict())
    assert ids(resumed) == full[7:]
