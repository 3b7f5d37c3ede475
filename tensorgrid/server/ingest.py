"""Bulk ingestion (Flight SQL ``CommandStatementIngest``, ADBC's ``adbc_ingest``) into a DuckDB table.

The uploaded stream is registered on the request's own cursor and copied by one ``CREATE TABLE ... AS`` or
``INSERT ... BY NAME`` inside a transaction: a failed upload leaves the table as it was. Arrow's fixed-shape
tensor columns become nested fixed-size lists, which DuckDB keeps as ``FLOAT[3][2]`` arrays, so the shape
survives the round trip (DuckDB would otherwise flatten the extension type to its storage, ``FLOAT[6]``).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from .metadata import quote
from .sqlproto import TableExistsOption, TableNotExistOption

_SOURCE = "__tensorgrid_ingest"


def ingest(cur: duckdb.DuckDBPyConnection, command, reader: pa.RecordBatchReader) -> int:
    """Rows of ``reader`` into the command's table, following its if-exists / if-not-exists options;
    returns the number of rows written."""
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

    rows = copy_in(cur, reader, statement)
    return int(rows[0][0]) if rows and rows[0] and rows[0][0] is not None else -1


def copy_in(cur: duckdb.DuckDBPyConnection, reader: pa.RecordBatchReader, statement,
            source: str = _SOURCE) -> list:
    """Run ``statement(source)`` (SQL reading the uploaded rows as table ``source``) in one transaction on
    ``cur``: the stream registered for it only, a failure rolled back (nothing half-written). Its result rows."""
    cur.register(source, duckdb_friendly(reader))
    cur.begin()
    try:
        rows = cur.sql(statement(source)).fetchall()
        cur.commit()
        return rows
    except BaseException:
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
    """``reader`` with fixed-shape tensor columns turned into nested fixed-size lists (streamed, no copy)."""
    fields = list(reader.schema)
    if not any(isinstance(f.type, pa.FixedShapeTensorType) for f in fields):
        return reader
    schema = pa.schema([pa.field(f.name, _nested_type(f.type), f.nullable)
                        if isinstance(f.type, pa.FixedShapeTensorType) else f for f in fields])

    def batches():
        for batch in reader:
            yield pa.RecordBatch.from_arrays(
                [_nested(col) if isinstance(col.type, pa.FixedShapeTensorType) else col for col in batch.columns],
                schema=schema)

    return pa.RecordBatchReader.from_batches(schema, batches())


def _nested_type(tensor: pa.FixedShapeTensorType) -> pa.DataType:
    value = tensor.value_type
    for size in reversed(tensor.shape):
        value = pa.list_(value, size)
    return value


def _nested(column) -> pa.Array:
    """A fixed-shape tensor column as nested fixed-size lists in row-major order."""
    tensor = column.type
    if tensor.permutation is not None and list(tensor.permutation) != sorted(tensor.permutation):
        raise flight.FlightServerError("fixed-shape tensors with a permutation are not supported by ingest")
    storage = column.storage
    values = storage.flatten()  # the row-major elements of every valid-or-not row
    for size in reversed(tensor.shape[1:]):
        values = pa.FixedSizeListArray.from_arrays(values, size)
    return pa.FixedSizeListArray.from_arrays(values, tensor.shape[0], mask=storage.is_null() if storage.null_count else None)
