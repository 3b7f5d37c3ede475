"""Training callbacks: user code that watches the run on rank 0 and may stop it, on every engine."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import CallbackError, TrainingConfigError

HOOKS = ("on_train_start", "on_step_end", "on_epoch_end", "on_train_end")


class Callback:
    """Base class of training callbacks (optional: any object with one or more of these methods works).

    Pass instances as ``Trainer(callbacks=[...])``. They are sent to the workers with the model (cloudpickle,
    so they must pickle) and run on rank 0 only, in this order, each hook given a ``TrainState``:

    - ``on_train_start(state)``: before the first step (after a resume: where the checkpoint left off).
    - ``on_step_end(state)``: after every optimizer step. Only define it if you need it: while one is defined,
      the ranks exchange one small message a step (to stop together).
    - ``on_epoch_end(state)``: after each epoch's metrics (all ranks' rows, and validation) are in
      ``state.metrics`` and ``state.history``, and after that epoch's checkpoint (``state.checkpoint``).
    - ``on_train_end(state)``: after the last epoch (not when training fails).

    Set ``state.should_stop = True`` to end training: every rank stops at the end of that step or epoch,
    and ``fit`` returns the model and history so far (a stop in mid-epoch saves a checkpoint there when
    ``checkpoint_dir`` is set, so ``fit(resume=True)`` continues exactly). An exception in a hook stops every
    rank and ``fit`` raises a ``CallbackError`` naming the callback (on several workers inside the
    ``WorkerFailedError``). Treat ``state.model`` as read-only: a change made on rank 0 alone would make the
    ranks diverge. When ``fit`` returns, each callback object holds the attributes it had on rank 0 at the
    end (so a callback that records something works on every engine, as with one process); a group restarted
    after a failure (``max_restarts``) starts again from the objects as ``fit`` sent them, so state that must
    survive belongs in what ``state.history`` already holds (as the built-in ``EarlyStopping`` and
    ``BestCheckpoint``, ``tensorgrid.train.monitors``, do: they decide the same after a resume).

    A callback that keeps a metric's curve (its attributes come back to this object after ``fit``)::

        class Curve(tg.Callback):
            def __init__(self, metric="val_loss"):
                self.metric, self.values = metric, []

            def on_epoch_end(self, state):
                self.values.append(state.metrics[self.metric])
    """

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState) -> None: ...

    def on_epoch_end(self, state: TrainState) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...


@dataclass
class TrainState:
    """What a hook sees (a fresh one each call). Epochs count from 1, as in ``history`` and the logs."""

    epoch: int  # the epoch running, or just ended (1 to epochs)
    epochs: int  # the run's total
    step: int  # optimizer steps so far (over the whole run, resumes included)
    samples: int  # real training rows seen so far, all ranks together (padding not counted)
    world_size: int
    model: torch.nn.Module  # rank 0's model (not the DDP wrapper): read it, copy it, do not change it
    metrics: dict = field(default_factory=dict)  # on_epoch_end: the epoch's row; on_train_end: the last row
    history: list[dict] = field(default_factory=list)  # every finished epoch's row (a copy)
    checkpoint: str | None = None  # URL of the newest checkpoint, if any
    should_stop: bool = False  # set True to stop every rank at the end of this step or epoch
    _batch: tuple | None = field(default=None, repr=False)

    @property
    def batch_loss(self) -> float | None:
        """In ``on_step_end``: the step's mean loss over rank 0's rows of the global batch (not averaged over
        the ranks: that would cost a collective every step). Reading it waits for the device."""
        if self._batch is None:
            return None
        loss_sum, n = self._batch
        return float(loss_sum) / max(n, 1)


def check_callbacks(callbacks) -> tuple:
    """``callbacks`` as a tuple of objects that each define at least one known hook, every hook callable with
    one argument; a method named like a hook that is not one (a typo) is refused, with the likely name."""
    if callbacks is None:
        return ()
    if _defined(callbacks) or isinstance(callbacks, (str, bytes, Mapping)) or not isinstance(callbacks, Iterable):
        raise TrainingConfigError(f"callbacks must be a list of callback objects (callbacks=[cb]), got "
                                  f"{type(callbacks).__name__}")
    callbacks = tuple(callbacks)
    for cb in callbacks:
        name = _name(cb)
        if isinstance(cb, type):
            raise TrainingConfigError(f"callbacks: pass an instance, {name}(), not the class {name}")
        for attr in dir(cb):
            if attr.startswith("on_") and attr not in HOOKS and callable(getattr(cb, attr, None)):
                near = difflib.get_close_matches(attr, HOOKS, n=1)
                raise TrainingConfigError(f"callback {name} has a method {attr!r}, which is not a hook"
                                          + (f" (did you mean {near[0]!r}?)" if near else "")
                                          + f"; the hooks are {', '.join(HOOKS)}")
        hooks = _defined(cb)
        if not hooks:
            raise TrainingConfigError(f"callback {name} defines none of the hooks {', '.join(HOOKS)}")
        for hook in hooks:
            _check_signature(cb, name, hook)
    return callbacks


def _defined(cb) -> list[str]:
    """The hooks ``cb`` defines (the no-op methods of ``Callback`` do not count)."""
    out = []
    for hook in HOOKS:
        fn = getattr(cb, hook, None)
        if fn is None or getattr(fn, "__func__", None) is getattr(Callback, hook):
            continue
        out.append(hook)
    return out


def _check_signature(cb, name: str, hook: str) -> None:
    fn = getattr(cb, hook)
    if not callable(fn):
        raise TrainingConfigError(f"callback {name}.{hook} is a {type(fn).__name__}, not a method")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        return
    try:
        sig.bind(None)
    except TypeError:
        raise TrainingConfigError(f"callback {name}.{hook}{sig} must take one argument, the TrainState") from None


def _name(cb) -> str:
    return cb.__qualname__ if isinstance(cb, type) else type(cb).__qualname__


GO_ON, STOP, FAILED = 0, 1, 2


class RankZeroFailed(Exception):
    """On ranks other than 0: rank 0's callback failed, so this rank leaves quietly (rank 0 raises the error,
    and the engine reports that one alone)."""


class Runner:
    """Runs the hooks on rank 0 and tells every rank what came of them, in one broadcast after each hook
    that some callback defines: go on, stop (all ranks at the same point), or rank 0's callback failed (the
    others leave instead of waiting in the next collective until ``timeout_s``)."""

    def __init__(self, callbacks, rank: int, world: int, device):
        self.rank, self.world, self.device = rank, world, device
        self.hooks = {h: [cb for cb in callbacks if h in _defined(cb)] for h in HOOKS}

    def wants(self, hook: str) -> bool:
        return bool(self.hooks[hook])

    def call(self, hook: str, state) -> bool:
        """Every rank calls it at the same point; ``state`` (a TrainState, or a function returning one, used
        on rank 0 only). True when a callback asked to stop."""
        if not self.hooks[hook]:
            return False
        error = None
        if self.rank == 0:
            state = state() if callable(state) else state
            for cb in self.hooks[hook]:
                try:
                    getattr(cb, hook)(state)
                except Exception as e:  # noqa: BLE001 - reported with the callback's name, on every rank
                    error = CallbackError(f"callback {_name(cb)}.{hook} failed at epoch {state.epoch}, step "
                                          f"{state.step}: {type(e).__name__}: {e}")
                    error.__cause__ = e
                    break
        code = FAILED if error is not None else STOP if self.rank == 0 and state.should_stop else GO_ON
        code = self._share(code)
        if error is not None:
            raise error
        if code == FAILED:
            raise RankZeroFailed()
        return code == STOP

    def _share(self, code: int) -> int:
        if self.world == 1:
            return code
        import torch.distributed as dist

        t = torch.tensor([code], dtype=torch.int64, device=self.device)  # nccl sends CUDA tensors only
        dist.broadcast(t, src=0)
        return int(t.item())
