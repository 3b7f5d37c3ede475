"""Subsets (split, select, filter, sample) are Datasets over the parent's rows: exact partitions, their own
fingerprints, and they work wherever a Dataset does (loader over ranks, SQL, write, trainer)."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.store.memory import ArrowDataset
from tensorgrid.store.subsets import SubsetDataset


def _table(n: int, classes: int = 3) -> pa.Table:
    rng = np.random.default_rng(n)
    x = rng.normal(size=(n, 2)).astype(np.float32)
    return pa.table({"id": np.arange(n, dtype=np.int64), "label": (np.arange(n) * 7 % classes).astype(np.int64),
                     "name": [f"r{i}" for i in range(n)], "x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)})


@pytest.fixture
def store(tmp_path):
    """1,000 rows in 4 shards of 3 row groups each (uneven), on disk."""
    return tg.write(str(tmp_path / "ds"), _table(1000), shard_rows=300)


def _ids(ds) -> list[int]:
    return ds.to_arrow(columns=["id"]).column(0).to_pylist()


def _memory(n: int, shard_rows: int) -> ArrowDataset:
    table = _table(n)
    return ArrowDataset(table, shard_bytes=max(1, shard_rows * table.nbytes // max(1, n)))


def _log_ways(sizes) -> float:
    """log of the number of ways to deal rows into splits of these sizes (is a repeat by chance likely?)"""
    return math.lgamma(sum(sizes) + 1) - sum(math.lgamma(s + 1) for s in sizes)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 400), shard_rows=st.integers(1, 150), weights=st.lists(st.integers(1, 20), min_size=1,
       max_size=4), seed=st.integers(0, 2**32), stratify=st.booleans())
def test_splits_partition_the_rows_exactly_and_depend_on_the_seed_only(n, shard_rows, weights, seed, stratify):
    ds = _memory(n, shard_rows)
    fracs = [w / sum(weights) for w in weights]
    by = "label" if stratify else None
    try:
        parts = ds.split(fracs, seed=seed, stratify=by)
    except tg.ArgumentError as e:  # only when a split's share is less than a row
        assert "would get no rows" in str(e) and any(f * n < 1 for f in fracs)
        return
    ids = [_ids(p) for p in parts]
    flat = [i for part in ids for i in part]
    assert sorted(flat) == list(range(n)) and len(set(flat)) == n  # disjoint and covering
    for part, f in zip(ids, fracs):
        assert abs(len(part) - f * n) < 1 + 1e-9 and part == sorted(part)  # storage order kept
    if stratify:  # each class is split in the same proportions, within one row
        labels = np.arange(n) * 7 % 3
        for c in range(3):
            in_class = int((labels == c).sum())
            for part, f in zip(ids, fracs):
                assert abs(int((labels[part] == c).sum()) - f * in_class) < 1 + 1e-9
    assert [_ids(p) for p in ds.split(fracs, seed=seed, stratify=by)] == ids  # deterministic
    if _log_ways([len(p) for p in ids]) > math.log(1e6):  # another seed dealing alike would be a fluke
        assert [_ids(p) for p in ds.split(fracs, seed=seed + 1, stratify=by)] != ids


def test_a_dict_of_fractions_gives_named_splits_and_splits_nest(store):
    parts = store.split({"train": 0.8, "test": 0.2}, seed=3)
    assert list(parts) == ["train", "test"] and [len(p) for p in parts.values()] == [800, 200]
    train, val = parts["train"].split([0.75, 0.25], seed=1)  # a split of a split: a view of the dataset itself
    assert isinstance(train, SubsetDataset) and train.base is store
    assert (len(train), len(val)) == (600, 200)
    assert set(_ids(train)) | set(_ids(val)) == set(_ids(parts["train"])) and not set(_ids(train)) & set(_ids(val))
    fps = {store.fingerprint, parts["train"].fingerprint, parts["test"].fingerprint, train.fingerprint,
           val.fingerprint}
    assert len(fps) == 5  # each its own data
    again = tg.open(store.url).split({"train": 0.8, "test": 0.2}, seed=3)["train"]
    assert again.fingerprint == parts["train"].fingerprint and _ids(again) == _ids(parts["train"])
    assert "split 'train'" in repr(parts["train"]) and "rows=800" in repr(parts["train"])


def test_select_filter_and_sample(store):
    sel = store.select(["name", "id"])
    assert sel.schema.names == ["name", "id"] and len(sel) == 1000 and sel.fingerprint != store.fingerprint
    assert sel.to_arrow().column("name").to_pylist()[:2] == ["r0", "r1"]
    by_sql = store.filter("label = 1 AND id < 100")
    by_arrow = store.filter((pc.field("label") == 1) & (pc.field("id") < 100))
    expected = [i for i in range(100) if i * 7 % 3 == 1]
    assert _ids(by_sql) == _ids(by_arrow) == expected
    assert _ids(store.filter("ID % 500 = 0")) == [0, 500]  # DuckDB's names are case-insensitive
    assert len(store.filter("false")) == 0 and len(store.filter("random() < 2")) == 1000
    train = store.split([0.5, 0.5])[0]
    assert set(_ids(train.filter("label = 2"))) == {i for i in _ids(train) if i * 7 % 3 == 2}
    s = store.sample(10, seed=5)
    assert len(s) == 10 == len(set(_ids(s))) and _ids(s) == _ids(store.sample(10, seed=5)) != _ids(store.sample(10))
    assert len(store.sample(0.25)) == 250 and len(store.sample(1.0)) == 1000
    nested = store.select(["id", "label", "x"]).filter("label = 0").sample(5, seed=1)
    assert nested.base is store and nested.schema.names == ["id", "label", "x"]
    assert all(i * 7 % 3 == 0 for i in _ids(nested))
    # tensors: the x of each row is the parent's
    rows = _ids(nested)
    np.testing.assert_array_equal(np.stack(nested.to_pandas()["x"]), np.stack(store.to_pandas()["x"])[rows])


def test_a_subset_works_wherever_a_dataset_does(store, tmp_path):
    test = store.split([0.7, 0.3], seed=2)[1]
    ids = set(_ids(test))
    seen = []
    for rank in range(2):  # each row exactly once over the ranks, shuffled, also through the Arrow cache
        for cache in (None, str(tmp_path / "cache")):
            if cache is not None and rank:
                continue
            for b in test.to_torch(32, rank=rank, world_size=2 if cache is None else 1, shuffle=True,
                                   drop_last=False, cache_dir=cache):
                seen.append(("cache" if cache else rank, *b["id"].tolist()))
    plain = [i for s in seen if s[0] != "cache" for i in s[1:]]
    cached = [i for s in seen if s[0] == "cache" for i in s[1:]]
    assert sorted(plain) == sorted(cached) == sorted(ids)
    assert tg.sql("SELECT count(*) AS n, min(id) AS lo FROM t", t=test).to_pandas().to_dict("records") == \
        [{"n": 300, "lo": min(ids)}]
    out = tg.write(str(tmp_path / "test"), test)  # materialised
    assert out.num_rows == 300 and _ids(out) == sorted(ids) and out.schema == test.schema
    assert test.head(3)["id"].tolist() == sorted(ids)[:3] and test.verify()["rows"] == 300
    assert test.to_pandas(columns=["id"], filter=pc.field("label") == 0)["id"].tolist() == \
        [i for i in sorted(ids) if i * 7 % 3 == 0]
    with pytest.raises(tg.ReadOnlyError, match="no files of its own"):
        test.vacuum()


def test_a_split_trains_and_its_checkpoint_refuses_another_split(tmp_path):
    import torch

    from tensorgrid.quickstart import digits_frame
    from tests.train import models

    ds = tg.write(str(tmp_path / "digits"), digits_frame().iloc[:600])
    train, other = ds.split([0.5, 0.5], seed=0, stratify="label")
    ck = str(tmp_path / "ck")

    def trainer():
        return tg.Trainer(model=models.mlp, loss=torch.nn.CrossEntropyLoss(), optimizer=models.sgd,
                          features="image", label="label", transform=models.to_float, batch_size=50, epochs=1,
                          workers=1, quiet=True, checkpoint_dir=ck)

    result = trainer().fit(train)
    assert len(result.history) == 1
    with pytest.raises(tg.CheckpointError, match="trained on other data"):
        trainer().fit(other, resume=True)


def test_label_names_of_a_split_are_the_datasets(tmp_path):
    t = pa.table({"label": ["a", "b", "c"] * 4, "label_index": [0, 1, 2] * 4})
    ds = tg.write(str(tmp_path / "l"), t)
    only_c = ds.filter("label = 'c'")
    assert only_c.label_names == ["a", "b", "c"]  # index 2 still means 'c'
    assert only_c.select(["label"]).label_names is None


def test_bad_subset_arguments_are_named(store):
    cases = [
        (lambda: store.split([0.8, 0.3]), tg.ArgumentError, r"must sum to 1, got \[0.8, 0.3\]"),
        (lambda: store.split([1.2, -0.2]), tg.ArgumentError, "fraction of split 0 must be a finite number in"),
        (lambda: store.split({"a": 1.0, "b": 0}), tg.ArgumentError, "split 'b' has fraction 0"),
        (lambda: store.split([0.9995, 0.0005]), tg.ArgumentError, r"split 1 \(0.0005 of 1000 rows\) would get no rows"),
        (lambda: store.split([]), tg.ArgumentError, "fractions is empty"),
        (lambda: store.split(0.8), tg.ArgumentError, "fractions must be a list"),
        (lambda: store.split([0.5, 0.5], seed=-1), tg.ArgumentError, "seed must be an int >= 0"),
        (lambda: store.split([0.5, 0.5], stratify="klass"), tg.ColumnNotFoundError, "no column 'klass'"),
        (lambda: store.split([0.5, 0.5], stratify="x"), tg.ArgumentError, "cannot stratify by 'x'"),
        (lambda: store.select(["id", "nope"]), tg.ColumnNotFoundError, "no column 'nope'"),
        (lambda: store.select([]), tg.ArgumentError, "at least one column"),
        (lambda: store.select(["id", "id"]), tg.ArgumentError, "names a column twice"),
        (lambda: store.sample(1001), tg.ArgumentError, r"sample\(1001\) of a dataset of 1000 rows"),
        (lambda: store.sample(0), tg.ArgumentError, r"sample\(n\) must be an int >= 1"),
        (lambda: store.sample(0.0001), tg.ArgumentError, "is no row"),
        (lambda: store.sample(1.5), tg.ArgumentError, r"fraction must be a finite number in \[0, 1\]"),
        (lambda: store.filter("nope > 1"), tg.ColumnNotFoundError, "nope"),
        (lambda: store.filter("id >"), tg.SQLError, "filter 'id >': Parser Error"),
        (lambda: store.filter(pc.field("nope") > 1), tg.ColumnNotFoundError, "columns: \\['id'"),
        (lambda: store.filter("  "), tg.ArgumentError, "empty string"),
        (lambda: store.filter(3), tg.ArgumentError, "an SQL condition"),
    ]
    for call, error, match in cases:
        with pytest.raises(error, match=match):
            call()
