"""Arrow columns -> torch, without per-row Python work for numeric and tensor columns."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import torch

from ..store import encoding


def column_to_torch(col: pa.ChunkedArray | pa.Array):
    """A torch.Tensor for numeric, bool and fixed-shape tensor columns (zero-copy when the column is one
    chunk without nulls); a Python list for everything else (strings, binary, nested...)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else (col.combine_chunks() if col.num_chunks else
                                                          pa.array([], col.type))
    t = col.type
    if isinstance(t, pa.FixedShapeTensorType) and col.null_count == 0:
        return _from_numpy(encoding.tensor_to_numpy(col))
    if col.null_count == 0:
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            return _from_numpy(col.to_numpy(zero_copy_only=False))
        if pa.types.is_boolean(t):
            return torch.from_numpy(col.to_numpy(zero_copy_only=False))
        if pa.types.is_fixed_size_list(t) and (pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)) \
                and col.values.null_count == 0:
            flat = col.values.slice(col.offset * t.list_size, len(col) * t.list_size)
            return _from_numpy(flat.to_numpy(zero_copy_only=False).reshape(len(col), t.list_size))
        if (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
                pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type)):
            # lists of one length (e.g. Spark's array columns) stack into a (rows, length) tensor
            offsets = col.offsets.to_numpy()
            lengths = np.diff(offsets)
            if len(lengths) and (lengths == lengths[0]).all() and col.values.null_count == 0:
                flat = col.values.slice(offsets[0], offsets[-1] - offsets[0])
                return _from_numpy(flat.to_numpy(zero_copy_only=False).reshape(len(col), int(lengths[0])))
    return col.to_pylist()


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    # Arrow memory is flagged read-only, but what reaches the user is private to this process and
    # epoch: a decoded copy dropped after the epoch, a copy-on-write map made afresh each epoch, or a
    # copy (stream.window_columns copies views of kept row groups and of in-memory tables).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _numpy_view(arr: pa.Array) -> np.ndarray | None:
    """A zero-copy numpy view (rows first) of a numeric or tensor array without nulls, else None."""
    t = arr.type
    if arr.null_count:
        return None
    if isinstance(t, pa.FixedShapeTensorType):
        return encoding.tensor_to_numpy(arr)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        return arr.to_numpy(zero_copy_only=False)
    return None


def take_to_torch(table: pa.Table, indices: np.ndarray) -> dict:
    """Rows ``indices`` of a table as batch columns, gathered chunk by chunk (chunks are never
    concatenated)."""
    col0 = table.column(0)
    if col0.num_chunks <= 1:
        return take_per_table([table], [(0, None, indices)], len(indices))
    bounds0 = [len(c) for c in col0.chunks]
    if any([len(c) for c in col.chunks] != bounds0 for col in table.columns[1:]):
        table = pa.Table.from_batches(table.to_batches(), table.schema)  # align the columns' chunks (zero-copy)
        col0 = table.column(0)
    starts = np.cumsum([0] + [len(c) for c in col0.chunks])
    owner = np.searchsorted(starts, indices, side="right") - 1
    order = np.argsort(owner, kind="stable")
    bounds = np.searchsorted(owner[order], np.arange(col0.num_chunks + 1))
    pieces = [pa.Table.from_arrays([c.chunk(k) for c in table.columns], schema=table.schema)
              for k in range(col0.num_chunks)]
    groups = [(k, order[bounds[k]:bounds[k + 1]], indices[order[bounds[k]:bounds[k + 1]]] - starts[k])
              for k in range(col0.num_chunks) if bounds[k + 1] > bounds[k]]
    return take_per_table(pieces, groups, len(indices))


def take_per_table(tables: list[pa.Table], groups: list, n: int) -> dict:
    """Batch columns of ``n`` rows assembled from several tables: group (t, out, rows) puts rows ``rows``
    of table t at output positions ``out`` (None: all of them, in order). Numeric and tensor columns are
    gathered with numpy (one pass, no per-row Python), the rest with Arrow take."""
    out = {}
    for name in tables[0].column_names:
        views = [_single_view(t.column(name)) for t in tables]
        if all(v is not None for v in views):
            if len(groups) == 1 and groups[0][1] is None:
                out[name] = torch.from_numpy(np.take(views[groups[0][0]], groups[0][2], axis=0))
                continue
            first = views[0]
            dest = np.empty((n,) + first.shape[1:], dtype=first.dtype)
            for t, pos, rows in groups:
                dest[pos] = np.take(views[t], rows, axis=0)
            out[name] = torch.from_numpy(dest)
            continue
        if len(groups) == 1 and groups[0][1] is None:
            taken = tables[groups[0][0]].column(name).take(pa.array(groups[0][2]))
        else:
            merged = pa.concat_arrays([tables[t].column(name).take(pa.array(rows)).combine_chunks()
                                       for t, _, rows in groups])
            order = np.concatenate([pos for _, pos, _ in groups])
            taken = merged.take(pa.array(np.argsort(order, kind="stable")))  # back to the requested order
        out[name] = column_to_torch(taken)
    return out


def concat_then_take(tables: dict, pieces: list, indices: np.ndarray) -> dict:
    """Rows ``indices`` of the concatenation of ``pieces`` (key, start, stop): slices of ``tables[key]``
    laid end to end. Numeric and tensor columns cost one sequential copy of the pieces and one gather in
    output order; scattering each table's rows to their output positions instead costs a random write per
    row (1.5x slower on a shuffle window, measured)."""
    out = {}
    for name in next(iter(tables.values())).column_names:
        views = {k: _single_view(t.column(name)) for k, t in tables.items()}
        if all(v is not None for v in views.values()):
            parts = [views[k][a:b] for k, a, b in pieces]
        else:  # tables of several chunks (decoded row groups): a view per chunk of each piece
            parts = [_numpy_view(c) for k, a, b in pieces for c in tables[k].column(name).slice(a, b - a).chunks]
        if parts and all(v is not None for v in parts):
            out[name] = torch.from_numpy(np.take(np.concatenate(parts), indices, axis=0))
        else:
            col = tables[pieces[0][0]].column(name)
            chunks = [c for k, a, b in pieces for c in tables[k].column(name).slice(a, b - a).chunks]
            out[name] = column_to_torch(pa.chunked_array(chunks, col.type).take(pa.array(indices)))
    return out


def _single_view(col: pa.ChunkedArray) -> np.ndarray | None:
    if col.num_chunks != 1:
        return None
    return _numpy_view(col.chunk(0))


def table_to_torch(table: pa.Table) -> dict:
    return {name: column_to_torch(col) for name, col in zip(table.column_names, table.columns)}


def slice_batch(cols: dict, a: int, b: int) -> dict:
    return {k: v[a:b] for k, v in cols.items()}
