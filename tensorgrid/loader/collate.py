"""Arrow columns -> torch, without per-row Python work for numeric, tensor and list columns.

A chunk's columns (``Columns``) are gathered once and sliced into batches. Two layouts keep a batch cheap:
1-D numeric columns of one dtype are the rows of one (k, rows) block, so a batch's k columns cost one slice
and one unbind instead of k slices (per-column tensor work made 25 float columns load at 0.4x one 25-wide
tensor column); from the Arrow cache such a group is gathered from the file's row-major pack in one pass
into a (rows, k) array whose transpose is the block (``stacked`` hands it over whole); lists of numbers (token ids, ragged arrays) stay flat values plus offsets (``Ragged``) and
are padded per batch: ``batch[name]`` (rows, longest) padded with 0, ``batch[name + "_lengths"]`` int64.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from ..errors import ArgumentError
from ..store import encoding

LENGTHS = "_lengths"  # batch[name + LENGTHS]: the row lengths of a padded list column


def is_ragged_type(t: pa.DataType) -> bool:
    """A list (of any lengths) of integers or floats: padded per batch, with lengths."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and (
        pa.types.is_integer(t.value_type) or pa.types.is_floating(t.value_type))


class Ragged:
    """Rows of a list column: flat ``values`` and ``offsets`` (rows + 1, int64, row i is
    values[offsets[i]:offsets[i+1]]). Slicing rows is a view; ``padded()`` makes the batch tensors."""

    __slots__ = ("values", "offsets")

    def __init__(self, values: torch.Tensor, offsets: torch.Tensor):
        self.values, self.offsets = values, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, s: slice) -> Ragged:
        return Ragged(self.values, self.offsets[s.start:s.stop + 1])

    def padded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, longest) values padded with 0 (a new tensor), and the lengths (int64)."""
        off = self.offsets.numpy()
        lengths = np.diff(off)
        width = int(lengths.max()) if len(lengths) else 0
        out = np.zeros((len(lengths), width), self.values.numpy().dtype)
        out[np.arange(width) < lengths[:, None]] = self.values.numpy()[off[0]:off[-1]]  # row-major = value order
        return torch.from_numpy(out), torch.from_numpy(lengths)

    def clone(self) -> Ragged:
        off = self.offsets.numpy()
        return Ragged(self.values[int(off[0]):int(off[-1])].clone(), self.offsets - self.offsets[0])

    def cat(self, other: Ragged) -> Ragged:
        a, b = self.clone(), other.clone()
        return Ragged(torch.cat([a.values, b.values]), torch.cat([a.offsets, b.offsets[1:] + a.offsets[-1]]))


def ragged_from_arrow(col: pa.Array) -> Ragged:
    """A list<number> array as a Ragged: a null list is an empty row, a null value inside a list is 0."""
    if col.null_count:
        col = pc.fill_null(col, pa.scalar([], col.type))
    values = col.flatten()  # the values of these rows only (respects slicing)
    if values.null_count:
        values = pc.fill_null(values, pa.scalar(0, values.type))
    offsets = col.offsets.to_numpy().astype(np.int64)
    return Ragged(_from_numpy(values.to_numpy(zero_copy_only=False)), torch.from_numpy(offsets - offsets[0]))


def column_to_torch(col: pa.ChunkedArray | pa.Array):
    """A torch.Tensor for numeric, bool and fixed-shape tensor columns (zero-copy when the column is one
    chunk without nulls); a Ragged for lists of numbers; a Python list for everything else (strings, binary,
    nested..., and numeric columns with nulls)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.chunk(0) if col.num_chunks == 1 else (col.combine_chunks() if col.num_chunks else
                                                          pa.array([], col.type))
    t = col.type
    if is_ragged_type(t):
        return ragged_from_arrow(col)
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


class Columns(dict):
    """One chunk's columns, name -> tensor, Ragged or list, in the table's order. ``blocks`` lists
    (names, block): 1-D numeric columns of one dtype stored as the rows of one (k, rows) tensor, each
    ``self[name]`` being the contiguous view ``block[j]``."""

    def __init__(self, items=(), blocks=()):
        super().__init__(items)
        self.blocks = list(blocks)
        self._keys: tuple | None = None

    def _layout(self) -> tuple:
        # computed on first use: a chunk's columns are complete by then
        if self._keys is None:
            packed_names = {name for group, _ in self.blocks for name in group}
            self._keys = (_batch_keys(self), [k for k in self if k not in packed_names])
        return self._keys

    def batch_keys(self) -> list[str]:
        """A batch's keys, in order."""
        return self._layout()[0]

    def loose(self) -> list[str]:
        """The columns outside blocks."""
        return self._layout()[1]


class _Dest:
    """Where a gather writes: a (k, n) block per group of two or more 1-D columns of one dtype, an array of
    its own for any other gatherable column. ``protos``: name -> a numpy view with the column's dtype and
    row shape (columns absent are not gatherable with numpy). ``packs``: column names -> a row-major (rows,
    k) view of the source: such a group is gathered in one pass, row by row, into an (n, k) array whose
    transpose is its block."""

    def __init__(self, names: list[str], protos: dict, n: int, packs: dict | None = None, empty=np.empty):
        self.names, self.where, self.blocks, self.values, self.rows = names, {}, [], {}, {}
        for group, p in (packs or {}).items():  # row-major: a sample's values side by side, as gathered
            rows = empty((n, len(group)), p.dtype)
            self.rows[group] = rows
            self.blocks.append((group, rows.T))
            self.where.update({name: rows[:, j] for j, name in enumerate(group)})
        by_dtype: dict = {}
        for name in names:
            p = protos.get(name)
            if p is not None and p.ndim == 1 and name not in self.where:
                by_dtype.setdefault(p.dtype, []).append(name)
        for dtype, group in by_dtype.items():
            if len(group) > 1:
                block = empty((len(group), n), dtype)
                self.blocks.append((tuple(group), block))
                self.where.update({name: block[j] for j, name in enumerate(group)})
        for name, p in protos.items():
            if name not in self.where:
                self.where[name] = empty((n,) + p.shape[1:], p.dtype)

    @property
    def rows_of(self) -> set:
        """Columns gathered with their row-major group."""
        return {name for group in self.rows for name in group}

    def array(self, name: str) -> np.ndarray:
        return self.where[name]

    def columns(self) -> Columns:
        blocks = [(group, torch.from_numpy(block)) for group, block in self.blocks]
        cols = {name: block[j] for group, block in blocks for j, name in enumerate(group)}
        out = Columns(blocks=blocks)
        for name in self.names:
            out[name] = cols[name] if name in cols else (
                torch.from_numpy(self.where[name]) if name in self.where else self.values[name])
        return out


def take_to_torch(table: pa.Table, indices: np.ndarray, empty=np.empty) -> Columns:
    """Rows ``indices`` of a table as batch columns, gathered chunk by chunk (chunks are never
    concatenated)."""
    col0 = table.column(0)
    if col0.num_chunks <= 1:
        return take_per_table([table], [(0, None, indices)], len(indices), empty=empty)
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
    return take_per_table(pieces, groups, len(indices), empty=empty)


def take_per_table(tables: list[pa.Table], groups: list, n: int, packs: list | None = None,
                   empty=np.empty) -> Columns:
    """Batch columns of ``n`` rows assembled from several tables: group (t, out, rows) puts rows ``rows``
    of table t at output positions ``out`` (None: all of them, in order). Numeric and tensor columns are
    gathered with numpy into their block rows (one pass, no per-row Python), the rest with Arrow take;
    ``packs`` (per table, row-major views of wide columns: ``Source.packs``) gather a group of columns in
    one pass. ``empty`` makes the output arrays (a loader's BufferPool reuses them)."""
    names = tables[0].column_names
    common = _common_packs(packs, len(tables))
    views = {}
    for name in names:
        vs = [_single_view(t.column(name)) for t in tables]
        if all(v is not None for v in vs):
            views[name] = vs
    dest = _Dest(names, {name: vs[0] for name, vs in views.items()}, n, {g: vs[0] for g, vs in common.items()},
                 empty)
    if views and len(groups) == 1 and groups[0][1] is None:
        _check_range(groups[0][2], len(tables[groups[0][0]]))
    for group, vs in common.items():
        out = dest.rows[group]
        if len(groups) == 1 and groups[0][1] is None:
            np.take(vs[groups[0][0]], groups[0][2], axis=0, out=out, mode="clip")
        else:
            for t, pos, rows in groups:
                out[pos] = np.take(vs[t], rows, axis=0)
    gathered = dest.rows_of
    for name in names:
        if name in gathered:
            continue
        if name in views:
            arr = dest.array(name)
            if len(groups) == 1 and groups[0][1] is None:  # clip: unbuffered (the indices are ours, in range)
                np.take(views[name][groups[0][0]], groups[0][2], axis=0, out=arr, mode="clip")
            else:
                for t, pos, rows in groups:
                    arr[pos] = np.take(views[name][t], rows, axis=0)
            continue
        if len(groups) == 1 and groups[0][1] is None:
            taken = tables[groups[0][0]].column(name).take(pa.array(groups[0][2]))
        else:
            merged = pa.concat_arrays([tables[t].column(name).take(pa.array(rows)).combine_chunks()
                                       for t, _, rows in groups])
            order = np.concatenate([pos for _, pos, _ in groups])
            taken = merged.take(pa.array(np.argsort(order, kind="stable")))  # back to the requested order
        dest.values[name] = column_to_torch(taken)
    return dest.columns()


def _joined(parts: list, empty) -> np.ndarray:
    """The arrays end to end (along rows), in memory from ``empty``."""
    out = empty((sum(len(p) for p in parts),) + parts[0].shape[1:], parts[0].dtype)
    return np.concatenate(parts, out=out)


def concat_then_take(tables: dict, pieces: list, indices: np.ndarray, packs: dict | None = None,
                     empty=np.empty) -> Columns:
    """Rows ``indices`` of the concatenation of ``pieces`` (key, start, stop): slices of ``tables[key]``
    laid end to end. Numeric and tensor columns cost one sequential copy of the pieces and one gather in
    output order (into their block rows); scattering each table's rows to their output positions instead
    costs a random write per row (1.5x slower on a shuffle window, measured), and gathering straight from
    the tables reads a fresh copy-on-write map at random (a fault per page) over a range often twice the
    pieces (measured slower too). ``empty`` makes the output and the scratch copy (a loader's BufferPool:
    no fresh pages to fault in and zero per window)."""
    names = next(iter(tables.values())).column_names
    keys = list(tables)
    common = _common_packs([packs[k] for k in keys] if packs else None, len(keys))
    parts = {}
    for name in names:
        views = {k: _single_view(t.column(name)) for k, t in tables.items()}
        if all(v is not None for v in views.values()):
            ps = [views[k][a:b] for k, a, b in pieces]
        else:  # tables of several chunks (decoded row groups): a view per chunk of each piece
            ps = [_numpy_view(c) for k, a, b in pieces for c in tables[k].column(name).slice(a, b - a).chunks]
        if ps and all(v is not None for v in ps):
            parts[name] = ps
    dest = _Dest(names, {name: ps[0] for name, ps in parts.items()}, len(indices),
                 {g: vs[0] for g, vs in common.items()}, empty)
    if parts:
        _check_range(indices, sum(len(p) for p in next(iter(parts.values()))))
    for group, vs in common.items():
        by_key = dict(zip(keys, vs))
        np.take(_joined([by_key[k][a:b] for k, a, b in pieces], empty), indices, axis=0, out=dest.rows[group],
                mode="clip")
    gathered = dest.rows_of
    for name in names:
        if name in gathered:
            continue
        if name in parts:
            # numpy's take buffers its output unless mode is clip/wrap (the indices were checked above)
            np.take(_joined(parts[name], empty), indices, axis=0, out=dest.array(name), mode="clip")
        else:
            col = tables[pieces[0][0]].column(name)
            chunks = [c for k, a, b in pieces for c in tables[k].column(name).slice(a, b - a).chunks]
            dest.values[name] = column_to_torch(pa.chunked_array(chunks, col.type).take(pa.array(indices)))
    return dest.columns()


def _common_packs(packs: list | None, ntables: int) -> dict:
    """Column groups packed row-major in every table, with one dtype: group -> [view per table]."""
    if not packs or len(packs) != ntables or not all(packs):
        return {}
    common = {g: [v] for g, v in packs[0]}
    for ps in packs[1:]:
        mine = dict(ps)
        common = {g: vs + [mine[g]] for g, vs in common.items() if g in mine and mine[g].dtype == vs[0].dtype}
    return common


def _check_range(indices: np.ndarray, n: int) -> None:
    """Once per gather, what numpy's take checks per column unless told not to (mode="clip" is unbuffered)."""
    if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise IndexError(f"row index out of range: {int(indices.min())}..{int(indices.max())} of {n} rows")


def _single_view(col: pa.ChunkedArray) -> np.ndarray | None:
    if col.num_chunks != 1:
        return None
    return _numpy_view(col.chunk(0))


def table_to_torch(table: pa.Table, packs: list | None = None) -> dict:
    """A table's columns as tensors (views); with ``packs`` (row-major views of its wide columns, same rows)
    a pack's columns are views of its one block."""
    if not packs:
        return {name: column_to_torch(col) for name, col in zip(table.column_names, table.columns)}
    with warnings.catch_warnings():  # a view of the copy-on-write map: writable, private to this process
        warnings.simplefilter("ignore", UserWarning)
        blocks = [(names, torch.from_numpy(v).T) for names, v in packs]
    views = {name: block[j] for names, block in blocks for j, name in enumerate(names)}
    return Columns({name: views[name] if name in views else column_to_torch(col)
                    for name, col in zip(table.column_names, table.columns)}, blocks)


def packed(cols: dict) -> Columns:
    """``cols`` with its 1-D numeric tensors of one dtype (two or more) copied into blocks (as a gather
    does); a Columns is returned as it is."""
    if isinstance(cols, Columns):
        return cols
    by_dtype: dict = {}
    for name, v in cols.items():
        if isinstance(v, torch.Tensor) and v.ndim == 1:
            by_dtype.setdefault(v.dtype, []).append(name)
    blocks = [(tuple(g), torch.stack([cols[n] for n in g])) for g in by_dtype.values() if len(g) > 1]
    views = {name: block[j] for group, block in blocks for j, name in enumerate(group)}
    return Columns({name: views.get(name, v) for name, v in cols.items()}, blocks)


def stacked(cols: dict, stack: dict) -> dict:
    """``cols`` with each group ``name -> [columns]`` of ``stack`` given as one (rows, k) tensor in place of
    its columns (at the first one's place): a view when the group was gathered row-major in that order (the
    Arrow cache's packs), else one copy per chunk (to the columns' common dtype)."""
    blocks = list(cols.blocks) if isinstance(cols, Columns) else []
    out: dict = {}
    replaced = {m: name for name, members in stack.items() for m in members}
    for k, v in cols.items():
        if k not in replaced:
            out[k] = v
            continue
        name = replaced[k]
        if name in out:
            continue
        members = stack[name]
        whole = next((b for g, b in blocks if g == tuple(members) and b.T.is_contiguous()), None)
        if whole is not None:
            out[name] = whole.T
            continue
        parts = [cols[m] for m in members]
        bad = next((m for m, p in zip(members, parts) if not isinstance(p, torch.Tensor) or p.ndim != 1), None)
        if bad is not None:
            raise ArgumentError(f"stack: column {bad!r} is not a plain numeric column in these rows (nulls "
                                f"arrive as a list): {name!r} stacks numeric columns without nulls")
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in parts])
        out[name] = torch.stack([p.to(dtype) for p in parts], dim=1)
    keep = [(g, b) for g, b in blocks if not set(g) & replaced.keys()]
    return Columns(out, keep)


def copied(cols: dict) -> Columns:
    """Private copies of ``cols`` (packed: the blocks are the copies of their columns)."""
    was = isinstance(cols, Columns)
    cols = packed(cols)
    blocks = [(g, b.clone()) for g, b in cols.blocks] if was else cols.blocks
    views = {name: block[j] for group, block in blocks for j, name in enumerate(group)}
    return Columns({k: views[k] if k in views else _copy(v) for k, v in cols.items()}, blocks)


def _copy(v):
    return v.clone() if isinstance(v, (torch.Tensor, Ragged)) else v


def concatenated(a: dict, b: dict) -> dict:
    """Columns of ``a``'s rows then ``b``'s."""
    def cat(x, y):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return torch.cat([x, y])
        if isinstance(x, Ragged):
            return x.cat(y)
        # a numeric column with nulls in one part only is a list there: the whole column is a list
        return (x.tolist() if isinstance(x, torch.Tensor) else x) + (y.tolist() if isinstance(y, torch.Tensor) else y)
    return {k: cat(a[k], b[k]) for k in a}


def pinned(cols: dict, pin) -> dict:
    """``cols`` with every tensor replaced by ``pin(tensor)`` (a block once for all its columns; a Ragged
    is padded into new tensors per batch, pinned then)."""
    pin_value = lambda v: pin(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    if isinstance(cols, Columns):
        blocks = [(g, pin(b)) for g, b in cols.blocks]
        views = {name: block[j] for group, block in blocks for j, name in enumerate(group)}
        return Columns({k: views[k] if k in views else pin_value(v) for k, v in cols.items()}, blocks)
    return {k: pin_value(v) for k, v in cols.items()}


def slice_batch(cols: dict, a: int, b: int, pin=None) -> dict:
    """Rows [a, b) of a chunk's columns as a batch, in the table's order: tensors are views; a list of
    numbers becomes its padded tensor followed by ``<name>_lengths`` (both passed through ``pin`` when
    given: they are new each batch)."""
    if isinstance(cols, Columns):
        out = dict.fromkeys(cols.batch_keys())  # the order; assigning an existing key keeps its place
        for group, block in cols.blocks:
            out.update(zip(group, block[:, a:b].unbind(0)))  # k column views in one call
        loose = cols.loose()
    else:
        out = dict.fromkeys(_batch_keys(cols))
        loose = cols
    for k in loose:
        v = cols[k]
        if isinstance(v, Ragged):
            out[k], out[k + LENGTHS] = v[a:b].padded()
            if pin is not None:
                out[k], out[k + LENGTHS] = pin(out[k]), pin(out[k + LENGTHS])
        else:
            out[k] = v[a:b]
    return out


def _batch_keys(cols: dict) -> list[str]:
    keys = []
    for k, v in cols.items():
        keys += (k, k + LENGTHS) if isinstance(v, Ragged) else (k,)
    return keys
