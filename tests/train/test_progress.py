"""What a person sees of a run: plain progress lines without a terminal, the checkpoint a resume continues
from, a resumed epoch's true rate, and TensorBoard curves without a step twice after a resume."""

import glob
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tensorgrid.train.progress import Progress
from tests.train import models
from tests.train.helpers import trainer


def test_without_a_terminal_progress_is_a_line_every_tenth_of_an_epoch_and_one_per_epoch(capsys):
    p = Progress(epochs=2, steps_per_epoch=20, terminal=False)
    p.start_epoch(0, 0)
    shown = []
    for _ in range(20):
        shown.append(p.wants_loss())
        p.step(0.5 if shown[-1] else None, 100.0, 64)
    p.end_epoch({"epoch": 1, "loss": 0.25, "samples_per_s": 1234.5}, 2.0)
    lines = capsys.readouterr().err.splitlines()
    assert shown == [False, True] * 9 + [False, False]  # the loss is read only for a shown line
    assert lines[0].startswith("epoch 1/2  step 2/20  loss 0.5000  ") and lines[0].endswith(" samples/s")
    assert [int(line.split()[3].split("/")[0]) for line in lines[:-1]] == list(range(2, 20, 2))
    assert lines[-1] == "epoch 1/2 done in 2.0 s: loss 0.2500  samples_per_s 1,234"
    assert "nan" not in "\n".join(lines)
    Progress(2, 20, quiet=True, terminal=False).resumed("x.pt", 1, 3, 23)
    assert capsys.readouterr().err == ""


def test_a_resumed_run_says_where_it_continues_and_counts_its_rate_over_the_steps_it_ran(halves, tmp_path, capsys):
    """Stopped after step 19 of 20 (two epochs of 10): the resumed epoch runs one step, paced to take at
    least 20 ms: its rate is at most 64 rows / 20 ms (the 640 rows of the whole epoch would count 10x)."""
    a, _ = halves
    ck = str(tmp_path / "ck")
    kw = dict(epochs=2, checkpoint_dir=ck, transform=models.paced_to_float, quiet=False)
    trainer(callbacks=[models.StopAtStep(19)], **kw).fit(a)
    capsys.readouterr()
    resumed = trainer(**kw).fit(a, resume=True)
    err = capsys.readouterr().err
    assert f"resuming from {ck}/ckpt-e00001-s000000019.pt: 19 steps done, continuing at epoch 2/2 at step 9/10" \
        in err.replace("\n", "")
    assert "epoch 2/2 done in" in err and "nan" not in err
    assert resumed.history[-1]["samples_per_s"] <= 64 / 0.02


def test_a_resumed_run_writes_no_step_twice_in_tensorboard(halves, tmp_path):
    """A run that wrote events up to step 20 but whose checkpoints after step 10 are lost (as when killed):
    the resumed run replays steps 11-20 and TensorBoard shows each step once, with the replayed values."""
    a, b = halves
    ck, log = str(tmp_path / "ck"), str(tmp_path / "tb")
    first = trainer(epochs=2, checkpoint_dir=ck, checkpoint_every=5, keep_checkpoints=10, log_dir=log).fit(a, val=b)
    for f in glob.glob(f"{ck}/ckpt-*.pt"):
        if int(f.rsplit("-s", 1)[1][:9]) > 10:
            os.remove(f)
    trainer(epochs=2, checkpoint_dir=ck, checkpoint_every=5, log_dir=log).fit(a, val=b, resume=True)
    assert len(glob.glob(f"{log}/events.out.tfevents.*")) == 2
    acc = EventAccumulator(log)
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    assert [e.step for e in acc.Scalars("epoch/val_loss")] == [10, 20]
    assert acc.Scalars("epoch/loss")[-1].value == pytest.approx(first.history[-1]["loss"], rel=1e-6)


def test_a_checkpoint_with_epochs_counted_from_0_still_resumes_numbered_from_1(halves, tmp_path):
    import torch

    a, _ = halves
    ck = str(tmp_path / "ck")
    trainer(epochs=1, checkpoint_dir=ck).fit(a)
    (path,) = glob.glob(f"{ck}/ckpt-*.pt")
    state = torch.load(path, weights_only=False)
    del state["history_epochs_from"]  # as written before epochs were numbered from 1
    state["history"] = [dict(r, epoch=r["epoch"] - 1) for r in state["history"]]
    torch.save(state, path)
    resumed = trainer(epochs=2, checkpoint_dir=ck).fit(a, resume=True)
    assert [h["epoch"] for h in resumed.history] == [1, 2]


def test_help_of_trainer_explains_every_argument():
    import inspect

    import tensorgrid as tg

    doc = tg.Trainer.__doc__
    missing = [p for p in inspect.signature(tg.Trainer).parameters if f"\n      {p}: " not in doc]
    assert not missing, missing
