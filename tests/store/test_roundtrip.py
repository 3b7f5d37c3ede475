"""Every column type round-trips exactly, on local disk and memory://, from every input kind."""

import datetime as dt
import decimal
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg


def all_types_table(n=7):
    rng = np.random.default_rng(0)
    return pa.table({
        "i8": pa.array(rng.integers(-100, 100, n), pa.int8()),
        "u64": pa.array(rng.integers(0, 2**63, n, dtype=np.uint64), pa.uint64()),
        "f32": pa.array(rng.random(n), pa.float32()),
        "f64": pa.array([1.5, None] + [float(x) for x in rng.random(n - 2)]),
        "b": pa.array([True, False, None] + [True] * (n - 3)),
        "s": pa.array(["héllo", None] + [f"s{i}" for i in range(n - 2)]),
        "bin": pa.array([b"\x00\xff", None] + [bytes([i]) * i for i in range(n - 2)]),
        "ts": pa.array([dt.datetime(2024, 1, 1, 12, 0, i, 123456) for i in range(n)], pa.timestamp("us", "UTC")),
        "ns": pa.array(np.arange(n).astype("datetime64[ns]")),
        "d": pa.array([dt.date(2020, 1, i + 1) for i in range(n)]),
        "dec": pa.array([decimal.Decimal(f"{i}.25") for i in range(n)], pa.decimal128(10, 2)),
        "lst": pa.array([[1, 2], [], None] + [[i] * i for i in range(n - 3)], pa.list_(pa.int32())),
        "nested": pa.array([{"metadata": {"file_name": f"f{i}.png", "label": i % 3, "width": 8, "height": 8},
                             "pixels": [i, i + 1, i + 2]} for i in range(n)]),
        "m": pa.array([[("a", 1), ("b", 2)], [], None] + [[(f"k{i}", i)] for i in range(n - 3)],
                      pa.map_(pa.string(), pa.int64())),
        "u": pa.array([uuid.UUID(int=i * 7919).bytes for i in range(n)], pa.uuid()),
        "deep": pa.array([{"a": {"b": {"c": [{"d": i}]}}} for i in range(n)]),
    })


def test_every_type_round_trips(any_url):
    t = all_types_table()
    ds = tg.write(any_url, t)
    back = tg.open(any_url).to_arrow()
    assert back.schema.equals(t.schema)
    assert back.equals(t)
    assert ds.num_rows == t.num_rows


def test_pandas_round_trip_with_tensors_uuid_and_nested(any_url):
    rng = np.random.default_rng(1)
    df = pd.DataFrame({
        "image": [rng.integers(0, 255, (4, 5, 3), dtype=np.uint8) for _ in range(6)],
        "emb": [rng.standard_normal(16).astype(np.float32) for _ in range(6)],
        "label": np.arange(6, dtype=np.int64),
        "id": [uuid.uuid4() for _ in range(6)],
        "meta": [{"file_name": f"{i}.png", "label": i, "width": 5, "height": 4} for i in range(6)],
        "when": pd.date_range("2024-01-01", periods=6, freq="h", tz="UTC"),
    })
    tg.write(any_url, df)
    ds = tg.open(any_url)
    assert isinstance(ds.schema.field("image").type, pa.FixedShapeTensorType)
    assert ds.schema.field("image").type.shape == [4, 5, 3]
    assert ds.schema.field("emb").type.value_type == pa.float32()
    back = ds.to_pandas()
    for a, b in zip(back["image"], df["image"]):
        assert a.dtype == np.uint8 and a.shape == (4, 5, 3)
        np.testing.assert_array_equal(a, b)
    for a, b in zip(back["emb"], df["emb"]):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)
    assert list(back["id"]) == list(df["id"])
    assert list(back["meta"]) == list(df["meta"])
    assert (back["when"] == df["when"]).all()
    assert back["label"].tolist() == list(range(6))


def test_tensor_column_stored_as_fixed_size_binary(tmp_path):
    """The physical layout is what makes tensor reads fast: check it inside the Parquet file."""
    arr = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    t = pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(arr)})
    ds = tg.write(str(tmp_path / "t"), t)
    raw = pq.read_table(ds.shard_urls()[0])
    assert pa.types.is_fixed_size_binary(raw.schema.field("x").type)
    assert raw.schema.field("x").type.byte_width == 3 * 4 * 4
    back = tg.open(str(tmp_path / "t")).to_arrow()
    assert back.schema.field("x").type.equals(t.schema.field("x").type)
    np.testing.assert_array_equal(back.column("x").chunk(0).to_numpy_ndarray(), arr)


def test_tensor_with_nulls_and_sliced_input(any_url):
    arr = np.arange(10 * 4, dtype=np.int16).reshape(10, 2, 2)
    df = pd.DataFrame({"x": [arr[i] if i % 3 else None for i in range(10)]})
    tg.write(any_url, df.iloc[2:9])  # a slice: offsets must be honoured
    back = tg.open(any_url).to_pandas()
    assert len(back) == 7
    for i, v in zip(range(2, 9), back["x"]):
        if i % 3:
            np.testing.assert_array_equal(v, arr[i])
        else:
            assert v is None


@pytest.mark.parametrize("kind", ["pandas", "table", "reader", "batches", "dicts"])
def test_input_kinds(any_url, kind):
    df = pd.DataFrame({"a": np.arange(10_000), "s": [f"r{i}" for i in range(10_000)]})
    t = pa.Table.from_pandas(df, preserve_index=False)
    data = {
        "pandas": df,
        "table": t,
        "reader": pa.RecordBatchReader.from_batches(t.schema, t.to_batches(max_chunksize=999)),
        "batches": iter(t.to_batches(max_chunksize=1234)),
        "dicts": ({"a": i, "s": f"r{i}"} for i in range(10_000)),
    }[kind]
    ds = tg.write(any_url, data)
    back = tg.open(any_url).to_pandas()
    assert back["a"].tolist() == list(range(10_000))
    assert back["s"].tolist() == [f"r{i}" for i in range(10_000)]
    assert ds.num_rows == 10_000


def test_shard_rows_and_shard_bytes_split(any_url):
    t = pa.table({"a": np.arange(1000), "blob": [bytes(100)] * 1000})
    ds = tg.write(any_url, t, shard_rows=300)
    assert ds.shard_rows == [300, 300, 300, 100]
    ds2 = tg.write(any_url, t, mode="overwrite", shard_bytes=20_000)
    assert ds2.num_shards > 4 and sum(ds2.shard_rows) == 1000
    assert tg.open(any_url).to_arrow().column("a").to_pylist() == list(range(1000))


def test_columns_and_filter_pushdown(any_url):
    t = pa.table({"a": np.arange(1000), "b": np.arange(1000) * 2.0, "c": ["x"] * 1000})
    tg.write(any_url, t, shard_rows=100)
    ds = tg.open(any_url)
    r = ds.to_arrow(columns=["b"], filter=pc.field("a") >= 990)
    assert r.column_names == ["b"]
    assert r.column("b").to_pylist() == [2.0 * i for i in range(990, 1000)]
    assert ds.to_pandas(filter=pc.field("c") == "y").empty
    with pytest.raises(tg.ColumnNotFoundError, match="nope"):
        ds.to_arrow(columns=["nope"])


def test_head(any_url):
    tg.write(any_url, pa.table({"a": np.arange(50)}), shard_rows=3)
    assert tg.open(any_url).head(7)["a"].tolist() == list(range(7))
    assert tg.open(any_url).head()["a"].tolist() == list(range(5))


def test_file_url_and_plain_path_are_the_same(tmp_path):
    tg.write(f"file://{tmp_path}/x", pa.table({"a": [1, 2]}))
    assert tg.open(str(tmp_path / "x")).to_arrow().column("a").to_pylist() == [1, 2]


def test_from_arrow_dataset():
    t = pa.table({"a": np.arange(10), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((10, 2, 2)))})
    ds = tg.from_arrow(t)
    assert ds.num_rows == 10 and ds.version is None
    assert ds.to_arrow().equals(t)
    assert ds.head(2)["x"][0].shape == (2, 2)
    assert ds.sql("SELECT sum(a) AS s FROM ds").to_pandas()["s"][0] == 45


def test_large_types_from_pandas_append_to_plain(any_url):
    """pandas gives large_string; Arrow gives string: they are one logical type, so appends agree."""
    tg.write(any_url, pa.table({"s": pa.array(["a"], pa.string())}))
    tg.write(any_url, pa.table({"s": pa.array(["b"], pa.large_string())}), mode="append")
    tg.write(any_url, pd.DataFrame({"s": ["c"]}), mode="append")
    assert tg.open(any_url).to_arrow().column("s").to_pylist() == ["a", "b", "c"]


@settings(max_examples=50, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=3), rows=st.integers(1, 20),
       dtype=st.sampled_from(["float32", "float64", "int64", "uint8", "int16"]))
def test_numpy_to_tensor_equals_pyarrows_own_conversion(shape, rows, dtype):
    from tensorgrid.store.encoding import numpy_to_tensor

    a = (np.arange(rows * int(np.prod(shape))) % 100).astype(dtype).reshape(rows, *shape)
    assert numpy_to_tensor(a).equals(pa.FixedShapeTensorArray.from_numpy_ndarray(a))
    assert numpy_to_tensor(a[:, ...][::-1]).equals(pa.FixedShapeTensorArray.from_numpy_ndarray(a[::-1].copy()))
