"""The store: versioned, checksummed Parquet shards at any filesystem URL, and foreign data in place."""

from __future__ import annotations

from .. import fs as tgfs
from ..args import check_int
from ..errors import DatasetNotFoundError, TensorGridError
from . import compaction as _compaction
from . import dataset as _dataset
from . import deletes as _deletes
from . import manifest, writer
from . import spark as _spark
from . import subsets as _subsets
from .catalog import DatasetEntry, list_datasets
from .convert import is_ray_dataset, is_spark_dataframe
from .dataset import Dataset
from .foreign import ForeignDataset
from .images import SkippedFilesWarning, ingest_images
from .memory import ArrowDataset, from_arrow
from .sql import sql
from .versioned import StoreDataset, VersionInfo


def _to_ray(ds: Dataset, columns: list[str] | None = None):
    from .ray import to_ray  # imports ray, which only its users need: on first use

    return to_ray(ds, columns)


# the Dataset methods the store's own modules implement (dataset.py imports none of them: no import circle)
_dataset.provide(sql=sql, to_spark=_spark.to_spark, to_ray=_to_ray, split=_subsets.split, select=_subsets.select,
                 filter=_subsets.filter, sample=_subsets.sample, compact=_compaction.compact,
                 delete=_deletes.delete)

__all__ = ["Dataset", "StoreDataset", "ForeignDataset", "ArrowDataset", "VersionInfo", "SkippedFilesWarning",
           "open", "write", "from_arrow", "sql", "ingest_images", "list_datasets", "DatasetEntry"]


def open(url: str, version: int | None = None, storage_options: dict | None = None) -> Dataset:  # noqa: A001
    """Open a dataset written by ``tg.write`` (optionally an earlier ``version``), or Parquet/CSV files,
    a directory of them or a glob, in place. ``storage_options``: fsspec's options for the URL's store
    (credentials, endpoint: ``{"key": ..., "secret": ..., "endpoint_url": ...}`` for s3://), kept for that
    bucket in this process and never written; without them, the store's usual sources (environment, config
    files)."""
    version = check_int("version", version, 1, none=True)
    fs, path = tgfs.resolve(url, storage_options)
    if manifest.is_dataset(fs, path):
        return StoreDataset(fs, path, manifest.load(fs, path, version))
    if version is not None:
        if not fs.exists(path):
            raise DatasetNotFoundError(f"no dataset at {url}")
        raise TensorGridError(f"{url} is not a versioned TensorGrid dataset: it has no version {version}")
    return ForeignDataset(url)


def write(url: str, data, mode: str = "create", shard_rows: int | None = None, shard_bytes: int | None = None,
          storage_options: dict | None = None):
    """Write ``data`` (pandas, Arrow tables/readers/batches, dicts, a Spark DataFrame, a Ray Dataset) as a
    new version of the dataset at ``url`` and return it as a Dataset.

    mode: "create" (error if a dataset exists), "append" (adds rows; creates the dataset if missing) or
    "overwrite" (the new version holds only ``data``; older versions stay readable). A Spark DataFrame or a
    Ray Dataset is written where it lives, by Spark's executors or Ray's tasks (``store/spark.py``,
    ``store/ray.py``), and committed once here. ``storage_options``: as ``open`` takes them.
    """
    tgfs.remember(url, tgfs.check_storage_options(storage_options))
    if is_spark_dataframe(data):
        from .spark import write_spark

        return write_spark(url, data, *writer.check_write_args(mode, shard_rows, shard_bytes))
    if is_ray_dataset(data):
        from .ray import write_ray

        return write_ray(url, data, *writer.check_write_args(mode, shard_rows, shard_bytes))
    return writer.write(url, data, mode, shard_rows, shard_bytes)
