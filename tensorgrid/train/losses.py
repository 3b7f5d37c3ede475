"""Each rank's loss, scaled so that DDP's gradient average is the gradient of the mean loss over the global
batch (padding rows weigh nothing, whatever form the loss takes), and the epoch's sums of real rows."""

from __future__ import annotations

import copy

import torch

from .features import forward, label_for_loss, stack_features


def is_classifier(loss) -> bool:
    return isinstance(loss, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))


def per_row_loss(loss):
    """The loss with reduction='none', so padding rows can be masked; None if it has no such switch."""
    if hasattr(loss, "reduction"):
        lossn = copy.deepcopy(loss)
        lossn.reduction = "none"
        return lossn
    return None


class BatchLoss:
    """Move a rank's batch to the device and compute its loss, weighted for the global-batch mean, and the
    (loss sum, correct, count) of its real rows. With gradient accumulation, ``global_batch`` is that of an
    optimizer step and ``compute`` is given each micro-batch (a slice of the rank's rows of it): the losses
    are weighted so that the micro-batches' gradients add up to that of the mean over the step's rows."""

    def __init__(self, spec, model, device, world: int, rows: int, global_batch: int, real_rows=None):
        """``real_rows(k)``: the real rows of global batch k when not the first ``rows`` cut in global batches
        (``locality=True``: each rank's own share, padded at its end)."""
        self.spec, self.model, self.device = spec, model, device
        self.world, self.rows, self.global_batch, self.real_rows = world, rows, global_batch, real_rows
        self.lossn = per_row_loss(spec.loss) if spec.step is None else None
        self.classifier = is_classifier(spec.loss)

    def compute(self, batch: dict, k: int):
        """Loss to back-propagate (scaled for DDP's average), and (loss_sum, correct, count) of real rows of
        global batch ``k``."""
        valid = batch.get("_valid")
        # rows of global batch k that are real (only the last global batch is short or padded)
        real = self.real_rows(k) if self.real_rows is not None else min(self.global_batch,
                                                                         self.rows - k * self.global_batch)
        if self.spec.step is not None:
            return self._user_step(batch, valid, real)
        out = forward(self.model, _to(stack_features(batch, self.spec.features), self.device), self.spec.features)
        y = label_for_loss(_to(batch[self.spec.label], self.device), self.classifier)
        if self.lossn is not None:
            loss, loss_sum = self._per_row(out, y, valid, real)
        elif valid is not None:
            loss, loss_sum = self._mean_of_real_rows(lambda keep: self.spec.loss(*_take(keep, out, y)), out,
                                                     valid, real)
        else:
            loss = self.spec.loss(out, y)
            loss_sum = loss.detach().double() * len(y)
            loss = _share(loss, len(y), real)
        n = int(valid.sum()) if valid is not None else len(y)  # valid lives on the CPU: no device sync
        correct = 0
        if self.classifier and out.ndim == 2 and "accuracy" in self.spec.metrics:
            hit = out.detach().argmax(dim=1) == y
            correct = (hit & _to(valid, self.device)).sum() if valid is not None else hit.sum()
        return loss, (loss_sum, correct, n)

    def _per_row(self, out, y, valid, real: int):
        """A loss with per-row values: padding rows masked, the sum weighted for the global batch."""
        per = self.lossn(out, y)
        per = per.reshape(per.shape[0], -1).mean(dim=1) if per.ndim > 1 else per
        if valid is not None:
            per = per * _to(valid, self.device).to(per.dtype)
        total = per.sum(dtype=torch.float32) if per.dtype in (torch.float16, torch.bfloat16) else per.sum()
        return total * (self.world / real), total.detach()

    def _mean_of_real_rows(self, mean_loss, anchor, valid, real: int):
        """A loss that is a mean over this rank's real rows (a plain loss function, or the user's step),
        weighted so that DDP's average of the ranks' gradients is the mean over the global batch, as in one
        process (uneven last batches too). ``mean_loss(keep)``: that mean over the rows where ``keep``."""
        m = int(valid.sum())
        if not m:  # nothing real here: take part in the all-reduce with zero gradients
            loss = anchor.sum() * 0.0 if anchor is not None else mean_loss(None) * 0.0
            return loss, loss.detach().double()
        keep = None if bool(valid.all()) else valid  # only an epoch's last global batch is padded
        loss = mean_loss(keep) * (m * self.world / real)
        return loss, loss.detach().double() * (real / self.world)

    def _user_step(self, batch: dict, valid, real: int):
        """``step(model, batch)``: the user's loss, taken as a mean over the rows it is given."""
        def mean_loss(keep):
            rows = batch if keep is None else _rows_of(batch, keep)
            return self.spec.step(self.model, {key: _to(v, self.device) for key, v in rows.items()})

        if valid is None:  # one process: the user's loss as it is (its share of the step's, accumulating)
            loss = mean_loss(None)
            n = _rows(batch)
            return _share(loss, n, real), (loss.detach().double() * n, 0, n)
        loss, loss_sum = self._mean_of_real_rows(mean_loss, None, valid, real)
        return loss, (loss_sum, 0, int(valid.sum()))


def micro_batches(batch: dict, size: int, k: int) -> list[dict]:
    """A rank's rows of an optimizer step as micro-batches of ``size`` rows (views; the last may be short):
    the batch itself when not accumulating (k == 1)."""
    if k == 1:
        return [batch]
    rows = _rows(batch)
    return [{key: v[i:i + size] for key, v in batch.items()} for i in range(0, rows, size)] or [batch]


def _share(mean_loss, n: int, real: int):
    """A mean over ``n`` rows weighted as its share of the mean over the step's ``real`` rows (unchanged
    without accumulation, where n == real)."""
    return mean_loss if n == real else mean_loss * (n / real)


def _take(keep, out, y):
    return (out, y) if keep is None else (out[_to(keep, out.device)], y[_to(keep, y.device)])


def _rows_of(batch: dict, keep: torch.Tensor) -> dict:
    """The rows of a batch where ``keep`` (a CPU bool tensor) is True."""
    idx = keep.nonzero().flatten().tolist()
    return {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in idx] for k, v in batch.items()}


def _to(v, device):
    return v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v


def _rows(batch: dict) -> int:
    for v in batch.values():
        return len(v)
    return 0


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
