"""TensorGrid: deep learning on big data, from one laptop to a cluster.

    import tensorgrid as tg
    ds = tg.write("grid/digits", df)              # versioned, checksummed Parquet shards at any URL
    ds = tg.open("grid/digits")                   # or plain Parquet/CSV, in place
    tg.sql("SELECT label, count(*) FROM ds GROUP BY label", ds=ds).to_pandas()

A process that only stores, queries or serves data never imports torch: the torch-side names (Trainer,
FitResult, Callback, TrainState, predict, Loader, transforms) are loaded on first use (PEP 562), and so is
``connect`` (a grid server's client: Flight, no torch).
"""

from importlib import import_module

from . import errors
from .errors import (
    ArgumentError,
    CacheRebuiltWarning,
    CallbackError,
    CheckpointError,
    ColumnNotFoundError,
    ConflictError,
    CorruptManifestError,
    CorruptShardError,
    CurveFitError,
    DatasetExistsError,
    DatasetNotFoundError,
    EmptyDataError,
    ImageDecodeError,
    LoaderWorkerError,
    ModelInputError,
    ModelLoadError,
    ReadOnlyError,
    ResumeError,
    SchemaMismatchError,
    SQLError,
    TensorGridError,
    TrainingConfigError,
    TransformError,
    UnsafeStoreError,
    UnsupportedDataError,
    UnsupportedFormatError,
    UnsupportedURLError,
    VersionExpiredError,
    WorkerFailedError,
)
from .store import Dataset, from_arrow, ingest_images, list_datasets, open, sql, write
from .store.dataset import provide as _provide
from .store.retention import expire
from .store.vacuum import vacuum


def _to_torch(ds, batch_size, **options):
    """``Dataset.to_torch``: the loader (and with it torch) is imported on first use."""
    return import_module("tensorgrid.loader").Loader(ds, batch_size, **options)


_provide(to_torch=_to_torch)

__version__ = "0.1.0"

_LAZY = {"Trainer": ("tensorgrid.train", "Trainer"), "FitResult": ("tensorgrid.train", "FitResult"),
         "Callback": ("tensorgrid.train", "Callback"), "TrainState": ("tensorgrid.train", "TrainState"),
         "predict": ("tensorgrid.train", "predict"), "train": ("tensorgrid.train", None),
         "EarlyStopping": ("tensorgrid.train", "EarlyStopping"), "BestCheckpoint": ("tensorgrid.train", "BestCheckpoint"),
         "Loader": ("tensorgrid.loader", "Loader"), "transforms": ("tensorgrid.transforms", None),
         "connect": ("tensorgrid.server.cluster", "connect"), "grid": ("tensorgrid.grid", None),
         "learning_curve": ("tensorgrid.ml.curve", "learning_curve"),
         "LearningCurve": ("tensorgrid.ml.curve", "LearningCurve")}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'tensorgrid' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = import_module(module) if attr is None else getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "write", "open", "sql", "from_arrow", "ingest_images", "vacuum", "expire", "list_datasets", "Dataset", "Trainer",
    "FitResult", "Callback", "TrainState", "EarlyStopping", "BestCheckpoint", "predict", "Loader", "errors",
    "transforms", "train", "connect", "grid", "learning_curve", "LearningCurve",
    "TensorGridError", "ArgumentError", "ConflictError", "CorruptShardError", "CorruptManifestError",
    "DatasetExistsError", "DatasetNotFoundError", "EmptyDataError", "ImageDecodeError", "ReadOnlyError", "SchemaMismatchError",
    "SQLError", "UnsupportedDataError", "UnsupportedFormatError", "UnsupportedURLError", "ColumnNotFoundError",
    "TrainingConfigError", "WorkerFailedError", "CheckpointError", "TransformError", "LoaderWorkerError",
    "ResumeError", "CallbackError", "ModelLoadError", "ModelInputError", "CurveFitError", "CacheRebuiltWarning",
    "VersionExpiredError", "UnsafeStoreError",
]
