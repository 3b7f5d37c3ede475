"""Issue 12: streaming scoring with ``tensorgrid.ml.spark.NNModel`` in Spark local[2] (Structured Streaming,
file source -> pandas UDF -> noop sink): latency per micro-batch (p50/p95 of ``triggerExecution`` from
``query.recentProgress``) and rows/s, against the same rows scored by a hand-written torch loop in one
process (the numpy array in memory, torch on both cores): the ceiling.

Data: scikit-learn's 1,797 digits (scaled to [0, 1], float32), repeated; each micro-batch is N rows in two
Parquet files (``maxFilesPerTrigger=2``: one task per core), ``--batches`` micro-batches per N. The files
are written just before each query (page cache warm). The first micro-batch (Python workers start, torch
imports, the model is unpickled once per worker) is reported apart and left out of the percentiles.
Models: an MLP 64-64-10 (the per-row overhead shows), the same adding only ``prediction`` (no MLlib vectors
for probability and rawPrediction), and quickstart's digits CNN (the model's own cost shows).

Prediction: small batches pay Spark's fixed cost per trigger (listing, planning, offset/commit logs, task
launch: ~0.1-0.3 s); large ones the Arrow -> pandas -> numpy conversion of the features (~0.2-0.5 M rows/s
per core), so the MLP stays far below its ceiling while the CNN, bound by its own FLOPs, comes near it.
Found (2026-12-02, one run): ~0.25 s per trigger beside addBatch (file listing ~0.1 s, offset WAL and commit
log ~0.08-0.1 s each); at 50 k rows the JVM side (Parquet list decode, Arrow to and from the Python worker,
array_to_vector for the two vectors) outweighs the UDF's own Python (~15 ms per 10 k rows): the MLP scores
~0.1 M rows/s (2% of its in-memory ceiling), the CNN about half its ceiling.

    .venv/bin/python benchmarks/bench_streaming.py [--rows 1000,10000,50000] [--batches 20] [--models mlp,cnn]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, table  # noqa: E402

from tensorgrid.quickstart import digits_cnn, digits_frame  # noqa: E402

SHAPES = {"mlp": [64], "cnn": [8, 8]}
LEAN = "-prediction-only"  # a model name ending so: probabilityCol="" and rawPredictionCol="" (no MLlib vectors)


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def session():
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # the executors run this venv
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("bench-streaming").config("spark.ui.enabled", "false")
             .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.sql.shuffle.partitions", "2").getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def write_batches(folder: str, images: np.ndarray, rows: int, batches: int) -> None:
    """``batches`` micro-batches of ``rows`` rows, each as two Parquet files of a list<float> column."""
    os.makedirs(folder)
    half = rows // 2
    for b in range(batches):
        for part, (lo, hi) in enumerate(((0, half), (half, rows))):
            start = (b * rows + lo) % len(images)
            idx = (start + np.arange(hi - lo)) % len(images)
            x = images[idx]
            col = pa.ListArray.from_arrays(pa.array(np.arange(0, x.size + 1, 64, dtype=np.int32)),
                                           pa.array(x.reshape(-1)))
            pq.write_table(pa.table({"id": np.arange(lo, hi) + b * rows, "features": col}),
                           f"{folder}/batch-{b:04d}-{part}.parquet")


def stream(spark, folder: str, model: torch.nn.Module, shape: list[int], rows: int, batches: int,
           lean: bool) -> list[dict]:
    from tensorgrid.ml.spark import NNModel

    schema = spark.read.parquet(folder).schema
    source = spark.readStream.schema(schema).option("maxFilesPerTrigger", 2).parquet(folder)
    stage = NNModel(model=model, classifier=True, featuresShape=shape)
    if lean:
        stage.setProbabilityCol("").setRawPredictionCol("")
    scored = stage.transform(source)
    query = (scored.writeStream.format("noop").queryName(f"bench_{uuid.uuid4().hex[:6]}")
             .option("checkpointLocation", f"{folder}-checkpoint").start())
    try:
        query.processAllAvailable()
        progress = [p for p in query.recentProgress if p["numInputRows"] > 0]
    finally:
        query.stop()
    assert len(progress) == batches and all(p["numInputRows"] == rows for p in progress), \
        [p["numInputRows"] for p in progress]
    return progress


def hand_written(model: torch.nn.Module, x: np.ndarray, batch: int) -> float:
    """Rows/s of the ceiling: the same rows in memory (at most 100 k of them: the rate does not depend on
    the count), batches of ``batch``, softmax and argmax kept; best of 3 passes."""
    model.eval()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        with torch.no_grad():
            for s in range(0, len(x), batch):
                out = model(torch.from_numpy(x[s:s + batch]))
                torch.softmax(out, dim=1).numpy(), out.argmax(dim=1).numpy()
        best = min(best, time.perf_counter() - t0)
    return len(x) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1000,10000,50000", help="rows per micro-batch, comma-separated")
    ap.add_argument("--batches", type=int, default=20, help="micro-batches per row count")
    ap.add_argument("--models", default=f"mlp,mlp{LEAN},cnn")
    a = ap.parse_args()
    frame = digits_frame()
    images = (np.stack(frame.image).reshape(-1, 64) / 255.0).astype(np.float32)
    spark = session()
    import pyspark

    torch.set_num_threads(os.cpu_count() or 1)
    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads in the hand loop), "
          f"Spark {pyspark.__version__} local[2], load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}",
          flush=True)
    root = tempfile.mkdtemp(prefix="tg-bench-streaming-")
    results = []
    try:
        for name in a.models.split(","):
            base = name.removesuffix(LEAN)
            model = mlp() if base == "mlp" else digits_cnn().eval()
            shape = SHAPES[base]
            for rows in (int(r) for r in a.rows.split(",")):
                folder = f"{root}/{name}-{rows}"
                write_batches(folder, images, rows, a.batches)
                progress = stream(spark, folder, model, shape, rows, a.batches, name.endswith(LEAN))
                ms = np.array([p["durationMs"]["triggerExecution"] for p in progress], dtype=float)
                steady = ms[1:]
                run = np.array([p["durationMs"].get("addBatch", 0) for p in progress[1:]], dtype=float)
                x = images[np.arange(min(rows * a.batches, 100_000)) % len(images)].reshape(-1, *shape)
                ceiling = hand_written(model, x, 1024)
                rate = rows * len(steady) / (steady.sum() / 1000)
                results.append((name, f"{rows:,}", f"{ms[0]:,.0f}", f"{np.percentile(steady, 50):,.0f}",
                                f"{np.percentile(steady, 95):,.0f}", f"{np.percentile(run, 50):,.0f}", f"{rate:,.0f}", f"{ceiling:,.0f}",
                                f"{rate / ceiling:.2f}"))
                print(" ".join(results[-1]), flush=True)
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        spark.stop()
    print(f"\n## Streaming scoring, Spark local[2]: file source -> NNModel (pandas UDF) -> noop sink, "
          f"{a.batches} micro-batches per row count (the first apart), batchSize 1024\n")
    print(table(results, ("model", "rows / micro-batch", "first batch ms", "p50 ms", "p95 ms", "addBatch p50 ms", "rows/s streaming",
                          "rows/s hand loop (1 process)", "ratio")))


main()
