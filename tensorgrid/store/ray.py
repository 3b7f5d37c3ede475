"""The bridge between Ray Data and the store, both ways. Imported only by its users: it imports ray.

Dataset -> Ray (``to_ray``): a Ray ``Datasource`` whose read tasks call ``Dataset.read_shard`` in Ray's
workers, so each shard is size- and xxh3-checked where it is read (a damaged one raises CorruptShardError in
the task, and Ray raises it to whoever consumes the rows); each task reads a contiguous run of shards, one
block per shard, in the dataset's order. Tensor columns stay Arrow's fixed-shape tensor type, which Ray
hands out as numpy arrays of their shape and dtype. Rows only this process can read (in-memory datasets,
memory://, subset views, a grid's datasets) are read here and given to Ray as one block per shard.

Ray -> dataset (``write_ray``, which ``tg.write`` calls): each task writes its blocks as shards with the
store's own shard writer into ``data/.ray-<txn>/`` and returns only their metadata; the driver renames them
into one write's run and commits once (``writer.write_staged``, the path Spark writes take). Ray's tensor
columns (its ArrowTensorType and V2, Arrow's own type) are stored as fixed-shape tensors.
"""

from __future__ import annotations

import functools

import numpy as np
import pyarrow as pa
import ray
from fsspec.implementations.memory import MemoryFileSystem
from ray.air.util.tensor_extensions import arrow as ray_tensors
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from .. import errors
from .. import fs as tgfs
from ..errors import EmptyDataError, TensorGridError, UnsupportedDataError, UnsupportedURLError
from . import encoding
from .dataset import Dataset
from .writer import MAX_SHARDS, write_shards, write_staged

_META = pa.schema([("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()), ("checksum", pa.string()),
                   ("row_group_rows", pa.int64())])
_RAY_FIXED = tuple(t for t in (getattr(ray_tensors, "ArrowTensorType", None),
                               getattr(ray_tensors, "ArrowTensorTypeV2", None)) if t is not None)
_CAST_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)


# --- where Ray's tasks can reach ---------------------------------------------------------------
READ_TASKS = 200  # read tasks of one to_ray at most (Ray Data's own default minimum)

def _one_machine() -> bool:
    """Whether every node of the Ray cluster runs on this machine (True before Ray is started: ray.data
    then starts a local one)."""
    if not ray.is_initialized():
        return True
    here = ray.util.get_node_ip_address()
    return all(n["NodeManagerAddress"] == here for n in ray.nodes() if n.get("Alive"))


def require_reachable(url: str) -> None:
    """Refuse a dataset URL Ray's tasks cannot all reach: memory:// (one process) always, a local path when
    the cluster has nodes on other machines."""
    fs, _ = tgfs.resolve(url)
    if isinstance(fs, MemoryFileSystem):
        raise UnsupportedURLError(f"the dataset URL is {url!r}: memory:// lives inside one process and Ray's tasks "
                                  "run in others; use a path or a URL they can reach")
    if tgfs.is_local(fs) and not _one_machine():
        raise TensorGridError(f"the dataset URL is {url!r}, a path on this machine, but the Ray cluster has nodes on "
                              "other machines: use a URL every node can reach (hdfs://, s3://, gs://, ...)")


# --- dataset -> Ray Dataset --------------------------------------------------------------------
def to_ray(ds: Dataset, columns: list[str] | None = None):
    """``ds`` (or its ``columns``) as a ``ray.data.Dataset``. Store datasets and foreign files are read by
    Ray's tasks through ``read_shard`` (verified); other kinds are read in this process, one block per
    shard (``ray.data.from_arrow``). Rows keep the dataset's order when Ray keeps order
    (``DataContext.execution_options.preserve_order``)."""
    columns = ds.check_columns(columns)
    schema = ds.schema if columns is None else pa.schema([ds.schema.field(c) for c in columns])
    _check_tensor_support(schema)
    if not _read_in_tasks(ds):
        tables = [ds.read_shard(i, columns) for i, n in enumerate(ds.shard_rows) if n]
        return ray.data.from_arrow(tables or [schema.empty_table()])
    require_reachable(ds.shard_urls()[0])
    if not any(ds.shard_rows):
        return ray.data.from_arrow(schema.empty_table())
    # one read task (and block) per shard up to READ_TASKS, runs of shards beyond; Ray would otherwise split
    # blocks further to keep its CPUs busy (the split depends on the cluster's size: 8 blocks for 4 shards
    # on 3 CPUs, 4 on 2)
    return ray.data.read_datasource(ShardSource(ds, columns, schema),
                                    override_num_blocks=max(1, min(ds.num_shards, READ_TASKS)))


def _read_in_tasks(ds: Dataset) -> bool:
    """Whether Ray's tasks can read ``ds``'s shards themselves: files of a store or foreign dataset, not
    memory:// (the rows of other kinds live in this process or behind its connection)."""
    from .foreign import ForeignDataset
    from .versioned import StoreDataset

    urls = ds.shard_urls()
    return isinstance(ds, (StoreDataset, ForeignDataset)) and bool(urls) and \
        not any(u.startswith("memory://") for u in urls)


def _check_tensor_support(schema: pa.Schema) -> None:
    if any(isinstance(f.type, pa.FixedShapeTensorType) for f in schema) and \
            not hasattr(ray.data.DataContext.get_current(), "arrow_fixed_shape_tensor_format"):
        raise UnsupportedDataError(f"this Ray ({ray.__version__}) does not know Arrow's fixed-shape tensor type "
                                   "the tensor columns are read as: upgrade Ray (pip install -U 'ray[data]')")


class ShardSource(Datasource):
    """A TensorGrid dataset for ``ray.data.read_datasource``: read tasks of contiguous runs of shards, each
    shard read (and verified) by ``Dataset.read_shard`` in the task and yielded as one block."""

    def __init__(self, ds: Dataset, columns: list[str] | None, schema: pa.Schema):
        super().__init__()
        self._ds, self._columns, self._schema = ds, columns, schema

    def get_name(self) -> str:
        return "TensorGrid"

    def estimate_inmemory_data_size(self) -> int | None:
        return self._ds.size_bytes or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        rows, urls = self._ds.shard_rows, self._ds.shard_urls()
        shards = [i for i, n in enumerate(rows) if n]
        per_row = self._ds.size_bytes / max(1, self._ds.num_rows)
        tasks = []
        for run in np.array_split(np.array(shards), max(1, min(parallelism, len(shards)))):
            run = [int(i) for i in run]
            n = sum(rows[i] for i in run)
            meta = BlockMetadata(num_rows=n, size_bytes=int(n * per_row), input_files=[urls[i] for i in run],
                                 exec_stats=None)
            tasks.append(ReadTask(functools.partial(_read_shards, self._ds, run, self._columns), meta,
                                  schema=self._schema, per_task_row_limit=per_task_row_limit))
        return tasks


def _read_shards(ds: Dataset, shards: list[int], columns: list[str] | None):
    """A read task's blocks: its shards, each read through the Dataset contract (checksums and all)."""
    for i in shards:
        yield ds.read_shard(i, columns)


# --- Ray Dataset -> dataset --------------------------------------------------------------------
def write_ray(url: str, rds, mode: str = "create", shard_rows: int | None = None, shard_bytes: int | None = None):
    """Write a ``ray.data.Dataset`` as a new version of the dataset at ``url`` (``tg.write`` calls this):
    Ray's tasks write its blocks (at least one shard per non-empty block), the driver commits once. The
    schema is Ray's (``rds.schema()``, which runs a pipeline's first block when Ray does not know it)."""
    require_reachable(url)
    logical = arrow_schema(rds)
    physical = encoding.physical_schema(logical)

    def run(staging_url: str, txn: str) -> list[dict]:
        write = functools.partial(_write_block, staging_url, logical, physical, shard_rows, shard_bytes,
                                  tgfs.remembered(staging_url))
        try:
            rows = rds.map_batches(write, batch_format="pyarrow", batch_size=None, zero_copy_batch=True).take_all()
        except Exception as e:  # noqa: BLE001 - Ray wraps the tasks' errors
            raise errors.from_task(e) from None
        if len(rows) > MAX_SHARDS:
            raise UnsupportedDataError(f"the Ray Dataset would make {len(rows)} shards (one or more per block); a "
                                       f"write holds at most {MAX_SHARDS}: repartition() it to fewer blocks")
        # in the order Ray hands the tasks' outputs back: the dataset's order when Ray preserves order
        return [{"path": str(r["path"]), "rows": int(r["rows"]), "bytes": int(r["bytes"]),
                 "checksum": str(r["checksum"]), "row_group_rows": int(r["row_group_rows"])} for r in rows]

    return write_staged(url, mode, physical, "ray", run)


def _write_block(staging_url: str, logical: pa.Schema, physical: pa.Schema, shard_rows: int | None,
                 shard_bytes: int | None, options: dict, block: pa.Table) -> pa.Table:
    """What each Ray task runs over a block: shards under ``staging_url``/data/, their metadata returned
    (``options``: the driver's storage options)."""
    if not block.num_rows:
        return _META.empty_table()
    tgfs.adopt(options)
    fs, root = tgfs.resolve(staging_url)
    shards = write_shards(fs, root, physical, iter(as_logical(block, logical).to_batches()), shard_rows, shard_bytes)
    return pa.Table.from_pylist([{"path": s.path, "rows": s.rows, "bytes": s.bytes, "checksum": s.checksum,
                                  "row_group_rows": s.row_group_rows} for s in shards], schema=_META)


def arrow_schema(rds) -> pa.Schema:
    """The logical Arrow schema a Ray Dataset is stored with: plain types, every column nullable (as from
    pandas, so writes from either append to the other), Ray's tensor columns as fixed-shape tensors."""
    schema = rds.schema()
    if schema is None:
        raise EmptyDataError("no rows to write: the Ray Dataset is empty")
    names, types = list(schema.names), list(schema.types)
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UnsupportedDataError(f"duplicate column names: {dup}")
    base = schema.base_schema if isinstance(schema.base_schema, pa.Schema) else None
    fields = []
    for name, t in zip(names, types):
        meta = {k: v for k, v in (base.field(name).metadata or {}).items() if k != encoding.TENSOR_KEY} \
            if base is not None else {}
        fields.append(pa.field(name, _logical_type(name, t), True, meta or None))
    return encoding.normalize_schema(pa.schema(fields))


def _logical_type(name: str, t) -> pa.DataType:
    if isinstance(t, ray_tensors.ArrowVariableShapedTensorType):
        raise UnsupportedDataError(f"column {name!r} holds tensors of varying shapes (Ray's variable-shaped tensor "
                                   "type); TensorGrid stores fixed-shape tensors: pad or resize them to one shape "
                                   "first (map_batches), or store them as lists")
    if isinstance(t, _RAY_FIXED):
        t = pa.fixed_shape_tensor(t.storage_type.value_type, list(t.shape))
    if not isinstance(t, pa.DataType):
        raise UnsupportedDataError(f"column {name!r} holds Python objects Arrow cannot type ({t}): give it one "
                                   "Arrow type (numbers, strings, lists, numpy arrays of one shape)")
    if isinstance(t, pa.FixedShapeTensorType) and not (pa.types.is_integer(t.value_type)
                                                       or pa.types.is_floating(t.value_type)):
        raise UnsupportedDataError(f"column {name!r} holds tensors of {t.value_type}: only numbers are stored "
                                   "as tensors")
    return t


def as_logical(block: pa.Table, logical: pa.Schema) -> pa.Table:
    """A block as Ray hands it to a task -> the stored logical types (tensors built, plain types)."""
    missing = [n for n in logical.names if n not in block.column_names]
    if missing:
        raise UnsupportedDataError(f"a block of the Ray Dataset has no column {missing[0]!r}; "
                                   f"its schema says {logical.names}")
    cols = []
    for f in logical:
        col = block.column(f.name)
        if isinstance(f.type, pa.FixedShapeTensorType):
            col = _as_tensor(col, f)
        elif not col.type.equals(f.type):
            try:
                col = col.cast(f.type)
            except _CAST_ERRORS as e:
                raise UnsupportedDataError(f"column {f.name!r}: a block holds {col.type}, which does not fit "
                                           f"{f.type}: {e}") from None
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=logical)


def _as_tensor(col: pa.ChunkedArray, field: pa.Field) -> pa.ChunkedArray:
    """A tensor column of Ray's types (or Arrow's) as the stored fixed-shape tensor type, values zero-copy."""
    tt = field.type
    chunks = []
    for c in col.chunks:
        if c.type.equals(tt):
            chunks.append(c)
            continue
        if not len(c):
            continue
        if c.null_count:
            raise UnsupportedDataError(f"column {field.name!r}: a tensor column written from Ray cannot hold "
                                       "null rows")
        a = c.to_numpy_ndarray() if isinstance(c.type, pa.FixedShapeTensorType) else c.to_numpy(zero_copy_only=False)
        want = np.dtype(tt.value_type.to_pandas_dtype())
        if a.shape[1:] != tuple(tt.shape) or a.dtype != want:
            raise UnsupportedDataError(f"column {field.name!r} is a tensor of shape {list(tt.shape)} {want} but a "
                                       f"block holds shape {list(a.shape[1:])} {a.dtype}")
        chunks.append(pa.ExtensionArray.from_storage(tt, encoding.numpy_to_tensor(a).storage))
    return pa.chunked_array(chunks, tt)
