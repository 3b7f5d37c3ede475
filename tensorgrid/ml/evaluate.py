"""Evaluators for predictions: accuracy, precision / recall / F1 (per class and macro), the confusion matrix
(a table and a PNG a person can read) and log-loss, over a Dataset, a pandas DataFrame or an Arrow table
holding a label column and a ``prediction`` column (or ``probability``: Spark ML's names, what
``tg.predict`` and the ML stages write).

    evaluate.accuracy(pred, label_col="label_index")
    evaluate.confusion_matrix(pred, label_col="label_index").plot("cm.png")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import ArgumentError, ColumnNotFoundError, EmptyDataError
from ..train.plot import check_path, new_figure, save_figure


def accuracy(data, label_col: str = "label", prediction_col: str = "prediction") -> float:
    """The share of rows whose prediction equals the label."""
    y, p = _pair(data, label_col, prediction_col)
    return float(np.mean(y == p))


@dataclass
class Report:
    """Precision, recall, F1 and support per class (in ``labels`` order) and their unweighted means."""

    labels: list
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray

    @property
    def macro(self) -> dict:
        return {"precision": float(self.precision.mean()), "recall": float(self.recall.mean()),
                "f1": float(self.f1.mean())}

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame({"label": self.labels, "precision": self.precision, "recall": self.recall,
                             "f1": self.f1, "support": self.support})


def precision_recall_f1(data, label_col: str = "label", prediction_col: str = "prediction",
                        labels=None) -> Report:
    """Per class and macro-averaged. A class never predicted has precision 0, one never present recall 0
    (and F1 0 when both are 0), as scikit-learn reports them."""
    cm = confusion_matrix(data, label_col, prediction_col, labels)
    m = cm.matrix.astype(np.float64)
    tp, predicted, actual = np.diag(m), m.sum(axis=0), m.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(tp), where=both > 0)
    return Report(cm.labels, precision, recall, f1, actual.astype(np.int64))


@dataclass
class ConfusionMatrix:
    """``matrix[i, j]``: rows whose label is ``labels[i]`` and prediction ``labels[j]``."""

    labels: list
    matrix: np.ndarray
    names: list[str]

    def to_pandas(self) -> pd.DataFrame:
        return pd.DataFrame(self.matrix, index=pd.Index(self.names, name="label"),
                            columns=pd.Index(self.names, name="prediction"))

    def plot(self, path, title: str | None = None) -> str:
        """Draw the matrix with its counts and class names to ``path`` (.png/.svg/.pdf; a local path or any
        URL the store takes, written whole); returns where. Needs matplotlib (``tensorgrid[plot]``)."""
        check_path(path, "cm.png")
        k = len(self.labels)
        side = min(16.0, 2.5 + 0.55 * k)
        fig = new_figure((side + 1.2, side))
        ax = fig.add_subplot()
        image = ax.imshow(self.matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, shrink=0.8)
        ax.set_xticks(range(k), self.names, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center")
        ax.set_yticks(range(k), self.names)
        ax.set_xlabel("prediction")
        ax.set_ylabel("label")
        top = self.matrix.max() if self.matrix.size else 0
        for i in range(k):
            for j in range(k):
                count = int(self.matrix[i, j])
                ax.text(j, i, str(count), ha="center", va="center", fontsize=9,
                        color="white" if top and count > top / 2 else "black")
        ax.set_title(title or f"confusion matrix ({int(self.matrix.sum())} rows, accuracy "
                              f"{np.trace(self.matrix) / max(1, self.matrix.sum()):.3f})")
        return save_figure(fig, path)


def confusion_matrix(data, label_col: str = "label", prediction_col: str = "prediction", labels=None,
                     label_names: list[str] | None = None) -> ConfusionMatrix:
    """Counts of (label, prediction) pairs. ``labels``: the classes and their order (default: every value
    seen, sorted); ``label_names``: display names for integer classes 0..k-1 (default: a Dataset's
    ``label_names`` when the labels index them)."""
    y, p = _pair(data, label_col, prediction_col)
    seen = np.unique(np.concatenate([y, p]))
    labels = seen.tolist() if labels is None else list(labels)
    k = len(labels)
    # each row's class position by a search over the sorted labels (no per-row Python)
    try:
        order = np.argsort(np.asarray(labels, dtype=y.dtype), kind="stable")
        ranked = np.asarray(labels, dtype=y.dtype)[order]
        found = ranked[np.minimum(np.searchsorted(ranked, seen), k - 1)] == seen if k else np.zeros(len(seen), bool)
    except (TypeError, ValueError):  # classes of another kind than the column's values
        raise ArgumentError(f"labels {labels[:20]} are not of the kind {label_col!r} holds "
                            f"({seen[:5].tolist()}, ...)") from None
    if not found.all():
        raise ArgumentError(f"{seen[~found][:5].tolist()} in {label_col!r}/{prediction_col!r} are not among the "
                            f"labels {labels[:20]}")
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (order[np.searchsorted(ranked, y)], order[np.searchsorted(ranked, p)]), 1)
    if label_names is None:
        known = getattr(data, "label_names", None)
        if known and all(isinstance(v, int) and 0 <= v < len(known) for v in labels):
            label_names = list(known)
    if label_names is not None:
        if not all(isinstance(v, int) and 0 <= v < len(label_names) for v in labels):
            raise ArgumentError(f"label_names name classes 0..{len(label_names) - 1}; the labels are {labels[:20]}")
        names = [str(label_names[v]) for v in labels]
    else:
        names = [str(v) for v in labels]
    return ConfusionMatrix(labels, matrix, names)


def log_loss(data, label_col: str = "label", probability_col: str = "probability", eps: float = 1e-15) -> float:
    """Mean negative log of the probability given to each row's label (classes 0..k-1, the probability
    column's positions), probabilities clipped to [eps, 1 - eps]."""
    table = _read(data, [label_col, probability_col])
    y = _labels(table, label_col)
    probs = _matrix(table.column(probability_col), probability_col)
    if probs.shape[0] != len(y):
        raise ArgumentError(f"{probability_col!r} has {probs.shape[0]} rows of probabilities for {len(y)} labels")
    if not np.issubdtype(y.dtype, np.integer):
        raise ArgumentError(f"log_loss takes integer class labels in {label_col!r}, got {y.dtype}")
    bad = (y < 0) | (y >= probs.shape[1])
    if bad.any():
        raise ArgumentError(f"label {int(y[bad][0])} is outside the {probs.shape[1]} classes of {probability_col!r}")
    chosen = np.clip(probs[np.arange(len(y)), y], eps, 1 - eps)
    return float(-np.mean(np.log(chosen)))


# -- reading the columns ----------------------------------------------------------------------------------

def _read(data, columns: list[str]) -> pa.Table:
    if isinstance(data, pd.DataFrame):
        missing = [c for c in columns if c not in data.columns]
        if missing:
            raise ColumnNotFoundError(f"no column {missing[0]!r}; columns: {list(data.columns)}")
        table = pa.Table.from_pandas(data[columns], preserve_index=False)
    elif isinstance(data, pa.Table):
        missing = [c for c in columns if c not in data.column_names]
        if missing:
            raise ColumnNotFoundError(f"no column {missing[0]!r}; columns: {data.column_names}")
        table = data.select(columns)
    elif hasattr(data, "to_arrow") and hasattr(data, "schema"):  # a Dataset of any kind
        missing = [c for c in columns if c not in data.schema.names]
        if missing:
            raise ColumnNotFoundError(f"no column {missing[0]!r} in {getattr(data, 'url', None) or 'the dataset'}; "
                                      f"columns: {data.schema.names}")
        table = data.to_arrow(columns=columns)
    else:
        raise ArgumentError(f"evaluate takes a Dataset, a pandas DataFrame or an Arrow table, got "
                            f"{type(data).__name__}")
    if table.num_rows == 0:
        raise EmptyDataError("there are no rows to evaluate")
    for name in columns:
        if table.column(name).null_count:
            raise ArgumentError(f"column {name!r} has {table.column(name).null_count} nulls: drop those rows first")
    return table


def _labels(table: pa.Table, name: str) -> np.ndarray:
    col = table.column(name)
    if pa.types.is_floating(col.type):
        values = col.to_numpy()
        if not np.all(np.mod(values, 1) == 0):
            raise ArgumentError(f"column {name!r} holds fractional values: labels must be classes")
        return values.astype(np.int64)
    if pa.types.is_integer(col.type):
        return col.to_numpy().astype(np.int64)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type) or pa.types.is_boolean(col.type):
        return np.asarray(col.to_pylist(), dtype=object)
    raise ArgumentError(f"column {name!r} is {col.type}: labels and predictions are integers, strings or booleans")


def _pair(data, label_col: str, prediction_col: str) -> tuple[np.ndarray, np.ndarray]:
    table = _read(data, [label_col, prediction_col])
    y, p = _labels(table, label_col), _labels(table, prediction_col)
    if (y.dtype == object) != (p.dtype == object):
        raise ArgumentError(f"{label_col!r} and {prediction_col!r} hold different kinds of values "
                            f"({table.schema.field(label_col).type} and {table.schema.field(prediction_col).type})")
    return y, p


def _matrix(col, name: str) -> np.ndarray:
    """A probability column (lists, fixed-size lists or a 1-D tensor per row) as a (rows, classes) array."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if isinstance(col.type, pa.FixedShapeTensorType):
        return np.asarray(col.to_numpy_ndarray(), dtype=np.float64).reshape(len(col), -1)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        widths = np.unique(pc.list_value_length(col).to_numpy(zero_copy_only=False))
        if len(widths) != 1:
            raise ArgumentError(f"{name!r} holds probability lists of different lengths: {widths[:5].tolist()}")
        values = col.flatten()
        if values.null_count or not (pa.types.is_floating(values.type) or pa.types.is_integer(values.type)):
            raise ArgumentError(f"{name!r} must hold numbers without nulls, got {values.type}")
        out = values.to_numpy(zero_copy_only=False).astype(np.float64).reshape(len(col), int(widths[0]))
        if not np.all(np.isfinite(out)):
            raise ArgumentError(f"{name!r} holds values that are not finite numbers")
        return out
    raise ArgumentError(f"{name!r} is {col.type}: probabilities are a list of numbers per row")
