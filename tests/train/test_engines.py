"""The same training on every engine: local processes, a real two-node Ray cluster, Spark local[2]."""

import pytest
import torch

import tensorgrid as tg
from tests.train import models
from tests.train.test_trainer import digits, trainer  # noqa: F401 - fixture


@pytest.fixture(scope="module")
def reference(digits):  # noqa: F811
    return trainer(workers=1).fit(digits[0])


def _same_curve(a, b):
    for x, y in zip(a.history, b.history):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-6)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)


def test_ray_engine_same_curve_and_spread_over_nodes(ray_cluster, digits, reference):  # noqa: F811
    r = trainer(workers=2, engine="ray").fit(digits[0])
    _same_curve(r, reference)
    assert r.placement and len(set(r.placement)) == 2  # one worker on each node


def test_spark_engine_same_curve(spark, digits, reference):  # noqa: F811
    r = trainer(workers=2, engine="spark").fit(digits[0])
    _same_curve(r, reference)


def test_spark_dataframe_trains_without_collecting(spark, digits, tmp_path):  # noqa: F811
    pdf = digits[0].to_pandas()
    pdf["image"] = pdf["image"].map(lambda a: a.reshape(-1).tolist())  # Spark has arrays, not tensors
    sdf = spark.createDataFrame(pdf)
    from tensorgrid import transforms as T

    r = trainer(workers=2, engine="spark", epochs=3, transform=T.to_float(scale=1 / 255)).fit(sdf)
    assert r.history[-1]["accuracy"] > 0.8


def test_spark_engine_needs_a_session_and_ray_needs_ray(digits):  # noqa: F811
    assert tg.Trainer(model=models.mlp, loss=torch.nn.CrossEntropyLoss(), engine="spark").engine == "spark"
    with pytest.raises(tg.TrainingConfigError, match="engine"):
        tg.Trainer(model=models.mlp, loss=torch.nn.CrossEntropyLoss(), engine="dask")


def _kill_ray_worker_after_first_checkpoint(ck, killed):
    import glob
    import os
    import signal
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(f"{ck}/ckpt-*.pt"):
        time.sleep(0.05)
    while time.time() < deadline:
        for pid in os.listdir("/proc"):
            try:
                if pid.isdigit() and b"ray::_Worker.train" in open(f"/proc/{pid}/cmdline", "rb").read():
                    os.kill(int(pid), signal.SIGKILL)
                    killed.append(int(pid))
                    return
            except OSError:
                pass
        time.sleep(0.05)


def test_ray_worker_killed_then_resumed(ray_cluster, digits, tmp_path):  # noqa: F811
    import threading

    full = trainer(workers=2, engine="ray", epochs=4).fit(digits[0])
    ck = str(tmp_path / "ck")
    killed = []
    killer = threading.Thread(target=_kill_ray_worker_after_first_checkpoint, args=(ck, killed))
    killer.start()
    with pytest.raises(tg.WorkerFailedError, match="Ray training worker failed.*last checkpoint"):
        trainer(workers=2, engine="ray", epochs=4, checkpoint_dir=ck, checkpoint_every=5, timeout_s=60,
                transform=models.paced_to_float).fit(digits[0])
    killer.join()
    assert killed
    resumed = trainer(workers=2, engine="ray", epochs=4, checkpoint_dir=ck, checkpoint_every=5).fit(
        digits[0], resume=True)
    sa, sb = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)


def _spark_task_workers() -> list[int]:
    """Python workers running Spark tasks: children of pyspark's daemon, forked from it."""
    import os

    def cmd(pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()

    out = []
    for pid in os.listdir("/proc"):
        try:
            if not pid.isdigit() or b"pyspark.daemon" not in cmd(pid):
                continue
            with open(f"/proc/{pid}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]
            if b"pyspark.daemon" in cmd(parent):
                out.append(int(pid))
        except OSError:
            pass
    return out


def _kill_spark_worker_after_first_checkpoint(ck, killed):
    import glob
    import os
    import signal
    import time

    deadline = time.time() + 120
    while time.time() < deadline and not glob.glob(f"{ck}/ckpt-*.pt"):
        time.sleep(0.05)
    while time.time() < deadline:
        workers = _spark_task_workers()
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])
            return
        time.sleep(0.05)


def test_spark_task_killed_then_resumed(spark, digits, tmp_path):  # noqa: F811
    import threading
    import time

    full = trainer(workers=2, engine="spark", epochs=4).fit(digits[0])
    ck = str(tmp_path / "ck")
    killed = []
    killer = threading.Thread(target=_kill_spark_worker_after_first_checkpoint, args=(ck, killed))
    killer.start()
    t0 = time.time()
    with pytest.raises(tg.WorkerFailedError, match="Spark training task failed.*last checkpoint"):
        trainer(workers=2, engine="spark", epochs=4, checkpoint_dir=ck, checkpoint_every=5, timeout_s=60,
                transform=models.paced_to_float).fit(digits[0])
    killer.join()
    assert killed and time.time() - t0 < 120  # no hang
    resumed = trainer(workers=2, engine="spark", epochs=4, checkpoint_dir=ck, checkpoint_every=5).fit(
        digits[0], resume=True)
    sa, sb = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-4) for k in sa)
