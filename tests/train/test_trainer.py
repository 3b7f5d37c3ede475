"""The trainer on real data (scikit-learn digits), real worker processes, real SIGKILLs."""

import glob
import os
import threading
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tensorgrid as tg
from tests.procs import KillAfterFirstCheckpoint, children_of, spawned_children_of
from tests.train import models
from tests.train.helpers import same, trainer, weights


def test_learns_digits_and_predicts(digits, tmp_path):
    train, val = digits
    t = trainer(model=models.cnn, optimizer=models.adam, epochs=8)
    r = t.fit(train, val=val)
    assert r.metrics["val_accuracy"] >= 0.9, r.history
    assert len(r.history) == 8 and r.history[-1]["loss"] < r.history[0]["loss"]
    pred = t.predict(val, out=str(tmp_path / "pred"))
    df = pred.to_pandas()
    assert set(df.columns) == {"label", "prediction", "probability"}
    assert (df["prediction"] == df["label"]).mean() >= 0.9
    assert abs(df["probability"][0].sum() - 1) < 1e-5 and df["probability"][0].shape == (10,)
    assert tg.open(str(tmp_path / "pred")).num_rows == val.num_rows


def test_two_workers_follow_the_same_loss_curve_as_one(digits):
    train, _ = digits
    one = trainer(workers=1).fit(train)
    two = trainer(workers=2).fit(train)
    for a, b in zip(one.history, two.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert same(weights(one.model), weights(two.model), atol=1e-4)


@pytest.mark.parametrize("how", ["loss function", "step"])
def test_padding_never_counts_whatever_computes_the_loss(digits, how):
    """1,499 rows: the last global batch splits unevenly over 2 workers, so one rank gets a padding row."""
    train = tg.from_arrow(digits[0].to_arrow().slice(0, 1499))
    kw = dict(loss=models.ce) if how == "loss function" else dict(loss=None, step=models.ce_step)
    one = trainer(**kw).fit(train)
    two = trainer(workers=2, **kw).fit(train)
    for a, b in zip(one.history, two.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert same(weights(one.model), weights(two.model), atol=1e-4)


def test_checkpoints_and_exact_resume(digits, tmp_path):
    train, _ = digits
    full = trainer(epochs=3).fit(train)
    ck = str(tmp_path / "ck")
    part = trainer(epochs=1, checkpoint_dir=ck, keep_checkpoints=2).fit(train)
    assert part.checkpoint.endswith(".pt") and os.path.exists(part.checkpoint)
    resumed = trainer(epochs=3, checkpoint_dir=ck, keep_checkpoints=2).fit(train, resume=True)
    assert same(weights(resumed.model), weights(full.model))
    assert [round(h["loss"], 6) for h in resumed.history] == [round(h["loss"], 6) for h in full.history]
    assert len(glob.glob(f"{ck}/ckpt-*.pt")) == 2  # keep_checkpoints


@pytest.mark.parametrize("workers, loader_workers", [(2, 0), (1, 1)])
def test_resume_is_exact_with_random_augmentations(digits, tmp_path, workers, loader_workers):
    """Every rank's random streams are checkpointed (ranks draw different numbers when the draws depend on
    their data), and loader workers seed a transform by batch: resuming mid-epoch repeats the same draws."""
    train = tg.from_arrow(digits[0].to_arrow().slice(0, 640))
    kw = dict(transform=models.noisy_high_labels, workers=workers, loader_workers=loader_workers, epochs=2)
    full = trainer(**kw).fit(train)
    ck = str(tmp_path / "ck")
    trainer(checkpoint_dir=ck, checkpoint_every=3, keep_checkpoints=20, **kw).fit(train)
    for f in glob.glob(f"{ck}/ckpt-*.pt"):  # stop after step 12: mid-epoch 2 (10 steps an epoch)
        if int(f.rsplit("-s", 1)[1][:9]) > 12:
            os.remove(f)
    resumed = trainer(checkpoint_dir=ck, checkpoint_every=3, **kw).fit(train, resume=True)
    assert same(weights(resumed.model), weights(full.model), atol=1e-6)


def test_resume_mid_epoch_from_step_checkpoints(digits, tmp_path):
    train, _ = digits
    full = trainer(epochs=2).fit(train)
    ck = str(tmp_path / "ck")
    # a run that stops mid-epoch 2: its newest checkpoint is at step 30 (epoch 1 has 24 steps)
    trainer(epochs=2, checkpoint_dir=ck, checkpoint_every=10, keep_checkpoints=10).fit(train)
    for f in sorted(glob.glob(f"{ck}/ckpt-*.pt")):
        if "s000000030" not in f and int(f.rsplit("-s", 1)[1][:9]) > 30:
            os.remove(f)
    resumed = trainer(epochs=2, checkpoint_dir=ck, checkpoint_every=10).fit(train, resume=True)
    assert same(weights(resumed.model), weights(full.model))
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], rel=1e-6)


def _our_workers(before):
    return lambda: spawned_children_of(os.getpid(), exclude=before)


def test_killed_worker_raises_then_resume_continues_exactly(digits, tmp_path):
    train, _ = digits
    full = trainer(epochs=4, workers=2).fit(train)
    ck = str(tmp_path / "ck")
    t0 = time.time()
    before = set(children_of(os.getpid()))  # e.g. a session-wide Ray's processes: not ours to kill
    with KillAfterFirstCheckpoint(ck, _our_workers(before)) as killer, \
            pytest.raises(tg.WorkerFailedError, match=r"worker rank \d \(pid \d+\) died with signal SIGKILL") as e:
        trainer(epochs=4, workers=2, checkpoint_dir=ck, checkpoint_every=5, timeout_s=600,
                transform=models.paced_to_float).fit(train)
    assert killer.killed and time.time() - t0 < 240  # no wait for timeout_s=600: the launcher stopped the group
    assert e.value.checkpoint and "last checkpoint" in str(e.value)
    resumed = trainer(epochs=4, workers=2, checkpoint_dir=ck, checkpoint_every=5).fit(train, resume=True)
    assert same(weights(resumed.model), weights(full.model), atol=1e-4)


def test_killed_worker_restarts_with_max_restarts(digits, tmp_path):
    train, _ = digits
    full = trainer(epochs=4, workers=2).fit(train)
    ck = str(tmp_path / "ck")
    before = set(children_of(os.getpid()))
    with KillAfterFirstCheckpoint(ck, _our_workers(before)) as killer:
        r = trainer(epochs=4, workers=2, checkpoint_dir=ck, checkpoint_every=5, max_restarts=1,
                    transform=models.paced_to_float).fit(train)
    assert killer.killed
    assert same(weights(r.model), weights(full.model), atol=1e-4)


def test_tensorboard_events_written_live(digits, tmp_path):
    train, val = digits
    logdir = str(tmp_path / "tb")
    trainer(epochs=2, log_dir=logdir).fit(train, val=val)
    acc = EventAccumulator(logdir)
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/samples_per_s", "train/data_wait_fraction", "epoch/loss",
                "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy", "epoch/data_wait_fraction"):
        assert tag in tags, tags
    assert len(acc.Scalars("train/loss")) == 48 and len(acc.Scalars("epoch/val_accuracy")) == 2


def test_tensorboard_to_memory_url(digits):
    import fsspec

    train, _ = digits
    trainer(epochs=1, log_dir="memory://tb-test/run1").fit(train)
    fs = fsspec.filesystem("memory")
    files = fs.ls("/tb-test/run1", detail=False)
    assert files and "tfevents" in files[0]
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        fs.get(files[0], d + "/")
        acc = EventAccumulator(d)
        acc.Reload()
        assert len(acc.Scalars("train/loss")) == 24


def test_bad_input_fails_before_any_worker(digits, tmp_path):
    train, _ = digits
    with pytest.raises(tg.TrainingConfigError, match="no column 'pixels' \\(features must be a column name"):
        trainer(features="pixels").fit(train)
    with pytest.raises(tg.TrainingConfigError, match="does not fit the data"):
        trainer(model=models.wrong_output, loss=torch.nn.MSELoss()).fit(train)
    with pytest.raises(tg.TrainingConfigError, match="empty"):
        trainer().fit(tg.from_arrow(train.to_arrow().slice(0, 0)))
    lock = threading.Lock()
    with pytest.raises(tg.TrainingConfigError, match="cannot be sent to workers"):
        trainer(model=lambda: (lock, models.mlp())[1], workers=2).fit(train)
    locked = models.mlp()
    locked.guard = lock  # an nn.Module instance (copied to workers) that cannot be copied
    with pytest.raises(tg.TrainingConfigError, match="cannot be sent to workers"):
        trainer(model=locked).fit(train)
    for kw in (dict(keep_checkpoints=0), dict(max_restarts=-1), dict(loader_workers=True)):
        with pytest.raises(tg.TrainingConfigError, match=next(iter(kw))):
            trainer(**kw)
    with pytest.raises(tg.TrainingConfigError, match="global batch"):
        trainer(batch_size=65, workers=2)
    with pytest.raises(tg.TrainingConfigError, match="memory://"):
        trainer(workers=2, checkpoint_dir="memory://x").fit(train)
    ck = str(tmp_path / "ck")
    trainer(epochs=1, checkpoint_dir=ck).fit(train)
    with pytest.raises(tg.CheckpointError, match="different model"):
        trainer(model=models.cnn, epochs=2, checkpoint_dir=ck).fit(train, resume=True)
    with pytest.raises(tg.CheckpointError, match="trained with torch.optim.sgd.SGD"):
        trainer(epochs=2, checkpoint_dir=ck, optimizer=lambda p: torch.optim.Adam(p)).fit(train, resume=True)
    with pytest.raises(tg.TrainingConfigError, match="already holds checkpoints"):
        trainer(epochs=1, checkpoint_dir=ck).fit(train)  # a fresh run never mixes with an old one
    with pytest.raises(tg.CheckpointError, match="no checkpoint"):
        trainer(checkpoint_dir=str(tmp_path / "none")).fit(train, resume=True)


def test_predict_on_data_without_labels(digits):
    train, val = digits
    t = trainer(epochs=1)
    t.fit(train)
    unlabelled = tg.from_arrow(val.to_arrow().drop_columns(["label"]))
    pred = t.predict(unlabelled)
    assert pred.num_rows == val.num_rows and set(pred.schema.names) == {"prediction", "probability"}


def test_a_diverged_loss_is_reported(digits):
    train = tg.from_arrow(digits[0].to_arrow().slice(0, 128))
    with pytest.warns(RuntimeWarning, match="epoch 1: the training loss is nan"):
        trainer(transform=models.nan_images, epochs=1).fit(train)


def test_one_checkpoint_per_step_and_no_resume_past_the_end(digits, tmp_path):
    train = tg.from_arrow(digits[0].to_arrow().slice(0, 640))  # 10 steps an epoch
    ck = str(tmp_path / "ck")
    trainer(epochs=2, checkpoint_dir=ck, checkpoint_every=5, keep_checkpoints=10).fit(train)
    steps = sorted(int(f.rsplit("-s", 1)[1][:9]) for f in glob.glob(f"{ck}/ckpt-*.pt"))
    assert steps == [5, 10, 15, 20]  # an epoch's last step is saved once, by the epoch's checkpoint
    assert trainer(epochs=2, checkpoint_dir=ck).fit(train, resume=True).history[-1]["epoch"] == 2  # done already
    with pytest.raises(tg.CheckpointError, match="past this run's end"):
        trainer(epochs=1, checkpoint_dir=ck).fit(train, resume=True)
