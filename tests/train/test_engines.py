"""The same training on every engine: local processes, a real three-node Ray cluster, Spark local[2]."""

import time

import pytest
import torch

import tensorgrid as tg
from tests.procs import KillAfterFirstCheckpoint, processes_running, spark_task_workers
from tests.train import models
from tests.train.helpers import trainer


@pytest.fixture(scope="module")
def reference(digits):
    return trainer(workers=1).fit(digits[0])


def _same_curve(a, b):
    for x, y in zip(a.history, b.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)


def test_ray_engine_same_curve_and_spread_over_nodes(ray_cluster, digits, reference):
    r = trainer(workers=2, engine="ray").fit(digits[0])
    _same_curve(r, reference)
    assert r.placement and len({p.node for p in r.placement}) == 2  # each worker on a node of its own


def test_spark_engine_same_curve(spark, digits, reference):
    r = trainer(workers=2, engine="spark").fit(digits[0])
    _same_curve(r, reference)


def _spark_staging(tmp_path, monkeypatch):
    """A fresh $TENSORGRID_SPARK_STAGING, and a driver that refuses to collect a DataFrame's rows."""
    from pyspark.sql import DataFrame

    def refuse(*a, **k):
        raise AssertionError("rows were collected to the driver")

    for name in ("toArrow", "_collect_as_arrow", "toPandas"):
        monkeypatch.setattr(DataFrame, name, refuse, raising=False)
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setenv("TENSORGRID_SPARK_STAGING", str(staging))
    return staging


def test_spark_dataframe_trains_without_collecting_and_its_staging_is_deleted(spark, digits, tmp_path,
                                                                               monkeypatch):
    pdf = digits[0].to_pandas()
    pdf["image"] = pdf["image"].map(lambda a: a.reshape(-1).tolist())  # a Spark array: stored as a list
    sdf = spark.createDataFrame(pdf)
    staging = _spark_staging(tmp_path, monkeypatch)
    from tensorgrid import transforms as T

    r = trainer(workers=2, engine="spark", epochs=3, transform=T.to_float(scale=1 / 255)).fit(sdf)
    assert r.history[-1]["accuracy"] > 0.8
    assert list(staging.iterdir()) == []  # the dataset the executors wrote for the ranks is gone


def test_spark_dataframe_tensor_column_staged_then_deleted_when_the_fit_fails(spark, digits, tmp_path,
                                                                             monkeypatch):
    pdf = digits[0].to_pandas()
    pdf["image"] = pdf["image"].map(lambda a: a.tobytes())  # row-major bytes, marked as an 8x8 uint8 tensor
    sdf = spark.createDataFrame(pdf).withMetadata("image", {"tensorgrid.tensor": {"dtype": "uint8", "shape": [8, 8]}})
    staging = _spark_staging(tmp_path, monkeypatch)
    with pytest.raises(tg.WorkerFailedError, match="rank one refuses"):
        trainer(workers=2, engine="spark", model=models.rank_one_fails).fit(sdf)
    assert list(staging.iterdir()) == []


def test_unknown_engine_refused_and_ray_needs_ray(digits, monkeypatch):
    with pytest.raises(tg.TrainingConfigError, match=r"engine must be one of \('local', 'ray', 'spark'\), got 'dask'"):
        tg.Trainer(model=models.mlp, loss=torch.nn.CrossEntropyLoss(), engine="dask")
    # (engine="spark" with no active session starts a local one: test_flat_scripts.py)
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` fails as when it is not installed
    with pytest.raises(tg.TrainingConfigError, match=r"engine='ray' needs Ray: pip install 'tensorgrid\[ray\]'"):
        trainer(workers=2, engine="ray").fit(digits[0])


def test_ray_worker_error_names_the_worker_and_its_cause(ray_cluster, digits):
    with pytest.raises(tg.WorkerFailedError, match="Ray training worker 1 failed: RuntimeError: rank one refuses") as e:
        trainer(workers=2, engine="ray", model=models.rank_one_fails).fit(digits[0])
    assert "\x1b" not in str(e.value) and "\n" not in str(e.value)


def test_ray_worker_killed_then_resumed(ray_cluster, digits, tmp_path):
    full = trainer(workers=2, engine="ray", epochs=4).fit(digits[0])
    ck = str(tmp_path / "ck")
    with KillAfterFirstCheckpoint(ck, lambda: processes_running(b"ray::_Worker.train")) as killer, \
            pytest.raises(tg.WorkerFailedError, match=r"Ray training worker \d failed.*last checkpoint"):
        trainer(workers=2, engine="ray", epochs=4, checkpoint_dir=ck, checkpoint_every=5, timeout_s=60,
                transform=models.paced_to_float).fit(digits[0])
    assert killer.killed
    resumed = trainer(workers=2, engine="ray", epochs=4, checkpoint_dir=ck, checkpoint_every=5).fit(
        digits[0], resume=True)
    sa, sb = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)


def test_spark_task_killed_then_resumed(spark, digits, tmp_path):
    full = trainer(workers=2, engine="spark", epochs=4).fit(digits[0])
    ck = str(tmp_path / "ck")
    t0 = time.time()
    # Spark keeps idle Python workers from earlier jobs beside the two training tasks: kill them all
    with KillAfterFirstCheckpoint(ck, spark_task_workers, kill_all=True) as killer, \
            pytest.raises(tg.WorkerFailedError, match="Spark training task failed.*last checkpoint"):
        trainer(workers=2, engine="spark", epochs=4, checkpoint_dir=ck, checkpoint_every=5, timeout_s=60,
                transform=models.paced_to_float).fit(digits[0])
    assert killer.killed and time.time() - t0 < 120  # no hang
    resumed = trainer(workers=2, engine="spark", epochs=4, checkpoint_dir=ck, checkpoint_every=5).fit(
        digits[0], resume=True)
    sa, sb = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)


def test_loader_workers_spawn_in_a_process_that_runs_ray(ray_cluster, digits):
    """Forking a process whose Ray/gRPC threads run can abort the child (seen once as a SIGABRT): with Ray
    initialized, loader workers start with spawn unless told otherwise, and still read every row once."""
    loader = digits[0].to_torch(batch_size=100, num_workers=1, shuffle=True)
    assert loader._start_method() == "spawn"
    assert sorted(i for b in loader for i in b["label"].tolist()) == sorted(digits[0].to_pandas()["label"])
    assert digits[0].to_torch(batch_size=100, num_workers=1, multiprocessing_context="fork")._start_method() == "fork"
