"""The trainer under attack: bad settings refused in the constructor, foreign or damaged checkpoints and
other data refused before any worker starts."""

import math
import os

import pytest
import torch

import tensorgrid as tg
from tests.train import models
from tests.train.helpers import trainer


def test_metrics_none_means_no_metrics_and_unknown_names_are_refused(halves):
    a, _ = halves
    r = trainer(metrics=None, epochs=1).fit(a)
    assert "accuracy" not in r.history[0] and "loss" in r.history[0]
    assert "accuracy" in trainer(metrics="accuracy", epochs=1).fit(a).history[0]  # one name as a string
    assert trainer(metrics=[]).metrics == ()
    with pytest.raises(tg.TrainingConfigError, match=r"metrics must be one of \('accuracy',\), got 'f1'"):
        trainer(metrics=["accuracy", "f1"])
    with pytest.raises(tg.TrainingConfigError, match="metrics"):
        trainer(metrics=3)


def test_unknown_engine_option_names_the_key_and_the_accepted_ones(halves):
    a, _ = halves
    with pytest.raises(tg.TrainingConfigError, match="engine='local' has no option 'nproc'; it accepts none"):
        trainer(workers=2, engine_options={"nproc": 2})
    with pytest.raises(tg.TrainingConfigError, match="engine='spark' has no option 'master'"):
        trainer(workers=2, engine="spark", engine_options={"master": "local[2]"})
    with pytest.raises(tg.TrainingConfigError, match="engine_options must be a dict"):
        trainer(engine_options=["address"])
    pytest.importorskip("ray")
    # Ray forwards the rest to ray.init: a name it does not take is refused before Ray starts
    with pytest.raises(tg.TrainingConfigError, match="engine='ray' has no option 'num_cpu'; it accepts address, "
                                                     "num_cpus_per_worker and ray.init's options: num_cpus"):
        trainer(workers=2, engine="ray", engine_options={"num_cpu": 1}).fit(a)


@pytest.mark.parametrize("bad", [-5, 0, 0.5, math.nan, math.inf, -math.inf, "60", True, None])
def test_timeout_is_checked_in_the_constructor(bad):
    with pytest.raises(tg.TrainingConfigError, match="timeout_s must be a finite number in"):
        trainer(workers=2, timeout_s=bad)


def test_other_counts_go_through_the_one_checking_helper():
    import numpy as np

    for kw, needle in ((dict(checkpoint_every=True), "checkpoint_every"), (dict(checkpoint_every=0), "checkpoint_every"),
                       (dict(checkpoint_every="daily"), "checkpoint_every"), (dict(seed=1.5), "seed"),
                       (dict(seed=-1), "seed"), (dict(epochs=np.float64(2)), "epochs"), (dict(engine=None), "engine")):
        with pytest.raises(tg.TrainingConfigError, match=needle):
            trainer(**kw)
    t = trainer(checkpoint_every=np.int64(5), epochs=np.int32(2), seed=np.uint8(3))
    assert (t.checkpoint_every, t.epochs, t.seed) == (5, 2, 3) and type(t.checkpoint_every) is int
    with pytest.raises(tg.TrainingConfigError, match="batch_size must be an int >= 1"):
        t.predict(tg.from_arrow(__import__("pyarrow").table({"image": [1]})), batch_size=0, model=models.mlp())


def test_a_checkpoint_that_is_not_a_training_state_is_checkpoint_error(halves, tmp_path):
    a, _ = halves
    ck = tmp_path / "ck"
    ck.mkdir()
    torch.save([1, 2, 3], ck / "ckpt-e00001-s000000010.pt")
    with pytest.raises(tg.CheckpointError, match="is not a TensorGrid checkpoint: it holds a list"):
        trainer(checkpoint_dir=str(ck)).fit(a, resume=True)
    torch.save({"model": {}, "step": "ten"}, ck / "ckpt-e00001-s000000011.pt")
    with pytest.raises(tg.CheckpointError, match=r"missing \['optimizer', 'loader', 'history'\]; step is a str"):
        trainer(checkpoint_dir=str(ck)).fit(a, resume=True)


def test_resume_on_other_data_of_the_same_size_is_refused_before_any_worker(halves, tmp_path):
    a, b = halves
    ck = str(tmp_path / "ck")
    full = trainer(epochs=2).fit(a)
    trainer(epochs=1, checkpoint_dir=ck).fit(a)
    before = len(os.listdir(ck))
    with pytest.raises(tg.CheckpointError, match=r"was trained on other data: the data changed since"):
        trainer(epochs=2, workers=2, checkpoint_dir=ck).fit(b, resume=True)
    assert len(os.listdir(ck)) == before  # nothing ran
    # the same data under another URL spelling resumes, exactly
    resumed = trainer(epochs=2, checkpoint_dir=ck).fit(f"file://{a.url}", resume=True)
    sa, sb = resumed.model.state_dict(), full.model.state_dict()
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_a_checkpoint_from_before_fingerprints_still_resumes(halves, tmp_path):
    a, _ = halves
    ck = tmp_path / "ck"
    trainer(epochs=1, checkpoint_dir=str(ck)).fit(a)
    (path,) = ck.glob("ckpt-*.pt")
    state = torch.load(path, weights_only=False)
    assert state.pop("data_fingerprint") == a.fingerprint
    torch.save(state, path)
    assert len(trainer(epochs=2, checkpoint_dir=str(ck)).fit(a, resume=True).history) == 2
