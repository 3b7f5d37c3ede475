"""What rank 0 shows on stderr while training: a live bar on a terminal (epoch, step, loss, samples/s, ETA);
elsewhere (CI, nohup, a notebook's captured stderr) plain lines, about every 10% of an epoch and one per
epoch; nothing when quiet. Epochs are shown counted from 1. And the final summary table."""

from __future__ import annotations

import math
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

LINES_PER_EPOCH = 10  # without a terminal: a line about every 10% of an epoch


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, quiet: bool = False, terminal: bool | None = None):
        terminal = sys.stderr.isatty() if terminal is None else terminal
        self.mode = None if quiet else "bar" if terminal else "lines"
        self.epochs, self.steps = epochs, steps_per_epoch
        self.every = max(1, math.ceil(steps_per_epoch / LINES_PER_EPOCH))
        self.epoch = self.done = 0
        self.since = time.perf_counter()
        self.samples = 0  # since the last line
        self.bar = self.task = None
        if self.mode == "bar":
            self.bar = RichProgress(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                                    MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
                                    TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                    console=Console(stderr=True), transient=False)
            self.bar.start()

    @property
    def visible(self) -> bool:
        return self.mode is not None

    def resumed(self, url: str, epoch: int, batch: int, step: int) -> None:
        """One line: the checkpoint a resumed run continues from (``epoch`` as the loader counts, from 0)."""
        where = (f"epoch {epoch + 1}/{self.epochs} at step {batch}/{self.steps} of it" if batch else
                 f"the start of epoch {epoch + 1}/{self.epochs}")
        self._print(f"resuming from {url}: {step} steps done, continuing at {where}")

    def start_epoch(self, epoch: int, done: int) -> None:
        """``epoch`` as the loader counts (from 0); ``done``: its steps already run (after a resume)."""
        self.epoch, self.done = epoch + 1, done
        self.since, self.samples = time.perf_counter(), 0
        if self.bar is not None:
            if self.task is not None:
                self.bar.remove_task(self.task)
            self.task = self.bar.add_task("", total=self.steps, completed=done, epoch=self.epoch,
                                          epochs=self.epochs, loss="loss -", rate="- samples/s")

    def wants_loss(self) -> bool:
        """Whether the next step's loss is shown (reading it waits for the device)."""
        if self.mode == "bar":
            return True
        return self.mode == "lines" and self._line_due(self.done + 1)

    def _line_due(self, done: int) -> bool:
        return done % self.every == 0 and done < self.steps  # the epoch's own line ends it

    def step(self, loss: float | None, rate: float, samples: int) -> None:
        self.done += 1
        self.samples += samples
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=_loss(loss), rate=f"{rate:,.0f} samples/s")
        elif self.mode == "lines" and self._line_due(self.done):
            now = time.perf_counter()
            rate = self.samples / max(now - self.since, 1e-9)
            self.since, self.samples = now, 0
            self._print(f"epoch {self.epoch}/{self.epochs}  step {self.done}/{self.steps}  {_loss(loss)}  "
                        f"{rate:,.0f} samples/s")

    def end_epoch(self, row: dict, seconds: float) -> None:
        extras = "  ".join(f"{k} {v:,.0f}" if k == "samples_per_s" else f"{k} {v:.4f}"
                           for k, v in row.items() if k != "epoch")
        self._print(f"epoch {row['epoch']}/{self.epochs} done in {seconds:.1f} s: {extras}")

    def _print(self, text: str) -> None:
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _loss(loss: float | None) -> str:
    return "loss -" if loss is None else f"loss {loss:.4f}"


def summary_table(history: list[dict]) -> Table:
    t = Table(title="training summary", title_justify="left")
    keys = [k for k in history[0] if k != "epoch"] if history else []
    t.add_column("epoch")
    for k in keys:
        t.add_column(k.replace("_", " "), justify="right")
    for row in history:  # epochs counted from 1, as in the history
        t.add_row(str(row["epoch"]), *(f"{row[k]:,.0f}" if k == "samples_per_s" else f"{row[k]:.4f}"
                                       for k in keys))
    return t
