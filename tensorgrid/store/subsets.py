"""Subsets of a dataset without copying it: ``split``, ``select``, ``filter`` and ``sample`` return a view
over row ids and columns of the dataset, read through its Dataset contract (so every kind, and every
consumer of the contract: loader, trainer, SQL, ``tg.write``, works with them unchanged).

A view of a view is a view of the first dataset (one hop on every read, whatever the nesting). Its rows
keep their storage order; a view's fingerprint is the parent's plus the selection, so a loader state or a
checkpoint of one split refuses to resume on another. ``tg.write(url, view)`` materialises one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from ..args import check_int, check_number
from ..errors import ArgumentError, ColumnNotFoundError, ReadOnlyError, SQLError
from . import encoding
from .dataset import Dataset
from .labels import INDEX_COLUMN

_ROW = "__tensorgrid_row__"  # the position column added to evaluate a filter


class SubsetDataset(Dataset):
    """Some rows (sorted ids into ``base``, or all) and some columns (or all) of ``base``."""

    def __init__(self, base: Dataset, rows: np.ndarray | None, columns: list[str] | None, what: str,
                 shards: list[int] | None = None):
        """``shards``: whole shards of ``base`` only, in this order (``rows`` None): e.g. a rank's partitions."""
        self.base, self._rows, self._columns, self.what = base, rows, columns, what
        self._shard_ids = None if shards is None else [int(s) for s in shards]
        self.url, self.version = base.url, base.version
        self._fingerprint: str | None = None
        if self._shard_ids is not None:
            self._shards = [(s, None) for s in self._shard_ids]
        elif rows is None:
            self._shards = [(s, None) for s in range(base.num_shards)]
        else:
            bounds = np.concatenate([[0], np.cumsum(base.shard_rows, dtype=np.int64)])
            cuts = np.searchsorted(rows, bounds)
            self._shards = [(s, rows[a:b] - bounds[s]) for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])) if b > a]
        fields = base.schema if columns is None else [base.schema.field(c) for c in columns]
        self._schema = pa.schema(fields, metadata=base.schema.metadata)

    # --- the contract, through the base's --------------------------------------------------------
    @property
    def schema(self) -> pa.Schema:
        return self._schema

    @property
    def shard_rows(self) -> list[int]:
        return [len(ids) if ids is not None else self.base.shard_rows[s] for s, ids in self._shards]

    def _cols(self, columns: list[str] | None) -> list[str] | None:
        return self._columns if columns is None else self.check_columns(columns)

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        s, ids = self._shards[i]
        cols = self._cols(columns)
        if ids is None:
            return self.base.read_shard(s, cols, filter)
        if filter is None:
            return self.base.read_shard(s, cols).take(ids)
        table = self.base.read_shard(s, self._columns).take(ids).filter(filter)  # a filter may read other columns
        return table if cols is None else table.select(cols)

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        s, ids = self._shards[shard]
        cols = self._cols(columns)
        if ids is None:
            return self.base.read_rows(s, start, stop, cols)
        sel = ids[start:stop]
        if not len(sel):
            return self.base.read_rows(s, 0, 0, cols)
        lo, hi = int(sel[0]), int(sel[-1]) + 1
        table = self.base.read_rows(s, lo, hi, cols)
        return table if hi - lo == len(sel) else table.take(sel - lo)  # a contiguous range needs no take

    def blocks(self) -> list[tuple[int, int, int]]:
        """The base's blocks (row groups...) cut down to this subset's rows: a block is read in one go."""
        if self._rows is None and self._shard_ids is None:
            return self.base.blocks()
        where = {s: (i, ids) for i, (s, ids) in enumerate(self._shards)}
        out = []
        for s, a, b in self.base.blocks():
            if s in where:
                i, ids = where[s]
                lo, hi = (a, b) if ids is None else np.searchsorted(ids, [a, b])
                if hi > lo:
                    out.append((i, int(lo), int(hi)))
        return sorted(out)

    @property
    def reads_ranges(self) -> bool:
        return self.base.reads_ranges

    @property
    def zero_copy_reads(self) -> bool:  # a take gathers rows into new buffers
        return self.base.zero_copy_reads if self._rows is None else False

    def bytes_per_row(self) -> float:
        return self.base.bytes_per_row()

    def network_reads(self) -> dict | None:
        return self.base.network_reads()

    def add_network_reads(self, counts: dict) -> None:
        self.base.add_network_reads(counts)

    @property
    def is_remote(self) -> bool:
        return self.base.is_remote

    @property
    def same_shards(self) -> bool:
        """Whether this view has every row of every shard of its base, in order (only columns selected)."""
        return self._rows is None and self._shard_ids is None

    @property
    def fork_safe(self) -> bool:  # a view of a grid's dataset holds its gRPC client too
        return self.base.fork_safe

    @property
    def takes_rows(self) -> bool:
        return self.base.takes_rows

    def read_take(self, shard: int, rows, columns: list[str] | None = None) -> pa.Table:
        s, ids = self._shards[shard]
        rows = np.asarray(rows, dtype=np.int64)
        return self.base.read_take(s, rows if ids is None else ids[rows], self._cols(columns))

    def cache_key(self, shard: int) -> str | None:
        s, ids = self._shards[shard]
        key = self.base.cache_key(s)
        if key is None:
            return None
        h = xxhash.xxh3_64(repr(self._columns).encode())
        if ids is not None:
            h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        return f"{key}-sub-{h.hexdigest()}"

    @property
    def fingerprint(self) -> str:
        """The parent's fingerprint and the selection (columns, row ids): each split is other data."""
        if self._fingerprint is None:
            h = xxhash.xxh3_64(f"{self.base.fingerprint}|{self._columns!r}|".encode())
            if self._shard_ids is not None:
                h.update(f"shards{self._shard_ids!r}".encode())
            if self._rows is not None:
                h.update(np.ascontiguousarray(self._rows, dtype=np.int64).tobytes())
            self._fingerprint = "subset:" + h.hexdigest()
        return self._fingerprint

    @property
    def label_names(self) -> list[str] | None:
        """The parent's class names (a split that lacks a class keeps its index)."""
        return self.base.label_names if INDEX_COLUMN in self._schema.names else None

    def verify(self) -> dict:
        r = self.base.verify()
        return {"shards": self.num_shards, "bytes": r["bytes"], "rows": self.num_rows}

    def vacuum(self, min_age_s: float = 600.0) -> dict:
        raise ReadOnlyError(f"a subset of {self.url or 'a dataset'} has no files of its own: vacuum the dataset")

    def __repr__(self) -> str:
        return f"SubsetDataset({self.url!r}, {self.what}, rows={self.num_rows}, shards={self.num_shards})"


def _view(ds: Dataset, positions: np.ndarray | None, columns: list[str] | None, what: str) -> SubsetDataset:
    """The subset of ``ds`` at sorted row ``positions`` (None: all) and ``columns`` (None: ds's), as a view
    of the first dataset that is not a view."""
    if isinstance(ds, SubsetDataset):
        base, rows, cols = ds.base, ds._rows, ds._columns
        what = f"{ds.what}, {what}"
    else:
        base, rows, cols = ds, None, None
    if positions is not None:
        rows = positions.astype(np.int64) if rows is None else rows[positions]
    return SubsetDataset(base, rows, cols if columns is None else columns, what)


def rows(ds: Dataset, start: int, stop: int) -> SubsetDataset:
    """Rows [start, stop) of ``ds`` in order (a part of a job that goes over the data in pieces)."""
    n = ds.num_rows
    if not (0 <= start <= stop <= n):
        raise ArgumentError(f"rows {start}..{stop} are not within the dataset's {n} rows")
    return take(ds, np.arange(start, stop, dtype=np.int64), f"rows {start}..{stop}")


def take(ds: Dataset, positions: np.ndarray, what: str) -> SubsetDataset:
    """The rows of ``ds`` at sorted, distinct ``positions`` (``what`` names the selection in its repr)."""
    return _view(ds, np.asarray(positions, dtype=np.int64), None, what)


def shares_rows(a: Dataset, b: Dataset) -> bool:
    """Whether two datasets hold a row in common as views of one dataset (the same one, or splits, samples,
    filters of it that overlap). Datasets of different origins are taken as disjoint."""
    base_a, base_b = (d.base if isinstance(d, SubsetDataset) else d for d in (a, b))
    if base_a.fingerprint != base_b.fingerprint:
        return False
    rows_a, rows_b = (d._rows if isinstance(d, SubsetDataset) else None for d in (a, b))
    if rows_a is None or rows_b is None:  # one of them is all of its rows
        return True
    return bool(np.intersect1d(rows_a, rows_b, assume_unique=True).size)


# --- select --------------------------------------------------------------------------------------
def select(ds: Dataset, columns) -> SubsetDataset:
    """The dataset with only ``columns`` (in that order)."""
    if isinstance(columns, str):
        columns = [columns]
    columns = ds.check_columns(columns)
    if not columns:
        raise ArgumentError("select needs at least one column")
    if len(set(columns)) != len(columns):
        raise ArgumentError(f"select names a column twice: {columns}")
    return _view(ds, None, columns, f"columns={columns}")


# --- sample --------------------------------------------------------------------------------------
def sample(ds: Dataset, n, seed: int = 0) -> SubsetDataset:
    """``n`` rows drawn without replacement (an int), or that fraction of the rows (a float in (0, 1]);
    they keep their storage order. The same seed draws the same rows."""
    seed = check_int("seed", seed, 0)
    total = ds.num_rows
    if isinstance(n, float):
        frac = check_number("sample(n) as a fraction", n, 0, 1)
        count = int(round(frac * total))
        if count == 0:
            raise ArgumentError(f"sample({n}) of {total} rows is no row: ask for a larger fraction or a count")
    else:
        count = check_int("sample(n)", n, 1)
        if count > total:
            raise ArgumentError(f"sample({count}) of a dataset of {total} rows: n must be at most the rows "
                                "(sampling is without replacement)")
    rows = np.sort(np.random.default_rng(seed).choice(total, count, replace=False))
    return _view(ds, rows, None, f"sample {n} seed {seed}")


# --- split ---------------------------------------------------------------------------------------
def split(ds: Dataset, fractions, seed: int = 0, stratify: str | None = None):
    """Disjoint subsets covering every row, of sizes within one row of ``fractions`` (a list, or a dict
    name -> fraction: then a dict of subsets); rows drawn at random by ``seed``. ``stratify``: a column
    whose every value is split in the same proportions (each value's count within one row of them)."""
    names, fracs = _fractions(fractions)
    seed = check_int("seed", seed, 0)
    n = ds.num_rows
    order, counts = _order(ds, seed, stratify)
    sizes = _apportion(counts, fracs)  # classes x splits
    totals = sizes.sum(axis=0)
    for name, f, size in zip(names, fracs, totals):
        if size == 0:
            raise ArgumentError(f"split {name!r} ({f:g} of {n} rows) would get no rows: use a larger fraction "
                                "or fewer splits")
    which = np.repeat(np.tile(np.arange(len(fracs)), len(counts)), sizes.reshape(-1))
    by = f", stratified by {stratify!r}" if stratify else ""
    parts = [_view(ds, np.sort(order[which == k]), None, f"split {name!r} ({f:g}) seed {seed}{by}")
             for k, (name, f) in enumerate(zip(names, fracs))]
    return dict(zip(names, parts)) if isinstance(fractions, Mapping) else parts


def _fractions(fractions) -> tuple[list, list[float]]:
    if isinstance(fractions, Mapping):
        names, values = list(fractions), list(fractions.values())
    elif isinstance(fractions, (list, tuple)):
        names, values = list(range(len(fractions))), list(fractions)
    else:
        raise ArgumentError(f"fractions must be a list like [0.8, 0.2] or a dict like {{'train': 0.8, 'test': 0.2}}, "
                            f"got {fractions!r}")
    if not values:
        raise ArgumentError("fractions is empty: give at least one split")
    fracs = [check_number(f"fraction of split {name!r}", v, 0, 1) for name, v in zip(names, values)]
    for name, f in zip(names, fracs):
        if f == 0:
            raise ArgumentError(f"split {name!r} has fraction 0: every split needs rows (leave it out)")
    if abs(sum(fracs) - 1) > 1e-6:
        raise ArgumentError(f"fractions must sum to 1, got {values} (sum {sum(fracs):g})")
    return names, fracs


def _order(ds: Dataset, seed: int, stratify: str | None) -> tuple[np.ndarray, np.ndarray]:
    """Row positions in a random order, grouped by class when stratified, and the count of each class."""
    rng = np.random.default_rng(seed)
    n = ds.num_rows
    if stratify is None:
        return rng.permutation(n), np.array([n])
    if not isinstance(stratify, str):
        raise ArgumentError(f"stratify must be a column name, got {stratify!r}")
    ds.check_columns([stratify])
    col = ds.to_arrow(columns=[stratify]).column(0)
    try:
        codes = pc.dictionary_encode(col.combine_chunks(), null_encoding="encode").indices
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
        raise ArgumentError(f"cannot stratify by {stratify!r}: its type {col.type} has no distinct values to "
                            "group by (use a label column)") from None
    codes = codes.to_numpy(zero_copy_only=False).astype(np.int64)
    order = np.lexsort((rng.permutation(n), codes))  # by class, then at random within it
    return order, np.bincount(codes, minlength=1)


def _apportion(counts: np.ndarray, fracs: list[float]) -> np.ndarray:
    """Rows of each class per split: each within one row of its share of the class; the totals within one
    row of each split's share (each class's leftover rows go to the splits furthest behind overall)."""
    f = np.asarray(fracs, dtype=np.float64)
    quota = np.outer(counts, f)
    sizes = np.floor(quota + 1e-9).astype(np.int64)
    behind = np.zeros(len(f))  # each split's share of the rows so far minus its rows so far
    for c in range(len(counts)):
        behind += quota[c] - sizes[c]
        extra = int(counts[c] - sizes[c].sum())
        if extra:
            top = np.argsort(-behind, kind="stable")[:extra]
            sizes[c, top] += 1
            behind[top] -= 1
    return sizes


# --- filter --------------------------------------------------------------------------------------
def filter(ds: Dataset, expr) -> SubsetDataset:  # noqa: A001 - the method's name
    """The rows for which ``expr`` is true: a DuckDB SQL boolean expression over the columns (a string,
    such as ``"label = 'cat' AND width >= 32"``) or a pyarrow compute expression (``pc.field("x") > 0``).
    Evaluated once, shard by shard, reading only the columns it names."""
    if isinstance(expr, str):
        if not expr.strip():
            raise ArgumentError("filter needs a condition, got an empty string")
        test = _SQLTest(expr)
    elif isinstance(expr, pc.Expression):
        ds._check_filter(expr)
        test = _ArrowTest(expr)
    else:
        raise ArgumentError(f"filter takes an SQL condition (a string) or a pyarrow.compute expression, got "
                            f"{type(expr).__name__}")
    named = _named_columns(ds, str(expr))
    row = _row_column(ds.schema.names)
    positions, offset = [], 0
    try:
        for i, rows in enumerate(ds.shard_rows):
            positions.append(_matching(ds, i, named, test, row) + offset)
            offset += rows
    finally:
        test.close()
    return _view(ds, np.concatenate(positions) if positions else np.zeros(0, np.int64), None, f"filter {expr}")


def _named_columns(ds: Dataset, text: str) -> list[str]:
    """The columns whose names appear in the expression's text (DuckDB's names are case-insensitive): what
    a shard is read with. Naming one by accident costs a read; missing one is caught (all are read then)."""
    low = text.lower()
    return [c for c in ds.schema.names if c.lower() in low]


def _row_column(names: list[str]) -> str:
    """A name for the position column that no column has, in any case (DuckDB's names ignore case)."""
    taken, row = {n.lower() for n in names}, _ROW
    while row.lower() in taken:
        row += "_"
    return row


def _matching(ds: Dataset, shard: int, columns: list[str], test, row: str) -> np.ndarray:
    """Positions in ``shard`` whose rows pass ``test``, reading the named columns (all if one is missing)."""
    for cols in (columns, None):
        if cols == []:  # a condition on no column (true, random() < 0.5): only the row count matters
            table = pa.table({row: pa.array(np.arange(ds.shard_rows[shard], dtype=np.int64))})
        else:
            table = ds.read_shard(shard, cols)
            table = table.append_column(row, pa.array(np.arange(table.num_rows, dtype=np.int64)))
        try:
            kept = test(table, row)
        except _MissingColumn as e:
            if cols is None:
                raise ColumnNotFoundError(f"filter {test.expr}: {e}; columns: {ds.schema.names}") from None
            continue
        kept = np.sort(kept.column(row).to_numpy(zero_copy_only=False).astype(np.int64))  # SQL keeps no order
        if len(kept) and (kept[0] < 0 or kept[-1] >= table.num_rows or (np.diff(kept) == 0).any()):
            raise SQLError(f"filter {test.expr} gave positions that are not rows of the shard")
        return kept
    raise AssertionError("unreachable")


class _MissingColumn(Exception):
    pass


class _ArrowTest:
    def __init__(self, expr: pc.Expression):
        self.expr = expr

    def __call__(self, table: pa.Table, row: str) -> pa.Table:
        try:
            return table.filter(self.expr)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            msg = str(e).splitlines()[0]
            if "No match for FieldRef" in msg:
                raise _MissingColumn(msg) from None
            raise ArgumentError(f"filter {self.expr}: {msg}") from None

    def close(self) -> None:
        pass


class _SQLTest:
    """Evaluates an SQL condition with DuckDB over a shard's table (tensor columns as their bytes). The text
    is parsed as one expression (a relation's filter), so it can never be more of a query than a condition:
    no ``) UNION SELECT ...`` adding rows, no second statement; and the connection has no file or network
    access (a subquery cannot ``read_csv('/etc/passwd')`` or fetch a URL)."""

    def __init__(self, expr: str):
        self.text, self.expr = expr, repr(expr)
        self.con = duckdb.connect(config={"enable_external_access": False, "lock_configuration": True})

    def __call__(self, table: pa.Table, row: str) -> pa.Table:
        seen: dict[str, str] = {}
        for name in table.schema.names:
            other = seen.setdefault(name.lower(), name)
            if other != name:
                raise SQLError(f"filter {self.expr}: columns {other!r} and {name!r} differ only in case, which SQL "
                               "cannot tell apart: filter with a pyarrow expression (pc.field(name) ...)")
        try:
            rel = self.con.from_arrow(encoding.encode(table, encoding.physical_schema(table.schema)))
            quoted = '"' + row.replace('"', '""') + '"'
            return rel.filter(self.text).project(quoted).to_arrow_table()
        except duckdb.Error as e:
            msg = str(e).splitlines()[0]
            if isinstance(e, duckdb.BinderException) and re.search(r"column .* not found", msg, re.IGNORECASE):
                raise _MissingColumn(msg) from None
            raise SQLError(f"filter {self.expr}: {msg}") from None

    def close(self) -> None:
        self.con.close()
