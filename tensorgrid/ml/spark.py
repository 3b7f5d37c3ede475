"""The ML stages as real ``pyspark.ml`` stages: ``NNEstimator`` / ``NNClassifier`` (Estimators) and ``NNModel``
(a Model), with Spark Params, so they sit in a ``pyspark.ml.Pipeline`` beside MLlib's stages, save and load
with it, and score batch and streaming DataFrames. Only Spark users import this module (``tensorgrid.ml``
does not), so pyspark is imported at its top.

Training is the core stages' (``tensorgrid.ml.stages``) on the Spark engine: the features column becomes a
tensor column (an MLlib vector through ``vector_to_array``, an array, or tensor bytes) and the core fit stages
it. Scoring is a pandas UDF: the pickled model is broadcast once, and each executor Python process
unpickles it once (a module-level cache keyed by the bytes' hash), then reuses it for every later batch and
micro-batch that process runs (Spark reuses its Python workers).

Columns out, as MLlib's: a classifier adds ``prediction`` (double: the argmax), ``probability`` (a vector:
the softmax) and ``rawPrediction`` (a vector: the model's outputs); set either of the last two to "" to
leave it out. Any other model adds ``prediction``: a double when it outputs one value per row, else an
array<float> of the outputs flattened, carrying their shape as tensor metadata.

The torch objects (``model``, ``criterion``, ``optimizer``, ``transform``) are not Params (not JSON): they
are constructor arguments kept as attributes (``transform_fn`` for ``transform``), saved as a cloudpickle
file beside the Params' metadata. ``transform`` sees the features and the label in fit (the other columns
are not passed on) and ``{featuresCol: tensor}`` alone when scoring.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import cloudpickle
import numpy as np
import pandas as pd
import torch
from pyspark import keyword_only
from pyspark.ml import Estimator, Model
from pyspark.ml.functions import array_to_vector, vector_to_array
from pyspark.ml.linalg import VectorUDT
from pyspark.ml.param import Param, Params, TypeConverters
from pyspark.ml.param.shared import (
    HasFeaturesCol,
    HasLabelCol,
    HasPredictionCol,
    HasProbabilityCol,
    HasRawPredictionCol,
    HasSeed,
)
from pyspark.ml.util import (
    DefaultParamsReader,
    DefaultParamsWriter,
    MLReadable,
    MLReader,
    MLWritable,
    MLWriter,
)
from pyspark.sql import functions as F
from pyspark.sql import types as T
from pyspark.sql.functions import pandas_udf

from .. import fs as tgfs
from ..allocator import tune_malloc
from ..errors import ArgumentError, ColumnNotFoundError, TrainingConfigError
from ..store.spark import TENSOR_KEY
from . import stages as core

TORCH_FILE = "torch.pkl"  # beside the metadata folder DefaultParamsWriter writes
_KEEP_MODELS = 4  # models kept loaded per executor Python process (a pipeline may score with several)
_LABEL_ERROR = "NNClassifier: label column"  # starts the message of a label that is no class index


# --- Params ---------------------------------------------------------------------------------------
class _Shared(HasFeaturesCol, HasPredictionCol):
    batchSize = Param(Params._dummy(), "batchSize", "rows per forward pass (estimators: the global training "
                      "batch, split across workers)", typeConverter=TypeConverters.toInt)

    def getBatchSize(self) -> int:
        return self.getOrDefault(self.batchSize)

    def setBatchSize(self, value: int):
        return self._set(batchSize=value)

    def setFeaturesCol(self, value: str):
        return self._set(featuresCol=value)

    def setPredictionCol(self, value: str):
        return self._set(predictionCol=value)


class _ClassifierCols(HasProbabilityCol, HasRawPredictionCol):
    def setProbabilityCol(self, value: str):
        return self._set(probabilityCol=value)

    def setRawPredictionCol(self, value: str):
        return self._set(rawPredictionCol=value)


class _EstimatorParams(_Shared, HasLabelCol, HasSeed):
    maxEpoch = Param(Params._dummy(), "maxEpoch", "passes over the training data", typeConverter=TypeConverters.toInt)
    workers = Param(Params._dummy(), "workers", "Spark training tasks (data-parallel ranks, all started together)",
                    typeConverter=TypeConverters.toInt)

    def getMaxEpoch(self) -> int:
        return self.getOrDefault(self.maxEpoch)

    def getWorkers(self) -> int:
        return self.getOrDefault(self.workers)

    def setMaxEpoch(self, value: int):
        return self._set(maxEpoch=value)

    def setWorkers(self, value: int):
        return self._set(workers=value)

    def setLabelCol(self, value: str):
        return self._set(labelCol=value)

    def setSeed(self, value: int):
        return self._set(seed=value)


class _ModelParams(_Shared, _ClassifierCols):
    classifier = Param(Params._dummy(), "classifier", "outputs are class scores: prediction is their argmax, "
                       "probability their softmax", typeConverter=TypeConverters.toBoolean)
    featuresShape = Param(Params._dummy(), "featuresShape", "the shape of one row's features the model takes "
                          "([] : each row's values, flat)", typeConverter=TypeConverters.toListInt)
    featuresDtype = Param(Params._dummy(), "featuresDtype", "the dtype of the features (of binary tensor bytes; "
                          "arrays and vectors are cast to it)", typeConverter=TypeConverters.toString)

    def getClassifier(self) -> bool:
        return self.getOrDefault(self.classifier)

    def getFeaturesShape(self) -> list[int]:
        return self.getOrDefault(self.featuresShape)

    def getFeaturesDtype(self) -> str:
        return self.getOrDefault(self.featuresDtype)

    def setClassifier(self, value: bool):
        return self._set(classifier=value)

    def setFeaturesShape(self, value: list[int]):
        return self._set(featuresShape=value)

    def setFeaturesDtype(self, value: str):
        return self._set(featuresDtype=value)


# --- persistence: the Params' metadata as DefaultParamsWriter writes it, the torch objects beside it ----
class _TorchWritable(MLWritable, MLReadable):
    _torch_attrs: tuple[str, ...] = ()

    def _apply(self, kwargs: dict):
        """Constructor / setParams arguments: torch objects to attributes, the rest to Params (None: unset)."""
        for name in self._torch_attrs:
            key = "transform" if name == "transform_fn" else name
            if key in kwargs:
                setattr(self, name, kwargs.pop(key))
        return self._set(**{k: v for k, v in kwargs.items() if v is not None})

    def write(self) -> MLWriter:
        return _Writer(self)

    @classmethod
    def read(cls) -> MLReader:
        return _Reader(cls)


class _Writer(MLWriter):
    def __init__(self, instance: _TorchWritable):
        super().__init__()
        self.instance = instance

    def saveImpl(self, path: str) -> None:
        objects = {name: getattr(self.instance, name) for name in self.instance._torch_attrs}
        try:
            data = cloudpickle.dumps(objects)
        except Exception as e:  # noqa: BLE001 - whatever a user's object raises
            raise ArgumentError(f"{type(self.instance).__name__}: its {', '.join(objects)} cannot be pickled: "
                                f"{type(e).__name__}: {e}") from None
        DefaultParamsWriter.saveMetadata(self.instance, path, self.sc, extraMetadata={"tensorgrid": TORCH_FILE})
        fs, root = tgfs.resolve(path)
        tgfs.put_atomic(fs, tgfs.join(root, TORCH_FILE), data)


class _Reader(MLReader):
    def __init__(self, cls: type):
        super().__init__()
        self.cls = cls

    def load(self, path: str):
        metadata = DefaultParamsReader.loadMetadata(path, self.sc)
        module, _, name = metadata["class"].rpartition(".")
        cls = getattr(__import__(module, fromlist=[name]), name, None)
        if not (isinstance(cls, type) and issubclass(cls, self.cls)):
            raise ArgumentError(f"{path} holds a saved {metadata['class']}, not a {self.cls.__name__}")
        instance = cls()
        instance._resetUid(metadata["uid"])
        DefaultParamsReader.getAndSetParams(instance, metadata)
        fs, root = tgfs.resolve(path)
        where = tgfs.join(root, metadata.get("tensorgrid", TORCH_FILE))
        try:
            objects = cloudpickle.loads(fs.cat_file(where))
        except Exception as e:  # noqa: BLE001 - missing, truncated, or made by code this process lacks
            raise ArgumentError(f"{where}: the saved torch objects cannot be loaded ({type(e).__name__}: {e})"[:400]) \
                from None
        for attr, value in objects.items():
            setattr(instance, attr, value)
        return instance


# --- the stages -----------------------------------------------------------------------------------
class NNModel(Model, _ModelParams, _TorchWritable):
    """A fitted ``nn.Module`` as a Spark Model: ``transform`` adds the prediction columns (see the module
    docstring) to a batch or streaming DataFrame; the features column is an MLlib vector, an array of
    numbers or tensor bytes (BinaryType with ``tensorgrid.tensor`` metadata)."""

    _torch_attrs = ("model", "transform_fn")

    @keyword_only
    def __init__(self, *, model: torch.nn.Module | None = None, transform=None, featuresCol: str = "features",
                 predictionCol: str = "prediction", probabilityCol: str = "probability",
                 rawPredictionCol: str = "rawPrediction", batchSize: int = 1024, classifier: bool = False,
                 featuresShape: list[int] | None = None, featuresDtype: str = "float32"):
        kwargs = self._input_kwargs
        super().__init__()
        self.model, self.transform_fn, self.history = None, None, []
        self._broadcast = None  # (content hash, Broadcast) of the pickled model, made by the first transform
        self._setDefault(batchSize=1024, classifier=False, featuresShape=[], featuresDtype="float32")
        self._apply(kwargs)

    @keyword_only
    def setParams(self, *, model=None, transform=None, featuresCol=None, predictionCol=None, probabilityCol=None,
                  rawPredictionCol=None, batchSize=None, classifier=None, featuresShape=None, featuresDtype=None):
        return self._apply(self._input_kwargs)

    def _transform(self, dataset):
        if not isinstance(self.model, torch.nn.Module):
            raise ArgumentError(f"NNModel needs an nn.Module as model=, got {type(self.model).__name__}")
        col = self.getFeaturesCol()
        layout = _layout(_field(dataset, col, "featuresCol"), self.getFeaturesShape(), self.getFeaturesDtype())
        layout = self._checked_shape(layout, dataset)
        spec = _ScoreSpec(col, layout.kind, layout.dtype, tuple(layout.shape or ()), self.getBatchSize(),
                          self.getClassifier(), *self._loaded_on_executors(dataset))
        returned = _returned(spec, self.model, self.transform_fn, self.getProbabilityCol(), self.getRawPredictionCol())
        score = pandas_udf(_udf(spec), returnType=T.StructType([T.StructField(n, t) for n, t, _ in returned]))
        scored = f"__tensorgrid_scores_{uuid.uuid4().hex[:8]}"
        arg = vector_to_array(_c(col), "float32") if layout.kind == "vector" else _c(col)
        out = dataset.withColumn(scored, score(arg))
        names = {"prediction": self.getPredictionCol(), "probability": self.getProbabilityCol(),
                 "raw": self.getRawPredictionCol()}
        for field, _, meta in returned:
            value = _c(scored).getField(field)
            out = out.withColumn(names[field], array_to_vector(value) if field != "prediction" else value)
            if meta:
                out = out.withMetadata(names[field], {TENSOR_KEY: meta})
        return out.drop(scored)

    def _checked_shape(self, layout: _Layout, dataset) -> _Layout:
        """The layout with a shape: the column's own, else the model's (featuresShape), else (a batch
        DataFrame) the first row's length; refused when the column's and the model's differ in size."""
        fitted = self.getFeaturesShape()
        if layout.shape and fitted and _size(layout.shape) != _size(fitted):
            raise ArgumentError(f"column {self.getFeaturesCol()!r} holds features of shape {layout.shape} "
                                f"({_size(layout.shape)} values) but the model takes shape {fitted} "
                                f"({_size(fitted)} values)")
        if layout.shape or fitted:
            return _Layout(layout.kind, layout.dtype, layout.shape or fitted)
        if dataset.isStreaming:
            if self.getClassifier():
                return layout  # the columns out do not depend on it: each row's values, flat
            raise ArgumentError(f"column {self.getFeaturesCol()!r} does not say its shape (no {TENSOR_KEY!r} metadata) "
                                "and the output's type depends on it: setFeaturesShape([...]) on the NNModel")
        return _Layout(layout.kind, layout.dtype, _first_row_shape(dataset, self.getFeaturesCol(), layout))

    def _loaded_on_executors(self, dataset) -> tuple[str, object]:
        """(content hash, broadcast) of the pickled model and transform, made once per model."""
        try:
            data = cloudpickle.dumps((self.model, self.transform_fn))
        except Exception as e:  # noqa: BLE001
            raise ArgumentError(f"the model or transform cannot be pickled for the executors: "
                                f"{type(e).__name__}: {e}") from None
        key = hashlib.sha256(data).hexdigest()[:24]
        if self._broadcast is None or self._broadcast[0] != key:
            self._broadcast = (key, dataset.sparkSession.sparkContext.broadcast(data))
        return self._broadcast


class NNEstimator(Estimator, _EstimatorParams, _TorchWritable):
    """Trains ``model`` with ``criterion`` (and ``optimizer``: a function of the parameters, default Adam lr
    1e-3) on the Spark engine with ``workers`` tasks; ``fit`` returns an ``NNModel`` whose prediction is
    the model's output. ``transform``: fn(batch dict) -> batch, on each training batch (and on the
    features when scoring)."""

    _torch_attrs = ("model", "criterion", "optimizer", "transform_fn")
    _core = core.NNEstimator

    @keyword_only
    def __init__(self, *, model=None, criterion=None, optimizer=None, transform=None, featuresCol: str = "features",
                 labelCol: str = "label", predictionCol: str = "prediction", batchSize: int = 32,
                 maxEpoch: int = 10, seed: int = 0, workers: int = 1):
        kwargs = self._input_kwargs
        super().__init__()
        self.model = self.criterion = self.optimizer = self.transform_fn = None
        self._setDefault(batchSize=32, maxEpoch=10, seed=0, workers=1)
        self._apply(kwargs)

    @keyword_only
    def setParams(self, *, model=None, criterion=None, optimizer=None, transform=None, featuresCol=None,
                  labelCol=None, predictionCol=None, batchSize=None, maxEpoch=None, seed=None, workers=None):
        return self._apply(self._input_kwargs)

    def _fit(self, dataset) -> NNModel:
        col, label = self.getFeaturesCol(), self.getLabelCol()
        layout = _layout(_field(dataset, col, "featuresCol"), [], "float32")
        label_type = _field(dataset, label, "labelCol").dataType
        if layout.shape is None:
            layout = _Layout(layout.kind, layout.dtype, _first_row_shape(dataset, col, layout))
        prepared = dataset.select(_as_tensor(col, layout), self._label(label, label_type))
        stage = self._core(self.model, self.criterion, optimizer=self.optimizer, batch_size=self.getBatchSize(),
                           max_epoch=self.getMaxEpoch(), features_col=col, label_col=label,
                           transform=self.transform_fn, prediction_col=self.getPredictionCol(), seed=self.getSeed())
        try:
            fitted = stage.fit(prepared, engine="spark", workers=self.getWorkers())
        except Exception as e:
            found = re.search(re.escape(_LABEL_ERROR) + r".*?StringIndexer makes them\)", str(e))
            if found:
                raise TrainingConfigError(found.group(0)) from None
            raise
        model = NNModel(model=fitted.model, transform=self.transform_fn, featuresCol=col,
                        predictionCol=self.getPredictionCol(), batchSize=max(1024, self.getBatchSize()),
                        classifier=self._core.classifier, featuresShape=list(layout.shape),
                        featuresDtype=layout.dtype)
        if isinstance(self, _ClassifierCols):
            model._set(probabilityCol=self.getProbabilityCol(), rawPredictionCol=self.getRawPredictionCol())
        model.history = fitted.history
        return model

    def _label(self, name: str, dtype: T.DataType):
        """The label as the core trainer takes it: float32 numbers for a regression (arrays as they are)."""
        if isinstance(dtype, T.NumericType):
            return _c(name).cast("float").alias(name)
        if isinstance(dtype, T.ArrayType):
            return _c(name)
        raise TrainingConfigError(f"label column {name!r} is {dtype.simpleString()}: a regression label is a number "
                                  "or an array of numbers")


class NNClassifier(NNEstimator, _ClassifierCols):
    """``NNEstimator`` for class labels: integer class indices 0, 1, 2, ... (or whole doubles, as
    ``StringIndexer`` makes them); the model outputs one score per class and the ``NNModel`` adds
    ``prediction`` (double), ``probability`` and ``rawPrediction`` (vectors), as MLlib classifiers do."""

    _core = core.NNClassifier

    @keyword_only
    def __init__(self, *, model=None, criterion=None, optimizer=None, transform=None, featuresCol: str = "features",
                 labelCol: str = "label", predictionCol: str = "prediction", probabilityCol: str = "probability",
                 rawPredictionCol: str = "rawPrediction", batchSize: int = 32, maxEpoch: int = 10, seed: int = 0,
                 workers: int = 1):
        kwargs = self._input_kwargs
        super().__init__()
        self._apply(kwargs)

    @keyword_only
    def setParams(self, *, model=None, criterion=None, optimizer=None, transform=None, featuresCol=None,
                  labelCol=None, predictionCol=None, probabilityCol=None, rawPredictionCol=None, batchSize=None,
                  maxEpoch=None, seed=None, workers=None):
        return self._apply(self._input_kwargs)

    def _label(self, name: str, dtype: T.DataType):
        """Class indices as int64; a fractional label fails the staging job with a message ``_fit`` names."""
        y = _c(name)
        if isinstance(dtype, T.IntegralType):
            return y.cast("long").alias(name)
        if isinstance(dtype, T.FractionalType):
            bad = F.concat(F.lit(f"{_LABEL_ERROR} {name!r} holds "), y.cast("string"),
                           F.lit(": NNClassifier takes class indices 0, 1, 2, ... (StringIndexer makes them)"))
            return F.when(y.isNull() | (y == F.floor(y)), y.cast("long")).otherwise(F.raise_error(bad)).alias(name)
        raise TrainingConfigError(f"label column {name!r} is {dtype.simpleString()}: NNClassifier takes class indices "
                                  "0, 1, 2, ... (index string labels with pyspark.ml.feature.StringIndexer)")


# --- the features column --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    kind: str  # "vector" (MLlib), "array" or "binary" (row-major tensor bytes)
    dtype: str  # numpy name of what the model is given (before its transform)
    shape: list[int] | None  # one row's; None: not known from the schema


def _c(name: str):
    """A column by its exact name (dots and backticks in it are not paths)."""
    return F.col("`" + name.replace("`", "``") + "`")


def _field(dataset, name: str, param: str) -> T.StructField:
    if name not in dataset.columns:
        raise ColumnNotFoundError(f"{param} {name!r} is not a column of the DataFrame; its columns: {dataset.columns}")
    return dataset.schema[name]


def _size(shape) -> int:
    return int(np.prod(shape)) if shape else 0


def _layout(field: T.StructField, fitted_shape: list[int], dtype: str) -> _Layout:
    """How the features column holds a row (from its type and metadata; ``fitted_shape`` and ``dtype``,
    the model's, fill what the schema does not say)."""
    meta = (field.metadata or {}).get(TENSOR_KEY)
    t = field.dataType
    if isinstance(t, VectorUDT):
        n = ((field.metadata or {}).get("ml_attr") or {}).get("num_attrs")
        return _Layout("vector", "float32", [int(n)] if n else None)
    numeric = isinstance(t, T.ArrayType) and isinstance(t.elementType, T.NumericType) \
        and not isinstance(t.elementType, T.DecimalType)
    if not (numeric or isinstance(t, T.BinaryType)):
        raise ArgumentError(f"column {field.name!r} is {t.simpleString()}: features are an MLlib vector "
                            f"(VectorAssembler), an array of numbers, or tensor bytes (binary with {TENSOR_KEY!r} "
                            "metadata)")
    if meta is not None:
        try:
            meta = json.loads(meta) if isinstance(meta, str) else meta
            shape = [int(d) for d in meta["shape"]]
            dtype = str(np.dtype(meta.get("dtype", dtype)))
        except (KeyError, TypeError, ValueError):
            raise ArgumentError(f"column {field.name!r}: its {TENSOR_KEY!r} metadata {meta!r} is not "
                                "{'dtype': 'float32', 'shape': [8, 8]}") from None
        return _Layout("array" if numeric else "binary", dtype, shape)
    if not numeric and not fitted_shape:
        raise ArgumentError(f"column {field.name!r} is binary without {TENSOR_KEY!r} metadata: give the column "
                            "withMetadata(name, {'tensorgrid.tensor': {'dtype': ..., 'shape': [...]}}) or the "
                            "NNModel featuresShape and featuresDtype")
    return _Layout("array" if numeric else "binary", dtype, list(fitted_shape) or None)


def _first_row_shape(dataset, col: str, layout: _Layout) -> list[int]:
    """The length of the first row's features (a job reading one row), for columns whose schema says none."""
    if layout.kind == "binary":
        raise ArgumentError(f"column {col!r}: binary features need their shape ({TENSOR_KEY!r} metadata)")
    values = vector_to_array(_c(col)) if layout.kind == "vector" else _c(col)
    row = dataset.select(F.size(values).alias("n")).where(F.col("n") >= 0).first()
    if row is None:
        raise ArgumentError(f"column {col!r} has no non-null row to take the features' shape from")
    return [int(row["n"])]


def _as_tensor(col: str, layout: _Layout):
    """The features as the core bridge stores a tensor column: the values with their dtype and shape."""
    values = vector_to_array(_c(col), "float32") if layout.kind == "vector" else _c(col)
    return values.alias(col, metadata={TENSOR_KEY: {"dtype": layout.dtype, "shape": list(layout.shape)}})


# --- scoring on the executors ---------------------------------------------------------------------
@dataclass(frozen=True)
class _ScoreSpec:
    """What a scoring task needs, small enough to ship with every task (the model goes by broadcast)."""
    col: str
    kind: str
    dtype: str
    shape: tuple
    batch_size: int
    classifier: bool
    key: str  # the pickled model's content hash: the cache key in each executor process
    broadcast: object


_MODELS: OrderedDict = OrderedDict()  # content hash -> (module, transform), per executor Python process


def _loaded(key: str, broadcast) -> tuple:
    """The model (in eval mode) and transform of ``broadcast``, unpickled at most once in this process."""
    hit = _MODELS.get(key)
    if hit is None:
        module, transform = cloudpickle.loads(broadcast.value)
        hit = _MODELS[key] = (module.eval(), transform)
        while len(_MODELS) > _KEEP_MODELS:
            _MODELS.popitem(last=False)
    else:
        _MODELS.move_to_end(key)
    return hit


def _udf(spec: _ScoreSpec):
    def score(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        return _score(spec, batches)

    return score


def _score(spec: _ScoreSpec, batches) -> Iterator[pd.DataFrame]:
    torch.set_num_threads(_task_cpus())  # Spark runs one task per spark.task.cpus cores (default 1)
    tune_malloc()  # a reused Python worker keeps freed activations for the next batch (allocator.py)
    module, transform = _loaded(spec.key, spec.broadcast)
    for series in batches:
        x = _features(series, spec)
        outs = []
        with torch.no_grad():
            for start in range(0, len(x), spec.batch_size):
                outs.append(_forward(module, transform, x[start:start + spec.batch_size], spec.col))
        out = np.concatenate(outs) if outs else np.zeros((0, 1), np.float32)
        yield _columns(out, spec.classifier)


def _task_cpus() -> int:
    from pyspark import TaskContext

    ctx = TaskContext.get()
    try:
        return max(1, int(ctx.cpus())) if ctx is not None else 1
    except (AttributeError, TypeError, ValueError):  # cpus() is pyspark >= 3.3
        return 1


def _forward(module, transform, x: np.ndarray, col: str) -> np.ndarray:
    t = torch.from_numpy(x)
    if transform is not None:
        t = transform({col: t})[col]
    elif not t.is_floating_point():
        t = t.float()
    out = module(t)
    if not isinstance(out, torch.Tensor):
        raise ArgumentError(f"the model returned a {type(out).__name__}; NNModel scores models that return a tensor")
    return out.float().reshape(len(x), -1).numpy()


def _columns(out: np.ndarray, classifier: bool) -> pd.DataFrame:
    if classifier:
        probability = torch.softmax(torch.from_numpy(out), dim=1).numpy()
        return pd.DataFrame({"prediction": out.argmax(axis=1).astype(np.float64), "probability": list(probability),
                             "raw": list(out)})
    if out.shape[1] == 1:
        return pd.DataFrame({"prediction": out[:, 0].astype(np.float64)})
    return pd.DataFrame({"prediction": list(out)})


def _features(series: pd.Series, spec: _ScoreSpec) -> np.ndarray:
    """A batch of the features column as one (rows, *shape) array of the layout's dtype."""
    if series.isna().any():
        raise ArgumentError(f"column {spec.col!r} holds a null in row {int(np.argmax(series.isna().to_numpy()))} "
                            "of a batch: drop or fill nulls before scoring")
    n, dtype = len(series), np.dtype(spec.dtype)
    if n == 0:
        return np.zeros((0, *spec.shape), dtype)
    rows = series.to_numpy()
    lengths = np.fromiter(map(len, rows), np.int64, n)
    if spec.kind == "binary":
        width = _size(spec.shape) * dtype.itemsize
        if (lengths != width).any():
            raise ArgumentError(f"column {spec.col!r} holds tensors of shape {list(spec.shape)} {dtype} ({width} "
                                f"bytes) but a row holds {int(lengths[lengths != width][0])} bytes")
        data = bytearray(b"".join(rows))  # writable: torch takes it without a copy
        return np.frombuffer(data, dtype).reshape(n, *spec.shape)
    width = _size(spec.shape) or int(lengths[0])
    if (lengths != width).any():
        raise ArgumentError(f"column {spec.col!r}: a row holds {int(lengths[lengths != width][0])} values but the model "
                            f"takes features of shape {list(spec.shape or [width])} ({width} values)")
    return np.concatenate(rows).astype(dtype, copy=False).reshape(n, *(spec.shape or (width,)))  # no per-row stack


def _returned(spec: _ScoreSpec, module: torch.nn.Module, transform, probability_col: str,
              raw_col: str) -> list[tuple[str, T.DataType, dict | None]]:
    """The UDF's result fields (name, type, tensor metadata): a classifier's are fixed; another model's
    depend on its output's shape, found by running it on two rows of zeros here."""
    if spec.classifier:
        floats = T.ArrayType(T.FloatType(), containsNull=False)
        fields = [("prediction", T.DoubleType(), None)]
        fields += [("probability", floats, None)] if probability_col else []
        fields += [("raw", floats, None)] if raw_col else []
        if spec.shape:
            _probe(module, transform, spec)
        return fields
    out = _probe(module, transform, spec)
    if out.numel() == 1:
        return [("prediction", T.DoubleType(), None)]
    return [("prediction", T.ArrayType(T.FloatType(), containsNull=False), {"dtype": "float32", "shape": list(out.shape)})]


def _probe(module: torch.nn.Module, transform, spec: _ScoreSpec) -> torch.Tensor:
    """One row's output, from two rows of zeros of the features' shape (the model's eval mode restored)."""
    x = np.zeros((2, *spec.shape), np.dtype(spec.dtype))
    modes = [(m, m.training) for m in module.modules()]  # each module's own flag (a frozen BatchNorm stays so)
    module.eval()
    try:
        with torch.no_grad():
            t = torch.from_numpy(x)
            t = transform({spec.col: t})[spec.col] if transform is not None else t.float()
            out = module(t)
    except Exception as e:  # noqa: BLE001 - the model's own error, reported with the shape tried
        raise ArgumentError(f"the model does not take features of shape {list(spec.shape)} (column {spec.col!r}): "
                            f"{type(e).__name__}: {e}"[:400]) from None
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != 2:
        raise ArgumentError(f"the model must return a tensor with one row per input row, got "
                            f"{getattr(out, 'shape', type(out).__name__)}")
    if spec.classifier and out.ndim != 2:
        raise ArgumentError(f"a classifier's model returns (rows, classes) scores, got shape {tuple(out.shape)}")
    return out[0]
