"""The progress bar drawn by rank 0 (epoch, step, loss, samples/s, ETA) and the final summary table."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress
from rich.table import Table


class Progress:
    def __init__(self, epochs: int, steps_per_epoch: int, quiet: bool = False):
        self.quiet = quiet or not sys.stderr.isatty()
        self.epochs, self.steps = epochs, steps_per_epoch
        self.console = Console(stderr=True)
        self.bar = None
        if not self.quiet:
            self.bar = RichProgress(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                                    MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                                    TextColumn("{task.fields[rate]:,.0f} samples/s"), TimeRemainingColumn(),
                                    console=self.console, transient=False)
            self.bar.start()
        self.task = None

    def start_epoch(self, epoch: int, done: int) -> None:
        if self.bar is None:
            return
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task("", total=self.steps, completed=done, epoch=epoch + 1, epochs=self.epochs,
                                      loss=float("nan"), rate=0.0)

    @property
    def visible(self) -> bool:
        return self.bar is not None

    def step(self, loss: float, rate: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, loss=loss, rate=rate)

    def end_epoch(self, row: dict) -> None:
        if self.bar is not None:
            extras = "  ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("epoch", "samples_per_s"))
            self.bar.console.print(f"epoch {row['epoch'] + 1}: {extras}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def summary_table(history: list[dict]) -> Table:
    t = Table(title="training summary", title_justify="left")
    keys = [k for k in history[0] if k != "epoch"] if history else []
    t.add_column("epoch")
    for k in keys:
        t.add_column(k.replace("_", " "), justify="right")
    for row in history:
        t.add_row(str(row["epoch"] + 1), *(f"{row[k]:,.0f}" if k == "samples_per_s" else f"{row[k]:.4f}"
                                           for k in keys))
    return t
