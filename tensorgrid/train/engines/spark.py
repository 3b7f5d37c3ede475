"""Spark engine: one barrier-mode task per worker on an existing SparkSession (all start together or
none do), torch.distributed between them with rank 0's host as the rendezvous. A Spark DataFrame is
staged as a temporary dataset by the executors (store/spark.py: never collected to the driver), read
per rank, and deleted after the fit."""

from __future__ import annotations

import os
import socket
import sys

from ...errors import TrainingConfigError, WorkerFailedError
from .. import checkpoint as ckpt


def _session(workers: int):
    """The active SparkSession, else a local one sized to the workers (as engine="ray" starts a local Ray),
    whose Python workers run this interpreter (so they import what this process imports)."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise TrainingConfigError("engine='spark' needs PySpark: pip install 'tensorgrid[spark]'") from None
    spark = SparkSession.getActiveSession()
    if spark is None:
        master = f"local[{workers}]"
        print(f"tensorgrid: no active SparkSession: starting a local one ({master}, Python {sys.executable}); "
              "create your own first to train on a cluster", file=sys.stderr, flush=True)
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # what PySpark's workers run
        spark = (SparkSession.builder.master(master).appName("tensorgrid")
                 .config("spark.ui.enabled", "false").getOrCreate())
        spark.sparkContext.setLogLevel("ERROR")
    return spark


def dataset_of(sdf, where: str | None = None):
    """A Spark DataFrame as a temporary dataset its executors write under ``where`` (default
    $TENSORGRID_SPARK_STAGING, else the temp dir: a local master only); ``run`` deletes it after the fit."""
    from ...store.spark import stage

    return stage(sdf, where)


def _task(payload: bytes, world: int):
    def run_partition(_):
        from pyspark import BarrierTaskContext

        ctx = BarrierTaskContext.get()
        rank = ctx.partitionId()
        host = ctx.getTaskInfos()[0].address.split(":")[0]
        port = ""
        if rank == 0:
            with socket.socket() as s:
                s.bind(("", 0))
                port = str(s.getsockname()[1])
        port = next(p for p in ctx.allGather(port) if p)
        import cloudpickle

        from ..loop import train

        os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0",
                           "MASTER_ADDR": host, "MASTER_PORT": port})
        out = train(cloudpickle.loads(payload), rank, world)
        yield cloudpickle.dumps(out) if rank == 0 else b""

    return run_partition


def run(payload: bytes, workers: int, max_restarts: int, timeout_s: float, checkpoint_dir: str | None):
    import cloudpickle

    from ...store.spark import unstage

    spec = cloudpickle.loads(payload)
    try:
        return _run(payload, workers, max_restarts, checkpoint_dir)
    finally:  # a DataFrame staged for this fit (dataset_of) is not needed after it, whatever the outcome
        for ds in (getattr(spec, "train", None), getattr(spec, "val", None)):
            unstage(ds)


def _run(payload: bytes, workers: int, max_restarts: int, checkpoint_dir: str | None):
    import cloudpickle

    spark = _session(workers)
    sc = spark.sparkContext
    attempt = 0
    while True:
        try:
            rdd = sc.parallelize(range(workers), workers).barrier().mapPartitions(_task(payload, workers))
            results = [r for r in rdd.collect() if r]
            return cloudpickle.loads(results[0])
        except Exception as e:  # noqa: BLE001 - py4j wraps every task failure
            if attempt < max_restarts:
                attempt += 1
                payload = _with_resume(payload, ckpt.latest(checkpoint_dir))
                continue
            last = ckpt.latest(checkpoint_dir)
            first = _python_error(str(e)) + _interpreter_hint(str(e), sc)
            where = f"last checkpoint: {last}; fit(resume=True) continues from it" if last else "no checkpoint was written"
            raise WorkerFailedError(f"a Spark training task failed: {first.strip()} ({where})", checkpoint=last) from None


def _with_resume(payload: bytes, latest: str | None) -> bytes:
    import cloudpickle

    spec = cloudpickle.loads(payload)
    spec.resume_from = latest or spec.resume_from
    return cloudpickle.dumps(spec)


def _interpreter_hint(text: str, sc) -> str:
    """When Spark's Python workers cannot import a module this process imports (tensorgrid, cloudpickle,
    torch), they run another interpreter than this one (a session made from a virtualenv's Python without
    activating it runs ``python3``): say what to set."""
    import importlib.util
    import re

    missing = re.search(r"No module named '([\w.]+)'", text)
    if missing is None or importlib.util.find_spec(missing.group(1).split(".")[0]) is None:
        return ""
    theirs = getattr(sc, "pythonExec", None) or os.environ.get("PYSPARK_PYTHON") or "python3"
    return (f". Spark's Python workers run {theirs!r}, which cannot import what this Python ({sys.executable}) "
            f"does: set the environment variable PYSPARK_PYTHON={sys.executable} before creating the "
            "SparkSession (or install tensorgrid where the executors run)")


def _python_error(text: str) -> str:
    """The Python exception line inside a py4j/Spark error dump, else its first line."""
    import re

    found = re.findall(r"^(\w+(?:Error|Exception|Interrupt)(?::.*)?)$", text, flags=re.M)
    return (found[0] if found else text.strip().splitlines()[0])[:300]
