"""Batch columns: many fixed-width columns gathered as one block (same results as column by column), lists of
numbers padded with their lengths, and pinned memory."""

import tempfile
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.errors import ArgumentError
from tensorgrid.loader import collate, stream

NUMERIC = [pa.int8(), pa.uint8(), pa.int32(), pa.int64(), pa.float32(), pa.float64()]
SETTINGS = dict(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tables(draw):
    """An id column, then numeric columns of random types (some with nulls), a fixed-shape tensor column, a
    string column, in a random order."""
    n = draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cols = {}
    for i in range(draw(st.integers(1, 8))):
        t = draw(st.sampled_from(NUMERIC))
        values = rng.integers(0, 100, n).astype(t.to_pandas_dtype())
        mask = rng.random(n) < 0.2 if draw(st.booleans()) and i % 3 == 0 else None
        cols[f"c{i}"] = pa.array(values, t, mask=mask)
    if draw(st.booleans()):
        cols["t"] = pa.FixedShapeTensorArray.from_numpy_ndarray(rng.random((n, 2, 3)).astype(np.float32))
    if draw(st.booleans()):
        cols["s"] = pa.array([f"s{i}" if i % 5 else None for i in range(n)])
    names = draw(st.permutations(list(cols)))
    return pa.table({"id": np.arange(n, dtype=np.int64), **{k: cols[k] for k in names}})


def _values(v):
    return v.tolist() if isinstance(v, torch.Tensor) else list(v)


def _check_batches(table: pa.Table, batches: list) -> None:
    """Each batch equals the table's rows at its ids, column by column (the per-column conversion)."""
    for b in batches:
        assert [k for k in b if k != "_valid"] == table.column_names
        ids = b["id"].numpy()
        want = table.take(pa.array(ids))
        for name in table.column_names:
            got, col = b[name], want.column(name)
            if isinstance(got, torch.Tensor):
                ref = collate.column_to_torch(col.combine_chunks().fill_null(0) if col.null_count else col)
                assert got.dtype == ref.dtype and got.shape == ref.shape, name
            else:
                assert table.column(name).null_count or pa.types.is_string(col.type), name  # lists only then
            if isinstance(col.type, pa.FixedShapeTensorType):
                assert torch.equal(got, collate.column_to_torch(col)), name
            else:
                assert _values(got) == col.to_pylist(), name


@settings(**SETTINGS)
@given(table=tables(), batch=st.integers(1, 70), shuffle=st.booleans(), seed=st.integers(0, 3),
       window=st.integers(1, 200), world=st.integers(1, 3), rank=st.integers(0, 2))
def test_block_gather_equals_the_per_column_result(table, batch, shuffle, seed, window, world, rank):
    ds = tg.from_arrow(table)
    everyone = []
    for r in range(world):  # a rank's share of a window is spread thin: the gather per table
        batches = list(ds.to_torch(batch_size=batch, shuffle=shuffle, seed=seed, shuffle_buffer=window,
                                   rank=r, world_size=world))
        _check_batches(table, batches)
        everyone += [i for b in batches for i, ok in zip(b["id"].tolist(), b.get("_valid", [True] * batch)) if ok]
    assert sorted(everyone) == list(range(table.num_rows))


@settings(**{**SETTINGS, "max_examples": 15})
@given(table=tables(), batch=st.integers(1, 50), shuffle=st.booleans(), stop=st.integers(0, 5),
       world=st.integers(1, 2), cache=st.booleans())
def test_block_gather_from_the_store_and_after_resume(table, batch, shuffle, stop, world, cache):
    with tempfile.TemporaryDirectory() as d:
        ds = tg.write(f"{d}/t", table, shard_rows=97)
        kw = dict(batch_size=batch, shuffle=shuffle, seed=1, rank=world - 1, world_size=world,
                  **({} if cache else {"cache_dir": False}))
        loader = ds.to_torch(**kw)
        full = list(loader)
        _check_batches(table, full)
        loader = ds.to_torch(**kw)
        it = iter(loader)
        head = [next(it) for _ in range(min(stop, len(loader)))]
        fresh = ds.to_torch(**kw)
        fresh.load_state_dict(loader.state_dict())
        rest = list(fresh)
        assert [b["id"].tolist() for b in head + rest] == [b["id"].tolist() for b in full]
        _check_batches(table, head + rest)


def test_columns_of_one_dtype_are_views_of_one_block_and_writes_stay_in_their_batch(tmp_path):
    n = 1000
    table = pa.table({"id": np.arange(n), **{f"f{i}": np.full(n, i, np.float32) for i in range(5)}})
    ds = tg.write(str(tmp_path / "w"), table)
    for shuffle in (False, True):
        loader = ds.to_torch(batch_size=100, shuffle=shuffle)
        batches = list(loader)
        b0, b1 = batches[0], batches[1]
        assert b0["f0"].untyped_storage().data_ptr() == b0["f4"].untyped_storage().data_ptr()  # one block
        assert all(b0[f"f{i}"].is_contiguous() for i in range(5))  # rows of a (k, rows) block
        b0["f0"] += 100
        b0["f1"][:] = -1
        assert (b0["f2"] == 2).all() and (b1["f0"] == 0).all() and (b1["f1"] == 1).all()
        again = list(ds.to_torch(batch_size=100, shuffle=shuffle))
        assert all((b["f0"] == 0).all() and (b["f1"] == 1).all() for b in again)  # cache and data untouched
        assert ds.to_arrow().column("f0").to_pylist() == [0.0] * n


# --- lists of numbers: padded tensors and lengths ------------------------------------------------------


@st.composite
def ragged(draw):
    n = draw(st.integers(1, 120))
    t = draw(st.sampled_from([pa.int64(), pa.int32(), pa.float32(), pa.float64()]))
    rows = []
    for _ in range(n):
        kind = draw(st.sampled_from(["list", "list", "list", "empty", "null"]))
        if kind == "null":
            rows.append(None)
        elif kind == "empty":
            rows.append([])
        else:
            rows.append(draw(st.lists(st.one_of(st.integers(1, 1000), st.none()) if draw(st.booleans())
                                      else st.integers(1, 1000), max_size=12)))
    return t, rows


def _expected_padded(rows, dtype):
    lengths = [len(r or []) for r in rows]
    out = np.zeros((len(rows), max(lengths, default=0)), dtype)
    for i, r in enumerate(rows):
        out[i, :len(r or [])] = [0 if v is None else v for v in (r or [])]
    return out, lengths


@settings(**SETTINGS)
@given(data=ragged(), batch=st.integers(1, 40), shuffle=st.booleans(), in_store=st.booleans(),
       large=st.booleans())
def test_lists_arrive_padded_with_lengths(data, batch, shuffle, in_store, large):
    t, rows = data
    lists = pa.array(rows, pa.large_list(t) if large else pa.list_(t))
    table = pa.table({"id": np.arange(len(rows)), "tokens": lists, "s": [str(i) for i in range(len(rows))]})
    with tempfile.TemporaryDirectory() as d:
        ds = tg.write(f"{d}/r", table, shard_rows=53) if in_store else tg.from_arrow(table)
        for b in ds.to_torch(batch_size=batch, shuffle=shuffle, seed=2):
            assert list(b) == ["id", "tokens", "tokens_lengths", "s"]
            ids = b["id"].tolist()
            want, lengths = _expected_padded([rows[i] for i in ids], t.to_pandas_dtype())
            assert b["tokens"].dtype == torch.from_numpy(want).dtype and b["tokens"].shape == want.shape
            assert np.array_equal(b["tokens"].numpy(), want)
            assert b["tokens_lengths"].dtype == torch.int64 and b["tokens_lengths"].tolist() == lengths
            assert b["s"] == [str(i) for i in ids]  # strings stay lists of str


def test_padded_lists_cross_worker_processes_and_a_transform_sees_them(tmp_path):
    rows = [[i] * (i % 4) for i in range(60)]
    ds = tg.write(str(tmp_path / "r"), pa.table({"id": np.arange(60), "x": pa.array(rows, pa.list_(pa.int64()))}))
    got = list(ds.to_torch(batch_size=8, num_workers=2, multiprocessing_context="fork"))
    seen = list(ds.to_torch(batch_size=8, transform=lambda b: {**b, "n": b["x_lengths"].sum()}))
    assert [b["x_lengths"].tolist() for b in got] == [[i % 4 for i in range(k, min(k + 8, 60))] for k in range(0, 60, 8)]
    assert [int(b["n"]) for b in seen] == [sum(i % 4 for i in range(k, min(k + 8, 60))) for k in range(0, 60, 8)]
    assert all((b["x"][:, :1].squeeze(1) == torch.where(b["x_lengths"] > 0, b["id"], 0)).all() for b in got)


def test_a_column_named_like_the_lengths_of_a_list_column_is_refused():
    table = pa.table({"x": pa.array([[1], [2, 3]]), "x_lengths": [1, 2]})
    with pytest.raises(ArgumentError, match="x_lengths"):
        tg.from_arrow(table).to_torch(batch_size=2)
    assert list(next(iter(tg.from_arrow(table).to_torch(batch_size=2, columns=["x"])))) == ["x", "x_lengths"]


# --- pinned memory -------------------------------------------------------------------------------------


def test_pin_memory_defaults_to_cuda_and_is_checked(monkeypatch):
    ds = tg.from_arrow(pa.table({"a": np.arange(10)}))
    assert ds.to_torch(batch_size=4).pin_memory is torch.cuda.is_available()
    with pytest.raises(ArgumentError, match="pin_memory"):
        ds.to_torch(batch_size=4, pin_memory="yes")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no CUDA device"):
        assert ds.to_torch(batch_size=4, pin_memory=True).pin_memory is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ds.to_torch(batch_size=4, pin_memory=False).pin_memory is False
        assert ds.to_torch(batch_size=4).pin_memory is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert ds.to_torch(batch_size=4).pin_memory is True


class _FakePin:
    """Stands in for Tensor.pin_memory where no CUDA is: copies, and remembers what it returned."""

    def __init__(self):
        self.calls, self.made = 0, []

    def __call__(self, t):
        self.calls += 1
        out = t.clone()
        self.made.append(out.untyped_storage().data_ptr())
        return out

    def pinned(self, t):
        return t.untyped_storage().data_ptr() in self.made


@pytest.mark.parametrize("workers", [0, 1])
def test_pinned_batches_are_views_of_memory_pinned_once_per_chunk(monkeypatch, tmp_path, workers):
    n = 500
    table = pa.table({"id": np.arange(n), "a": np.ones(n, np.float32), "b": np.ones(n, np.float32),
                      "t": pa.array([[1] * (i % 3) for i in range(n)], pa.list_(pa.int64())),
                      "s": [str(i) for i in range(n)]})
    ds = tg.write(str(tmp_path / "p"), table)
    fake = _FakePin()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(stream, "_pin", fake)
    loader = ds.to_torch(batch_size=50, shuffle=True, num_workers=workers, multiprocessing_context="fork")
    assert loader.pin_memory
    chunks = loader.plan(0).num_chunks  # the epoch's plan: taken before the cache is filled (its chunking
    batches = list(loader)              # depends on whether every row is cached; the order does not)
    tensors = [v for b in batches for v in b.values() if isinstance(v, torch.Tensor)]
    assert all(fake.pinned(v) for v in tensors)
    # per batch the padded list and lengths; the rest (the packed block, id, each other column) once per chunk
    assert chunks < len(batches) and fake.calls <= 2 * len(batches) + 3 * chunks
    _check_batches(table.drop_columns(["t"]), [{k: v for k, v in b.items() if k[0] != "t"} for b in batches])
    plain = {b["id"][0].item(): b for b in ds.to_torch(batch_size=50, shuffle=True, pin_memory=False)}
    for b in batches:
        ref = plain[b["id"][0].item()]
        assert torch.equal(b["t"], ref["t"]) and torch.equal(b["t_lengths"], ref["t_lengths"])


def test_pinned_transform_output(monkeypatch):
    fake = _FakePin()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(stream, "_pin", fake)
    ds = tg.from_arrow(pa.table({"a": np.arange(20)}))
    for b in ds.to_torch(batch_size=5, transform=lambda b: {"a2": b["a"] * 2}):
        assert fake.pinned(b["a2"])
