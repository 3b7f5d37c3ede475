"""Bad input: a specific named error, and nothing written."""

import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import tensorgrid as tg


def _listing(path):
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_unknown_scheme():
    with pytest.raises(tg.UnsupportedURLError, match="nosuch://"):
        tg.open("nosuch://bucket/ds")
    with pytest.raises(tg.UnsupportedURLError):
        tg.write("nosuch://bucket/ds", pa.table({"a": [1]}))


def test_missing_dataset(tmp_path):
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(str(tmp_path / "nope"))
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open("memory://does/not/exist")
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(str(tmp_path / "nope"), version=3)


def test_append_other_schema_names_columns(tmp_path):
    url = str(tmp_path / "s")
    tg.write(url, pa.table({"a": [1], "b": ["x"], "c": [1.0]}))
    before = _listing(url)
    with pytest.raises(tg.SchemaMismatchError) as e:
        tg.write(url, pa.table({"a": [1.5], "b": ["y"], "d": [True]}), mode="append")
    msg = str(e.value)
    assert "'a' is double, dataset has int64" in msg
    assert "missing column 'c'" in msg and "extra column 'd'" in msg
    assert _listing(url) == before  # nothing written


def test_append_other_tensor_shape(tmp_path):
    url = str(tmp_path / "t")
    tg.write(url, pd.DataFrame({"x": list(np.zeros((2, 3, 3), np.uint8))}))
    with pytest.raises(tg.SchemaMismatchError, match="'x'"):
        tg.write(url, pd.DataFrame({"x": list(np.zeros((2, 4, 4), np.uint8))}), mode="append")


@pytest.mark.parametrize("data", [pd.DataFrame({"a": []}), pa.table({"a": pa.array([], pa.int64())}), [], iter([]),
                                  pd.DataFrame()])
def test_empty_data(tmp_path, data):
    with pytest.raises(tg.EmptyDataError):
        tg.write(str(tmp_path / "e"), data)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("data", [42, "a string", {"a": [1]}, [object(), object()], [1, 2, 3]])
def test_unsupported_containers(tmp_path, data):
    with pytest.raises(tg.UnsupportedDataError):
        tg.write(str(tmp_path / "u"), data)
    assert not (tmp_path / "u").exists()


def test_unsupported_python_objects_name_the_column(tmp_path):
    class Thing:
        pass

    with pytest.raises(tg.UnsupportedDataError, match="'obj'"):
        tg.write(str(tmp_path / "o"), pd.DataFrame({"ok": [1, 2], "obj": [Thing(), Thing()]}))
    assert not (tmp_path / "o").exists()
    with pytest.raises(tg.UnsupportedDataError):
        tg.write(str(tmp_path / "o"), [{"a": Thing()}])


@pytest.mark.parametrize("where", ["new", "existing"])
def test_rows_changing_type_midstream_leave_nothing(tmp_path, where):
    rows = [{"a": i} for i in range(5000)] + [{"a": "text"}]
    url = str(tmp_path / "m")
    if where == "existing":
        tg.write(url, pa.table({"a": [1, 2]}))
    before = _listing(tmp_path)
    with pytest.raises(tg.SchemaMismatchError):  # after dozens of shards were written
        tg.write(url, iter(rows), mode="append", shard_rows=100)
    assert _listing(tmp_path) == before and os.listdir(tmp_path) == (["m"] if where == "existing" else [])
    if where == "existing":
        assert tg.open(url).num_rows == 2


def test_failed_first_write_on_memory_url_leaves_nothing(mem_url):
    import fsspec

    rows = [{"a": i} for i in range(5000)] + [{"a": "text"}]
    with pytest.raises(tg.SchemaMismatchError):
        tg.write(mem_url, iter(rows), shard_rows=500)
    fs = fsspec.filesystem("memory")
    assert not fs.exists(mem_url.removeprefix("memory://")) or not fs.find(mem_url.removeprefix("memory://"))


def test_writing_over_foreign_files_is_refused(tmp_path):
    import pyarrow.parquet as pq

    spark_out = tmp_path / "spark_out"
    spark_out.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3]}), spark_out / "part-0.parquet")
    before = _listing(tmp_path)
    for mode in ("create", "append", "overwrite"):
        with pytest.raises(tg.ReadOnlyError, match="spark_out"):
            tg.write(str(spark_out), pa.table({"a": [9]}), mode=mode)
    assert _listing(tmp_path) == before
    assert tg.open(str(spark_out)).num_rows == 3


def test_no_dataset_inside_another(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pa.table({"a": [1, 2]}))
    before = _listing(tmp_path)
    for inner in ("d/data", "d/_tensorgrid/x", "d/sub/deeper"):
        with pytest.raises(tg.TensorGridError, match="inside the dataset"):
            tg.write(str(tmp_path / inner), pa.table({"a": [1]}))
    assert _listing(tmp_path) == before
    ds.verify()  # raises CorruptShardError if anything of it went missing
    assert tg.open(str(tmp_path / "d")).to_pandas()["a"].tolist() == [1, 2]


def test_manifest_that_is_not_an_object(tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [1]}))
    (manifest,) = (tmp_path / "d" / "_tensorgrid").glob("v*.json")
    manifest.write_text("[1, 2]")
    with pytest.raises(tg.CorruptShardError, match="unreadable"):
        tg.open(url)


def test_bad_mode_and_sizes(tmp_path):
    with pytest.raises(tg.TensorGridError, match="mode"):
        tg.write(str(tmp_path / "x"), pa.table({"a": [1]}), mode="upsert")
    with pytest.raises(tg.TensorGridError, match="shard_rows"):
        tg.write(str(tmp_path / "x"), pa.table({"a": [1]}), shard_rows=0)


def test_duplicate_columns(tmp_path):
    t = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    with pytest.raises(tg.UnsupportedDataError, match="duplicate"):
        tg.write(str(tmp_path / "d"), t)


def test_bad_filters_are_named_not_taken_for_corruption(tmp_path):
    import pyarrow.compute as pc

    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": [1, 2, 3], "s": ["a", "b", "c"]}))
    for d in (ds, tg.from_arrow(ds.to_arrow()), tg.open(ds.shard_urls()[0])):
        with pytest.raises(tg.ColumnNotFoundError, match="nope"):
            d.to_arrow(filter=pc.field("nope") == 3)
        with pytest.raises(tg.TensorGridError, match="types") as e:
            d.to_pandas(filter=pc.field("x") == "a")
        assert not isinstance(e.value, tg.CorruptShardError)
        for bad in ("x > 3", True):
            with pytest.raises(tg.TensorGridError, match="pyarrow.compute expression"):
                d.to_arrow(filter=bad)
        assert d.to_arrow(filter=pc.field("x") > 1).num_rows == 2


def test_bad_url_and_version_types(tmp_path):
    for bad in (None, 123):
        with pytest.raises(tg.UnsupportedURLError, match="expected a URL or path"):
            tg.open(bad)
        with pytest.raises(tg.UnsupportedURLError, match="expected a URL or path"):
            tg.write(bad, pa.table({"a": [1]}))
    url = str(tmp_path / "d")
    tg.write(url, pa.table({"a": [1]}))
    for bad in (1.0, "1", True, 0):
        with pytest.raises(tg.TensorGridError, match="version must be an int"):
            tg.open(url, version=bad)
    assert tg.open(url, version=np.int64(1)).num_rows == 1


def test_bad_counts_are_named(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pa.table({"a": [1, 2]}))
    with pytest.raises(tg.TensorGridError, match="head"):
        ds.head(-3)
    with pytest.raises(tg.TensorGridError, match="min_age_s"):
        ds.vacuum(min_age_s=-1)
    for q in ("", "   "):
        with pytest.raises(tg.SQLError, match="non-empty"):
            tg.sql(q)
    assert len(ds.head(0)) == 0


def test_append_of_another_tensor_dtype_or_shape_is_refused(tmp_path):
    url = str(tmp_path / "t")
    tg.write(url, pd.DataFrame({"x": [np.ones((2, 3), np.float32)]}))
    for other in (np.arange(6, dtype=np.int32), np.ones((3, 2), np.float32)):  # same byte width, other tensor
        with pytest.raises(tg.SchemaMismatchError, match="fixed_shape_tensor"):
            tg.write(url, pd.DataFrame({"x": [other]}), mode="append")
    assert tg.open(url).to_pandas()["x"][0].shape == (2, 3)  # still readable, one version


def test_dict_rows_with_later_keys(tmp_path):
    rows = tg.write(str(tmp_path / "a"), [{"a": 1}, {"a": 2, "b": 3}]).to_arrow().to_pylist()
    assert rows == [{"a": 1, "b": None}, {"a": 2, "b": 3}]  # every key kept, missing ones null
    with pytest.raises(tg.SchemaMismatchError, match=r"key\(s\) \['b'\]"):  # after the first chunk of rows
        tg.write(str(tmp_path / "b"), iter([{"a": i} for i in range(5000)] + [{"a": 1, "b": 2}]))
    assert not (tmp_path / "b").exists()


def test_conflict_retry_commits_once(tmp_path):
    url = str(tmp_path / "c")
    tg.write(url, pa.table({"a": [0]}))
    from tensorgrid.store import writer

    def race(fs, root, version):  # another writer commits this version first, once
        writer._before_commit = None
        tg.write(url, pa.table({"a": [1]}), mode="append")

    writer._before_commit = race
    try:
        with pytest.raises(tg.ConflictError) as e:
            tg.write(url, pa.table({"a": [2]}), mode="append")
    finally:
        writer._before_commit = None
    assert sorted(e.value.retry().to_pandas()["a"]) == [0, 1, 2]
    with pytest.raises(tg.TensorGridError, match="already retried"):
        e.value.retry()
    assert tg.open(url).num_rows == 3


def test_permuted_tensor_columns(tmp_path):
    import pyarrow.compute as pc

    x = pa.FixedShapeTensorArray.from_numpy_ndarray(np.arange(12, dtype=np.float32).reshape(2, 2, 3))
    ds = tg.write(str(tmp_path / "p"), pa.table({"i": [1, 2], "x": x}))
    assert ds.to_arrow(filter=pc.field("i") > 1).num_rows == 1 and len(ds.head(0)) == 0
    tt = pa.fixed_shape_tensor(pa.int16(), [3, 4], permutation=[1, 0])
    a = pa.ExtensionArray.from_storage(tt, pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.int16)), 12))
    got = tg.write(str(tmp_path / "q"), pa.table({"x": a})).to_pandas()["x"][0]
    assert np.array_equal(got, a.to_numpy_ndarray()[0])


def test_data_parquet_cannot_hold_is_named_and_leaves_nothing(tmp_path):
    cases = {
        "interval": pa.table({"a": pa.array([(1, 2, 3)], pa.month_day_nano_interval())}),
        "big-endian": pd.DataFrame({"x": [np.zeros(2, ">f4")]}),
        "empty tensors": pd.DataFrame({"x": [np.zeros((0, 3))]}),
        "duplicate columns": pd.DataFrame([[1, 2]], columns=["a", "a"]),
    }
    for name, data in cases.items():
        with pytest.raises(tg.UnsupportedDataError):
            tg.write(str(tmp_path / name), data)
    for bad in ("10", 2.5, True):
        with pytest.raises(tg.TensorGridError, match="shard_rows must be an int"):
            tg.write(str(tmp_path / "s"), pa.table({"a": [1]}), shard_rows=bad)
    assert os.listdir(tmp_path) == []
    ds = tg.write(str(tmp_path / "ok"), pa.table({"a": [1]}))
    with pytest.raises(tg.ColumnNotFoundError, match="list of column names"):
        ds.to_arrow(columns=5)
    assert len(ds.head(np.int64(1))) == 1


def test_types_parquet_stores_coarser_come_back_exactly(tmp_path):
    import datetime as dt

    x = pa.FixedShapeTensorArray.from_numpy_ndarray(np.arange(6, dtype=np.float32).reshape(1, 2, 3))
    t = pa.table({"ts": pa.array([dt.datetime(2020, 1, 1, 12)], pa.timestamp("s")),
                  "d64": pa.array([dt.date(2020, 1, 2)], pa.date64()),
                  "t32": pa.array([3], pa.time32("s")), "x": x})
    ds = tg.write(str(tmp_path / "t"), t)
    got = ds.to_arrow()
    assert got.drop_columns(["x"]).equals(t.drop_columns(["x"]))
    assert np.array_equal(got.column("x").chunk(0).to_numpy_ndarray(), x.to_numpy_ndarray())  # still a tensor
    batch = next(iter(ds.to_torch(batch_size=1, columns=["t32", "x"])))  # the loader's own reader
    assert batch["t32"] == [dt.time(0, 0, 3)] and batch["x"].shape == (1, 2, 3)


def test_list_views_store_and_negative_decimal_scales_are_named(tmp_path):
    from decimal import Decimal

    a = pa.array([[1], None, [2, 3], []], pa.list_view(pa.int32()))
    assert tg.write(str(tmp_path / "lv"), pa.table({"a": a})).to_arrow().column("a").to_pylist() == a.to_pylist()
    with pytest.raises(tg.UnsupportedDataError, match="negative scale"):
        tg.write(str(tmp_path / "dec"), pa.table({"a": pa.array([Decimal("100")], pa.decimal128(5, -2))}))
    assert not (tmp_path / "dec").exists()


@pytest.mark.parametrize("data", [
    pd.DataFrame({"a": [1, 2], "s": pd.Series(["ok", "\ud800"], dtype=object)}),
    pd.DataFrame({"a": [1, 2], "s": pd.Series([["ok"], ["x", "\ud800"]], dtype=object)}),
    [{"a": 1, "s": "ok"}, {"a": 2, "s": "\ud800"}],
    [{"a": 1, "s": {"k": "\ud800"}}, {"a": 2, "s": {"k": "ok"}}],
], ids=["pandas", "pandas-lists", "dicts", "dicts-nested"])
def test_lone_surrogate_is_unsupported_data_naming_the_column(tmp_path, data):
    url = str(tmp_path / "u")
    with pytest.raises(tg.UnsupportedDataError, match=r"column 's'.*not valid Unicode \(row \d"):
        tg.write(url, data)
    assert not os.path.exists(url)


def test_lone_surrogate_after_the_first_rows_leaves_no_version(tmp_path):
    url = str(tmp_path / "u")
    rows = ({"a": i, "s": "ok" if i != 5000 else "\ud800"} for i in range(6000))  # past the first chunk
    with pytest.raises(tg.UnsupportedDataError, match=r"column 's'.*row 5000"):
        tg.write(url, rows)
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(url)
    assert not any(f.endswith(".parquet") for f in _listing(url))  # the writer removed its shards
    with pytest.raises(tg.UnsupportedDataError, match="column name"):
        tg.write(url, [{"\ud800": 1}])


def test_named_index_and_multiindex_are_stored_as_columns(tmp_path):
    df = pd.DataFrame({"a": [3, 1, 2], "b": ["x", "y", "z"], "v": [0.5, 1.5, 2.5]})
    named = df.set_index("b")
    got = tg.write(str(tmp_path / "named"), named).to_pandas()
    assert list(got.columns) == ["b", "a", "v"]  # as df.reset_index() would lay them out
    pd.testing.assert_frame_equal(got.set_index("b"), named)
    multi = df.set_index(["a", "b"])
    got = tg.write(str(tmp_path / "multi"), multi).to_pandas()
    pd.testing.assert_frame_equal(got.set_index(["a", "b"]), multi)
    times = pd.DataFrame({"v": [1.0, 2.0]}, index=pd.date_range("2026-01-01", periods=2, name="t"))
    got = tg.write(str(tmp_path / "times"), times).to_pandas()
    pd.testing.assert_frame_equal(got.set_index("t"), times, check_freq=False)
    # a default (or filtered) unnamed index holds positions, not data: not stored
    assert tg.write(str(tmp_path / "plain"), df).schema.names == ["a", "b", "v"]
    assert tg.write(str(tmp_path / "filtered"), df[df.a > 1]).schema.names == ["a", "b", "v"]
    # set_index(drop=False): the column already holds the index
    assert tg.write(str(tmp_path / "kept"), df.set_index("b", drop=False)).schema.names == ["a", "b", "v"]
    clash = df.set_index("b")
    clash["b"] = 0
    with pytest.raises(tg.UnsupportedDataError, match="index level 'b' has the name of a column"):
        tg.write(str(tmp_path / "clash"), clash)
    assert not (tmp_path / "clash").exists()


def test_verify_of_foreign_files_names_the_bad_files_by_url(tmp_path):
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "ok.parquet")
    pq.write_table(pa.table({"a": [3, 4]}), tmp_path / "bad.parquet")
    data = (tmp_path / "bad.parquet").read_bytes()
    (tmp_path / "bad.parquet").write_bytes(data[:4] + b"\xff" * 24 + data[28:])  # its first page header
    with pytest.raises(tg.CorruptShardError) as e:
        tg.open(str(tmp_path)).verify()
    assert e.value.shards == [str(tmp_path / "bad.parquet")]


def test_verify_of_an_invalid_in_memory_table_is_corrupt_shard_error():
    offsets = pa.py_buffer(pa.array([0, 2, 4], pa.int32()).buffers()[1])
    bad = pa.Array.from_buffers(pa.string(), 2, [None, offsets, pa.py_buffer(b"a\xffcd")])  # not UTF-8
    with pytest.raises(tg.CorruptShardError, match="invalid"):
        tg.from_arrow(pa.table({"a": bad})).verify()
