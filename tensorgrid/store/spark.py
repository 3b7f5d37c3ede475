"""The one bridge between Spark and the store, both ways, with nothing collected to the driver.

Spark -> dataset: each executor writes its partitions as shards with the store's own shard writer
(row groups, tensor layout, xxh3) into a hidden staging folder inside the dataset (``data/.spark-<txn>/``);
the driver collects only per-shard metadata, renames the shards of the successful task attempts to
``data/part-<txn>-<seq>.parquet`` in partition order and commits them through the writer's commit path
(claim, conflict, clean-up: ``writer.write_staged``, which Ray writes share). Staging is deleted on success
and failure; what a killed driver leaves is vacuumed like any orphan. Dataset -> Spark: Spark's own
Parquet reader reads store shards and foreign Parquet; the executors read other files through the Dataset
contract; rows only this process holds go through Arrow.

Spark has no tensor type. A BinaryType or ArrayType column whose field metadata holds ``"tensorgrid.tensor":
{"dtype": ..., "shape": [...]}`` is stored as a fixed-shape tensor (binary: the row-major bytes; array:
the elements, cast to dtype); ``to_spark`` gives tensors back as BinaryType with that metadata, so a round
trip keeps them. Other arrays stay Arrow lists. pyspark is imported inside functions: the store never
needs it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.memory import MemoryFileSystem

from .. import errors
from .. import fs as tgfs
from ..errors import TensorGridError, UnsupportedDataError, UnsupportedURLError
from . import encoding
from .writer import MAX_SHARDS

TENSOR_KEY = encoding.TENSOR_KEY.decode()  # the same key as in the shards' Arrow field metadata
STAGING_ENV = "TENSORGRID_SPARK_STAGING"
_META = pa.schema([("partition", pa.int32()), ("path", pa.string()), ("rows", pa.int64()), ("bytes", pa.int64()),
                   ("checksum", pa.string()), ("row_group_rows", pa.int64())])
_META_DDL = "partition int, path string, rows long, bytes long, checksum string, row_group_rows long"


# --- where executors may write ----------------------------------------------------------------
def master_of(spark) -> str:
    try:
        return spark.sparkContext.master
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext
        return spark.conf.get("spark.master", "")


def require_shared(url: str, master: str, setting: str) -> None:
    """Refuse a URL Spark's executors cannot all reach: memory:// (one process) always, a local path when
    the master is not local (other machines). ``setting`` names what the user sets to fix it."""
    fs, _ = tgfs.resolve(url)
    if isinstance(fs, MemoryFileSystem):
        raise UnsupportedURLError(f"{setting} is {url!r}: memory:// lives inside one process and Spark's "
                                  "executors run in others; use a path or a URL they can reach")
    if tgfs.is_local(fs) and not master.startswith("local"):
        raise TensorGridError(f"{setting} is {url!r}, a path on this machine, but Spark's master is {master!r}: "
                              "executors on other machines cannot reach it; use a URL every executor can reach "
                              f"(hdfs://, s3://, gs://, ...) for {setting}")


# --- Spark DataFrame -> dataset ---------------------------------------------------------------
def write_spark(url: str, sdf, mode: str = "create", shard_rows: int | None = None,
                shard_bytes: int | None = None):
    """Write a Spark DataFrame as a new version of the dataset at ``url`` (``tg.write`` calls this): the
    executors write its partitions (at least one shard per non-empty partition), the driver commits."""
    from .writer import write_staged

    require_shared(url, master_of(sdf.sparkSession), "the dataset URL")
    logical = arrow_schema(sdf)
    physical = encoding.physical_schema(logical)

    def run(staging_url: str, txn: str) -> list[dict]:
        write = _partition_writer(staging_url, logical, physical, shard_rows, shard_bytes)
        return _in_order(_collect_or_stop(sdf.mapInArrow(write, _META_DDL), f"tensorgrid-write-{txn}"))

    return write_staged(url, mode, physical, "spark", run)


def _collect_or_stop(sdf, group: str) -> list:
    """``sdf.collect()`` as a job group of its own; if it fails, its tasks still running are cancelled and
    waited for (Spark fails a job on its first failed task while the others keep writing), so nothing
    writes into the staging folder once this returns. The caller's job group is restored."""
    try:
        sc = sdf.sparkSession.sparkContext
    except Exception:  # noqa: BLE001 - Spark Connect has no SparkContext: its server stops the job
        sc = None
    keys = ("spark.jobGroup.id", "spark.job.description", "spark.job.interruptOnCancel")
    before = [sc.getLocalProperty(k) for k in keys] if sc is not None else None
    if sc is not None:
        sc.setJobGroup(group, "tensorgrid: write a DataFrame as a dataset", interruptOnCancel=True)
    try:
        return sdf.collect()
    except Exception as e:  # noqa: BLE001 - py4j/pyspark wrap the executors' errors
        if sc is not None:
            sc.cancelJobGroup(group)
            _wait_for_tasks(sc, group)
        raise errors.from_task(e) from None
    finally:
        if sc is not None:
            for k, v in zip(keys, before):
                sc.setLocalProperty(k, v)


def _wait_for_tasks(sc, group: str, timeout: float = 60.0) -> None:
    """Until no task of the group's jobs runs (Spark's status tracker), at most ``timeout`` seconds."""
    tracker = sc.statusTracker()
    start = time.monotonic()
    while time.monotonic() < start + timeout:
        jobs = tracker.getJobIdsForGroup(group)
        active = 0
        for job in jobs:
            info = tracker.getJobInfo(job)
            if info is None or info.status == "RUNNING":  # its end not seen yet: nor perhaps its tasks'
                active += 1
            for stage in (info.stageIds if info else ()):
                st = tracker.getStageInfo(stage)
                active += st.numActiveTasks if st else 0
        # the tracker learns of jobs and tasks from Spark's event bus, which lags behind under load
        if not active and (jobs or time.monotonic() > start + 5):
            return
        time.sleep(0.05)


def arrow_schema(sdf) -> pa.Schema:
    """The logical Arrow schema a Spark DataFrame is stored with: Spark's own Arrow mapping, plain types,
    every column nullable (as from pandas, so writes from either append to the other), tensor columns
    from their field metadata."""
    from pyspark.sql.pandas.types import to_arrow_schema

    names = [f.name for f in sdf.schema]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UnsupportedDataError(f"duplicate column names: {dup}")
    tz = sdf.sparkSession.conf.get("spark.sql.session.timeZone")
    try:
        try:
            schema = to_arrow_schema(sdf.schema, timezone=tz)
        except TypeError:  # pyspark 3.5 has no timezone argument (it says UTC)
            schema = to_arrow_schema(sdf.schema)
    except Exception as e:  # noqa: BLE001 - pyspark's own type errors
        raise UnsupportedDataError(f"cannot store this Spark DataFrame: {str(e).splitlines()[0]}") from None
    fields = []
    for sf, f in zip(sdf.schema, encoding.normalize_schema(schema)):
        tensor = _tensor_type(sf, f.type)
        fields.append(pa.field(f.name, tensor or _standard(f.type), True))
    return pa.schema(fields)


def _standard(t: pa.DataType) -> pa.DataType:
    """Lists and maps with pyarrow's own child names (Spark says "element" and names a map's entries after
    its column), so a Spark write and a pandas write of the same columns have the same schema."""
    if pa.types.is_list(t):
        return pa.list_(pa.field("item", _standard(t.value_type), t.value_field.nullable))
    if pa.types.is_map(t):
        return pa.map_(pa.field("key", _standard(t.key_type), False),
                       pa.field("value", _standard(t.item_type), t.item_field.nullable))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_standard(t.field(i).type)) for i in range(t.num_fields)])
    return t


def _tensor_type(sfield, arrow_type: pa.DataType) -> pa.FixedShapeTensorType | None:
    """The tensor type a Spark column's metadata declares (BinaryType or an array of numbers), or None."""
    meta = (sfield.metadata or {}).get(TENSOR_KEY)
    if meta is None:
        return None
    try:
        m = json.loads(meta) if isinstance(meta, str) else dict(meta)
        shape = [int(d) for d in m["shape"]]
        if pa.types.is_list(arrow_type) and "dtype" not in m:
            dtype = arrow_type.value_type
        else:
            dtype = pa.from_numpy_dtype(np.dtype(m["dtype"]))
        if not (pa.types.is_integer(dtype) or pa.types.is_floating(dtype)) or min(shape, default=1) < 1:
            raise ValueError(f"dtype {dtype} and shape {shape}: a numeric dtype and dimensions >= 1")
        tt = pa.fixed_shape_tensor(dtype, shape, dim_names=m.get("dim_names"), permutation=m.get("permutation"))
    except (KeyError, TypeError, ValueError, pa.ArrowException) as e:
        raise UnsupportedDataError(f"column {sfield.name!r}: its {TENSOR_KEY!r} metadata {meta!r} is not a tensor "
                                   f"type ({e}); give {{'dtype': 'float32', 'shape': [28, 28]}}") from None
    if not (pa.types.is_binary(arrow_type) or pa.types.is_list(arrow_type)):
        raise UnsupportedDataError(f"column {sfield.name!r} is {sfield.dataType.simpleString()}: only a binary or "
                                   f"an array column can be marked as a tensor ({TENSOR_KEY!r} metadata)")
    return tt


def _partition_writer(staging_url: str, logical: pa.Schema, physical: pa.Schema, shard_rows: int | None,
                      shard_bytes: int | None):
    """The function each task runs over its partition's Arrow batches, on an executor: shards under
    ``staging_url``/data/ (named by a transaction of the task attempt's own), their metadata returned."""

    options = tgfs.remembered(staging_url)  # the driver's storage options, for the executors

    def write_partition(batches):
        from pyspark import TaskContext

        from .writer import write_shards

        tgfs.adopt(options)
        fs, root = tgfs.resolve(staging_url)
        shards = write_shards(fs, root, physical, (as_logical(b, logical) for b in batches), shard_rows, shard_bytes)
        if shards:
            part = TaskContext.get().partitionId()
            yield pa.RecordBatch.from_pylist(
                [{"partition": part, "path": s.path, "rows": s.rows, "bytes": s.bytes, "checksum": s.checksum,
                  "row_group_rows": s.row_group_rows} for s in shards], schema=_META)

    return write_partition


def as_logical(batch: pa.RecordBatch, logical: pa.Schema) -> pa.RecordBatch:
    """A batch as Spark hands it to Python -> the stored logical types (tensors built, plain types)."""
    cols = []
    for col, f in zip(batch.columns, logical):
        if isinstance(f.type, pa.FixedShapeTensorType):
            col = _to_tensor(col, f)
        elif not col.type.equals(f.type):
            col = col.cast(f.type)
        cols.append(col)
    return pa.RecordBatch.from_arrays(cols, schema=logical)


def _to_tensor(col: pa.Array, field: pa.Field) -> pa.ExtensionArray:
    """A binary column of row-major bytes, or an array column of n elements per row, as tensors."""
    tt = field.type
    n = int(np.prod(tt.shape))
    valid = pc.is_valid(col)
    if pa.types.is_list(col.type):
        wrong = pc.and_(valid, pc.not_equal(pc.list_value_length(col), n))
        if pc.any(wrong).as_py():
            row = pc.index(wrong, True).as_py()
            raise UnsupportedDataError(f"column {field.name!r} is a tensor of shape {list(tt.shape)} ({n} elements) "
                                       f"but a row holds {len(col[row])}")
        filled = pc.fill_null(col, pa.scalar([0] * n, col.type)) if col.null_count else col
        values = pc.list_flatten(filled)
        if values.null_count:
            raise UnsupportedDataError(f"column {field.name!r}: a tensor cannot hold null elements")
        try:
            values = values.cast(tt.value_type)
        except pa.ArrowInvalid as e:
            raise UnsupportedDataError(f"column {field.name!r}: its elements do not fit {tt.value_type}: {e}") from None
    else:
        width = n * tt.value_type.bit_width // 8
        try:
            fixed = col.cast(pa.binary(width))
        except pa.ArrowInvalid:
            sizes = pc.binary_length(col)
            row = pc.index(pc.and_(valid, pc.not_equal(sizes, width)), True).as_py()
            raise UnsupportedDataError(f"column {field.name!r} is a tensor of shape {list(tt.shape)} {tt.value_type} "
                                       f"({width} bytes) but a row holds {sizes[row].as_py()} bytes") from None
        values = pa.Array.from_buffers(tt.value_type, len(fixed) * n, [None, fixed.buffers()[1]],
                                       offset=fixed.offset * n)
    mask = pc.invert(valid) if col.null_count else None
    storage = pa.FixedSizeListArray.from_arrays(values, n, mask=mask)
    return pa.ExtensionArray.from_storage(tt, storage)


def _in_order(meta) -> list[dict]:
    """The staged shards' metadata in partition order (the DataFrame's row order)."""
    rows = sorted(meta, key=lambda r: (r["partition"], r["path"]))
    if len(rows) > MAX_SHARDS:
        raise UnsupportedDataError(f"the DataFrame would make {len(rows)} shards (one or more per partition); a write "
                                   f"holds at most {MAX_SHARDS}: coalesce() it to fewer partitions")
    return [r.asDict() if hasattr(r, "asDict") else r for r in rows]


# --- a DataFrame staged as a temporary dataset (the Spark engine's fit, ML stages) ------------
_STAGED: dict[str, weakref.finalize] = {}


def stage(sdf, where: str | None = None):
    """Write a Spark DataFrame as a temporary dataset under ``where`` (default: $TENSORGRID_SPARK_STAGING,
    else the temp dir, which only a local master can use) for ranks on the executors to read. Remove it
    with ``unstage``; it is removed anyway once the returned dataset is garbage or the process exits."""
    base = where or os.environ.get(STAGING_ENV) or tempfile.gettempdir()
    require_shared(base, master_of(sdf.sparkSession), "where" if where else STAGING_ENV)
    url = tgfs.join(base, f"tensorgrid-spark-{uuid.uuid4().hex[:12]}")
    fs, root = tgfs.resolve(url)
    try:
        ds = write_spark(url, sdf)
    except BaseException:
        tgfs.remove_tree(fs, root)
        raise
    _STAGED[ds.url] = weakref.finalize(ds, tgfs.remove_tree, fs, root)
    return ds


def unstage(ds) -> None:
    """Delete a dataset ``stage`` made (nothing for any other dataset)."""
    done = _STAGED.pop(getattr(ds, "url", None), None)
    if done is not None:
        done()


# --- dataset -> Spark DataFrame ---------------------------------------------------------------
def to_spark(ds, spark=None):
    """``ds`` as a Spark DataFrame. Store shards and foreign Parquet are read by Spark's Parquet reader on
    the executors (no checksum check there: ``ds.verify()`` first if that matters); other files (CSV,
    Hive folders) are read by the executors through the Dataset contract; rows held in this process
    (in-memory datasets, memory://) go through Arrow. Tensor columns become BinaryType (row-major bytes)
    with ``{"tensorgrid.tensor": {"dtype", "shape"}}`` in the column's metadata; unsigned integers widen
    to the next signed type (uint64 to decimal(20,0)), as Spark reads them from Parquet."""
    spark = spark or _active_session()
    how = _read_path(ds)
    if how != "arrow" and ds.shard_urls():  # the executors open the files
        require_shared(ds.url, master_of(spark), "the dataset URL")
    if how == "parquet":
        df = spark.read.parquet(*[_hadoop_url(u) for u in ds.shard_urls()])
        df = df.select(*["`" + n.replace("`", "``") + "`" for n in ds.schema.names])
    else:
        from pyspark.sql.pandas.types import from_arrow_schema

        out = pa.schema([f.with_type(_spark_type(f.type)) for f in ds.schema])
        try:
            struct = from_arrow_schema(out)
        except Exception as e:  # noqa: BLE001 - pyspark's own type errors
            raise UnsupportedDataError(f"Spark cannot hold these columns: {str(e).splitlines()[0]}") from None
        if how == "executors":
            df = spark.range(ds.num_shards, numPartitions=max(1, ds.num_shards)).mapInArrow(_shard_reader(ds, out),
                                                                                             struct)
        else:
            df = spark.createDataFrame(for_spark(ds.to_arrow(), out), schema=struct)
    for f in ds.schema:
        if isinstance(f.type, pa.FixedShapeTensorType):
            df = df.withMetadata(f.name, {TENSOR_KEY: _tensor_meta(f.type)})
    return df


def _read_path(ds) -> str:
    """"parquet" (Spark reads the files), "executors" (they read shards through the contract) or "arrow"."""
    from .foreign import ForeignDataset
    from .versioned import StoreDataset

    urls = ds.shard_urls()
    if any(u.startswith("memory://") for u in urls) or (not urls and not ds.is_remote):
        return "arrow"  # the rows live in this process
    if urls and ((isinstance(ds, StoreDataset) and not ds.altered) or (isinstance(ds, ForeignDataset) and ds.format == "parquet"
                                                   and not ds.partition_columns)):
        return "parquet"
    return "executors"


def _shard_reader(ds, out: pa.Schema):
    def read(batches):
        for b in batches:
            for i in b.column(0).to_pylist():
                yield from for_spark(ds.read_shard(i), out).to_batches()

    return read


def _spark_type(t: pa.DataType) -> pa.DataType:
    """The Arrow type Spark takes for ``t`` (the types Spark's Parquet reader gives)."""
    if isinstance(t, pa.FixedShapeTensorType) or pa.types.is_fixed_size_binary(t):
        return pa.binary()
    if pa.types.is_unsigned_integer(t):
        return {8: pa.int16(), 16: pa.int32(), 32: pa.int64()}.get(t.bit_width, pa.decimal128(20, 0))
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_dictionary(t):
        return _spark_type(t.value_type)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return pa.list_(t.value_field.with_type(_spark_type(t.value_type)))
    if pa.types.is_struct(t):
        return pa.struct([t.field(i).with_type(_spark_type(t.field(i).type)) for i in range(t.num_fields)])
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(_spark_type(t.key_type)), t.item_field.with_type(_spark_type(t.item_type)))
    return encoding.normalize_schema(pa.schema([("x", t)])).field(0).type


def for_spark(table: pa.Table, out: pa.Schema) -> pa.Table:
    """A logical table in the types of ``out`` (see ``_spark_type``); tensors as their raw bytes."""
    table = encoding.encode(table, encoding.physical_schema(table.schema))  # tensors -> fixed_size_binary
    return pa.Table.from_arrays([c.cast(f.type) for c, f in zip(table.columns, out)], schema=out)


def _tensor_meta(t: pa.FixedShapeTensorType) -> dict:
    m = {"dtype": np.dtype(t.value_type.to_pandas_dtype()).name, "shape": list(t.shape)}
    if t.dim_names:
        m["dim_names"] = list(t.dim_names)
    if t.permutation is not None:
        m["permutation"] = list(t.permutation)
    return m


def _hadoop_url(url: str) -> str:
    """A URL as Hadoop's filesystems spell it: local paths as file://, fsspec's s3:// as s3a://."""
    if "://" not in url:
        return "file://" + os.path.abspath(url)
    return "s3a://" + url[len("s3://"):] if url.startswith("s3://") else url


def _active_session():
    from pyspark.sql import SparkSession

    spark = SparkSession.getActiveSession()
    if spark is None:
        raise TensorGridError("to_spark needs a SparkSession: pass one, or create it first "
                              "(SparkSession.builder.master(...).getOrCreate())")
    return spark
