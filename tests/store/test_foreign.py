"""Foreign data opened in place: Parquet by pyarrow and by DuckDB, Spark-style folders, CSV, globs."""

import os

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import tensorgrid as tg


def test_parquet_file_written_by_pyarrow(tmp_path):
    t = pa.table({"a": np.arange(100), "s": [f"x{i}" for i in range(100)]})
    pq.write_table(t, tmp_path / "f.parquet", row_group_size=10)
    ds = tg.open(str(tmp_path / "f.parquet"))
    assert ds.version is None and ds.num_rows == 100 and ds.num_shards == 1
    assert ds.to_arrow().equals(t)
    assert ds.to_arrow(columns=["s"], filter=pc.field("a") < 3).column("s").to_pylist() == ["x0", "x1", "x2"]
    assert ds.versions() == []
    assert (tmp_path / "f.parquet").stat().st_size == ds.verify()["bytes"]  # read in place, not copied


def test_parquet_folder_written_by_duckdb_spark_style(tmp_path):
    out = tmp_path / "spark_out"
    out.mkdir()
    for i in range(3):
        duckdb.sql(f"COPY (SELECT range + {i * 10} AS a, 'v' || range AS s FROM range(10)) "
                   f"TO '{out}/part-0000{i}.snappy.parquet' (FORMAT parquet)")
    (out / "_SUCCESS").write_text("")
    (out / ".part-00000.crc").write_bytes(b"\x00")
    ds = tg.open(str(out))
    assert ds.num_shards == 3 and ds.num_rows == 30
    assert sorted(ds.to_arrow().column("a").to_pylist()) == list(range(30))
    assert ds.sql("SELECT max(a) AS m FROM ds").to_pandas()["m"][0] == 29


def test_glob_and_csv(tmp_path):
    for i in range(2):
        pd.DataFrame({"x": [i, i + 10], "y": ["a", "b"]}).to_csv(tmp_path / f"p{i}.csv", index=False)
    ds = tg.open(str(tmp_path / "*.csv"))
    assert ds.num_rows == 4 and ds.num_shards == 2
    assert sorted(ds.to_pandas()["x"].tolist()) == [0, 1, 10, 11]
    assert tg.open(str(tmp_path / "p1.csv")).head(1)["y"][0] == "a"


def test_foreign_data_is_read_only(tmp_path):
    pq.write_table(pa.table({"a": [1]}), tmp_path / "f.parquet")
    with pytest.raises(tg.ReadOnlyError):
        tg.open(str(tmp_path / "f.parquet")).vacuum()
    with pytest.raises(tg.TensorGridError, match="not a versioned"):
        tg.open(str(tmp_path / "f.parquet"), version=1)


def test_not_parquet_nor_csv(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "img.bin").write_bytes(b"\x89PNG....")
    with pytest.raises(tg.UnsupportedFormatError, match="neither Parquet nor CSV"):
        tg.open(str(tmp_path))
    with pytest.raises(tg.UnsupportedFormatError):
        tg.open(str(tmp_path / "notes.txt"))


def test_corrupt_foreign_parquet(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 definitely not parquet PAR1")
    with pytest.raises((tg.UnsupportedFormatError, tg.CorruptShardError)):
        tg.open(str(tmp_path / "bad.parquet")).to_arrow()


def test_store_shards_are_plain_parquet_for_duckdb_and_pandas(tmp_path):
    url = str(tmp_path / "digits")
    tg.write(url, pd.DataFrame({"label": np.arange(100) % 10,
                                "image": list(np.zeros((100, 8, 8), np.uint8))}), shard_rows=30)
    n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{url}/**/*.parquet')").fetchall()[0][0]
    assert n == 100
    # after an overwrite the glob also sees the old version; shard_urls() lists the current one only
    tg.write(url, pd.DataFrame({"label": [1, 2], "image": list(np.zeros((2, 8, 8), np.uint8))}), mode="overwrite")
    files = tg.open(url).shard_urls()
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet({files})").fetchall()[0][0] == 2
    assert len(pd.read_parquet(files[0])) == 2
    # and tg.open on the shard folder itself restores the tensor type from the field metadata
    reopened = tg.open(files[0])
    assert isinstance(reopened.schema.field("image").type, pa.FixedShapeTensorType)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_files_with_different_columns_are_refused(tmp_path, fmt):
    (tmp_path / "two").mkdir()
    for i, cols in enumerate((["a", "b"], ["a", "c"])):
        df = pd.DataFrame({c: [i] for c in cols})
        path = tmp_path / "two" / f"{i}.{fmt}"
        df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    ds = tg.open(str(tmp_path / "two"))
    for read in (ds.to_arrow, ds.head, lambda: list(ds.to_torch(batch_size=1))):
        with pytest.raises(tg.SchemaMismatchError, match=rf"1\.{fmt} has columns \['a', 'c'\]"):
            read()


def test_hive_partitioned_folder_keeps_its_key_columns(tmp_path):
    for k in (1, 2):
        (tmp_path / "h" / f"k={k}").mkdir(parents=True)
        pq.write_table(pa.table({"v": [k * 10, k * 10 + 1]}), tmp_path / "h" / f"k={k}" / "p.parquet")
    ds = tg.open(str(tmp_path / "h"))
    assert ds.schema.names == ["v", "k"]
    assert sorted(zip(*(ds.to_pandas()[c].tolist() for c in ("v", "k")))) == [(10, 1), (11, 1), (20, 2), (21, 2)]
    got = sorted((int(v), int(k)) for b in ds.to_torch(batch_size=3, shuffle=True) for v, k in zip(b["v"], b["k"]))
    assert got == [(10, 1), (11, 1), (20, 2), (21, 2)]
    duck = duckdb.sql(f"SELECT sum(v) FROM read_parquet('{tmp_path}/h/**/*.parquet', hive_partitioning=true) "
                      "WHERE k = 2").fetchall()[0][0]
    assert ds.sql("SELECT sum(v) AS s FROM ds WHERE k = 2").to_pandas()["s"][0] == duck == 41


def test_tsv_is_split_on_tabs(tmp_path):
    (tmp_path / "t.tsv").write_text("a\tb\n1\tx y\n")
    assert tg.open(str(tmp_path / "t.tsv")).to_pandas().to_dict("records") == [{"a": 1, "b": "x y"}]


def test_files_with_different_column_types_are_named(tmp_path):
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"a": [1]}), tmp_path / "m" / "0.parquet")
    pq.write_table(pa.table({"a": ["x"]}), tmp_path / "m" / "1.parquet")
    with pytest.raises(tg.SchemaMismatchError, match=r"'a' is string in .*1\.parquet but int64 in .*0\.parquet"):
        tg.open(str(tmp_path / "m")).to_arrow()
    (tmp_path / "w").mkdir()  # widths pyarrow reads through are fine
    pq.write_table(pa.table({"a": pa.array([1], pa.int32())}), tmp_path / "w" / "0.parquet")
    pq.write_table(pa.table({"a": pa.array([2], pa.int64())}), tmp_path / "w" / "1.parquet")
    assert sorted(tg.open(str(tmp_path / "w")).to_pandas()["a"]) == [1, 2]
    (tmp_path / "n").mkdir()  # an all-null column in one file, another time unit in the next
    pq.write_table(pa.table({"a": pa.array(["x"]), "t": pa.array([1], pa.timestamp("us"))}), tmp_path / "n" / "0.parquet")
    pq.write_table(pa.table({"a": pa.array([None], pa.null()), "t": pa.array([2], pa.timestamp("ms"))}),
                   tmp_path / "n" / "1.parquet")
    assert tg.open(str(tmp_path / "n")).num_rows == 2 and len(tg.open(str(tmp_path / "n")).to_arrow()) == 2


def test_a_fifo_among_foreign_files_is_never_opened(tmp_path):
    """Opening a folder must not block on a FIFO (with or without a data extension), nor open one given directly."""
    import threading

    pq.write_table(pa.table({"a": [1, 2]}), tmp_path / "p.parquet")
    os.mkfifo(tmp_path / "pipe")
    os.mkfifo(tmp_path / "pipe.parquet")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("rows", tg.open(str(tmp_path)).to_arrow().num_rows),
                         daemon=True)
    t.start()
    t.join(20)
    assert result == {"rows": 2}
    with pytest.raises(tg.UnsupportedFormatError, match="not a regular file"):
        tg.open(str(tmp_path / "pipe.parquet"))
