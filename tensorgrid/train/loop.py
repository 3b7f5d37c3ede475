"""The training loop every worker runs: DDP on its partition of the data, checkpoints, logs and callbacks on
rank 0.

Runs in the caller's process (workers=1) or in engine-started processes with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. Same seed, data and global batch -> the same updates on any engine:
each rank's loss is scaled so that DDP's gradient average equals the gradient of the mean loss over the
global batch (padding rows of the last batch weigh nothing; see ``losses.py``). With ``accumulate=k`` the
loader reads the step's whole batch (batch_size * k rows over all ranks) and each rank runs it as k
micro-batches (gradients all-reduced once, on the last): the same update as one step over those rows.

Epochs are numbered from 1 where people read them (history rows, TrainState, logs); the loader's epoch
(``set_epoch``, checkpoints' loader state) counts from 0, as torch's DistributedSampler does.
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .. import fs as tgfs
from ..allocator import tune_malloc
from ..loader import Loader
from ..rng import seed_all
from ..store import Dataset
from . import checkpoint as ckpt
from . import placement
from .callbacks import RankZeroFailed, Runner, TrainState
from .features import feature_columns, loader_stack
from .losses import BatchLoss, Sums, is_classifier, micro_batches
from .precision import Precision
from .schedule import StepSchedule

__all__ = ["Spec", "build_model", "device_and_backend", "evaluate", "is_classifier", "train"]

FAILURE_GRACE_S = 1.0


@dataclass
class Spec:
    """Everything a worker needs (shipped to workers with cloudpickle)."""

    model: object
    loss: object
    optimizer: object
    scheduler: object
    features: str | tuple | None  # one column, or columns stacked into one float32 tensor (features.py)
    label: str | None
    step: object
    transform: object
    batch_size: int
    epochs: int
    seed: int
    checkpoint_dir: str | None
    checkpoint_every: object
    keep_checkpoints: int
    log_dir: str | None
    metrics: tuple
    timeout_s: float
    loader_workers: int
    quiet: bool
    train: Dataset = None
    val: Dataset | None = None
    resume_from: str | None = None
    data_fingerprint: str | None = None  # of ``train``, recorded in checkpoints (resume only on the same data)
    callbacks: tuple = ()  # run on rank 0 (callbacks.py)
    accumulate: int = 1  # micro-batches of batch_size per optimizer step
    grad_clip: float | None = None  # max total L2 norm of the gradients
    precision: str = "fp32"  # precision.py
    warmup_steps: int = 0  # schedule.py
    lr_schedule: str = "constant"
    locality: bool = False  # each rank reads only the partitions on its own node (loader/locality.py)
    storage: dict | None = None  # the driver's storage options for checkpoint_dir and log_dir (fs.remembered)

    @property
    def step_batch(self) -> int:
        """The global batch of one optimizer step (batch_size times accumulate)."""
        return self.batch_size * self.accumulate


def build_model(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    m = spec.model
    return copy.deepcopy(m) if isinstance(m, torch.nn.Module) else m()


def device_and_backend() -> tuple[torch.device, str]:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), "nccl"
    return torch.device("cpu"), "gloo"


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # dropout on a GPU draws from the device's generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _gather_rng(world: int) -> list[dict]:
    """Every rank's RNG state, rank by rank (a collective: every rank calls it)."""
    if world == 1:
        return [_rng_state()]
    out: list = [None] * world
    dist.all_gather_object(out, _rng_state())
    return out


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available() and len(s["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(s["cuda"])


def _allreduce(values: list[float], world: int, device=None) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    return t.tolist()


def _columns(spec: Spec, ds: Dataset) -> list[str] | None:
    if spec.step is not None:
        return None
    names = set(ds.schema.names)
    return [c for c in dict.fromkeys([*feature_columns(spec.features), spec.label]) if c in names]


def rank_loader(spec: Spec, ds: Dataset, rank: int, world: int, batch: int | None = None, **options) -> Loader:
    """This rank's loader over ``ds``: its slice of every global batch (``batch``, default batch_size), the
    training transform."""
    stack = None if spec.step is not None or spec.transform is not None else \
        loader_stack(ds.schema, spec.features, keep=[spec.label])
    return Loader(ds, max(1, (batch or spec.batch_size) // world), columns=_columns(spec, ds),
                  transform=spec.transform, rank=rank, world_size=world, stack=stack, **options)


def evaluate(spec: Spec, model, ds: Dataset, device, rank: int, world: int, precision=None) -> dict:
    """Loss (and accuracy) of ``model`` over ``ds``, all ranks' rows together (every rank calls it), in
    batches of batch_size, under the training's autocast."""
    losses = BatchLoss(spec, model, device, world, ds.num_rows, spec.batch_size)
    sums = Sums()
    model.eval()
    with torch.no_grad(), (precision.autocast() if precision is not None else nullcontext()):
        for k, batch in enumerate(rank_loader(spec, ds, rank, world)):
            sums.add(*losses.compute(batch, k)[1])
    ls, c, n = _allreduce(sums.values(), world, device)
    out = {"loss": ls / max(n, 1)}
    if losses.classifier and "accuracy" in spec.metrics:
        out["accuracy"] = c / max(n, 1)
    return out


def train(spec: Spec, rank: int = 0, world: int = 1, restarted: bool = False, report=None) -> dict | None:
    """Train; rank 0 returns the final weights, history and metrics. ``report``: a ``watch.Reporter`` that
    tells the driver this rank's progress, its own error or its end (so a hang or an early exit is named).
    ``spec`` may instead be any job with a ``run_rank(rank, world)`` method: each worker runs that."""
    device, backend = device_and_backend()
    tune_malloc()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > 1 and device.type == "cpu":  # share the cores: oversubscribed OpenMP threads crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized() and not hasattr(spec, "run_rank"):  # other jobs need no group
        dist.init_process_group(backend, timeout=timedelta(seconds=spec.timeout_s))
    try:
        try:
            if hasattr(spec, "run_rank"):  # another job on the same workers (ml/inference.py's parts)
                out = spec.run_rank(rank, world)
            else:
                tgfs.adopt(spec.storage)
                out = _train(spec, rank, world, device, restarted, report)
        except RankZeroFailed:  # rank 0's callback failed: rank 0 raises that error, this rank just leaves
            out = None
        if report is not None:
            report.done()
        return out
    except Exception as e:
        if report is not None:
            report.error(e)
        if world > 1:
            # When one worker dies, its peers fail next ("connection reset by peer"). Waiting a moment
            # before exiting lets the launcher see the first death (polled every 0.2 s) and report the
            # root cause, not an echo of it. The launcher stops the whole group anyway.
            time.sleep(FAILURE_GRACE_S)
        raise
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """One rank's training, shared by the functions below."""

    spec: Spec
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # the bare model: checkpoints, callbacks and the result read it
    net: torch.nn.Module  # what trains: the model, in DDP when world > 1
    optimizer: torch.optim.Optimizer
    scheduler: object
    loader: Loader
    losses: BatchLoss
    callbacks: Runner
    precision: Precision
    schedule: StepSchedule
    report: object = None
    history: list = field(default_factory=list)
    step: int = 0  # optimizer steps so far, over the whole run
    epoch: int = 0  # the epoch running
    batch: int = 0  # batches of it done
    sums: Sums = field(default_factory=Sums)  # the epoch's so far
    last_checkpoint: str | None = None
    saved_step: int | None = None  # the step of the newest checkpoint this process wrote (or joined)
    carried_rows: float = 0.0  # rows of the running epoch done before a resume (not run by this process)
    resumed_from: str | None = None
    grad_norm: object = None  # the last step's total gradient norm (a tensor) when clipping
    log: object = None
    bar: object = None
    reads_seen: tuple = (0, 0)  # rows read from a grid's servers on this rank's node and others, so far


def _train(spec: Spec, rank: int, world: int, device, restarted: bool, report=None) -> dict | None:
    """Set up (or resume), run the epochs until the last or until a callback stops them, return the result."""
    run = _start(spec, rank, world, device, report)
    resume = spec.resume_from or (ckpt.latest(spec.checkpoint_dir) if restarted else None)
    if resume:
        _resume(run, resume)
    _open_outputs(run)
    try:
        stop = run.callbacks.call("on_train_start", lambda: _state(run))
        epoch = run.epoch
        while not stop and epoch < spec.epochs:
            stop = _epoch(run, epoch)
            epoch += 1
    finally:
        _close_outputs(run)
    run.callbacks.call("on_train_end", lambda: _state(run, run.history[-1] if run.history else None))
    where = placement.gather(rank, world, run.loader)  # every rank: where it ran, what it read there
    return {**_result(run), "placement": where} if rank == 0 else None


def _start(spec: Spec, rank: int, world: int, device, report) -> Run:
    """The model (DDP when several ranks), optimizer, scheduler and this rank's loader."""
    model = build_model(spec).to(device)
    # each rank its own random streams (dropout masks, augmentations), all fixed by the seed; after the
    # model's init (DDP copies rank 0's weights to every rank anyway)
    seed_all(spec.seed, rank)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = spec.optimizer(net.parameters())
    scheduler = spec.scheduler(optimizer) if spec.scheduler else None
    # the loader reads whole optimizer steps; accumulation splits them (see _optimizer_step)
    loader = rank_loader(spec, spec.train, rank, world, batch=spec.step_batch, shuffle=True, seed=spec.seed,
                         num_workers=spec.loader_workers, locality=spec.locality)
    return Run(spec, rank, world, device, model, net, optimizer, scheduler, loader,
               BatchLoss(spec, net, device, world, spec.train.num_rows, spec.step_batch,
                         real_rows=loader.real_rows if spec.locality else None),
               Runner(spec.callbacks, rank, world, device), Precision(spec.precision, device),
               StepSchedule(spec.warmup_steps, spec.lr_schedule, spec.epochs * len(loader)), report)


def _resume(run: Run, url: str) -> None:
    """Continue from checkpoint ``url``: weights, optimizer, scheduler, this rank's random streams, the
    loader's position, history, step and the epoch's sums so far."""
    state = ckpt.load(url)
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scheduler is not None and state.get("scheduler") is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    run.precision.load_state_dict(state.get("scaler"))
    rngs = state.get("rngs") or []
    if len(rngs) == run.world:  # each rank continues its own streams
        _set_rng_state(rngs[run.rank])
    elif run.rank == 0:  # another world size: rank 0 continues its streams, the others start afresh
        _set_rng_state(state["rng"])
    run.loader.load_state_dict(state["loader"])
    run.history, run.step = ckpt.history(state), state["step"]
    run.epoch, run.batch = state["loader"]["epoch"], state["loader"]["batch"]
    # the checkpoint holds the epoch's sums so far over all ranks: rank 0 carries them on
    run.sums = Sums(state.get("epoch_sums") or (0.0, 0.0, 0.0)) if run.rank == 0 else Sums()
    run.carried_rows = run.sums.base[2]
    run.last_checkpoint = run.resumed_from = url


def _save(run: Run, epoch_sums: list[float]) -> None:
    """A checkpoint of this moment, with the epoch's sums so far (every rank calls it: RNG states are
    gathered from all)."""
    spec = run.spec
    if not spec.checkpoint_dir:
        return
    run.saved_step = run.step
    rngs = _gather_rng(run.world)
    if run.rank != 0:
        return
    if run.log is not None:  # events up to this step are on disk: a resume purges only what comes after
        run.log.flush()
    loader = run.loader.state_dict()
    state = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "optimizer_type": ckpt.type_name(run.optimizer),
             "scheduler": run.scheduler.state_dict() if run.scheduler else None, "rng": rngs[0], "rngs": rngs,
             "loader": loader, "history": run.history, "step": run.step, "epoch_sums": epoch_sums,
             "data_fingerprint": spec.data_fingerprint, "scaler": run.precision.state_dict(),
             "history_epochs_from": 1}
    run.last_checkpoint = ckpt.save(spec.checkpoint_dir, loader["epoch"], run.step, state, spec.keep_checkpoints)


def _epoch(run: Run, epoch: int) -> bool:
    """One epoch (what remains of it after a resume), then its row, checkpoint and callbacks; True when a
    callback asked to stop."""
    if run.loader.epoch != epoch:  # a resumed loader already sits at its epoch and batch
        run.loader.set_epoch(epoch)
    run.epoch, run.batch = epoch, run.loader.state_dict()["batch"]
    run.net.train()
    clock = Clock()
    run.bar.start_epoch(epoch, run.batch)
    stop = _steps(run, clock)
    row = _end_epoch(run, clock, complete=run.batch == len(run.loader))
    return run.callbacks.call("on_epoch_end", lambda: _state(run, row)) or stop


def _steps(run: Run, clock: Clock) -> bool:
    """The epoch's optimizer steps from batch ``run.batch`` on; True when a callback asked to stop."""
    spec, every, batches = run.spec, _every(run.spec), len(run.loader)
    it = iter(run.loader)
    while True:
        clock.waiting()
        try:
            batch = next(it)
        except StopIteration:
            return False
        clock.got_batch()
        ls, n = _optimizer_step(run, batch)
        run.step += 1
        run.batch += 1
        if run.report is not None:
            run.report.step(run.step)
        _log_step(run, clock.stepped(n * run.world), ls, n)
        # (an epoch's last step is saved by the epoch's own checkpoint)
        if every and run.step % every == 0 and spec.checkpoint_dir and run.batch < batches:
            _save(run, _allreduce(run.sums.values(), run.world, run.device))  # every rank reduces
        if run.callbacks.wants("on_step_end") and run.callbacks.call(
                "on_step_end", lambda: _state(run, batch_loss=(ls, n))):  # noqa: B023 - called at once
            if run.batch < batches:
                it.close()  # ends the loader's epoch here (its workers too); its position stays at this batch
            else:
                next(it, None)  # the epoch's last batch: the loader finishes its epoch as usual
            return True


def _optimizer_step(run: Run, batch: dict) -> tuple:
    """One optimizer step on this rank's rows of the step's global batch: its micro-batches' gradients added
    up (DDP all-reduces on the last one only), clipped, the scheduled learning rate; returns (loss sum, rows)
    of the step's real rows on this rank, and adds them to the epoch's sums."""
    spec = run.spec
    run.optimizer.zero_grad(set_to_none=True)
    parts = micro_batches(batch, max(1, spec.batch_size // run.world), spec.accumulate)
    ls, n = 0.0, 0
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        with nullcontext() if last or run.world == 1 else run.net.no_sync():
            with run.precision.autocast():
                loss, (part_ls, c, part_n) = run.losses.compute(part, run.batch)
            run.precision.backward(loss)
        run.sums.add(part_ls, c, part_n)
        ls, n = ls + part_ls, n + part_n
    if spec.grad_clip is not None:
        run.precision.unscale(run.optimizer)
        run.grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), spec.grad_clip)
    with run.schedule.applied(run.optimizer, run.step):
        run.precision.step(run.optimizer)
    return ls, n


def _every(spec: Spec) -> int | None:
    return spec.checkpoint_every if isinstance(spec.checkpoint_every, int) else None


class Clock:
    """An epoch's timing: the wait for each batch, samples/s of each step, the epoch's rates (over the steps
    this process ran: a resumed epoch's earlier steps are not in them)."""

    def __init__(self):
        self.start = self.last = self.t0 = self.t1 = time.perf_counter()
        self.wait_total = 0.0

    def waiting(self) -> None:
        self.t0 = time.perf_counter()

    def got_batch(self) -> None:
        self.t1 = time.perf_counter()

    def stepped(self, samples: int) -> tuple[float, float]:
        """(samples/s since the previous step, the share of this step spent waiting for its batch)."""
        t2 = time.perf_counter()
        wait = self.t1 - self.t0
        self.wait_total += wait
        rate = samples / max(t2 - self.last, 1e-9)
        self.last = t2
        return rate, wait / max(t2 - self.t0, 1e-9)

    def epoch_rates(self, samples: float) -> dict:
        elapsed = time.perf_counter() - self.start
        return {"samples_per_s": samples / max(elapsed, 1e-9),
                "data_wait_fraction": self.wait_total / max(elapsed, 1e-9)}


def _log_step(run: Run, rates: tuple[float, float], loss_sum, n: int) -> None:
    """The step on the progress display and in TensorBoard (rank 0)."""
    samples_s, wait_fraction = rates
    # reading the loss waits for the device: only when a log or the progress display shows it
    step_loss = float(loss_sum) / max(n, 1) if run.log is not None or run.bar.wants_loss() else None
    run.bar.step(step_loss, samples_s, n * run.world)
    if run.log is not None:
        values = {"train/loss": step_loss, "train/samples_per_s": samples_s,
                  "train/data_wait_fraction": wait_fraction, "train/lr": run.schedule.lr(run.optimizer, run.step - 1)}
        if run.grad_norm is not None:
            values["train/grad_norm"] = run.grad_norm
        run.log.scalars(run.step, values)


def _end_epoch(run: Run, clock: Clock, complete: bool) -> dict:
    """The epoch's row (all ranks' sums, validation) into the history and the logs, and its checkpoint.
    ``complete`` False: a callback stopped the run in mid-epoch; the checkpoint is then taken as any
    mid-epoch one (before the row, with the sums so far), so that resuming continues exactly."""
    if complete and run.scheduler is not None:
        run.scheduler.step()
    reads = _grid_reads(run)  # a grid of several servers: rows read on this rank's node and across nodes
    totals = _allreduce(run.sums.values() + reads, run.world, run.device)
    totals, reads = totals[:3], totals[3:]
    run.sums = Sums()  # the next epoch's
    if not complete and run.saved_step != run.step:
        _save(run, totals)
    row = _epoch_row(run, totals, clock)
    if reads:
        row.update(grid_rows_local=int(reads[0]), grid_rows_remote=int(reads[1]))
    run.history.append(row)
    if run.rank == 0 and not math.isfinite(row["loss"]):
        warnings.warn(f"epoch {row['epoch']}: the training loss is {row['loss']} (diverged: lower the learning "
                      "rate, or check the data for NaN/inf)", RuntimeWarning, stacklevel=2)
    if run.log is not None:
        run.log.scalars(run.step, {f"epoch/{k}": v for k, v in row.items() if k != "epoch"})
        run.log.flush()
    run.bar.end_epoch(row, time.perf_counter() - clock.start)
    if complete:
        _save(run, [0.0, 0.0, 0.0])
    return row


def _grid_reads(run: Run) -> list[float]:
    """This rank's rows read from servers on its node and on others since the last epoch's row ([] when the
    data is not on a grid of several servers; every rank reads the same kind of data)."""
    counts = run.loader.dataset.network_reads()
    if counts is None:
        return []
    now = (counts["local"], counts["remote"])
    delta = [float(now[0] - run.reads_seen[0]), float(now[1] - run.reads_seen[1])]
    run.reads_seen = now
    return delta


def _epoch_row(run: Run, totals: list[float], clock: Clock) -> dict:
    """The epoch's metrics: loss (and accuracy) over all ranks' real rows, rates, validation."""
    spec = run.spec
    ls, c, n = totals
    row = {"epoch": run.epoch + 1, "loss": ls / max(n, 1), **clock.epoch_rates(n - run.carried_rows)}
    run.carried_rows = 0.0
    if run.losses.classifier and "accuracy" in spec.metrics:
        row["accuracy"] = c / max(n, 1)
    if spec.val is not None:
        val = evaluate(spec, run.net, spec.val, run.device, run.rank, run.world, run.precision)
        row.update({f"val_{k}": v for k, v in val.items()})
    return row


def _state(run: Run, metrics: dict | None = None, batch_loss: tuple | None = None) -> TrainState:
    """What a callback sees now (on rank 0): the epoch running or just ended, counted from 1."""
    rows = run.spec.train.num_rows
    return TrainState(epoch=run.epoch + 1, epochs=run.spec.epochs, step=run.step,
                      samples=run.epoch * rows + min(run.batch * run.spec.step_batch, rows),
                      world_size=run.world, model=run.model, metrics=dict(metrics or {}),
                      history=[dict(r) for r in run.history], checkpoint=run.last_checkpoint, _batch=batch_loss)


def _open_outputs(run: Run) -> None:
    """Rank 0's TensorBoard log and progress bar (the bar is silent elsewhere)."""
    from .progress import Progress

    if run.rank == 0 and run.spec.log_dir:
        from .tblog import TBLog

        # a resumed run hides the events a stopped run wrote after its checkpoint (TensorBoard's purge)
        run.log = TBLog(run.spec.log_dir, purge_step=run.step + 1 if run.resumed_from else None)
    run.bar = Progress(run.spec.epochs, len(run.loader), quiet=run.spec.quiet or run.rank != 0)
    if run.resumed_from:
        run.bar.resumed(run.resumed_from, run.epoch, run.batch, run.step)


def _close_outputs(run: Run) -> None:
    if run.bar is not None:
        run.bar.close()
    if run.log is not None:
        run.log.close()


def _result(run: Run) -> dict:
    """Rank 0's result: weights, history, newest checkpoint, and the callbacks as they ended (pickled one by
    one: the driver copies their attributes back onto the user's objects)."""
    import cloudpickle

    callbacks = []
    for cb in run.spec.callbacks:
        try:
            callbacks.append(cloudpickle.dumps(cb))
        except Exception as e:  # noqa: BLE001 - the driver warns; training itself succeeded
            callbacks.append(f"{type(e).__name__}: {e}")
    return {"model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()}, "history": run.history,
            "checkpoint": run.last_checkpoint, "step": run.step, "callbacks": callbacks}
