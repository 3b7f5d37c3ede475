"""Learning curves on the user's own model and data: ``learning_curve(trainer, train, val)`` trains on
nested, stratified, seeded subsets of growing size (each larger subset holds the smaller ones), measures the
validation error of each run, and fits the power law of error against size (``powerlaw.py``).

Each run's error is written whole to a work folder keyed by the data, the trainer and the plan, so a curve
interrupted part-way resumes from the runs already done. With ``parallel`` > 1 the runs go to that many
processes at once: children forked from this one on Linux (started in milliseconds; nothing of
``__main__`` runs again, so flat scripts and notebooks work), else the Trainer's local engine (fresh
interpreters); for a trainer on Ray or Spark, that many runs at once on the cluster (Ray actors, Spark
barrier tasks), each trained where it runs. Each run keeps the trainer's own settings.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import warnings

import numpy as np
import pandas as pd

from .. import fs as tgfs
from ..args import check_int
from ..errors import ArgumentError, CurveFitError, WorkerFailedError
from ..store import subsets
from ..store.dataset import Dataset
from ..train.predict import predict
from ..train.trainer import Trainer
from . import evaluate, jobs
from .digest import stable_digest
from .powerlaw import PowerLaw, fit_power_law

MIN_AUTO_SIZES = 6
METRICS = ("error", "log_loss")


class LearningCurve:
    """Measured errors by training-set size (``table``) and the fitted law (``law``; None when refused,
    ``refused`` says why)."""

    def __init__(self, runs: pd.DataFrame, law: PowerLaw | None, refused: str | None = None):
        self.runs, self.law, self.refused = runs, law, refused

    @property
    def table(self) -> pd.DataFrame:
        """One row per size: size, error_mean, error_std, n_runs."""
        g = self.runs.groupby("size")["error"]
        return pd.DataFrame({"size": g.mean().index.astype(int), "error_mean": g.mean().values,
                             "error_std": g.std(ddof=1).fillna(0.0).values, "n_runs": g.count().values})

    def _law(self) -> PowerLaw:
        if self.law is None:
            raise CurveFitError(f"no power law was fitted: {self.refused}")
        return self.law

    def predict(self, m: float) -> tuple[float, float, float]:
        """The predicted error at ``m`` rows: (value, low, high), a 95% interval."""
        return self._law().predict(m)

    def size_for(self, error: float) -> tuple[float, float, float]:
        """Rows needed for ``error``: (value, low, high); CurveFitError when below the floor."""
        return self._law().size_for(error)

    @property
    def regions(self) -> dict:
        """The sizes of each region: ``small_data`` (left out of the fit: the error stays near a guess's),
        ``power_law`` (the fitted sizes), ``plateau`` (fitted sizes within 10% of the floor gamma, when seen)."""
        law = self._law()
        plateau = [m for m in law.sizes if law(m) <= law.gamma * 1.1] if law.gamma > 0 else []
        return {"small_data": list(law.small_data), "power_law": [m for m in law.sizes if m not in plateau],
                "plateau": plateau}

    def roi(self, cost_per_row: float, value_per_point: float, factor: float = 10.0) -> dict:
        """What ``factor`` times more rows buy: the predicted error there, the points of error gained (1
        point = 0.01), their value (``value_per_point`` each), the rows' cost and the net; and the marginal
        value of one more row at today's size. ``summary`` says it in words."""
        law = self._law()
        now = int(self.runs["size"].max())
        later = now * factor
        e_now, e_later = float(law(now)), law.predict(later)
        gained = (e_now - e_later[0]) * 100
        cost = (later - now) * cost_per_row
        value = gained * value_per_point
        marginal = -law.alpha * law.beta * now ** (law.beta - 1) * 100 * value_per_point  # value of one more row
        summary = (f"{factor:g}x the data ({now:,} -> {later:,.0f} rows) is predicted to take the error from "
                   f"{e_now:.2%} to {e_later[0]:.2%} (95%: {e_later[1]:.2%}..{e_later[2]:.2%}), {gained:.2f} points, "
                   f"worth {value:,.2f} for a cost of {cost:,.2f}: net {value - cost:,.2f}. One more row is worth "
                   f"{marginal:.4g} at {now:,} rows against its cost of {cost_per_row:g}"
                   + ("; the next rows pay off" + (f", though not all the way to {factor:g}x." if value < cost else ".")
                      if marginal > cost_per_row else "; more rows cost more than they bring."))
        return {"rows_now": now, "rows_later": later, "error_now": e_now, "error_later": e_later,
                "points_gained": gained, "value": value, "cost": cost, "net": value - cost,
                "marginal_value_per_row": marginal, "summary": summary}

    def plot(self, path, target_error: float | None = None, title: str | None = None) -> str:
        """A log-log PNG (or .svg/.pdf; a local path or any URL the store takes): the measured errors with
        their spread, the fitted law and its 95% band extrapolated to 10x the largest size, the small-data
        sizes marked, the floor, and the predicted size for ``target_error`` when given. Needs matplotlib."""
        from ..train.plot import check_path, new_figure, save_figure

        check_path(path, "curve.png")
        t = self.table
        fig = new_figure((7.5, 5.0))
        ax = fig.add_subplot()
        ax.errorbar(t["size"], t["error_mean"], yerr=t["error_std"], fmt="o", color="black", capsize=3,
                    label=f"measured (mean +- std of {int(t['n_runs'].max())} runs)")
        if self.law is not None:
            law = self.law
            right = t["size"].max() * 10
            if target_error is not None and target_error > law.gamma:
                right = max(right, law.size_for(target_error)[0] * 1.3)  # the band reaches the target's size
            grid = np.geomspace(t["size"].min(), right, 200)
            band = np.array([law.predict(x) for x in grid])
            ax.plot(grid, band[:, 0], color="tab:blue",
                    label=f"fit: {law.alpha:.3g} * m^{law.beta:.3f} + {law.gamma:.3g}")
            ax.fill_between(grid, band[:, 1], band[:, 2], color="tab:blue", alpha=0.2, label="95% interval")
            if law.small_data:
                ax.axvspan(t["size"].min() * 0.9, max(law.small_data) * 1.05, color="grey", alpha=0.15,
                           label="small-data region (not fitted)")
            if law.gamma > 0:
                ax.axhline(law.gamma, color="tab:red", linestyle=":", label=f"floor (irreducible) {law.gamma:.3g}")
            if target_error is not None and target_error > law.gamma:
                m, lo, hi = law.size_for(target_error)
                ax.axhline(target_error, color="tab:green", linestyle="--")
                ax.axvline(m, color="tab:green", linestyle="--",
                           label=f"error {target_error:.3g} at ~{m:,.0f} rows ({lo:,.0f}..{hi:,.0f})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training rows (log scale)")
        ax.set_ylabel("validation error, share of rows wrong (log scale)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or (f"learning curve: beta {self.law.beta:.3f}" if self.law else
                               f"learning curve (no fit: {self.refused})"[:90]))
        return save_figure(fig, path)

    def save(self, url: str) -> str:
        fs, path = tgfs.resolve(os.fspath(url))
        body = {"format": 1, "runs": self.runs.to_dict(orient="list"),
                "law": self.law.to_dict() if self.law else None, "refused": self.refused}
        tgfs.put_atomic(fs, path, json.dumps(body).encode())
        return url

    @classmethod
    def load(cls, url: str) -> LearningCurve:
        fs, path = tgfs.resolve(os.fspath(url))
        try:
            body = json.loads(fs.cat_file(path))
        except FileNotFoundError:
            raise ArgumentError(f"{url}: no saved learning curve") from None
        except ValueError as e:
            raise ArgumentError(f"{url}: not a saved learning curve ({e})") from None
        if not isinstance(body, dict) or body.get("format") != 1:
            raise ArgumentError(f"{url}: not a saved learning curve of format 1")
        law = PowerLaw.from_dict(body["law"]) if body.get("law") else None
        return cls(pd.DataFrame(body["runs"]), law, body.get("refused"))

    def __repr__(self) -> str:
        if self.law is None:
            return f"LearningCurve({len(self.runs)} runs; no fit: {self.refused})"
        lo, hi = self.law.beta_interval
        return (f"LearningCurve({len(self.runs)} runs; error = {self.law.alpha:.3g} * m^{self.law.beta:.3f} "
                f"+ {self.law.gamma:.3g}, beta in [{lo:.3f}, {hi:.3f}])")


def learning_curve(trainer, train: Dataset, val: Dataset, sizes="auto", repeats: int = 3, seed: int = 0,
                   metric="error", parallel: int = 1, label: str | None = None, work_dir: str | None = None,
                   progress: bool | None = None) -> LearningCurve:
    """Train ``trainer`` (a ``tg.Trainer`` or an estimator with ``fit``) on nested stratified subsets of
    ``train`` and measure ``metric`` on ``val``; fit the power law. ``sizes``: "auto" (at least 6,
    geometric, up to all of ``train``) or a list; ``repeats``: runs per size (other seeds, other subsets);
    ``metric``: "error" (classification error), "log_loss" (validation cross-entropy of the predicted
    probabilities) or a function ``(predictions: Dataset, label) -> float`` (lower is better);
    ``parallel``: runs at once (forked children of this process; a trainer on Ray or Spark: that many runs
    at once on the cluster, each trained with the trainer's ``workers`` where it runs). Runs already done (same data, trainer, metric and
    plan) are read back from ``work_dir`` (default: under the loader's cache folder). ``progress``: a bar of
    the runs on stderr (default: on a terminal)."""
    if not isinstance(trainer, Trainer) and not all(callable(getattr(trainer, a, None)) for a in ("fit", "copy")):
        raise ArgumentError(f"trainer must be a tg.Trainer or an estimator (NNClassifier, NNEstimator), got "
                            f"{type(trainer).__name__}")
    repeats = check_int("repeats", repeats, 1)
    parallel = check_int("parallel", parallel, 1)
    if not (callable(metric) or metric in METRICS):
        raise ArgumentError(f"metric must be one of {METRICS} or a function (predictions, label) -> float, "
                            f"got {metric!r}")
    label = label or getattr(trainer, "label", None) or getattr(trainer, "label_col", None) or "label"
    for name, ds in (("train", train), ("val", val)):
        if not isinstance(ds, Dataset):
            raise ArgumentError(f"{name} must be a Dataset, got {type(ds).__name__}")
        if label not in ds.schema.names:
            raise ArgumentError(f"{name} has no label column {label!r}; columns: {ds.schema.names}")
    if subsets.shares_rows(train, val):
        raise ArgumentError("val shares rows with train: measure the error on rows the runs never train on "
                            "(ds.split gives disjoint parts)")
    labels = _labels(train, label)
    sizes = _sizes(sizes, len(labels), len(np.unique(labels)))
    orders = [_nested_order(labels, seed + r) for r in range(repeats)]
    plan = [(m, r) for m in sizes for r in range(repeats)]
    folder = _work_folder(work_dir, trainer, train, val, sizes, repeats, seed, metric)
    todo = [k for k, (m, r) in enumerate(plan) if _done(folder, m, r) is None]
    job = _Runs(trainer, train, val, label, plan, orders, todo, folder, metric)
    workers = min(parallel, len(todo))
    engine = trainer.engine if isinstance(trainer, Trainer) else "local"
    if workers > 1:  # the workers write the runs into the folder: memory:// would stay in each of them
        jobs.check_reachable(folder, engine, workers, "the curve's work folder (work_dir=)")
    if workers > 1 and engine != "local":  # several runs at once on the cluster, each trained where it runs
        job.engine = "local"
        with _Bar(plan, folder, progress):
            jobs.run(job, engine, workers, *tgfs.resolve(folder), "learning curve", "runs")
    elif workers > 1 and jobs.can_fork(workers, train, val):  # largest first: the last runs to end are short ones
        jobs.forked_else_fresh(job, workers, sorted(todo, key=lambda k: -plan[k][0]), folder, "learning curve",
                               "runs", lambda: [k for k in todo if _done(folder, *plan[k]) is None],
                               around=_Bar(plan, folder, progress))
    elif todo:
        with _Bar(plan, folder, progress):
            if workers == 1:
                job.run_rank(0, 1)
            else:
                jobs.run(job, "local", workers, *tgfs.resolve(folder), "learning curve", "runs")
    errors = [_done(folder, m, r) for m, r in plan]
    missing = [(m, r) for (m, r), e in zip(plan, errors) if e is None]
    if missing:  # every worker ended well, yet runs are not in the folder (written where we cannot see)
        raise WorkerFailedError(f"{len(missing)} learning curve run(s) left no result in {folder} (e.g. size "
                                f"{missing[0][0]}, repeat {missing[0][1]}): run the curve again")
    runs = pd.DataFrame([{"size": m, "repeat": r, "error": e} for (m, r), e in zip(plan, errors)])
    table = runs.groupby("size")["error"].apply(list)
    try:
        law = fit_power_law(table.index.tolist(), table.tolist(), seed=seed)
        return LearningCurve(runs, law)
    except CurveFitError as e:
        warnings.warn(f"tensorgrid: no power law fitted to the learning curve: {e}", RuntimeWarning, stacklevel=2)
        return LearningCurve(runs, None, str(e))


class _Bar:
    """Runs done out of all, on stderr while the runs go (here or in worker processes: the work folder is
    watched), when ``progress`` (default: stderr is a terminal)."""

    def __init__(self, plan, folder: str, progress: bool | None):
        self.plan, self.folder = plan, folder
        self.on = sys.stderr.isatty() if progress is None else bool(progress)
        self.stop = threading.Event()

    def __enter__(self):
        if self.on:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("learning curve runs"), BarColumn(), MofNCompleteColumn(),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("runs", total=len(self.plan))
            self.bar.start()
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _count(self) -> int:  # one listing, not a read of every run's file each time
        fs, path = tgfs.resolve(self.folder)
        try:
            names = {tgfs.name(p) for p in fs.ls(path, detail=False)}
        except FileNotFoundError:
            return 0
        return sum(tgfs.name(_run_path(self.folder, m, r)) in names for m, r in self.plan)

    def _watch(self) -> None:
        while not self.stop.wait(0.5):
            self.bar.update(self.task, completed=self._count())

    def __exit__(self, *exc):
        if self.on:
            self.stop.set()
            self.thread.join()
            self.bar.update(self.task, completed=self._count())
            self.bar.stop()
        return False


class _Runs:
    """The runs still to do, ``todo[rank::world]`` on each worker; each writes its error whole."""

    timeout_s = jobs.TIMEOUT_S
    engine = None  # each run's engine: None keeps the trainer's

    def __init__(self, trainer, train, val, label, plan, orders, todo, folder, metric):
        self.trainer, self.train, self.val, self.label = trainer, train, val, label
        self.plan, self.orders, self.todo, self.folder, self.metric = plan, orders, todo, folder, metric

    def run_rank(self, rank: int, world: int, take=None) -> dict:
        done = 0
        with jobs.errors_kept(*tgfs.resolve(self.folder), rank, world, take):
            for k in jobs.pieces(self.todo, rank, world, take):
                self.run(k)
                done += 1
        return {"runs": done}

    def run(self, k: int) -> None:
        m, r = self.plan[k]
        subset = subsets.take(self.train, np.sort(self.orders[r][:m]), f"{m} rows, repeat {r}")
        error = _error(self.trainer, subset, self.val, self.label, r, self.metric, self.engine)
        tgfs.put_atomic(*tgfs.resolve(_run_path(self.folder, m, r)), json.dumps({"error": error}).encode())


def _error(trainer, subset: Dataset, val: Dataset, label: str, seed: int, metric="error",
           engine: str | None = None) -> float:
    """One run: train on ``subset`` (another seed per repeat; on ``engine``, default the trainer's),
    ``metric`` on ``val``."""
    if isinstance(trainer, Trainer):
        t = _reseeded(trainer, seed)
        t.engine = engine or t.engine
        model = t.fit(subset).model
        pred = predict(model, val, t.features, transform=t.transform, classifier=True, keep=[label])
    else:
        est = trainer.copy(seed=seed) if "seed" in trainer.get_params() else trainer.copy()
        pred = est.fit(subset).transform(val)
    if callable(metric):
        value = metric(pred, label)
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ArgumentError(f"the metric returned {value!r}, not a number") from None
        return value
    if metric == "log_loss":
        return float(evaluate.log_loss(pred, label_col=label))
    return 1.0 - evaluate.accuracy(pred, label_col=label)


def _reseeded(trainer: Trainer, seed: int) -> Trainer:
    import copy

    t = copy.copy(trainer)
    t.seed, t.quiet = seed, True
    return t


def _labels(ds: Dataset, label: str) -> np.ndarray:
    col = ds.to_arrow(columns=[label]).column(0)
    if col.null_count:
        raise ArgumentError(f"the label column {label!r} has {col.null_count} nulls")
    return col.to_numpy()


def _sizes(sizes, n: int, classes: int) -> list[int]:
    if isinstance(sizes, str):
        if sizes != "auto":
            raise ArgumentError(f"sizes must be 'auto' or a list of row counts, got {sizes!r}")
        low = min(n // 8, max(10 * classes, 50))
        count = max(MIN_AUTO_SIZES, int(math.log2(n / max(low, 1))) + 1)
        out = sorted({int(round(x)) for x in np.geomspace(max(low, 1), n, count)})
    else:
        out = sorted({int(s) for s in sizes})
    if len(out) < 4:
        raise CurveFitError(f"{len(out)} sizes: a learning curve needs at least 4 (the data has {n} rows)")
    if out[0] < classes or out[-1] > n:
        raise ArgumentError(f"sizes must lie between the number of classes ({classes}) and the training rows ({n}); "
                            f"got {out[0]}..{out[-1]}")
    return out


def _nested_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """Row positions in an order whose every prefix is stratified by label: each class's rows shuffled,
    then interleaved by their position within the class relative to its size."""
    rng = np.random.default_rng(seed)
    key = np.empty(len(labels))
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        rng.shuffle(rows)
        key[rows] = (np.arange(len(rows)) + rng.random()) / len(rows)
    return np.argsort(key, kind="stable")


def _work_folder(work_dir, trainer, train, val, sizes, repeats, seed, metric="error") -> str:
    key = stable_digest(trainer, (train.fingerprint, val.fingerprint, sizes, repeats, seed), metric)
    base = work_dir or os.path.join(os.environ.get("TENSORGRID_CACHE_DIR") or
                                    os.path.join(os.path.expanduser("~"), ".cache", "tensorgrid"), "curves")
    return tgfs.join(base, key[:16])


def _run_path(folder: str, m: int, r: int) -> str:
    return tgfs.join(folder, f"run-{m}-{r}.json")


def _done(folder: str, m: int, r: int) -> float | None:
    fs, path = tgfs.resolve(_run_path(folder, m, r))
    try:
        return float(json.loads(fs.cat_file(path))["error"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
