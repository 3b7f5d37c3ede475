"""Built-in metric callbacks: EarlyStopping and BestCheckpoint, on 2 workers, decided from the history a
checkpoint carries so that a stopped and resumed run ends as an uninterrupted one."""

import os

import pytest

import tensorgrid as tg
from tensorgrid.train import BestCheckpoint, EarlyStopping, TrainState, load_weights
from tests.train import models
from tests.train.helpers import same, trainer, weights


def _stops(cb, *values):
    state = TrainState(epoch=len(values), epochs=10, step=0, samples=0, world_size=1, model=None,
                       history=[{"epoch": i + 1, "val_loss": v} for i, v in enumerate(values)])
    cb.on_epoch_end(state)
    return state.should_stop


def test_early_stopping_counts_epochs_without_an_improvement_larger_than_min_delta():
    cb = EarlyStopping(monitor="val_loss", mode="min", patience=2, min_delta=0.05)
    assert not _stops(cb, 1.0, 0.9, 0.88)  # 0.88 is no improvement (< 0.05) on 0.9: one epoch without
    assert _stops(cb, 1.0, 0.9, 0.88, 0.86) and cb.stopped_epoch == 4
    assert not _stops(cb, 1.0, 0.9, 0.88, 0.8)
    assert not _stops(EarlyStopping(mode="max", patience=1), 1.0, 1.5)
    assert _stops(EarlyStopping(mode="max", patience=1), 1.0, float("nan"))  # NaN never improves


def test_early_stopping_on_two_workers_resumes_to_the_same_stop_and_a_stopped_run_stays_stopped(halves, tmp_path):
    """mode="max" on a falling val_loss: no epoch improves on the first, so patience=2 stops after epoch 3."""
    a, b = halves
    full = trainer(epochs=6, callbacks=[EarlyStopping("val_loss", mode="max", patience=2)]).fit(a, val=b)
    assert [h["epoch"] for h in full.history] == [1, 2, 3]
    ck = str(tmp_path / "ck")
    trainer(workers=2, epochs=6, checkpoint_dir=ck, callbacks=[models.StopAfterEpoch(2)]).fit(a, val=b)
    stop = EarlyStopping("val_loss", mode="max", patience=2)
    resumed = trainer(workers=2, epochs=6, checkpoint_dir=ck, callbacks=[stop]).fit(a, val=b, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3] and stop.stopped_epoch == 3
    assert same(weights(resumed.model), weights(full.model), atol=1e-5)  # 2 workers and 1: the same updates
    again = trainer(epochs=6, checkpoint_dir=ck, callbacks=[EarlyStopping("val_loss", mode="max", patience=2)]
                    ).fit(a, val=b, resume=True)  # resumed after it stopped: stops at once
    assert len(again.history) == 3 and same(weights(again.model), weights(resumed.model), atol=0)


def test_best_checkpoint_survives_rotation_loads_and_is_found_again_after_a_resume(halves, tmp_path):
    a, b = halves
    ck = str(tmp_path / "ck")
    best = BestCheckpoint("val_loss", mode="max")  # the first epoch's (val_loss falls)
    r = trainer(epochs=2, checkpoint_dir=ck, keep_checkpoints=1, callbacks=[best]).fit(a, val=b)
    assert os.path.basename(r.best_checkpoint) == "best-e00001-s000000010.pt" == os.path.basename(
        best.best_checkpoint) and best.best_epoch == 1 and best.best_value == r.history[0]["val_loss"]
    assert sorted(os.listdir(ck)) == ["best-e00001-s000000010.pt", "ckpt-e00002-s000000020.pt"]
    one_epoch = trainer(epochs=1).fit(a).model
    assert same(weights(load_weights(r.best_checkpoint, models.mlp)), weights(one_epoch), atol=0)
    resumed = trainer(workers=2, epochs=3, checkpoint_dir=ck, keep_checkpoints=1,
                      callbacks=[BestCheckpoint("val_loss", mode="max")]).fit(a, val=b, resume=True)
    assert resumed.best_checkpoint == r.best_checkpoint  # no better epoch since: the copy is found again
    lower = trainer(epochs=4, checkpoint_dir=ck, callbacks=[BestCheckpoint("val_loss")]).fit(a, val=b, resume=True)
    assert os.path.basename(lower.best_checkpoint) == "best-e00004-s000000040.pt"  # min: the newest epoch
    assert sorted(f for f in os.listdir(ck) if f.startswith("best-")) == ["best-e00004-s000000040.pt"]


def test_metric_callbacks_are_checked_before_any_worker(halves):
    a, _ = halves
    with pytest.raises(tg.TrainingConfigError, match=r"EarlyStopping monitors 'val_loss', which the epochs will "
                                                     r"not have \(val_\* metrics need fit\(..., val=...\)\)"):
        trainer(callbacks=[EarlyStopping()]).fit(a)
    with pytest.raises(tg.TrainingConfigError, match="give the Trainer a checkpoint_dir"):
        trainer(callbacks=[BestCheckpoint("loss")]).fit(a)
    for make, needle in ((lambda: EarlyStopping(mode="up"), "mode must be one of"),
                         (lambda: EarlyStopping(patience=0), "patience"),
                         (lambda: BestCheckpoint(""), "monitor must be the name")):
        with pytest.raises(tg.TrainingConfigError, match=needle):
            make()
