"""Learning rate by optimizer step: a linear warm-up over ``warmup_steps``, then "constant", "linear" (to 0)
or "cosine" (to 0) over the run's remaining steps. A factor on the optimizer's own learning rate (what the
optimizer was built with, or a per-epoch ``scheduler=`` has set), applied for each step only: it is a pure
function of the step count, which checkpoints carry, so a resumed run continues the same curve."""

from __future__ import annotations

import math
from contextlib import contextmanager

SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The factor for optimizer step ``step`` (0 = the run's first) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup  # the first step already learns (not a wasted step at lr 0)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)  # 0 at the end of warm-up, ->1 at the last step
    progress = min(progress, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class StepSchedule:
    def __init__(self, warmup: int, schedule: str, total: int):
        self.warmup, self.schedule, self.total = warmup, schedule, total

    @property
    def active(self) -> bool:
        return self.warmup > 0 or self.schedule != "constant"

    @contextmanager
    def applied(self, optimizer, step: int):
        """The optimizer's learning rates times this step's factor while it steps; restored afterwards (the
        optimizer's state, a per-epoch scheduler and checkpoints keep the rates as set)."""
        if not self.active:
            yield
            return
        factor = lr_factor(step, self.warmup, self.total, self.schedule)
        saved = [g["lr"] for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, saved):
            g["lr"] = lr * factor
        try:
            yield
        finally:
            for g, lr in zip(optimizer.param_groups, saved):
                g["lr"] = lr

    def lr(self, optimizer, step: int) -> float:
        """The first group's learning rate for step ``step`` (what TensorBoard shows as train/lr)."""
        lr = optimizer.param_groups[0]["lr"]
        return lr * lr_factor(step, self.warmup, self.total, self.schedule) if self.active else lr
