"""The Spark bridge (tensorgrid/store/spark.py) on a real Spark local[2]: executors write a DataFrame's
partitions as shards and the driver commits them; Spark reads datasets back; staging never outlives a write."""

import datetime
import decimal
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tensorgrid as tg
from tensorgrid.store import spark as bridge
from tensorgrid.store.writer import publish

TENSOR = {"tensorgrid.tensor": {"dtype": "uint8", "shape": [2, 3]}}


@pytest.fixture
def no_driver_collect(monkeypatch):
    """Make every way of pulling a DataFrame's rows into the driver fail (the bridge must not use them)."""
    from pyspark.sql import DataFrame

    def refuse(*a, **k):
        raise AssertionError("rows were collected to the driver")

    for name in ("toArrow", "_collect_as_arrow", "toPandas"):
        monkeypatch.setattr(DataFrame, name, refuse, raising=False)


def test_spark_reads_current_version_shards(spark, tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, pd.DataFrame({"label": np.arange(100) % 10, "image": list(np.ones((100, 8, 8), np.uint8))}),
             shard_rows=40)
    df = spark.read.parquet(f"{url}/data")  # shards live in data/; the manifests in _tensorgrid/
    assert df.count() == 100
    assert sorted(r["label"] for r in df.groupBy("label").count().collect()) == list(range(10))
    first = df.limit(1).collect()[0]["image"]
    assert bytes(first) == bytes(64 * [1])  # the tensor's raw bytes (fixed_size_binary)
    tg.write(url, pd.DataFrame({"label": [7], "image": [np.zeros((8, 8), np.uint8)]}), mode="overwrite")
    assert spark.read.parquet(*tg.open(url).shard_urls()).count() == 1


def _rows(n: int = 40) -> pa.Table:
    return pa.table({
        "id": pa.array(range(n), pa.int64()),
        "x": pa.array(np.linspace(0, 1, n), pa.float32()),
        "s": [f"r{i}" if i % 7 else None for i in range(n)],
        "vec": pa.array([[float(i), i + 0.5, -1.0] for i in range(n)], pa.list_(pa.float32())),
        "img": [bytes([i % 256] * 6) if i % 9 else None for i in range(n)],
        "d": [datetime.date(2024, 1, 1) + datetime.timedelta(days=i) for i in range(n)],
        "ts": pa.array([datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc) + datetime.timedelta(hours=i)
                        for i in range(n)], pa.timestamp("us", tz="UTC")),
        "dec": pa.array([decimal.Decimal(i) / 4 for i in range(n)], pa.decimal128(10, 2)),
        "m": pa.array([[("k", i)] for i in range(n)], pa.map_(pa.string(), pa.int32())),
        "st": pa.array([{"a": i, "b": str(i)} for i in range(n)], pa.struct([("a", pa.int32()), ("b", pa.string())])),
    })


def _spark_df(spark, table: pa.Table, partitions: int):
    # range partitions: partition i holds the i-th run of ids, so the dataset keeps the DataFrame's order
    return spark.createDataFrame(table).repartitionByRange(partitions, "id").withMetadata("img", TENSOR)


def test_executors_write_each_partition_as_shards_and_the_driver_collects_no_rows(spark, tmp_path,
                                                                                 no_driver_collect):
    table = _rows()
    ds = tg.write(str(tmp_path / "d"), _spark_df(spark, table, 4))
    assert ds.num_shards == 4 and ds.num_rows == 40  # one shard per partition: written where the rows were
    assert all("/data/part-" in u for u in ds.shard_urls())
    assert sorted(os.listdir(tmp_path / "d" / "data")) == sorted(os.path.basename(u) for u in ds.shard_urls())
    ds.verify()  # checksums and footers the executors recorded
    got = ds.to_arrow()
    for name in ("id", "x", "s", "vec", "d", "dec", "m", "st"):  # exact values and types
        assert got.column(name).to_pylist() == table.column(name).to_pylist(), name
        assert got.schema.field(name).type.equals(table.schema.field(name).type), name
    assert pa.types.is_list(got.schema.field("vec").type)  # a Spark array stays a list
    assert got.column("ts").cast(pa.timestamp("us", tz="UTC")).to_pylist() == table.column("ts").to_pylist()
    img = got.schema.field("img").type  # a binary column marked in its metadata becomes a tensor
    assert isinstance(img, pa.FixedShapeTensorType) and img.shape == [2, 3] and img.value_type == pa.uint8()
    back = ds.to_pandas()["img"]
    assert back[1].shape == (2, 3) and back[1].dtype == np.uint8 and (back[1] == 1).all()
    assert back[0] is None and back[9] is None  # null rows stay null


def test_shard_rows_splits_a_partition_and_append_numbers_a_new_run(spark, tmp_path):
    url = str(tmp_path / "d")
    sdf = spark.createDataFrame(pd.DataFrame({"a": np.arange(30)})).repartitionByRange(2, "a")
    ds = tg.write(url, sdf, shard_rows=6)
    assert ds.shard_rows == [6, 6, 3, 6, 6, 3] and ds.to_pandas()["a"].tolist() == list(range(30))
    ds = tg.write(url, sdf, mode="append", shard_rows=10)
    assert ds.version == 2 and ds.num_rows == 60 and ds.num_shards == 10
    with pytest.raises(tg.SchemaMismatchError):
        tg.write(url, spark.createDataFrame(pd.DataFrame({"b": [1.0]})), mode="append")


def test_spark_and_pandas_writes_append_to_each_other(spark, tmp_path):
    url = str(tmp_path / "d")
    tg.write(url, spark.range(5))  # spark.range's id is NOT NULL; stored nullable like pandas' columns
    ds = tg.write(url, pd.DataFrame({"id": np.arange(5, 8)}), mode="append")
    assert sorted(ds.to_pandas()["id"]) == list(range(8))


def _left_over(root) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_a_failing_job_leaves_no_staging_and_no_shards(spark, tmp_path):
    from pyspark.sql import functions as F

    @F.udf("long")
    def boom(i):
        if i == 37:
            raise ValueError("row 37 is bad")
        return i

    bad = spark.createDataFrame(pd.DataFrame({"a": np.arange(40)})).repartitionByRange(4, "a") \
        .withColumn("a", boom("a"))
    with pytest.raises(Exception, match="row 37 is bad"):
        tg.write(str(tmp_path / "new"), bad)
    assert not (tmp_path / "new").exists()  # a failed first write leaves no folder

    url = tmp_path / "old"
    tg.write(str(url), pd.DataFrame({"a": np.arange(3)}))
    before = _left_over(url)
    with pytest.raises(Exception, match="row 37 is bad"):
        tg.write(str(url), bad, mode="append")
    assert _left_over(url) == before and tg.open(str(url)).version == 1
    with pytest.raises(tg.errors.EmptyDataError):
        tg.write(str(tmp_path / "empty"), spark.range(0))
    assert not (tmp_path / "empty").exists()


def test_a_staged_shard_removed_before_the_commit_is_a_conflict(tmp_path):
    staging = tmp_path / "data" / ".spark-0123456789ab"
    meta = [{"partition": 0, "path": "data/part-aaaaaaaaaaaa-00000.parquet", "rows": 1, "bytes": 1,
             "checksum": "xxh3_64:" + 16 * "0", "row_group_rows": 1}]
    moved = []
    with pytest.raises(tg.ConflictError, match="vacuum") as e:
        publish(*tg.fs.resolve(str(tmp_path)), str(staging), "0123456789ab", meta, moved)
    assert not e.value.retryable and moved == []


def test_a_task_that_outlives_its_failed_job_cannot_recreate_the_staging(tmp_path):
    """Spark fails a job on its first failed task while others still run; once the driver removed the
    staging folder, a late task's shard write fails instead of making the folder again."""
    from tensorgrid.store.writer import write_shards

    staging = tmp_path / "d" / "data" / ".spark-0123456789ab"
    schema = pa.schema([("x", pa.int64())])
    batch = pa.record_batch([pa.array([1, 2])], schema=schema)
    with pytest.raises(FileNotFoundError):
        write_shards(*tg.fs.resolve(str(staging)), schema, iter([batch]))
    assert not (tmp_path / "d").exists()
    (staging / "data").mkdir(parents=True)  # the driver makes it before the job
    assert [s.rows for s in write_shards(*tg.fs.resolve(str(staging)), schema, iter([batch]))] == [2]


def test_staging_a_killed_driver_left_does_not_block_a_new_write_and_is_vacuumed(tmp_path):
    url = tmp_path / "d"
    left = url / "data" / ".spark-0123456789ab" / "data" / "part-aaaaaaaaaaaa-00000.parquet"
    left.parent.mkdir(parents=True)
    left.write_bytes(b"half a shard")
    ds = tg.write(str(url), pd.DataFrame({"x": [1, 2]}))  # not taken for a folder of foreign files
    assert ds.to_pandas()["x"].tolist() == [1, 2]
    tg.vacuum(str(url), min_age_s=0)
    assert not left.parent.parent.exists() and tg.open(str(url)).to_pandas()["x"].tolist() == [1, 2]


def test_an_executors_tensorgrid_error_comes_back_as_itself(spark, tmp_path):
    sdf = spark.createDataFrame(pd.DataFrame({"img": [bytes(6), bytes(5)]})).withMetadata("img", TENSOR)
    with pytest.raises(tg.errors.UnsupportedDataError, match="'img'.*6 bytes.*holds 5 bytes"):
        tg.write(str(tmp_path / "d"), sdf)
    assert not (tmp_path / "d").exists()
    arr = spark.createDataFrame(pd.DataFrame({"v": [[1, 2], [3]]})) \
        .withMetadata("v", {"tensorgrid.tensor": {"shape": [2]}})
    with pytest.raises(tg.errors.UnsupportedDataError, match="'v'.*2 elements.*holds 1"):
        tg.write(str(tmp_path / "d"), arr)


def test_an_array_marked_as_a_tensor_is_stored_as_one(spark, tmp_path):
    sdf = spark.createDataFrame(pd.DataFrame({"v": [[1, 2, 3, 4], None, [5, 6, 7, 8]]})) \
        .withMetadata("v", {"tensorgrid.tensor": {"dtype": "float32", "shape": [2, 2]}})
    back = tg.write(str(tmp_path / "d"), sdf).to_pandas()["v"]
    assert back[0].dtype == np.float32 and back[0].tolist() == [[1, 2], [3, 4]] and back[1] is None
    with pytest.raises(tg.errors.UnsupportedDataError, match="only a binary or an array"):
        tg.write(str(tmp_path / "e"), spark.range(2).withMetadata("id", TENSOR))


def test_staging_must_be_reachable_by_every_executor(spark, tmp_path, monkeypatch):
    bridge.require_shared(str(tmp_path), "local[2]", "X")  # a local master shares this machine's disk
    bridge.require_shared(str(tmp_path), "local-cluster[2,1,1024]", "X")
    for master in ("spark://head:7077", "yarn", "k8s://https://api:6443"):
        with pytest.raises(tg.TensorGridError, match=f"TENSORGRID_SPARK_STAGING is '{tmp_path}'.*{master}"):
            bridge.require_shared(str(tmp_path), master, "TENSORGRID_SPARK_STAGING")
    with pytest.raises(tg.TensorGridError, match="memory://"):
        bridge.require_shared("memory://x/y", "local[2]", "the dataset URL")
    # the real entry points check before any job starts
    monkeypatch.setattr(bridge, "master_of", lambda spark: "spark://head:7077")
    monkeypatch.delenv(bridge.STAGING_ENV, raising=False)
    with pytest.raises(tg.TensorGridError, match="the dataset URL"):
        tg.write(str(tmp_path / "d"), spark.range(3))
    with pytest.raises(tg.TensorGridError, match=bridge.STAGING_ENV):
        bridge.stage(spark.range(3))
    (tmp_path / "t.csv").write_text("a\n1\n")
    with pytest.raises(tg.TensorGridError, match="the dataset URL"):
        tg.open(str(tmp_path / "t.csv")).to_spark(spark)
    (tmp_path / "t.csv").unlink()
    assert _left_over(tmp_path) == []


def test_stage_writes_a_temporary_dataset_that_unstage_deletes(spark, tmp_path, monkeypatch):
    monkeypatch.setenv(bridge.STAGING_ENV, str(tmp_path))
    ds = bridge.stage(spark.range(10, numPartitions=2))
    assert ds.num_rows == 10 and ds.url.startswith(str(tmp_path)) and len(os.listdir(tmp_path)) == 1
    bridge.unstage(ds)
    assert os.listdir(tmp_path) == []
    bridge.unstage(ds)  # twice is fine
    ds = bridge.stage(spark.range(3))
    del ds  # dropped without unstage: removed anyway
    assert os.listdir(tmp_path) == []
    from pyspark.sql import functions as F

    with pytest.raises(Exception, match="row 2 is bad"):
        bridge.stage(spark.range(4).withColumn("x", F.when(F.col("id") == 2, F.raise_error("row 2 is bad"))))
    assert os.listdir(tmp_path) == []


# --- dataset -> Spark --------------------------------------------------------------------------
def _images(n: int = 100) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"label": np.arange(n) % 10, "w": rng.random(n).astype(np.float32),
                         "u": (np.arange(n) % 250).astype(np.uint8),
                         "image": list(rng.integers(0, 255, (n, 8, 8), dtype=np.uint8))})


def _check_spark_copy(sdf, pdf: pd.DataFrame) -> None:
    from pyspark.sql import functions as F

    assert sdf.count() == len(pdf)
    sums = sdf.agg(F.sum("label"), F.sum("w"), F.sum("u")).collect()[0]
    assert sums[0] == pdf["label"].sum() and sums[1] == pytest.approx(float(pdf["w"].sum()), rel=1e-5)
    assert sums[2] == pdf["u"].astype(int).sum()
    field = sdf.schema["image"]
    assert field.dataType.simpleString() == "binary"  # a tensor: its row-major bytes
    assert field.metadata == {"tensorgrid.tensor": {"dtype": "uint8", "shape": [8, 8]}}
    assert sdf.schema["u"].dataType.simpleString() == "smallint"  # uint8 widened as Spark reads it
    rows = {r["label"] * 1000 + int(r["u"]): bytes(r["image"]) for r in sdf.select("label", "u", "image").collect()}
    want = {int(a) * 1000 + int(u): img.tobytes() for a, u, img in zip(pdf["label"], pdf["u"], pdf["image"])}
    assert rows == want


def test_to_spark_reads_store_shards_and_the_round_trip_keeps_tensors(spark, tmp_path):
    pdf = _images()
    ds = tg.write(str(tmp_path / "d"), pdf, shard_rows=30)
    sdf = ds.to_spark(spark)
    assert sorted(sdf.inputFiles()) == sorted("file://" + u for u in ds.shard_urls())  # Spark reads the shards
    _check_spark_copy(sdf, pdf)
    back = tg.write(str(tmp_path / "again"), sdf)  # Spark -> store: the metadata makes it a tensor again
    assert back.schema.field("image").type == ds.schema.field("image").type
    got = back.to_pandas().sort_values(["label", "u"]).reset_index(drop=True)
    want = pdf.sort_values(["label", "u"]).reset_index(drop=True)
    assert all((a == b).all() for a, b in zip(got["image"], want["image"]))
    tg.write(str(tmp_path / "d"), pdf.head(3), mode="overwrite")  # the current version only
    assert tg.open(str(tmp_path / "d")).to_spark(spark).count() == 3


def test_to_spark_of_in_memory_foreign_parquet_and_csv(spark, tmp_path):
    pdf = _images()
    table = tg.write(str(tmp_path / "d"), pdf).to_arrow()
    _check_spark_copy(tg.from_arrow(table).to_spark(spark), pdf)  # in memory: through Arrow
    plain = tmp_path / "plain"
    plain.mkdir()
    pq.write_table(pa.table({"a": [1, 2, 3], "s": ["x", "y", "z"]}), plain / "part-0.parquet")
    assert sorted(r["a"] for r in tg.open(str(plain)).to_spark(spark).collect()) == [1, 2, 3]
    (tmp_path / "t.csv").write_text("a,s\n1,x\n2,y\n")
    csv = tg.open(str(tmp_path / "t.csv")).to_spark(spark)  # read by the executors through the Dataset
    assert [(r["a"], r["s"]) for r in csv.orderBy("a").collect()] == [(1, "x"), (2, "y")]
    assert tg.from_arrow(pa.table({"a": pa.array([], pa.int64())})).to_spark(spark).count() == 0
