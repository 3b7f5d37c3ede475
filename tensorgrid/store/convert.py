"""Turn whatever the user hands to ``tg.write`` into one schema and a stream of Arrow record batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ..errors import EmptyDataError, SchemaMismatchError, UnsupportedDataError
from .encoding import normalize_schema, pandas_tensors_to_arrow

DICT_CHUNK_ROWS = 4096


def _from_pandas(df: pd.DataFrame) -> pa.Table:
    """A DataFrame as a table: its index first when it carries data (see ``_index_levels``), then its
    columns; object columns of equal-shape arrays become tensors."""
    dup = df.columns[df.columns.duplicated()].tolist()
    if dup:
        raise UnsupportedDataError(f"duplicate column names: {sorted(set(map(str, dup)))}")
    arrays, names = [], []
    for name, s in [*_index_levels(df), *df.items()]:
        if s.dtype == object:
            tensor = pandas_tensors_to_arrow(s.tolist())
            if tensor is not None:
                arrays.append(tensor)
                names.append(str(name))
                continue
        try:
            arrays.append(pa.Array.from_pandas(s))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise UnsupportedDataError(f"column {name!r}: cannot store its values ({e})") from None
        except UnicodeEncodeError:
            raise UnsupportedDataError(f"column {name!r}: {_bad_text_where(s.tolist())}") from None
        names.append(str(name))
    return pa.Table.from_arrays(arrays, names=names)


def _index_levels(df: pd.DataFrame) -> list[tuple[str, pd.Series]]:
    """The index levels stored as columns, as ``df.reset_index()`` would name them: a named index, every
    level of a MultiIndex (an unnamed one as level_<i>). An unnamed single index (the default RangeIndex,
    or what filtering left) holds positions, not data, and is not stored. A level named like a column is
    left out when it holds the same values (``set_index(..., drop=False)``), else refused."""
    idx = df.index
    if isinstance(idx, pd.MultiIndex):
        names = [n if n is not None else f"level_{i}" for i, n in enumerate(idx.names)]
    elif idx.name is not None:
        names = [idx.name]
    else:
        return []
    out = []
    for i, name in enumerate(names):
        level = pd.Series(idx.get_level_values(i), name=name)
        if name in df.columns:
            if level.reset_index(drop=True).equals(df[name].reset_index(drop=True)):
                continue  # the column already holds it
            raise UnsupportedDataError(f"the index level {name!r} has the name of a column with other values: "
                                       f"rename one of them (df.rename_axis / df.rename) or drop the index "
                                       f"(df.reset_index(drop=True))")
        out.append((name, level))
    return out


def _bad_text(v) -> bool:
    """Whether ``v`` (a string, or a list/dict/array holding strings) has text UTF-8 cannot encode."""
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(v, Mapping):
        return any(_bad_text(k) or _bad_text(x) for k, x in v.items())
    if isinstance(v, (list, tuple, np.ndarray)) and (not isinstance(v, np.ndarray) or v.dtype == object):
        return any(_bad_text(x) for x in v)
    return False


def _bad_text_where(values: list, first_row: int = 0) -> str:
    row = next((i for i, v in enumerate(values) if _bad_text(v)), None)
    where = f" (row {first_row + row}: {values[row]!r})" if row is not None else ""
    return (f"holds text that is not valid Unicode{where}: a lone surrogate such as '\\ud800' has no UTF-8 "
            "form; fix or drop it, e.g. text.encode('utf-8', 'replace').decode('utf-8')")


def _has_ndarray(rows: list[dict]) -> bool:
    return any(isinstance(v, np.ndarray) for v in rows[0].values())


def _pylist(rows: list[dict], schema: pa.Schema | None, first_row: int = 0) -> pa.RecordBatch:
    """Rows -> a batch whose columns are every key seen (a row without a key holds null there); keys that
    first appear after the first rows are an error, never silently dropped. ``first_row``: the position
    of ``rows[0]`` in the input (for messages)."""
    names = list(dict.fromkeys(k for r in rows for k in r))
    try:
        if schema is None:
            return pa.RecordBatch.from_pydict({k: [r.get(k) for r in rows] for k in names})
        extra = [k for k in names if k not in schema.names]
        if extra:
            raise SchemaMismatchError(f"rows have key(s) {extra} that the first rows did not have "
                                      f"(columns: {schema.names})")
        return pa.RecordBatch.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        if schema is not None:
            raise SchemaMismatchError(f"rows do not match the schema of the first rows: {e}") from None
        raise UnsupportedDataError(f"cannot store these rows: {e}") from None
    except UnicodeEncodeError:
        bad = next((k for k in names if _bad_text(k)), None)
        if bad is not None:
            raise UnsupportedDataError(f"the column name {bad!r} is not valid Unicode (a lone surrogate)") from None
        name = next(k for k in names if any(_bad_text(r.get(k)) for r in rows))
        raise UnsupportedDataError(f"column {name!r}: {_bad_text_where([r.get(name) for r in rows], first_row)}") \
            from None


def _dict_batches(rows: Iterator[Mapping]) -> Iterator[pa.RecordBatch]:
    schema = None
    for first_row in itertools.count(0, DICT_CHUNK_ROWS):
        chunk = list(itertools.islice(rows, DICT_CHUNK_ROWS))
        if not chunk:
            return
        if not all(isinstance(r, Mapping) for r in chunk):
            bad = next(r for r in chunk if not isinstance(r, Mapping))
            raise UnsupportedDataError(f"an iterable of rows must yield dicts, got {type(bad).__name__}")
        if schema is None:
            frame = pd.DataFrame.from_records(chunk) if _has_ndarray(chunk) else None
            batch = _from_pandas(frame).to_batches()[0] if frame is not None else _pylist(chunk, None, first_row)
            schema = batch.schema
        else:
            if _has_ndarray(chunk):
                batch = _from_pandas(pd.DataFrame.from_records(chunk)).to_batches()[0]
                batch = _cast(batch, schema)
            else:
                batch = _pylist(chunk, schema, first_row)
        yield batch


def _cast(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    if batch.schema.equals(schema):
        return batch
    if batch.schema.names != schema.names:
        raise SchemaMismatchError(f"columns {batch.schema.names} differ from the first batch's {schema.names}")
    try:
        return batch.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise SchemaMismatchError(f"a batch does not match the first batch's schema: {e}") from None


def is_spark_dataframe(data) -> bool:
    """A pyspark DataFrame (classic or Spark Connect), told apart without importing pyspark."""
    mod = type(data).__module__ or ""
    return mod.startswith("pyspark.sql") and type(data).__name__ == "DataFrame"


def is_ray_dataset(data) -> bool:
    """A ``ray.data.Dataset`` (or its MaterializedDataset), told apart without importing ray."""
    return any(c.__module__ == "ray.data.dataset" and c.__name__ == "Dataset" for c in type(data).__mro__)


def to_batches(data) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """Return the normalised schema and a batch stream (first batch already checked to exist)."""
    if isinstance(data, pd.DataFrame):
        table = _from_pandas(data)
        source: Iterable[pa.RecordBatch] = table.to_batches()
        schema = table.schema
    elif isinstance(data, pa.Table):
        source, schema = data.to_batches(), data.schema
    elif isinstance(data, pa.RecordBatch):
        source, schema = [data], data.schema
    elif isinstance(data, pa.RecordBatchReader):
        source, schema = data, data.schema
    elif is_spark_dataframe(data):  # its executors write it (store/spark.py): never streamed to this process
        raise UnsupportedDataError("a Spark DataFrame is written by its executors: tg.write(url, df)")
    elif is_ray_dataset(data):  # its tasks write it (store/ray.py)
        raise UnsupportedDataError("a Ray Dataset is written by Ray's tasks: tg.write(url, ds)")
    elif hasattr(data, "to_arrow") and hasattr(data, "schema") and hasattr(data, "num_rows"):
        table = data.to_arrow()  # a TensorGrid Dataset or SQL result
        source, schema = table.to_batches(), table.schema
    elif isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise UnsupportedDataError(
            f"cannot write a {type(data).__name__}: pass a pandas DataFrame, pyarrow Table, RecordBatchReader, "
            "an iterable of RecordBatches or of dicts, or a Spark DataFrame")
    else:
        it = iter(data)
        first = next(it, None)
        if first is None:
            raise EmptyDataError("no rows to write: the iterable is empty")
        if isinstance(first, pa.RecordBatch):
            schema = first.schema
            source = (_cast(b, schema) if isinstance(b, pa.RecordBatch) else _bad_item(b)
                      for b in itertools.chain([first], it))
        elif isinstance(first, Mapping):
            gen = _dict_batches(itertools.chain([first], it))
            head = next(gen)
            schema = head.schema
            source = itertools.chain([head], gen)
        else:
            raise UnsupportedDataError(f"an iterable must yield dicts or RecordBatches, got {type(first).__name__}")
    norm = normalize_schema(schema)
    if not norm.names:
        raise EmptyDataError("no columns to write")
    if len(set(norm.names)) != len(norm.names):
        dup = sorted({n for n in norm.names if norm.names.count(n) > 1})
        raise UnsupportedDataError(f"duplicate column names: {dup}")
    batches = (b if b.schema.equals(norm) else _cast_normal(b, norm) for b in source)
    batches = (b for b in batches if b.num_rows)
    first_batch = next(batches, None)
    if first_batch is None:
        raise EmptyDataError("no rows to write")
    return norm, itertools.chain([first_batch], batches)


def _cast_normal(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    try:
        return pa.RecordBatch.from_arrays([_list_views_as_lists(c).cast(f.type) if not c.type.equals(f.type) else c
                                           for c, f in zip(batch.columns, schema)], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise SchemaMismatchError(f"a batch does not match the data's schema: {e}") from None


def _list_views_as_lists(col: pa.Array) -> pa.Array:
    """A list_view column as a plain list column (pyarrow 26's cast between them builds invalid arrays)."""
    if not (pa.types.is_list_view(col.type) or pa.types.is_large_list_view(col.type)):
        return col
    sizes = pc.fill_null(col.sizes, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(sizes)]), pa.int64())
    return pa.LargeListArray.from_arrays(offsets, pc.list_flatten(col), mask=col.is_null())


def _bad_item(item):
    raise UnsupportedDataError(f"an iterable of RecordBatches yielded a {type(item).__name__}")

