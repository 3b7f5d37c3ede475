"""Built-in callbacks that watch an epoch metric: ``EarlyStopping`` and ``BestCheckpoint``. Both decide from
``state.history`` (which checkpoints carry) and the files in ``checkpoint_dir``, never from memory of earlier
epochs alone, so a run killed and resumed decides as an uninterrupted one would."""

from __future__ import annotations

import math

from .. import fs as tgfs
from ..args import check_choice, check_int, check_number
from ..errors import TrainingConfigError
from .callbacks import Callback

MODES = ("min", "max")


class _Monitor(Callback):
    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        if not isinstance(monitor, str) or not monitor:
            raise TrainingConfigError(f"monitor must be the name of an epoch metric (e.g. 'val_loss'), got {monitor!r}")
        self.monitor = monitor
        self.mode = check_choice("mode", mode, MODES, error=TrainingConfigError)
        self.min_delta = check_number("min_delta", min_delta, 0, error=TrainingConfigError)

    def _check_fit(self, metrics: set[str], checkpoint_dir: str | None) -> None:
        """Called by ``Trainer.fit`` before any worker starts, with the names the epoch rows will have."""
        if self.monitor not in metrics:
            hint = " (val_* metrics need fit(..., val=...))" if self.monitor.startswith("val_") else ""
            raise TrainingConfigError(f"{type(self).__name__} monitors {self.monitor!r}, which the epochs will not "
                                      f"have{hint}; they have {sorted(metrics)}")

    def _better(self, value: float, best: float) -> bool:
        """Whether ``value`` improves on ``best`` by more than min_delta (NaN never does)."""
        if not math.isfinite(value):
            return False
        if not math.isfinite(best):
            return True
        return value < best - self.min_delta if self.mode == "min" else value > best + self.min_delta

    def _best_index(self, history: list[dict]) -> int | None:
        """The index of the history's best row (the first of equals), or None."""
        best, at = math.nan, None
        for i, row in enumerate(history):
            if self.monitor in row and self._better(row[self.monitor], best):
                best, at = row[self.monitor], i
        return at


class EarlyStopping(_Monitor):
    """Stop training when ``monitor`` (a key of the epoch rows: "val_loss", "val_accuracy", "loss", ...) has
    not improved by more than ``min_delta`` for ``patience`` epochs; ``mode`` "min" or "max". The run ends after
    that epoch (its checkpoint is written), and ``fit`` returns the history so far. Resume-safe: it reads the
    history, and a run resumed after it stopped stops again at once."""

    def __init__(self, monitor: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int("patience", patience, 1, error=TrainingConfigError)
        self.stopped_epoch: int | None = None  # the epoch after which it stopped the run

    def _should_stop(self, history: list[dict]) -> bool:
        at = self._best_index(history)
        return at is not None and len(history) - 1 - at >= self.patience

    def on_train_start(self, state) -> None:
        if self._should_stop(state.history):  # resumed after it had stopped the run
            self.stopped_epoch = state.history[-1]["epoch"]
            state.should_stop = True

    def on_epoch_end(self, state) -> None:
        if self._should_stop(state.history):
            self.stopped_epoch = state.epoch
            state.should_stop = True


class BestCheckpoint(_Monitor):
    """Keep a copy of the checkpoint of the epoch with the best ``monitor`` ("val_accuracy" with mode="max",
    "val_loss" with mode="min", ...) as ``best-eXXXXX-sYYYYYYYYY.pt`` in ``checkpoint_dir`` (needs one),
    beside the rotated ``ckpt-*`` files: ``keep_checkpoints`` never deletes it, ``fit(resume=True)`` never
    resumes from it. After ``fit``: ``FitResult.best_checkpoint`` (and this object's ``best_checkpoint``,
    ``best_value``, ``best_epoch``); load it with ``tensorgrid.train.load_weights(url, model)``."""

    PREFIX = "best-"

    def __init__(self, monitor: str = "val_loss", mode: str = "min", min_delta: float = 0.0):
        super().__init__(monitor, mode, min_delta)
        self.best_checkpoint: str | None = None
        self.best_value: float | None = None
        self.best_epoch: int | None = None

    def _check_fit(self, metrics: set[str], checkpoint_dir: str | None) -> None:
        super()._check_fit(metrics, checkpoint_dir)
        if not checkpoint_dir:
            raise TrainingConfigError("BestCheckpoint keeps a checkpoint: give the Trainer a checkpoint_dir")

    def on_train_start(self, state) -> None:
        """After a resume: find the best copy made so far; make it if the run stopped between the best epoch's
        checkpoint and its copy."""
        if state.checkpoint is None:
            return
        at = self._best_index(state.history)
        found = _copies(state.checkpoint, self.PREFIX)
        if at is not None and at == len(state.history) - 1 and _epochs_done(state.checkpoint) == at + 1 and (
                not found or found[-1][0] != at + 1):
            self._keep(state.checkpoint, state.history[at])  # the resumed checkpoint ends that epoch
        elif found:
            self.best_checkpoint = found[-1][1]
            if at is not None:
                self.best_value, self.best_epoch = state.history[at][self.monitor], state.history[at]["epoch"]

    def on_epoch_end(self, state) -> None:
        if state.checkpoint is None or self._best_index(state.history) != len(state.history) - 1:
            return
        if _epochs_done(state.checkpoint) != state.epoch:  # stopped in mid-epoch: not a whole epoch's weights
            return
        self._keep(state.checkpoint, state.metrics)

    def _keep(self, url: str, row: dict) -> None:
        fs, path = tgfs.resolve(url)
        name = tgfs.name(path)
        target = tgfs.join(path[: len(path) - len(name)], self.PREFIX + name.removeprefix("ckpt-"))
        tgfs.put_atomic(fs, target, fs.cat_file(path))
        kept = tgfs.to_url(fs, target)
        for _, old in _copies(kept, self.PREFIX):
            if old != kept:
                ofs, opath = tgfs.resolve(old)
                ofs.rm_file(opath)
        self.best_checkpoint, self.best_value, self.best_epoch = kept, row[self.monitor], row["epoch"]


def _epochs_done(url: str) -> int | None:
    """The epochs a checkpoint's name says were done (ckpt-e00003-... : 3, plus any steps of the 4th)."""
    from .checkpoint import _NAME

    m = _NAME.match(tgfs.name(url))
    return int(m.group(1)) if m else None


def _copies(beside: str, prefix: str) -> list[tuple[int, str]]:
    """(epochs done, URL) of the ``prefix`` checkpoints in the folder of checkpoint ``beside``, oldest first."""
    from .checkpoint import _NAME

    fs, path = tgfs.resolve(beside)
    folder = path[: len(path) - len(tgfs.name(path))].rstrip("/") or "/"
    out = []
    for n in fs.ls(folder, detail=False):
        base = tgfs.name(n)
        m = _NAME.match("ckpt-" + base.removeprefix(prefix)) if base.startswith(prefix) else None
        if m:
            out.append((int(m.group(1)), int(m.group(2)), tgfs.to_url(fs, n)))
    return [(e, u) for e, _, u in sorted(out)]
