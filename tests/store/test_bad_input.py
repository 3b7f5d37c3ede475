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


def test_rows_changing_type_midstream(tmp_path):
    rows = [{"a": i} for i in range(5000)] + [{"a": "text"}]
    with pytest.raises(tg.SchemaMismatchError):
        tg.write(str(tmp_path / "m"), iter(rows))
    with pytest.raises(tg.DatasetNotFoundError):  # nothing committed
        tg.open(str(tmp_path / "m"))


def test_bad_mode_and_sizes(tmp_path):
    with pytest.raises(tg.TensorGridError, match="mode"):
        tg.write(str(tmp_path / "x"), pa.table({"a": [1]}), mode="upsert")
    with pytest.raises(tg.TensorGridError, match="shard_rows"):
        tg.write(str(tmp_path / "x"), pa.table({"a": [1]}), shard_rows=0)


def test_duplicate_columns(tmp_path):
    t = pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["a", "a"])
    with pytest.raises(tg.UnsupportedDataError, match="duplicate"):
        tg.write(str(tmp_path / "d"), t)
