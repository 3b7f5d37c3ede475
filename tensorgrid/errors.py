"""The named exceptions users catch. Every error TensorGrid raises for bad input is a TensorGridError."""

from __future__ import annotations

import re


class TensorGridError(Exception):
    """Base class of every error TensorGrid raises on purpose."""


class ArgumentError(TensorGridError, ValueError):
    """An argument of the wrong type or out of range (checked by ``tensorgrid.args``)."""


class DatasetNotFoundError(TensorGridError, FileNotFoundError):
    """No dataset (and no Parquet/CSV data) at the URL, or no such version."""


class VersionExpiredError(DatasetNotFoundError):
    """Time travel to a version that ``expire`` removed (retention): its rows may already be vacuumed."""


class UnsafeStoreError(TensorGridError):
    """A write to a filesystem that offers no safe way to commit (no exclusive create): refused rather than
    letting two writers both believe they committed the same version."""


class DatasetExistsError(TensorGridError, FileExistsError):
    """mode="create" on a URL that already holds a dataset."""


class ConflictError(TensorGridError):
    """Another writer committed the version this writer wanted. Nothing was lost:
    the shards this writer wrote are kept, and ``retry()`` commits them on the new latest version.
    (A conflict with a vacuum that removed this write's shards has no retry: ``retryable`` is False.)"""

    def __init__(self, message: str, retry=None):
        super().__init__(message)
        self._retry = retry
        self.retryable = retry is not None

    def retry(self):
        """Commit the already-written shards on top of the current latest version; returns the Dataset."""
        if not self.retryable:
            raise TensorGridError(f"this conflict cannot be retried: {self}")
        if self._retry is None:
            raise TensorGridError("this conflict was already retried: its shards were committed, or the retry "
                                  "raised a newer ConflictError to retry instead")
        retry, self._retry = self._retry, None  # the shards are committed at most once
        try:
            return retry()
        except ConflictError:
            raise  # a new conflict, with its own retry
        except BaseException:
            self._retry = retry  # nothing committed: may be retried again
            raise


class SchemaMismatchError(TensorGridError, ValueError):
    """Data whose schema differs from the dataset's (names the differing columns and types)."""


class CorruptShardError(TensorGridError):
    """A shard's size or checksum does not match the manifest, or it does not parse."""

    def __init__(self, message: str, shards: list[str] | None = None):
        super().__init__(message)
        self.shards = list(shards or [])


class CorruptManifestError(CorruptShardError):
    """A version's manifest fails its checksum or its checks (types, counts, paths, version); names it."""


class UnsupportedURLError(TensorGridError, ValueError):
    """A URL whose scheme no installed filesystem handles."""


class UnsupportedFormatError(TensorGridError, ValueError):
    """A path that holds neither a TensorGrid dataset, Parquet nor CSV."""


class UnsupportedDataError(TensorGridError, TypeError):
    """Input data TensorGrid cannot turn into Arrow (unknown container or Python objects)."""


class ImageDecodeError(TensorGridError, ValueError):
    """A file of an image folder is not a readable image (ingest with ``on_error="raise"``)."""


class EmptyDataError(TensorGridError, ValueError):
    """Writing data that has no rows."""


class ReadOnlyError(TensorGridError):
    """A write or vacuum on data opened in place (foreign Parquet/CSV, SQL results)."""


class ColumnNotFoundError(TensorGridError, KeyError):
    """A column name that the dataset does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class SQLError(TensorGridError):
    """DuckDB rejected a query (syntax, unknown table or column...)."""


class TransformError(TensorGridError):
    """A loader ``transform`` raised; the message names the batch, shard and rows it was given."""


class LoaderWorkerError(TensorGridError):
    """A loader worker process died (killed by a signal, out of memory...)."""


class ResumeError(TensorGridError):
    """A loader state that does not fit this loader (other data, seed or global batch)."""


class WorkerFailedError(TensorGridError):
    """A training worker died; the message names the worker and the last checkpoint to resume from."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint


class CheckpointError(TensorGridError):
    """A checkpoint that does not fit the model being trained, or that cannot be read."""


class TrainingConfigError(TensorGridError, ValueError):
    """Trainer input found wrong before any worker started (columns, shapes, pickling, empty data)."""


class CallbackError(TensorGridError):
    """A training callback raised: the message names the callback, the hook, the epoch and step."""


class CacheRebuiltWarning(UserWarning):
    """A file of the loader's Arrow cache was damaged (bytes changed, truncated, emptied, or its checksum
    record missing or unreadable) and was rebuilt from the verified shard."""


class ModelLoadError(TensorGridError):
    """A model file (TorchScript, ONNX) that cannot be loaded: missing, not a model, or its runtime not installed."""


class ModelInputError(TensorGridError):
    """The model cannot take the batch it was given (another shape or dtype than it expects, e.g. from a
    transform that returns the wrong size): the message names the features, their shape and torch's reason."""


class CurveFitError(TensorGridError, ValueError):
    """Learning-curve points that do not support a power-law fit (too few sizes, an error that does not
    fall, a poor fit), or an error the fitted law cannot reach: the message says why."""


def from_task(e: Exception) -> Exception:
    """The TensorGrid error a task in another process raised (Spark's executors, Ray's tasks), rebuilt from
    the error dump its framework raises here (it names the error, not the object), else ``e`` itself."""
    found = re.findall(r"tensorgrid\.errors\.(\w+): (.*)", str(e))
    if found:
        name, message = found[-1]
        cls = globals().get(name)
        if isinstance(cls, type) and issubclass(cls, TensorGridError):
            try:
                return cls(message.strip())
            except TypeError:
                pass
    return e
