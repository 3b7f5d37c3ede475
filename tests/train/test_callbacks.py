"""Training callbacks: run on rank 0 with the all-reduced metrics, stop every rank at the same point, fail
with the callback's name (no rank left waiting), checked in the constructor, the same on every engine."""

import glob
import os
import time

import pytest

import tensorgrid as tg
from tensorgrid.train import Callback, CallbackError, TrainState
from tests.train import models
from tests.train.helpers import same, trainer, weights


def test_a_stopping_callback_stops_both_ranks_after_the_same_epoch(halves):
    a, b = halves
    r = trainer(workers=2, epochs=5, callbacks=[models.StopAfterEpoch(2)], timeout_s=120).fit(a, val=b)
    assert [h["epoch"] for h in r.history] == [1, 2]
    # the same weights as a run of 2 epochs: no rank took a step past the stop (one that did would also
    # have waited in a collective for the other until timeout_s, and failed)
    assert same(weights(r.model), weights(trainer(workers=2, epochs=2).fit(a).model), atol=1e-5)


def test_a_recording_callback_sees_every_epochs_all_reduced_metrics_equal_to_the_history(halves, tmp_path):
    a, b = halves
    rec = models.Recorder()
    r = trainer(workers=2, epochs=3, callbacks=[rec], checkpoint_dir=str(tmp_path / "ck")).fit(a, val=b)
    assert rec.rows == r.history and len(rec.rows) == 3  # the driver's object got rank 0's records back
    assert {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(rec.rows[0])
    # 640 rows, global batch 64: 10 steps and 640 samples an epoch, all ranks counted
    assert rec.events[0] == ("start", 1, 0, 0, 2)  # epochs counted from 1
    assert [e[1:5] for e in rec.events[1:4]] == [(1, 10, 640, 1), (2, 20, 1280, 2), (3, 30, 1920, 3)]
    assert [os.path.basename(e[5]) for e in rec.events[1:4]] == [
        "ckpt-e00001-s000000010.pt", "ckpt-e00002-s000000020.pt", "ckpt-e00003-s000000030.pt"]
    assert rec.events[-1] == ("end", 3, 30, 1920, True)
    assert len(rec.batch_losses) == 30 and all(x > 0 for x in rec.batch_losses)


def test_a_stop_after_a_step_ends_every_rank_there_and_resume_continues_exactly(halves, tmp_path):
    a, _ = halves
    full = trainer(workers=2, epochs=2).fit(a)
    ck = str(tmp_path / "ck")
    r = trainer(workers=2, epochs=2, checkpoint_dir=ck, callbacks=[models.StopAtStep(15)]).fit(a)
    assert [h["epoch"] for h in r.history] == [1, 2]  # epoch 2's row covers its first 5 steps
    assert sorted(os.path.basename(f) for f in glob.glob(f"{ck}/*.pt")) == [
        "ckpt-e00001-s000000010.pt", "ckpt-e00001-s000000015.pt"]  # epoch 0's, and where it stopped
    resumed = trainer(workers=2, epochs=2, checkpoint_dir=ck).fit(a, resume=True)
    assert same(weights(resumed.model), weights(full.model), atol=1e-5)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)


def test_a_stop_on_an_epochs_last_step_is_an_ordinary_epoch_end(halves, tmp_path):
    a, _ = halves
    ck = str(tmp_path / "ck")
    r = trainer(epochs=3, checkpoint_dir=ck, callbacks=[models.StopAtStep(10)]).fit(a)
    assert [h["epoch"] for h in r.history] == [1]
    assert [os.path.basename(f) for f in glob.glob(f"{ck}/*.pt")] == ["ckpt-e00001-s000000010.pt"]
    assert len(trainer(epochs=3, checkpoint_dir=ck).fit(a, resume=True).history) == 3  # epochs 2, 3 added


def test_a_failing_callback_is_named_and_no_rank_waits_for_the_timeout(halves):
    a, _ = halves
    with pytest.raises(CallbackError, match=r"callback FailsAtEpochEnd.on_epoch_end failed at epoch 1, step 10: "
                                            r"ValueError: no metrics today") as e:
        trainer(epochs=2, callbacks=[models.FailsAtEpochEnd()]).fit(a)
    assert isinstance(e.value.__cause__, ValueError)
    t0 = time.time()
    with pytest.raises(tg.WorkerFailedError, match=r"worker rank 0 \(pid \d+\) died with exit code 1: .*callback "
                                                   r"FailsAtEpochEnd.on_epoch_end failed at epoch 1"):
        trainer(workers=2, epochs=2, callbacks=[models.FailsAtEpochEnd()], timeout_s=600).fit(a)
    assert time.time() - t0 < 240  # rank 1 left at once: it did not wait out timeout_s=600 in a collective


class _Typo:
    def on_epoch_ends(self, state):
        pass


class _NoHooks:
    def on_nothing(self):
        pass


class _NoArgument:
    def on_epoch_end(self):
        pass


def test_callbacks_are_checked_in_the_constructor():
    for cbs, needle in (([_Typo()], r"_Typo has a method 'on_epoch_ends', which is not a hook \(did you mean "
                                    r"'on_epoch_end'\?\); the hooks are on_train_start, on_step_end"),
                        ([object()], "defines none of the hooks"),
                        ([Callback()], "Callback defines none of the hooks"),
                        ([models.Recorder], r"pass an instance, Recorder\(\), not the class"),
                        ([_NoArgument()], r"_NoArgument.on_epoch_end\(\) must take one argument"),
                        (models.Recorder(), r"a list of callback objects \(callbacks=\[cb\]\)"),
                        ("on_epoch_end", "a list of callback objects")):
        with pytest.raises(tg.TrainingConfigError, match=needle):
            trainer(callbacks=cbs)
    with pytest.raises(tg.TrainingConfigError, match="'on_nothing', which is not a hook; the hooks"):
        trainer(callbacks=[_NoHooks()])
    ok = [models.StopAtStep(3), models.Recorder()]  # duck-typed or subclassed
    assert trainer(callbacks=ok).callbacks == tuple(ok) and trainer(callbacks=None).callbacks == ()


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stop = tg.EarlyStopping(monitor="val_loss", patience=2)

    def after(*losses):
        state = TrainState(epoch=len(losses) - 1, epochs=10, step=0, samples=0, world_size=1, model=None,
                           history=[{"val_loss": v} for v in losses])
        stop.on_epoch_end(state)
        return state.should_stop

    assert not after(1.0, 0.9, 0.95)
    assert after(1.0, 0.9, 0.95, 0.91)
    assert not after(1.0, 0.9, 0.95, 0.8)


@pytest.mark.parametrize("engine", ["ray", "spark"])
def test_callbacks_stop_and_record_the_same_on_ray_and_spark(request, halves, engine):
    request.getfixturevalue("ray_cluster" if engine == "ray" else "spark")
    a, _ = halves
    rec = models.Recorder()
    r = trainer(workers=2, engine=engine, epochs=4, callbacks=[rec, models.StopAfterEpoch(2)]).fit(a)
    assert [h["epoch"] for h in r.history] == [1, 2] and rec.rows == r.history
    assert rec.events[-1] == ("end", 2, 20, 1280, True)
