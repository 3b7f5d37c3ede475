"""Learning curves of a run as a PNG: loss (and accuracy when measured), training and validation, by epoch.
matplotlib (the optional ``tensorgrid[plot]`` extra) draws with its Agg backend: no display needed."""

from __future__ import annotations

import io
import math
import os

from .. import fs as tgfs
from ..errors import ArgumentError, TensorGridError


def plot_history(history: list[dict], path: str, title: str | None = None) -> str:
    """Draw ``history`` (``FitResult.history``: one row per epoch) to ``path`` (.png/.svg/.pdf, a local path
    or any URL the store takes, its folder created); returns the absolute path (or the URL)."""
    check_path(path, "curves.png")
    if not history:
        raise ArgumentError("there is nothing to plot: the run has no finished epoch")
    panels = [m for m in ("loss", "accuracy") if any(_finite(r.get(m)) or _finite(r.get(f"val_{m}")) for r in history)]
    fig = new_figure((5 * max(1, len(panels)), 3.6))
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history)]
    for k, metric in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for key, label, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            points = [(e, r[key]) for e, r in zip(epochs, history) if _finite(r.get(key))]
            if points:
                ax.plot(*zip(*points), style, label=label, markersize=3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def check_path(path, example: str) -> None:
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ArgumentError(f"path must be a file name such as {example!r}, got {path!r}")


def new_figure(figsize: tuple[float, float]):
    """A matplotlib Figure drawn with the Agg backend (no display needed); a clear error without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise TensorGridError("plotting needs matplotlib: pip install 'tensorgrid[plot]'") from None
    return Figure(figsize=figsize, layout="constrained")


def save_figure(fig, path) -> str:
    """``fig`` written whole to ``path`` (.png/.svg/.pdf by its extension; a local path or any URL the store
    takes, its folder created); the absolute path (or the URL)."""
    fs, where = tgfs.resolve(os.fspath(path))
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(where)[1].lstrip(".").lower() or "png", dpi=110)
    tgfs.put_atomic(fs, where, buf.getvalue())  # a reader never sees half a picture
    return os.path.abspath(where) if tgfs.is_local(fs) else tgfs.to_url(fs, where)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
