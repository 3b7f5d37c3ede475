"""TensorGrid: deep learning on big data, from one laptop to a cluster.

    import tensorgrid as tg
    ds = tg.write("grid/digits", df)              # versioned, checksummed Parquet shards at any URL
    ds = tg.open("grid/digits")                   # or plain Parquet/CSV, in place
    tg.sql("SELECT label, count(*) FROM ds GROUP BY label", ds=ds).to_pandas()
"""

from . import errors, transforms
from .errors import (
    ArgumentError,
    CheckpointError,
    ColumnNotFoundError,
    ConflictError,
    CorruptShardError,
    DatasetExistsError,
    DatasetNotFoundError,
    EmptyDataError,
    ReadOnlyError,
    SchemaMismatchError,
    SQLError,
    TensorGridError,
    TrainingConfigError,
    UnsupportedDataError,
    UnsupportedFormatError,
    UnsupportedURLError,
    WorkerFailedError,
)
from .store import Dataset, from_arrow, ingest_images, list_datasets, open, sql, write
from .store.vacuum import vacuum
from .train import FitResult, Trainer

__version__ = "0.1.0"

__all__ = [
    "write", "open", "sql", "from_arrow", "ingest_images", "vacuum", "list_datasets", "Dataset", "Trainer", "FitResult", "errors", "transforms",
    "TensorGridError", "ArgumentError", "ConflictError", "CorruptShardError", "DatasetExistsError", "DatasetNotFoundError",
    "EmptyDataError", "ReadOnlyError", "SchemaMismatchError", "SQLError", "UnsupportedDataError",
    "UnsupportedFormatError", "UnsupportedURLError", "ColumnNotFoundError", "TrainingConfigError",
    "WorkerFailedError", "CheckpointError",
]
