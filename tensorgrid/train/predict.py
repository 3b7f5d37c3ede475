"""Batch inference: a model over every row of a dataset, in order, in this process -> a new Dataset."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import torch

from ..allocator import tune_malloc
from ..args import check_int
from ..errors import ArgumentError, ColumnNotFoundError, TensorGridError
from ..loader import Loader
from ..loader.collate import LENGTHS
from ..store import Dataset, from_arrow, write
from ..store.encoding import numpy_to_tensor
from .features import feature_columns, forward, loader_stack, stack_features


def predict(model: torch.nn.Module, data, features="features", *, transform=None, batch_size: int = 256,
            out: str | None = None, classifier: bool = False, keep=None, mode: str = "create",
            label_names: list[str] | None = None, prediction_col: str = "prediction",
            probability_col: str = "probability") -> Dataset:
    """Run ``model`` over every row of ``data`` (a Dataset or a URL), in order, in this process (RANK and
    WORLD_SIZE are ignored); returns a Dataset with the ``keep`` columns (default: all but ``features``) and
    ``prediction``, written to ``out`` (with ``mode``) when given, else in memory. ``features``: a column,
    or a list of numeric columns stacked into one float32 tensor per batch, as the trainer does (a wide table).

    ``transform`` runs on each batch as in training. ``classifier=True``: the model's 2-D outputs are class
    scores (logits or log-probabilities): ``prediction`` is the argmax (int64), ``probability`` the softmax
    (float32 tensors) and, when there are class names, ``prediction_label`` the class name: names from
    ``label_names``, else the data's own (``ds.label_names``, which a test split of an ingested image folder
    keeps); their number must match the model's outputs. Otherwise ``prediction`` is the output itself (a
    scalar per row when it has one value, else a tensor). A kept column named ``prediction``,
    ``probability`` or ``prediction_label`` is replaced (Spark ML's names; ``prediction_col`` and
    ``probability_col`` rename the first two). A transform gets every column; without one, only
    ``keep`` and ``features`` are read. The model runs in eval mode on its own device under
    ``torch.inference_mode()``; its train/eval flags are restored afterwards.
    """
    if not isinstance(model, torch.nn.Module):
        raise ArgumentError(f"model must be an nn.Module, got {type(model).__name__}")
    job = Inference(data, features, transform=transform, batch_size=batch_size, classifier=classifier, keep=keep,
                    label_names=label_names, prediction_col=prediction_col, probability_col=probability_col)
    batches = job.batches(model)
    if out is None:
        return from_arrow(pa.Table.from_batches(list(batches)))
    return write(out, batches, mode=mode)


class Inference:
    """What ``predict`` runs over a dataset, checked once; picklable, so that a worker runs it over a part of
    the rows (``batches(model, rows)``, rows: a view of the dataset) with the same columns and names."""

    def __init__(self, data, features="features", *, transform=None, batch_size: int = 256,
                 classifier: bool = False, keep=None, label_names: list[str] | None = None,
                 prediction_col: str = "prediction", probability_col: str = "probability"):
        self.ds = ds = _dataset(data)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.features, self.transform, self.classifier = features, transform, bool(classifier)
        inputs = feature_columns(features) if features is not None else []
        self.keep = _keep(ds, inputs, keep)
        self.names = _label_names(ds, label_names, self.classifier)
        # a transform may read any column: it gets them all; else only what is kept and the features are read
        self.columns = None if transform is not None else list(dict.fromkeys([*self.keep, *inputs]))
        self.stack = None if transform is not None else loader_stack(ds.schema, features, self.keep)
        for name, value in (("prediction_col", prediction_col), ("probability_col", probability_col)):
            if not isinstance(value, str) or not value:
                raise ArgumentError(f"{name} must be a column name, got {value!r}")
        self.outputs = (prediction_col, probability_col)

    def batches(self, model: torch.nn.Module, rows: Dataset | None = None) -> Iterator[pa.RecordBatch]:
        """Record batches of the kept columns plus the predictions, over ``rows`` (default: all the data)."""
        tune_malloc()  # the model's per-batch activations reuse freed memory, not fresh pages (allocator.py)
        # one pass: cached shards are read from the cache, none is built for it
        loader = Loader(self.ds if rows is None else rows, self.batch_size, columns=self.columns,
                        transform=self.transform, rank=0, world_size=1, cache_fill=False, stack=self.stack)
        loader.ramp = rows is None  # a part of a job (rows given) is not the first batch anyone waits for
        return _batches(model, loader, self.features, self.keep, self.classifier, self.names, self.outputs)


def _dataset(data) -> Dataset:
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str):
        from ..store import open as open_dataset

        return open_dataset(data)
    raise ArgumentError(f"data must be a Dataset (tg.open/tg.write/tg.from_arrow/SQL) or a URL, got "
                        f"{type(data).__name__}")


def _keep(ds: Dataset, inputs: list[str], keep) -> list[str]:
    names = ds.schema.names
    missing = [c for c in inputs if c not in names]
    if missing or not inputs:
        raise ColumnNotFoundError(f"predict: features must be a column or a list of columns of the dataset; "
                                  f"missing: {missing or inputs}; columns: {names}")
    if keep is None:
        return [c for c in names if c not in inputs]
    keep = [keep] if isinstance(keep, str) else list(keep)
    missing = [c for c in keep if c not in names]
    if missing:
        raise ColumnNotFoundError(f"predict: keep names {missing[0]!r}, which the dataset does not have; "
                                  f"columns: {names}")
    return keep


def _label_names(ds: Dataset, label_names, classifier: bool) -> list | None:
    """The class names predictions are named by: given, else the data's own (None: no names)."""
    if label_names is None:
        return ds.label_names if classifier else None
    if not classifier:
        raise ArgumentError("label_names names the classes of a classifier: pass classifier=True with it")
    if isinstance(label_names, str) or not isinstance(label_names, (list, tuple)) or not label_names or \
            not all(isinstance(n, str) for n in label_names):
        raise ArgumentError(f"label_names must be a non-empty list of class names, got {label_names!r}")
    return list(label_names)


GROUP_ROWS = 32_768  # outputs are turned into Arrow columns this many rows at a time, not per batch,
GROUP_BYTES = 32 << 20  # or fewer when they hold more than this (a segmentation model's outputs)


def _batches(model: torch.nn.Module, loader: Loader, features, keep: list[str],
             classifier: bool, names: list | None = None,
             outputs: tuple[str, str] = ("prediction", "probability")) -> Iterator[pa.RecordBatch]:
    """Record batches of the kept columns plus the model's predictions, in order: the loader's batches'
    outputs are gathered as numpy and turned into Arrow once per ~GROUP_ROWS rows (per batch, the
    conversions cost as much as a small model's layers)."""
    modes = [(m, m.training) for m in model.modules()]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.eval()
    pending, rows, size = [], 0, 0
    try:
        for batch in loader:
            x = stack_features(batch, features)
            with torch.inference_mode():  # no autograd bookkeeping at all (the outputs leave torch)
                y = forward(model, x.to(device) if isinstance(x, torch.Tensor) else x, features)
            if not isinstance(y, torch.Tensor):
                raise TensorGridError(f"predict: the model returned a {type(y).__name__}, not a tensor")
            cols = {c: _raw(batch[c], batch.get(c + LENGTHS)) for c in keep
                    if c not in (*outputs, "prediction_label")}
            cols.update(_outputs(y.detach().cpu(), classifier, outputs))
            pending.append(cols)
            rows += len(y)
            size += sum(getattr(v, "nbytes", 0) for v in cols.values())
            if rows >= GROUP_ROWS or size >= GROUP_BYTES:
                yield _group(pending, names, outputs, classifier)
                pending, rows, size = [], 0, 0
        if pending:
            yield _group(pending, names, outputs, classifier)
    finally:
        for m, training in modes:
            m.training = training


def _raw(v, lengths=None):
    """A kept column of one batch as numpy when it is a plain tensor (joined with the next batches' before
    it becomes Arrow), else as Arrow now."""
    if isinstance(v, torch.Tensor) and lengths is None:
        return v.numpy()
    return _column(v, lengths)


def _group(pending: list[dict], names: list | None, outputs: tuple[str, str], classifier: bool) -> pa.RecordBatch:
    cols = {}
    for c in pending[0]:
        parts = [p[c] for p in pending]
        if all(isinstance(a, np.ndarray) for a in parts):
            cols[c] = _column(parts[0] if len(parts) == 1 else np.concatenate(parts))
        else:  # some batches as Arrow already (a column with nulls arrives as a list): one type for all, the
            # tensors' (the data's own dtype) when a batch had one, else the first that is not all nulls
            arrays = [a if isinstance(a, pa.Array) else _column(a) for a in parts]
            kind = next((x.type for a, x in zip(parts, arrays) if isinstance(a, np.ndarray)), None) or next(
                (x.type for x in arrays if not pa.types.is_null(x.type)), arrays[0].type)
            cols[c] = pa.concat_arrays([x if x.type == kind else x.cast(kind, safe=False) for x in arrays])
    if names is not None and outputs[1] in cols:
        cols["prediction_label"] = _named(cols[outputs[0]], names, cols[outputs[1]].type.shape[0])
    return pa.RecordBatch.from_pydict(cols)


def _outputs(y: torch.Tensor, classifier: bool, names: tuple[str, str] = ("prediction", "probability")) -> dict:
    """The model's outputs of one batch as numpy: a classifier's predicted index and probabilities, else the
    outputs (one value per row when the model gives one)."""
    if classifier and y.ndim == 2:
        p = torch.softmax(y.float(), dim=1).numpy()
        return {names[0]: p.argmax(axis=1).astype(np.int64), names[1]: p.astype(np.float32, copy=False)}
    yn = y.float().numpy()
    return {names[0]: yn.reshape(len(yn)) if yn.ndim == 2 and yn.shape[1] == 1 else yn}


def _named(prediction: pa.Array, names: list, classes: int) -> pa.Array:
    """The class name of each predicted index."""
    if classes != len(names):
        raise TensorGridError(f"predict: the model scores {classes} classes but there are {len(names)} label "
                              f"names ({names[:5]}{', ...' if len(names) > 5 else ''}): pass the model's own "
                              "classes as label_names=")
    return pa.array(names, pa.string()).take(prediction)


def _column(v, lengths=None):
    if lengths is not None and isinstance(v, torch.Tensor) and v.ndim == 2:  # a list column the loader padded
        n = lengths.numpy()
        keep = np.arange(v.shape[1])[None, :] < n[:, None]
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(v.numpy()[keep]))
    a = v.numpy() if isinstance(v, torch.Tensor) else v
    if isinstance(a, np.ndarray):
        return pa.array(a) if a.ndim == 1 else numpy_to_tensor(a)
    return pa.array(v)
