"""SQL over datasets through DuckDB (scans with projection and filter pushdown, results as Arrow)."""

from __future__ import annotations

import duckdb
import pandas as pd
import pyarrow as pa

from ..errors import SQLError, UnsupportedDataError
from . import encoding
from .dataset import Dataset
from .evolution import SqlView
from .memory import ArrowDataset


def _source(value):
    if isinstance(value, Dataset):
        return value._arrow_source(), value.schema
    if isinstance(value, (pa.Table, pa.RecordBatch, pd.DataFrame)):
        return value, None
    if isinstance(value, str):
        from . import open as open_dataset

        ds = open_dataset(value)
        return ds._arrow_source(), ds.schema
    raise UnsupportedDataError(f"SQL tables must be Datasets, URLs, Arrow tables or DataFrames, "
                               f"got {type(value).__name__}")


def sql(query: str, **tables) -> ArrowDataset:
    """Run a DuckDB query; each keyword names a table. Returns the result as an in-memory Dataset."""
    if not isinstance(query, str) or not query.strip():
        raise SQLError(f"the query must be a non-empty SQL string, got {query!r}")
    con = duckdb.connect()
    tensors: dict[str, pa.FixedShapeTensorType | None] = {}
    try:
        for name, value in tables.items():
            src, schema = _source(value)
            try:
                src.register(con, name) if isinstance(src, SqlView) else con.register(name, src)
            except duckdb.Error as e:
                raise SQLError(f"cannot use {name!r} as an SQL table: {str(e).splitlines()[0]}") from None
            for f in schema or []:
                if isinstance(f.type, pa.FixedShapeTensorType):
                    # a name with two different tensor types is ambiguous: its bytes are left as they are
                    tensors[f.name] = f.type if tensors.get(f.name, f.type) == f.type else None
        try:
            result = con.sql(query)
            if result is None:  # a statement without a result (e.g. SET)
                table = pa.table({})
            else:
                table = result.to_arrow_table() if hasattr(result, "to_arrow_table") else result.fetch_arrow_table()
        except duckdb.Error as e:
            raise SQLError(str(e).splitlines()[0]) from None
    finally:
        con.close()
    return ArrowDataset(_restore_tensors(table, tensors), url="sql-result")


def _restore_tensors(table: pa.Table, tensors: dict) -> pa.Table:
    """Tensor columns pass through DuckDB as BLOBs; selected unchanged, they become tensors again."""
    cols, fields, changed = [], [], False
    for f, col in zip(table.schema, table.columns):
        tt = tensors.get(f.name)
        if tt is not None and (pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)
                               or pa.types.is_fixed_size_binary(f.type)):
            try:
                field = encoding.physical_schema(pa.schema([pa.field(f.name, tt)])).field(0)
                fsb = col.cast(field.type)
                col = encoding.decode(pa.Table.from_arrays([fsb], schema=pa.schema([field]))).column(0)
                f = pa.field(f.name, tt, f.nullable)
                changed = True
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                pass
        cols.append(col)
        fields.append(f)
    return pa.Table.from_arrays(cols, schema=pa.schema(fields)) if changed else table
