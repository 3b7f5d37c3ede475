import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import tensorgrid as tg


def test_sql_joins_two_datasets_and_keeps_tensors(tmp_path, mem_url):
    imgs = tg.write(str(tmp_path / "img"), pd.DataFrame({
        "id": np.arange(20), "image": list(np.arange(20 * 4, dtype=np.uint8).reshape(20, 2, 2))}), shard_rows=7)
    labels = tg.write(mem_url, pa.table({"id": np.arange(20), "label": np.arange(20) % 3}))
    r = tg.sql("SELECT i.id, i.image, l.label FROM i JOIN l USING (id) WHERE l.label = 1 ORDER BY id",
               i=imgs, l=labels)
    df = r.to_pandas()
    assert df["id"].tolist() == [i for i in range(20) if i % 3 == 1]
    assert isinstance(r.schema.field("image").type, pa.FixedShapeTensorType)
    np.testing.assert_array_equal(df["image"][0], np.arange(4, 8, dtype=np.uint8).reshape(2, 2))
    assert r.to_arrow().num_rows == len(df)


def test_dataset_sql_and_urls_and_frames(tmp_path):
    url = str(tmp_path / "d")
    ds = tg.write(url, pd.DataFrame({"x": np.arange(10)}))
    assert ds.sql("SELECT sum(x) AS s FROM ds").to_pandas()["s"][0] == 45
    assert tg.sql("SELECT count(*) AS n FROM t", t=url).to_pandas()["n"][0] == 10
    assert tg.sql("SELECT count(*) AS n FROM f", f=pd.DataFrame({"a": [1, 2]})).to_pandas()["n"][0] == 2


def test_sql_errors_are_named(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": [1]}))
    with pytest.raises(tg.SQLError, match="nope"):
        ds.sql("SELECT nope FROM ds")
    with pytest.raises(tg.SQLError):
        ds.sql("SELEC 1")


def test_sql_verifies_checksums_first(tmp_path):
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": np.arange(1000)}))
    path = ds.shard_urls()[0]
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(tg.CorruptShardError):
        tg.open(str(tmp_path / "d")).sql("SELECT sum(x) FROM ds")


def test_same_named_tensors_of_other_types_are_never_reinterpreted(tmp_path):
    a = tg.write(str(tmp_path / "a"), pd.DataFrame({"id": [0], "x": [np.array([1.5, 2.5], np.float32)]}))
    b = tg.write(str(tmp_path / "b"), pd.DataFrame({"id": [0], "x": [np.array([7, 8], np.int32)]}))
    x = tg.sql("SELECT a.x FROM a JOIN b USING (id)", a=a, b=b).to_arrow().column("x")
    assert not isinstance(x.type, pa.FixedShapeTensorType)  # ambiguous: the stored bytes, untouched
    assert np.frombuffer(x[0].as_py(), np.float32).tolist() == [1.5, 2.5]


def test_tables_duckdb_cannot_take_are_sql_errors():
    with pytest.raises(tg.SQLError, match="cannot use 't'"):
        tg.sql("SELECT * FROM t", t=pa.table({"h": pa.array(np.ones(1, np.float16))}))
    with pytest.raises(tg.SQLError, match="cannot use ''"):
        tg.sql("SELECT 1", **{"": pa.table({"a": [1]})})
