"""The training loop every worker runs: DDP on its partition of the data, checkpoints and logs on rank 0.

Runs in the caller's process (workers=1) or in engine-started processes with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set. Same seed, data and global batch -> the same updates on any engine:
each rank's loss is scaled so that DDP's gradient average equals the gradient of the mean loss over the
global batch (padding rows of the last batch weigh nothing).
"""

from __future__ import annotations

import copy
import math
import os
import random
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from ..rng import seed_all
from ..store.dataset import Dataset
from . import checkpoint as ckpt
from .allocator import tune_malloc

FAILURE_GRACE_S = 1.0


@dataclass
class Spec:
    """Everything a worker needs (shipped to workers with cloudpickle)."""

    model: object
    loss: object
    optimizer: object
    scheduler: object
    features: str | None
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


def is_classifier(loss) -> bool:
    return isinstance(loss, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))


def per_row_loss(loss):
    """The loss with reduction='none', so padding rows can be masked; None if it has no such switch."""
    if hasattr(loss, "reduction"):
        lossn = copy.deepcopy(loss)
        lossn.reduction = "none"
        return lossn
    return None


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


class Batches:
    """Move a batch to the device; compute loss and metric sums with padding masked out."""

    def __init__(self, spec: Spec, model, device, world: int, rows: int, global_batch: int):
        self.spec, self.model, self.device = spec, model, device
        self.world, self.rows, self.global_batch = world, rows, global_batch
        self.lossn = per_row_loss(spec.loss) if spec.step is None else None
        self.classifier = is_classifier(spec.loss)

    def run(self, batch: dict, k: int):
        """Loss to back-propagate (scaled for DDP's average), and (loss_sum, correct, count) of real rows."""
        spec = self.spec
        valid = batch.get("_valid")
        padded = valid is not None and not bool(valid.all())  # only in an epoch's last global batch
        # rows of global batch k that are real (only the last global batch is short or padded)
        real = min(self.global_batch, self.rows - k * self.global_batch)
        if spec.step is not None:
            n = int(valid.sum()) if valid is not None else _rows(batch)
            if valid is None:  # one process: the user's loss as it is
                loss = spec.step(self.model, {key: _to(v, self.device) for key, v in batch.items()})
                return loss, (loss.detach().double() * n, 0, n)
            if not n:  # nothing real here: take part in the all-reduce with zero gradients
                loss = spec.step(self.model, {key: _to(v, self.device) for key, v in batch.items()}) * 0.0
                return loss, (loss.detach().double(), 0, 0)
            rows = _rows_of(batch, valid) if padded else batch
            # the user's loss is a mean over this rank's real rows; weighted so that DDP's average of the
            # ranks' gradients is the mean over the global batch, as in one process (uneven last batches too)
            loss = spec.step(self.model, {key: _to(v, self.device) for key, v in rows.items()}) * (n * self.world / real)
            return loss, (loss.detach().double() * (real / self.world), 0, n)
        x = _to(batch[spec.features], self.device)
        y = _to(batch[spec.label], self.device)
        out = self.model(x)
        if self.lossn is not None:
            per = self.lossn(out, y)
            per = per.reshape(per.shape[0], -1).mean(dim=1) if per.ndim > 1 else per
            mask = _to(valid, self.device).to(per.dtype) if valid is not None else None
            if mask is not None:
                per = per * mask
            total = per.sum(dtype=torch.float32) if per.dtype in (torch.float16, torch.bfloat16) else per.sum()
            loss = total * (self.world / real)
            loss_sum = total.detach()
        elif valid is not None:  # a loss without per-row values, several ranks: weighted as for step
            m = int(valid.sum())
            if m:
                keep = _to(valid, self.device)
                o, t = (out[keep], y[keep]) if padded else (out, y)
                loss = spec.loss(o, t) * (m * self.world / real)
                loss_sum = loss.detach().double() * (real / self.world)
            else:
                loss = out.sum() * 0.0
                loss_sum = loss.detach().double()
        else:
            loss = spec.loss(out, y)
            loss_sum = loss.detach().double() * len(y)
        n = int(valid.sum()) if valid is not None else len(y)  # valid lives on the CPU: no device sync
        correct = 0
        if self.classifier and out.ndim == 2 and "accuracy" in spec.metrics:
            hit = out.detach().argmax(dim=1) == y
            correct = (hit & _to(valid, self.device)).sum() if valid is not None else hit.sum()
        return loss, (loss_sum, correct, n)


def _rows_of(batch: dict, keep: torch.Tensor) -> dict:
    """The rows of a batch where ``keep`` (a CPU bool tensor) is True."""
    idx = keep.nonzero().flatten().tolist()
    return {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}


class Sums:
    """Loss sum, correct count and row count of an epoch so far. The first two are running totals on the
    device (float64), read only by ``values()``: a training step never waits for the device to count."""

    def __init__(self, base=(0.0, 0.0, 0.0)):
        self.base = [float(v) for v in base]
        self.loss = self.hit = None  # 0-dim float64 tensors on the device of the first step
        self.rows = 0

    def add(self, loss_sum, correct, n: int) -> None:
        if self.loss is None:
            device = loss_sum.device if isinstance(loss_sum, torch.Tensor) else None
            self.loss = torch.zeros((), dtype=torch.float64, device=device)
            self.hit = torch.zeros((), dtype=torch.float64, device=device)
        self.loss.add_(loss_sum)  # one small kernel, no sync
        if isinstance(correct, torch.Tensor):  # else 0: accuracy is not computed
            self.hit.add_(correct)
        self.rows += n

    def values(self) -> list[float]:
        """[loss sum, correct, rows] as floats (one read of the device)."""
        if self.loss is not None:
            ls, c = torch.stack([self.loss, self.hit]).tolist()
            self.base = [self.base[0] + ls, self.base[1] + c, self.base[2] + self.rows]
            self.loss = self.hit = None
            self.rows = 0
        return list(self.base)


def _to(v, device):
    return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v


def _rows(batch: dict) -> int:
    for v in batch.values():
        return len(v)
    return 0


def _allreduce(values: list[float], world: int, device=None) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    return t.tolist()


def evaluate(spec: Spec, model, ds: Dataset, device, rank: int, world: int) -> dict:
    loader = ds.to_torch(batch_size=max(1, spec.batch_size // world), columns=_columns(spec, ds), rank=rank,
                         world_size=world, transform=spec.transform)
    helper = Batches(spec, model, device, world, ds.num_rows, spec.batch_size)
    sums = Sums()
    model.eval()
    with torch.no_grad():
        for k, batch in enumerate(loader):
            sums.add(*helper.run(batch, k)[1])
    ls, c, n = _allreduce(sums.values(), world, device)
    out = {"loss": ls / max(n, 1)}
    if helper.classifier and "accuracy" in spec.metrics:
        out["accuracy"] = c / max(n, 1)
    return out


def _columns(spec: Spec, ds: Dataset) -> list[str] | None:
    if spec.step is not None:
        return None
    return [c for c in (spec.features, spec.label) if c in ds.schema.names]


def train(spec: Spec, rank: int = 0, world: int = 1, restarted: bool = False, report=None) -> dict | None:
    """Train; rank 0 returns the final weights, history and metrics. ``report``: a ``watch.Reporter`` that
    tells the driver this rank's progress, its own error or its end (so a hang or an early exit is named)."""
    device, backend = device_and_backend()
    tune_malloc()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if local_world > 1 and device.type == "cpu":  # share the cores: oversubscribed OpenMP threads crawl
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=spec.timeout_s))
    try:
        out = _train(spec, rank, world, device, restarted, report)
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


def _train(spec: Spec, rank: int, world: int, device, restarted: bool, report=None) -> dict | None:
    model = build_model(spec).to(device)
    # each rank its own random streams (dropout masks, augmentations), all fixed by the seed; after the
    # model's init (DDP copies rank 0's weights to every rank anyway)
    seed_all(spec.seed, rank)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = spec.optimizer(net.parameters())
    scheduler = spec.scheduler(optimizer) if spec.scheduler else None
    local_batch = spec.batch_size // world
    loader = spec.train.to_torch(batch_size=local_batch, columns=_columns(spec, spec.train), shuffle=True,
                                 seed=spec.seed, transform=spec.transform, rank=rank, world_size=world,
                                 num_workers=spec.loader_workers)
    history: list[dict] = []
    epoch0, step, sums = 0, 0, Sums()
    resume = spec.resume_from or (ckpt.latest(spec.checkpoint_dir) if restarted else None)
    if resume:
        state = ckpt.load(resume)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        rngs = state.get("rngs") or []
        if len(rngs) == world:  # each rank continues its own streams
            _set_rng_state(rngs[rank])
        elif rank == 0:  # another world size: rank 0 continues its streams, the others start afresh
            _set_rng_state(state["rng"])
        loader.load_state_dict(state["loader"])
        history, step, epoch0 = state["history"], state["step"], state["loader"]["epoch"]
        # the checkpoint holds the epoch's sums so far over all ranks: rank 0 carries them on
        sums = Sums(state.get("epoch_sums") or (0.0, 0.0, 0.0)) if rank == 0 else Sums()
    log = None
    if rank == 0 and spec.log_dir:
        from .tblog import TBLog

        log = TBLog(spec.log_dir)
    from .progress import Progress

    bar = Progress(spec.epochs, len(loader), quiet=spec.quiet or rank != 0)
    helper = Batches(spec, net, device, world, spec.train.num_rows, spec.batch_size)
    last_ckpt = resume
    every = spec.checkpoint_every if isinstance(spec.checkpoint_every, int) else None

    def save(epoch_sums: list[float]) -> str | None:  # every rank calls it
        if not spec.checkpoint_dir:
            return None
        rngs = _gather_rng(world)
        if rank != 0:
            return None
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "optimizer_type": ckpt.type_name(optimizer),
                 "scheduler": scheduler.state_dict() if scheduler else None, "rng": rngs[0], "rngs": rngs,
                 "loader": loader.state_dict(), "history": history, "step": step, "epoch_sums": epoch_sums,
                 "data_fingerprint": spec.data_fingerprint}
        return ckpt.save(spec.checkpoint_dir, loader.state_dict()["epoch"], step, state, spec.keep_checkpoints)

    try:
        for epoch in range(epoch0, spec.epochs):
            if loader.epoch != epoch:  # a resumed loader already sits at its epoch and batch
                loader.set_epoch(epoch)
            net.train()
            k = loader.state_dict()["batch"]
            if not (resume and epoch == epoch0 and k):
                sums = Sums()
            t_epoch = time.perf_counter()
            wait_total = 0.0
            bar.start_epoch(epoch, k)
            it = iter(loader)
            t_last = time.perf_counter()
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                t1 = time.perf_counter()
                loss, (ls, c, n) = helper.run(batch, k)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                k += 1
                sums.add(ls, c, n)
                if report is not None:
                    report.step(step)
                t2 = time.perf_counter()
                wait = t1 - t0
                wait_total += wait
                samples_s = n * world / max(t2 - t_last, 1e-9)
                t_last = t2
                # reading the loss waits for the device: only when a log or a visible bar shows it
                step_loss = float(ls) / max(n, 1) if log is not None or bar.visible else float("nan")
                bar.step(step_loss, samples_s)
                if log is not None:
                    log.scalars(step, {"train/loss": step_loss, "train/samples_per_s": samples_s,
                                       "train/data_wait_fraction": wait / max(t2 - t0, 1e-9),
                                       "train/lr": optimizer.param_groups[0]["lr"]})
                # (an epoch's last step is saved by the epoch's own checkpoint just below)
                if every and step % every == 0 and spec.checkpoint_dir and k < len(loader):
                    last_ckpt = save(_allreduce(sums.values(), world, device)) or last_ckpt  # every rank reduces
            if scheduler is not None:
                scheduler.step()
            ls, c, n = _allreduce(sums.values(), world, device)
            elapsed = time.perf_counter() - t_epoch
            row = {"epoch": epoch, "loss": ls / max(n, 1), "samples_per_s": n / max(elapsed, 1e-9),
                   "data_wait_fraction": wait_total / max(elapsed, 1e-9)}
            if helper.classifier and "accuracy" in spec.metrics:
                row["accuracy"] = c / max(n, 1)
            if spec.val is not None:
                row.update({f"val_{k2}": v for k2, v in evaluate(spec, net, spec.val, device, rank, world).items()})
            history.append(row)
            if rank == 0 and not math.isfinite(row["loss"]):
                warnings.warn(f"epoch {epoch}: the training loss is {row['loss']} (diverged: lower the learning "
                              "rate, or check the data for NaN/inf)", RuntimeWarning, stacklevel=2)
            if log is not None:
                log.scalars(step, {f"epoch/{k2}": v for k2, v in row.items() if k2 != "epoch"})
                log.flush()
            bar.end_epoch(row)
            if spec.checkpoint_every == "epoch" or every:
                last_ckpt = save([0.0, 0.0, 0.0]) or last_ckpt
    finally:
        bar.close()
        if log is not None:
            log.close()
    if rank != 0:
        return None
    return {"model": {k2: v.detach().cpu() for k2, v in model.state_dict().items()}, "history": history,
            "checkpoint": last_ckpt, "step": step}
