"""Wide tables from the Arrow cache: same-dtype numeric columns are packed row-major in the cache file and
gathered in one pass; ``stack=`` hands them over as one (rows, k) tensor. The rows, their order and resume
are the same as without the cache; writes into a batch stay in it."""

import os
import tempfile

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.errors import ArgumentError
from tensorgrid.loader import cache
from tests.loader.test_columns import SETTINGS, _check_batches, tables


def served(ds, **kw):
    """A loader whose epoch is read from the filled Arrow cache (the first epoch fills it)."""
    first = ds.to_torch(**kw)
    list(first)
    assert first.source.wait_filled(60)
    loader = ds.to_torch(**kw)
    assert loader.source.refresh(), "the cache should hold every shard by now"
    return loader


def wide(n: int = 1000, k: int = 25) -> pa.Table:
    rng = np.random.default_rng(0)
    cols = {"id": np.arange(n, dtype=np.int64)}
    cols.update({f"f{i}": rng.standard_normal(n).astype(np.float32) for i in range(k)})
    cols["label"] = rng.integers(0, 10, n).astype(np.int64)
    return pa.table(cols)


@settings(**{**SETTINGS, "max_examples": 12})
@given(table=tables(), batch=st.integers(1, 50), shuffle=st.booleans(), stop=st.integers(0, 4),
       world=st.integers(1, 2), window=st.sampled_from([None, 7, 60]))
def test_epochs_from_packed_cache_files_equal_those_without_the_cache(table, batch, shuffle, stop, world, window):
    with tempfile.TemporaryDirectory() as d:
        ds = tg.write(f"{d}/t", table, shard_rows=97)
        kw = dict(batch_size=batch, shuffle=shuffle, seed=3, rank=world - 1, world_size=world,
                  shuffle_buffer=window)
        loader = served(ds, **kw, cache_dir=f"{d}/c")
        loader.set_epoch(1)
        got = list(loader)
        plain = ds.to_torch(**kw, cache_dir=False)
        plain.set_epoch(1)
        want = list(plain)
        assert [b["id"].tolist() for b in got] == [b["id"].tolist() for b in want]
        _check_batches(table, got)
        # a state taken with the cache resumes without it, and the other way round
        for a, b in ((loader, plain), (plain, loader)):
            a.set_epoch(1)
            it = iter(a)
            head = [next(it) for _ in range(min(stop, len(a)))]
            b.load_state_dict(a.state_dict())
            rest = list(b)
            assert [x["id"].tolist() for x in head + rest] == [x["id"].tolist() for x in want]


def test_the_cache_file_packs_same_dtype_columns_without_nulls_row_major(tmp_path):
    t = wide(300, 4).append_column("i0", pa.array(np.arange(300), pa.int32())) \
        .append_column("i1", pa.array(np.arange(300) * 2, pa.int32())) \
        .append_column("nul", pa.array([None if i % 7 == 0 else 1.0 for i in range(300)], pa.float32()))
    ds = tg.write(str(tmp_path / "d"), t)
    loader = served(ds, batch_size=32, cache_dir=str(tmp_path / "c"))
    packs = dict(loader.source.packs(0, 10, 20))
    assert set(packs) == {("f0", "f1", "f2", "f3"), ("id", "label"), ("i0", "i1")}  # "nul" has nulls: not packed
    f = packs[("f0", "f1", "f2", "f3")]
    assert f.shape == (10, 4) and f.flags.c_contiguous
    assert np.array_equal(f, np.stack([t.column(f"f{j}").to_numpy()[10:20] for j in range(4)], axis=1))
    # a loader reading some of a pack's columns does not use it (and gets its columns right)
    part = served(ds, batch_size=32, cache_dir=str(tmp_path / "c"), columns=["f1", "label"])
    assert part.source.packs(0, 0, 5) == []
    rows = {i: r for b in part for i, r in zip(b["label"].tolist(), b["f1"].tolist())}
    assert len(rows) <= 10 and all(np.isfinite(list(rows.values())))
    assert sum(len(b["f1"]) for b in part) == 300
    # every table the loader hands on has the dataset's own columns
    assert list(next(iter(loader))) == t.column_names


def test_stack_gives_one_tensor_equal_to_the_columns_and_a_view_from_the_cache(tmp_path):
    t = wide(2000, 25)
    ds = tg.write(str(tmp_path / "d"), t, shard_rows=700)
    names = [f"f{i}" for i in range(25)]
    ref = np.stack([t.column(c).to_numpy() for c in names], axis=1)
    for shuffle in (False, True):
        for kw in ({"cache_dir": False}, {"cache_dir": str(tmp_path / "c")}):
            loader = served(ds, **kw, batch_size=128, shuffle=shuffle, stack={"x": names}) \
                if kw["cache_dir"] else ds.to_torch(**kw, batch_size=128, shuffle=shuffle, stack={"x": names})
            seen = 0
            for b in loader:
                assert list(b) == ["id", "x", "label"]
                assert b["x"].shape == (len(b["id"]), 25) and b["x"].dtype == torch.float32
                assert b["x"].is_contiguous()
                assert np.array_equal(b["x"].numpy(), ref[b["id"].numpy()])
                seen += len(b["id"])
            assert seen == 2000
    # mixed dtypes stack to their common dtype by torch's promotion (one copy per chunk)
    b = next(iter(ds.to_torch(batch_size=10, stack={"z": ["id", "f0"]}, cache_dir=False)))
    assert b["z"].dtype == torch.float32 and b["z"][:, 0].tolist() == list(range(10))


def test_writes_into_packed_batches_stay_in_their_batch(tmp_path):
    t = wide(1000, 5)
    ds = tg.write(str(tmp_path / "d"), t)
    names = [f"f{i}" for i in range(5)]
    for shuffle in (False, True):
        for stack in (None, {"x": names}):
            loader = served(ds, batch_size=100, shuffle=shuffle, stack=stack, cache_dir=str(tmp_path / "c"))
            batches = list(loader)
            b0 = batches[0]
            if stack:
                b0["x"][:] = 1e9
            else:
                b0["f0"] += 100
                b0["f1"][:] = -1
                assert b0["f0"].untyped_storage().data_ptr() == b0["f4"].untyped_storage().data_ptr()  # one block
            again = list(ds.to_torch(batch_size=100, shuffle=shuffle, stack=stack, cache_dir=str(tmp_path / "c")))
            key = "x" if stack else "f0"
            want = {i: v for b in batches[1:] for i, v in zip(b["id"].tolist(), b[key].tolist())}
            got = {i: v for b in again for i, v in zip(b["id"].tolist(), b[key].tolist())}
            assert all(got[i] == v for i, v in want.items())
            first = set(b0["id"].tolist())
            ref = {i: v for i, v in enumerate(np.stack([t.column(c).to_numpy() for c in names], 1).tolist())} \
                if stack else dict(enumerate(t.column("f0").to_pylist()))
            assert all(got[i] == pytest.approx(ref[i]) for i in first)  # the cache and the data are untouched


@pytest.mark.parametrize("stack, match", [
    ([["f0", "f1"]], "must be a dict"),
    ({}, "must be a dict"),
    ({"x": ["f0"]}, "two or more"),
    ({"x": "f0"}, "two or more"),
    ({"x": ["f0", "nope"]}, "not loaded: \\['nope'\\]"),
    ({"x": ["f0", "s"]}, "\\['s'\\] are not"),
    ({"x": ["f0", "f1"], "y": ["f1", "f2"]}, "stacked twice"),
    ({"f2": ["f0", "f1"]}, "already a column"),
])
def test_bad_stack_arguments_are_refused(stack, match):
    ds = tg.from_arrow(wide(20, 3).append_column("s", pa.array(["a"] * 20)))
    with pytest.raises(ArgumentError, match=match):
        ds.to_torch(batch_size=4, stack=stack)


def test_stacking_a_column_with_nulls_is_a_clear_error():
    ds = tg.from_arrow(pa.table({"a": [1.0, None, 3.0], "b": [1.0, 2.0, 3.0]}))
    with pytest.raises(ArgumentError, match="'a' is not a plain numeric column"):
        list(ds.to_torch(batch_size=2, stack={"x": ["a", "b"]}))


def test_clear_removes_an_earlier_formats_files_too(tmp_path):
    root = tmp_path / "root"
    old = root / cache.OLD_FORMATS[0]
    ds = tg.write(str(tmp_path / "d"), wide(100, 2))
    served(ds, batch_size=10, cache_dir=str(old))  # a cache of the earlier format, built the same way
    assert list(old.glob("*.arrow"))
    got = cache.Cache(str(root / cache.FORMAT)).clear()
    assert got["removed"] == 1 and not old.exists()
    mine = root / cache.OLD_FORMATS[0]
    os.makedirs(mine)
    (mine / "notes.txt").write_text("mine")  # a folder without the cache's marker is not touched
    cache.Cache(str(root / cache.FORMAT)).clear()
    assert (mine / "notes.txt").exists()
