"""What an optimizer step does: gradient accumulation, clipping, mixed precision, learning-rate warm-up and
schedule by step; the same updates on 2 workers, and exactly the same after a stop and a resume."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import tensorgrid as tg
from tensorgrid.train.schedule import lr_factor
from tests.train import models
from tests.train.helpers import same, trainer, weights


def test_two_micro_batches_of_32_make_the_update_of_one_batch_of_64_on_two_workers(halves):
    """600 rows: the epoch's last step has 24 rows (one short micro-batch), weighted as in one step of 64."""
    rows = tg.from_arrow(halves[0].to_arrow().slice(0, 600))
    one = trainer(batch_size=64).fit(rows)
    acc = trainer(batch_size=32, accumulate=2, workers=2).fit(rows)
    assert same(weights(acc.model), weights(one.model), atol=1e-5)
    assert [h["loss"] for h in acc.history] == pytest.approx([h["loss"] for h in one.history], rel=1e-5)


def test_every_step_option_together_resumes_bit_identically_on_two_workers(halves, tmp_path):
    """accumulate, grad_clip, bf16 and a warm-up + cosine schedule on 2 workers: a run stopped at step 13 (in
    epoch 2) and resumed ends with exactly the weights and history of the uninterrupted run."""
    a, b = halves
    kw = dict(workers=2, epochs=2, batch_size=32, accumulate=2, grad_clip=0.5, precision="bf16", warmup_steps=4,
              lr_schedule="cosine", optimizer=models.adam)
    full = trainer(**kw).fit(a, val=b)
    ck = str(tmp_path / "ck")
    stopped = trainer(checkpoint_dir=ck, callbacks=[models.StopAtStep(13)], **kw).fit(a, val=b)
    assert stopped.checkpoint.endswith("ckpt-e00001-s000000013.pt")
    resumed = trainer(checkpoint_dir=ck, **kw).fit(a, val=b, resume=True)
    assert all(torch.equal(v, full.model.state_dict()[k]) for k, v in resumed.model.state_dict().items())
    drop = ("samples_per_s", "data_wait_fraction")
    assert [{k: v for k, v in h.items() if k not in drop} for h in resumed.history] == \
        [{k: v for k, v in h.items() if k not in drop} for h in full.history]


def test_grad_clip_bounds_the_total_gradient_norm_of_a_step(halves):
    """One plain SGD step (lr 1): the weights move by the gradient, whose total L2 norm is clipped to 0.01."""
    batch = tg.from_arrow(halves[0].to_arrow().slice(0, 64))
    sgd = lambda p: torch.optim.SGD(p, lr=1.0)  # noqa: E731
    torch.manual_seed(0)
    start = weights(models.mlp())  # what the trainer builds with seed 0
    for clip, lo, hi in ((0.01, 0.0099, 0.01 + 1e-6), (None, 0.05, float("inf"))):
        moved = weights(trainer(optimizer=sgd, epochs=1, grad_clip=clip).fit(batch).model)
        norm = torch.sqrt(sum(((moved[k] - start[k]) ** 2).sum() for k in start)).item()
        assert lo <= norm <= hi, (clip, norm)


def test_warmup_and_cosine_set_each_steps_lr_and_a_per_epoch_scheduler_still_steps(halves, tmp_path):
    a, _ = halves
    log = str(tmp_path / "tb")
    trainer(epochs=2, warmup_steps=4, lr_schedule="cosine", log_dir=log,
            scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)).fit(a)
    acc = EventAccumulator(log)
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("train/lr")]
    epoch_lr = [0.05] * 10 + [0.025] * 10  # models.sgd, halved by StepLR after the first epoch
    expected = [lr * lr_factor(s, 4, 20, "cosine") for s, lr in enumerate(epoch_lr)]
    assert lrs == pytest.approx(expected, rel=1e-6)
    assert lrs[:4] == pytest.approx([0.0125, 0.025, 0.0375, 0.05]) and 0 < lrs[-1] < 1e-3
    assert lr_factor(12, 4, 20, "linear") == pytest.approx(0.5) and lr_factor(12, 0, 20, "constant") == 1.0


def test_bf16_computes_in_bfloat16_and_fp16_without_cuda_is_refused(halves):
    a, _ = halves
    fp32, bf16 = (trainer(epochs=1, precision=p).fit(a) for p in ("fp32", "bf16"))
    assert bf16.history[0]["loss"] != fp32.history[0]["loss"]  # autocast was on
    assert bf16.history[0]["loss"] == pytest.approx(fp32.history[0]["loss"], rel=2e-2)
    assert all(v.dtype == torch.float32 for v in bf16.model.state_dict().values())  # weights stay float32
    if not torch.cuda.is_available():
        with pytest.raises(tg.TrainingConfigError, match="precision='fp16' needs CUDA"):
            trainer(precision="fp16")
    for kw, needle in ((dict(precision="fp8"), "precision must be one of"), (dict(accumulate=0), "accumulate"),
                       (dict(grad_clip=0), "grad_clip must be > 0"), (dict(grad_clip=float("inf")), "grad_clip"),
                       (dict(warmup_steps=-1), "warmup_steps"), (dict(lr_schedule="step"), "lr_schedule")):
        with pytest.raises(tg.TrainingConfigError, match=needle):
            trainer(**kw)


def test_a_checkpoint_resumes_only_with_the_same_rows_per_step(halves, tmp_path):
    a, _ = halves
    ck = str(tmp_path / "ck")
    trainer(epochs=1, batch_size=64, checkpoint_dir=ck).fit(a)
    with pytest.raises(tg.CheckpointError, match=r"64 rows per optimizer step, this trainer uses 128 \(batch_size"):
        trainer(epochs=2, batch_size=64, accumulate=2, checkpoint_dir=ck).fit(a, resume=True)
    assert len(trainer(epochs=2, batch_size=32, accumulate=2, checkpoint_dir=ck).fit(a, resume=True).history) == 2
