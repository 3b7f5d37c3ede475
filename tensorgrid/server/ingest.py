"""Bulk ingestion (Flight SQL ``CommandStatementIngest``, ADBC's ``adbc_ingest``) into a DuckDB table.

The uploaded stream is registered on the request's own cursor and copied by one ``CREATE TABLE ... AS`` or
``INSERT ... BY NAME`` inside a transaction: a failed upload leaves the table as it was. Arrow's fixed-shape
tensor columns become nested fixed-size lists, which DuckDB keeps as ``FLOAT[3][2]`` arrays, so the shape
survives the round trip (DuckDB would otherwise flatten the extension type to its storage, ``FLOAT[6]``).
Tensors of more than ``BLOB_BYTES`` a row become BLOBs of their row-major bytes instead: DuckDB allocates an
ARRAY column 2,048 rows at a time, and 1 MiB images asked it for 2 GiB per vector (out of memory even for a
300-row ``SELECT *``, measured). A query over a loaded dataset gets its tensor columns back as tensors, ARRAYs
and BLOBs alike (``tensors_back``: a result column with the tensor column's name, shape or size), so a
``SELECT *`` answers Arrow's tensor type to every client, as the loader does.
"""

from __future__ import annotations

import itertools
import math

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from ..store.encoding import binary_to_tensor, tensor_to_binary
from .metadata import quote
from .sqlproto import TableExistsOption, TableNotExistOption

_SOURCE = "__tensorgrid_ingest"
BLOB_BYTES = 16 << 10  # tensors with bigger rows are BLOBs in SQL (their row-major bytes), smaller ones ARRAYs


def ingest(cur: duckdb.DuckDBPyConnection, command, reader: pa.RecordBatchReader, own_transaction: bool = True) -> int:
    """Rows of ``reader`` into the command's table, following its if-exists / if-not-exists options;
    returns the number of rows written (``own_transaction=False``: in the client's transaction on ``cur``)."""
    if command.temporary:
        raise flight.FlightServerError("ingest into a temporary table is not supported: a temporary table "
                                       "would vanish with the request's cursor")
    if not command.table:
        raise flight.FlightServerError("ingest needs a table name")
    catalog = command.catalog if command.HasField("catalog") else None
    schema = command.schema if command.HasField("schema") else None
    target = quote(catalog, schema, command.table)
    options = command.table_definition_options

    def statement(source: str) -> str:  # decided inside the transaction: the table cannot appear meanwhile
        if _exists(cur, catalog, schema, command.table):
            if options.if_exists == TableExistsOption.REPLACE:
                return f"CREATE OR REPLACE TABLE {target} AS SELECT * FROM {source}"
            if options.if_exists == TableExistsOption.APPEND:
                return f"INSERT INTO {target} BY NAME SELECT * FROM {source}"
            raise flight.FlightServerError(f"table {target} already exists (ingest mode 'create')")
        if options.if_not_exist == TableNotExistOption.CREATE:
            return f"CREATE TABLE {target} AS SELECT * FROM {source}"
        raise flight.FlightServerError(f"table {target} does not exist (ingest mode 'append')")

    rows = copy_in(cur, reader, statement, own_transaction=own_transaction)
    return int(rows[0][0]) if rows and rows[0] and rows[0][0] is not None else -1


def copy_in(cur: duckdb.DuckDBPyConnection, reader: pa.RecordBatchReader, statement,
            source: str = _SOURCE, own_transaction: bool = True) -> list:
    """Run ``statement(source)`` (SQL reading the uploaded rows as table ``source``) in one transaction on
    ``cur``: the stream registered for it only, a failure rolled back (nothing half-written). Its result rows.
    ``own_transaction=False``: ``cur`` is in a client's transaction already, which commits or rolls back."""
    cur.register(source, duckdb_friendly(reader))
    if own_transaction:
        cur.begin()
    try:
        rows = cur.sql(statement(source)).fetchall()
        if own_transaction:
            cur.commit()
        return rows
    except BaseException:
        if own_transaction:
            cur.rollback()
        raise
    finally:
        cur.unregister(source)


def _exists(cur, catalog: str | None, schema: str | None, table: str) -> bool:
    return bool(cur.sql(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = $1 "
        "AND ($2::VARCHAR IS NULL OR table_catalog = $2) AND table_schema = coalesce($3::VARCHAR, current_schema())",
        params=[table, catalog, schema]).fetchall()[0][0])


def duckdb_friendly(reader: pa.RecordBatchReader) -> pa.RecordBatchReader:
    """``reader`` with fixed-shape tensor columns turned into nested fixed-size lists, or into BLOBs of their
    row-major bytes when a row is over ``BLOB_BYTES`` (streamed, no copy of the values)."""
    fields = list(reader.schema)
    if not any(isinstance(f.type, pa.FixedShapeTensorType) for f in fields):
        return reader
    schema = pa.schema([pa.field(f.name, _sql_type(f.type), f.nullable)
                        if isinstance(f.type, pa.FixedShapeTensorType) else f for f in fields])

    def batches():
        for batch in reader:
            yield pa.RecordBatch.from_arrays([_for_sql(col) for col in batch.columns], schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def sql_tensors(schema: pa.Schema) -> dict[str, pa.FixedShapeTensorType]:
    """The tensor columns of ``schema`` (by name): what ``tensors_back`` turns a result's columns back into."""
    return {f.name: f.type for f in schema if isinstance(f.type, pa.FixedShapeTensorType)}


def tensors_back(reader: pa.RecordBatchReader, tensors: dict[str, pa.FixedShapeTensorType]) -> pa.RecordBatchReader:
    """``reader`` (a query's result) with columns named like a tensor column of ``tensors`` turned back into
    that tensor type: nested fixed-size lists of its shape and value type (decided by the schema; zero-copy),
    and BLOBs when every value has the tensor's size (else left as they are)."""
    nested = {i: tensors[f.name] for i, f in enumerate(reader.schema)
              if f.name in tensors and _is_nested_of(f.type, tensors[f.name])}
    blobs = {i: tensors[f.name] for i, f in enumerate(reader.schema) if f.name in tensors
             and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) or pa.types.is_fixed_size_binary(f.type))}
    if not nested and not blobs:
        return reader
    wanted = {**nested, **blobs}
    schema = pa.schema([f.with_type(wanted[i]) if i in wanted else f for i, f in enumerate(reader.schema)])
    peeked = []

    def convert(batch: pa.RecordBatch) -> pa.RecordBatch | None:
        cols = list(batch.columns)
        for i, ttype in wanted.items():
            col = _nested_to_tensor(cols[i], ttype) if i in nested else _blob_to_tensor(cols[i], ttype)
            if col is None:
                return None
            cols[i] = col
        return pa.RecordBatch.from_arrays(cols, schema=schema)

    if blobs:  # the first batch decides (a result whose bytes do not fit is passed on unchanged)
        for batch in reader:
            converted = convert(batch)
            if converted is None:
                return pa.RecordBatchReader.from_batches(reader.schema, itertools.chain([batch], reader))
            peeked.append(converted)
            break

    def rest():
        yield from peeked
        for batch in reader:
            converted = convert(batch)
            if converted is None:
                raise flight.FlightServerError("a result column named like a tensor column holds values of "
                                               "another size, or null sub-arrays: select it under another name")
            yield converted

    return pa.RecordBatchReader.from_batches(schema, rest())


def _is_nested_of(dtype: pa.DataType, tensor: pa.FixedShapeTensorType) -> bool:
    """Whether ``dtype`` is the tensor's nested fixed-size lists (its shape, outer first; its value type)."""
    for size in tensor.shape:
        if not pa.types.is_fixed_size_list(dtype) or dtype.list_size != size:
            return False
        dtype = dtype.value_type
    return dtype == tensor.value_type


def _nested_to_tensor(column, ttype: pa.FixedShapeTensorType):
    """Nested fixed-size lists in row-major order as the tensor (zero-copy); None when a sub-array of a row
    that is not null is null (a tensor has no place for it). A null row's sub-arrays may be null (DuckDB
    marks them so: a NULL from an outer join)."""
    storage_nulls = column.is_null() if column.null_count else None
    null_rows = storage_nulls.to_numpy(zero_copy_only=False) if storage_nulls is not None else None
    values = column
    for _ in ttype.shape:
        if values is not column and values.null_count:
            inner = values.is_null().to_numpy(zero_copy_only=False)
            if null_rows is None or bool(np.any(inner & ~null_rows)):
                return None
        size = values.type.list_size
        null_rows = None if null_rows is None else np.repeat(null_rows, size)
        values = values.values.slice(values.offset * size, len(values) * size)
    storage = pa.FixedSizeListArray.from_arrays(values, math.prod(ttype.shape), mask=storage_nulls)
    return pa.ExtensionArray.from_storage(ttype, storage)


def _blob_to_tensor(column, ttype: pa.FixedShapeTensorType):
    width = _row_bytes(ttype)
    try:
        fixed = column.cast(pa.binary(width)) if not pa.types.is_fixed_size_binary(column.type) else column
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    if fixed.type.byte_width != width:
        return None
    return binary_to_tensor(fixed, ttype)


def _row_bytes(tensor: pa.FixedShapeTensorType) -> int:
    return math.prod(tensor.shape) * tensor.value_type.bit_width // 8


def _as_blob(tensor: pa.FixedShapeTensorType) -> bool:
    # DuckDB allocates a vector of 2,048 rows of an ARRAY column at once: a 1 MiB tensor asked for 2 GiB
    return _row_bytes(tensor) > BLOB_BYTES


def _sql_type(tensor: pa.FixedShapeTensorType) -> pa.DataType:
    return pa.binary(_row_bytes(tensor)) if _as_blob(tensor) else _nested_type(tensor)


def _for_sql(column):
    if not isinstance(column.type, pa.FixedShapeTensorType):
        return column
    if _as_blob(column.type):
        _check_row_major(column.type)
        return tensor_to_binary(column)
    return _nested(column)


def _nested_type(tensor: pa.FixedShapeTensorType) -> pa.DataType:
    value = tensor.value_type
    for size in reversed(tensor.shape):
        value = pa.list_(value, size)
    return value


def _nested(column) -> pa.Array:
    """A fixed-shape tensor column as nested fixed-size lists in row-major order."""
    tensor = column.type
    _check_row_major(tensor)
    storage = column.storage
    values = storage.flatten()  # the row-major elements of every valid-or-not row
    for size in reversed(tensor.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return pa.FixedSizeListArray.from_arrays(values, tensor.shape[0], mask=storage.is_null() if storage.null_count else None)


def _check_row_major(tensor: pa.FixedShapeTensorType) -> None:
    if tensor.permutation is not None and list(tensor.permutation) != sorted(tensor.permutation):
        raise flight.FlightServerError("fixed-shape tensors with a permutation are not supported by SQL")
