"""Spark reads our shards as plain Parquet, and a Spark DataFrame can be written as a dataset."""

import numpy as np
import pandas as pd

import tensorgrid as tg


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


def test_write_spark_dataframe(spark, tmp_path):
    sdf = spark.createDataFrame(pd.DataFrame({"a": np.arange(50), "s": [f"r{i}" for i in range(50)]}))
    ds = tg.write(str(tmp_path / "s"), sdf)
    back = ds.to_pandas().sort_values("a")
    assert back["a"].tolist() == list(range(50)) and back["s"].tolist() == [f"r{i}" for i in range(50)]
