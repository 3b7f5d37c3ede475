"""Rows out as files others read: CSV, JSON Lines, Parquet (the ``tensorgrid sql`` command's output).

CSV and JSON have no bytes or tensors: binary values are written as base64 text, tensors and lists as
(JSON) arrays. Parquet keeps every type, tensors in the store's layout (``tg.open`` reads them back).
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import stat

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .. import fs as tgfs
from ..errors import TensorGridError
from . import encoding

FORMATS = ("csv", "json", "parquet")
_EXT = {".csv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}


def format_of(path: str) -> str | None:
    """The format a file name's extension names, or None."""
    low = path.lower()
    return next((fmt for ext, fmt in _EXT.items() if low.endswith(ext)), None)


def to_bytes(table: pa.Table, fmt: str) -> bytes:
    if fmt == "parquet":
        sink = io.BytesIO()
        pq.write_table(encoding.encode(table, encoding.physical_schema(table.schema)), sink, store_schema=True)
        return sink.getvalue()
    if fmt == "csv":
        sink = io.BytesIO()
        pacsv.write_csv(_as_text(table), sink)
        return sink.getvalue()
    if fmt == "json":
        cols = [_pylist(table.column(i)) for i in range(table.num_columns)]
        lines = (json.dumps(dict(zip(table.schema.names, row)), ensure_ascii=False, default=str) for row in zip(*cols))
        return "".join(line + "\n" for line in lines).encode()
    raise ValueError(f"unknown format {fmt!r}")


def write_stream(table: pa.Table, fmt: str, stream) -> None:
    stream.write(to_bytes(table, fmt))
    stream.flush()


def target_problem(url: str) -> str | None:
    """Why no file can be written at ``url`` (its folder is missing; it is a device, pipe or socket, which
    a rename would replace), or None. Through a symbolic link, the file it names is the target."""
    fs, path = tgfs.resolve(url)
    if not tgfs.is_local(fs):
        return None
    path = os.path.realpath(path)
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return f"has no folder {folder}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return "is not a regular file (a device, pipe or socket): give a file path"
    return None


def write_file(table: pa.Table, url: str, fmt: str, overwrite: bool = True) -> None:
    """The rows as one file at ``url``, whole or not at all (``fs.put_atomic``; without ``overwrite``,
    ``fs.create_exclusive``: a file that appeared meanwhile is never replaced)."""
    problem = target_problem(url)
    if problem is not None:
        raise TensorGridError(f"{url} {problem}")
    data = to_bytes(table, fmt)
    fs, path = tgfs.resolve(url)
    if tgfs.is_local(fs):
        path = os.path.realpath(path)  # a link stays a link to the new file
    try:
        if overwrite:
            tgfs.put_atomic(fs, path, data)
        elif not tgfs.create_exclusive(fs, path, data):
            raise TensorGridError(f"{url} was created by someone else while the rows were written: not replaced")
    except OSError as e:  # disk full, no permission...: named by the file asked for, not the temporary
        raise OSError(e.errno, e.strerror, url) from None


def _pylist(col: pa.ChunkedArray) -> list:
    """A column's values as JSON can hold them: tensors and lists as nested lists, bytes as base64."""
    t = col.type
    if isinstance(t, pa.FixedShapeTensorType):
        array = encoding.tensor_to_numpy(col)
        finite = array.dtype.kind != "f" or bool(np.isfinite(array).all())
        dense = array.tolist() if finite else _jsonable(array.tolist())
        valid = col.is_valid().to_pylist() if col.null_count else None
        return dense if valid is None else [v if ok else None for v, ok in zip(dense, valid)]
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return [None if v is None else base64.b64encode(v).decode() for v in col.to_pylist()]
    values = col.to_pylist()
    if _nested(t) or pa.types.is_floating(t):
        return [_jsonable(v) for v in values]
    return values


def _nested(t: pa.DataType) -> bool:
    return pa.types.is_nested(t) or isinstance(t, pa.BaseExtensionType)


def _jsonable(v):
    """``v`` as JSON holds it: bytes as base64, NaN and infinities as null (JSON has no such numbers)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _as_text(table: pa.Table) -> pa.Table:
    """Columns CSV cannot hold (bytes, tensors, lists, structs) as text: base64, or JSON arrays/objects."""
    cols = []
    for f, col in zip(table.schema, table.columns):
        t = f.type
        if _nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            values = _pylist(col)
            if _nested(t):
                values = [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in values]
            col = pa.array(values, pa.string())
        cols.append(col)
    return pa.Table.from_arrays(cols, names=table.schema.names)
