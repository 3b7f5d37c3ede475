"""The Dataset contract: one read API over shards, whatever holds them. Its kinds live in their own modules:
``versioned`` (written by tg.write), ``memory`` (Arrow tables, SQL results), ``foreign`` (Parquet/CSV in
place); a user's own kind subclasses ``Dataset`` directly."""

from __future__ import annotations

import abc
import contextlib
import os
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from .. import fs as tgfs
from ..args import check_int
from ..errors import ArgumentError, ColumnNotFoundError, ReadOnlyError
from . import encoding
from .labels import label_names

# Operations that modules above this one implement and a Dataset offers as methods (to_torch: the loader;
# sql, split, ...: store modules built on Dataset). Each is registered by the package that imports both
# (``store/__init__.py`` for the store's, ``tensorgrid/__init__.py`` for the loader's, which it imports on
# first use), so this module imports none of them and every import points down.
_PROVIDED: dict = {}


def provide(**operations) -> None:
    """Register implementations of Dataset methods by name (``to_torch=fn, sql=fn, ...``)."""
    _PROVIDED.update(operations)


def _provided(name: str):
    fn = _PROVIDED.get(name)
    if fn is None:  # only while the package itself is being imported
        raise NotImplementedError(f"Dataset.{name} is registered when tensorgrid is imported")
    return fn

_PARSE_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, OSError, ValueError, IndexError)


def _threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


BLOCK_BYTES = 4 << 20  # the default read unit of kinds without natural blocks (row groups)


class Dataset(abc.ABC):
    """Rows in shards: the one contract every dataset kind implements and the loader, SQL and the trainer
    use. A kind must give its schema, its shards' row counts and a way to read a shard; everything else
    has a default that works (and that a kind overrides to be faster: natural blocks, row-range reads)."""

    url: str = ""
    version: int | None = None

    # --- what every kind provides ------------------------------------------------------------
    @property
    @abc.abstractmethod
    def schema(self) -> pa.Schema:
        """The logical Arrow schema (fixed-shape tensor columns as Arrow's tensor type)."""

    @property
    @abc.abstractmethod
    def shard_rows(self) -> list[int]:
        """Rows in each shard, in storage order."""

    @abc.abstractmethod
    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """Shard ``i`` as a logical Arrow table (verified when the storage keeps checksums)."""

    # --- what the loader uses (defaults work for any kind) -----------------------------------
    def blocks(self) -> list[tuple[int, int, int]]:
        """The natural read units as (shard, start, stop) row ranges, in storage order: the loader
        shuffles blocks, and reads a range through the blocks holding it. Default: ~4 MiB ranges when
        the kind reads row ranges itself (overrides ``read_rows``), else whole shards (a shard is read
        whole anyway)."""
        if not self.reads_ranges:
            return [(s, 0, n) for s, n in enumerate(self.shard_rows) if n]
        return fixed_blocks(self.shard_rows, self.bytes_per_row(), BLOCK_BYTES)

    @property
    def reads_ranges(self) -> bool:
        """Whether this kind reads a row range by itself (overrides ``read_rows``) rather than its whole
        shard: the loader then reads ranges directly, else it keeps each shard it read."""
        return type(self).read_rows is not Dataset.read_rows

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) of a shard (the loader asks for whole blocks). Default: the shard, sliced."""
        return self.read_shard(shard, columns).slice(start, stop - start)

    #: Whether ``read_take`` fetches just the rows named (a kind across a network, e.g. a grid server's): a
    #: loader rank then reads only its own rows of a shuffled window, never the whole span.
    takes_rows: bool = False

    def read_take(self, shard: int, rows, columns: list[str] | None = None) -> pa.Table:
        """Rows ``rows`` (sorted, distinct row numbers of the shard) in that order. Default: the range they
        span, then a take."""
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        return self.read_rows(shard, lo, hi, columns).take(pa.array(rows - lo))

    #: Whether a loader worker may be forked from a process that has used this dataset (a gRPC client is
    #: not: its forked children hang), else the loader's workers are spawned.
    fork_safe: bool = True

    def bytes_per_row(self) -> float:
        """Average bytes per row once in memory (for memory budgets). Default: from the first shard."""
        for i, n in enumerate(self.shard_rows):
            if n:
                return max(1.0, self.read_shard(i).nbytes / n)
        return 1.0

    @property
    def is_remote(self) -> bool:
        """Whether reads cross a network (the loader then prefetches a chunk ahead)."""
        return False

    #: Whether ``read_rows`` may return views of memory the dataset keeps (in-memory tables): the loader
    #: then reads ranges directly (no block cache) and hands out copies, so writing into a batch never
    #: changes the data. Kinds that decode fresh buffers on every read (files, network) say False.
    zero_copy_reads: bool = True

    def cache_key(self, shard: int) -> str | None:
        """A name for shard ``shard``'s content that changes whenever its bytes do, or None: the loader's
        Arrow cache (``cache_dir=``) keeps only shards with a key."""
        return None

    def network_reads(self) -> dict | None:
        """Rows this process has read from servers on its own node ("local") and on others ("remote"): a grid
        of several servers counts them (cluster.py), in all and by partition ("partitions": {k: [local,
        remote]}); None for every kind that reads no servers."""
        return None

    def add_network_reads(self, counts: dict) -> None:
        """Count reads another process made for this one (a loader worker's): ``counts`` as network_reads
        gives them, by partition. Nothing to do for kinds that read no servers."""
        return None

    @property
    def fingerprint(self) -> str:
        """The identity of the rows this dataset holds, the same from any URL spelling or process: two
        datasets with equal fingerprints hold the same rows in the same shards (a loader state or a
        checkpoint resumes only over its own data). Default: kind, URL, schema and row counts."""
        h = xxhash.xxh3_64(f"{type(self).__qualname__}|{self.url}|{self.shard_rows}".encode())
        h.update(self.schema.serialize().to_pybytes())
        return "dataset:" + h.hexdigest()

    # --- what storage-backed kinds provide ---------------------------------------------------
    def verify(self) -> dict:
        """Check every shard; raise CorruptShardError listing every bad one. Default: every shard reads."""
        for i in range(self.num_shards):
            self.read_shard(i).validate(full=True)
        return {"shards": self.num_shards, "bytes": self.size_bytes, "rows": self.num_rows}

    def _arrow_source(self):
        """Something DuckDB can scan with projection and filter pushdown (pyarrow dataset or table)."""
        return encoding.encode(self.to_arrow(), encoding.physical_schema(self.schema))

    def vacuum(self, min_age_s: float = 600.0) -> dict:
        raise ReadOnlyError(f"{self.url or 'this dataset'} is not a versioned TensorGrid dataset: nothing to vacuum")

    # --- shared API ----------------------------------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self.shard_rows)

    @property
    def num_rows(self) -> int:
        return sum(self.shard_rows)

    def __len__(self) -> int:
        return self.num_rows

    def versions(self) -> list:
        return []

    @property
    def size_bytes(self) -> int:
        """Bytes the rows take where they are kept (shard files; memory for in-memory data)."""
        return 0

    def shard_urls(self) -> list[str]:
        """The files holding this version's rows (give them to DuckDB, Spark or pandas to read in place)."""
        return []

    def check_columns(self, columns: list[str] | None) -> list[str] | None:
        """``columns`` as a list of this dataset's column names (None: all); ColumnNotFoundError names a
        missing one."""
        if columns is None:
            return None
        if isinstance(columns, str):
            columns = [columns]
        if not isinstance(columns, (list, tuple)) or not all(isinstance(c, str) for c in columns):
            raise ColumnNotFoundError(f"columns must be a list of column names, got {columns!r}")
        missing = [c for c in columns if c not in self.schema.names]
        if missing:
            raise ColumnNotFoundError(f"no column {missing[0]!r} in {self.url or 'dataset'}; "
                                      f"columns: {self.schema.names}")
        return list(columns)

    def _check_filter(self, filter) -> None:
        """A filter must be a pyarrow compute expression over this dataset's columns, of fitting types."""
        if filter is None:
            return
        if not isinstance(filter, pc.Expression):
            raise ArgumentError(f"filter must be a pyarrow.compute expression such as pc.field('label') == 3, "
                                  f"got {type(filter).__name__}")
        try:
            pa.Table.from_batches([], schema=self.schema).filter(filter)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            msg = str(e).splitlines()[0]
            if "No match for FieldRef" in msg:
                raise ColumnNotFoundError(f"filter {filter} names a column {self.url or 'the dataset'} does not "
                                          f"have; columns: {self.schema.names}") from None
            raise ArgumentError(f"filter {filter} does not fit the columns' types: {msg}") from None

    def to_arrow(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """All rows (of ``columns``, matching ``filter``, a pyarrow compute expression pushed down) as Arrow."""
        columns = self.check_columns(columns)
        self._check_filter(filter)
        n = self.num_shards
        if n == 0:
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return pa.Table.from_batches([], schema=schema)
        if n == 1:
            return self._read_only_shard(columns, filter)
        with ThreadPoolExecutor(min(n, _threads())) as pool:
            tables = list(pool.map(lambda i: self.read_shard(i, columns, filter), range(n)))
        return pa.concat_tables(tables)

    def _read_only_shard(self, columns: list[str] | None, filter: pc.Expression | None) -> pa.Table:
        return self.read_shard(0, columns, filter)

    def to_pandas(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pd.DataFrame:
        """Rows as pandas; tensor columns hold numpy arrays of their shape and dtype."""
        return table_to_pandas(self.to_arrow(columns, filter))

    def head(self, n: int = 5) -> pd.DataFrame:
        n = check_int("head(n)", n, 0)
        parts, got = [], 0
        for i in range(self.num_shards):
            if got >= n:
                break
            t = self.read_shard(i).slice(0, n - got)
            parts.append(t)
            got += t.num_rows
        table = pa.concat_tables(parts) if parts else pa.Table.from_batches([], schema=self.schema)
        return table_to_pandas(table)

    # --- operations other modules implement (registered with ``provide``: see below) ------------------
    def to_torch(self, batch_size: int, **options):
        """A PyTorch loader over this dataset (``tensorgrid.loader.Loader``: see its docstring for the
        options)."""
        return _provided("to_torch")(self, batch_size, **options)

    def to_spark(self, spark=None):
        """This dataset as a Spark DataFrame, read by the executors (``tensorgrid.store.spark.to_spark``)."""
        return _provided("to_spark")(self, spark)

    def to_ray(self, columns: list[str] | None = None):
        """This dataset as a ``ray.data.Dataset``, its shards read and verified by Ray's tasks
        (``tensorgrid.store.ray.to_ray``)."""
        return _provided("to_ray")(self, columns)

    def sql(self, query: str) -> Dataset:
        """Run DuckDB SQL with this dataset as the table ``ds``."""
        return _provided("sql")(query, ds=self)

    @property
    def label_names(self) -> list[str] | None:
        """Class names in ``label_index`` order (``tg.ingest_images`` keeps them with the schema; older
        datasets derive them from their label/label_index pairs); None without a label_index column."""
        return label_names(self)

    # --- subsets: views of this dataset's rows and columns, no copy (store/subsets.py) --------------
    def split(self, fractions, seed: int = 0, stratify: str | None = None):
        """Disjoint random subsets covering every row, sized by ``fractions`` (a list -> a list, a dict
        name -> fraction -> a dict); ``stratify``: a column each value of which is split alike."""
        return _provided("split")(self, fractions, seed, stratify)

    def select(self, columns: list[str]) -> Dataset:
        """Only ``columns``, in that order."""
        return _provided("select")(self, columns)

    def filter(self, expr) -> Dataset:
        """The rows where ``expr`` holds: an SQL condition (DuckDB) or a pyarrow compute expression."""
        return _provided("filter")(self, expr)

    def sample(self, n, seed: int = 0) -> Dataset:
        """``n`` random rows (an int) or that fraction of them (a float), without replacement."""
        return _provided("sample")(self, n, seed)

    def info(self) -> dict:
        return {"url": self.url, "version": self.version, "rows": self.num_rows, "shards": self.num_shards,
                "columns": {f.name: str(f.type) for f in self.schema}}

    def __repr__(self) -> str:
        v = "" if self.version is None else f", version={self.version}"
        return f"{type(self).__name__}({self.url!r}{v}, rows={self.num_rows}, shards={self.num_shards})"


def fixed_blocks(shard_rows: list[int], row_bytes: float, block_bytes: int) -> list[tuple[int, int, int]]:
    """(shard, start, stop) ranges of about ``block_bytes`` each, in storage order."""
    step = max(1, int(block_bytes // max(1.0, row_bytes)))
    return [(s, a, min(a + step, n)) for s, n in enumerate(shard_rows) for a in range(0, n, step)]


def table_to_pandas(table: pa.Table) -> pd.DataFrame:
    """Arrow -> pandas, with fixed-shape tensor columns as object columns of numpy arrays (views)."""
    tensor_cols = [i for i, f in enumerate(table.schema) if isinstance(f.type, pa.FixedShapeTensorType)]
    if not tensor_cols:
        return table.to_pandas()
    plain = table.drop_columns([table.schema.field(i).name for i in tensor_cols])
    df = plain.to_pandas()
    for i in tensor_cols:
        col = table.column(i)
        dense = encoding.tensor_to_numpy(col)
        valid = col.is_valid().to_numpy(zero_copy_only=False) if col.null_count else None
        values = list(dense) if valid is None else [d if ok else None for d, ok in zip(dense, valid)]
        df.insert(i, table.schema.field(i).name, pd.Series(values, dtype=object, index=df.index))
    return df



_MAX_HANDLES = 8  # open shard files per process and dataset: their touched pages count in RSS


def _cached_handle(ds: Dataset, shard: int, make):
    """A per-process, per-dataset LRU of open shard handles (never pickled: see ``__getstate__``)."""
    handles = ds.__dict__.setdefault("_handles", OrderedDict())
    h = handles.get(shard)
    if h is None:
        h = handles[shard] = make()
        if len(handles) > (2 if ds.is_remote else _MAX_HANDLES):  # remote shards are held in memory
            handles.popitem(last=False)
    else:
        handles.move_to_end(shard)
    return h


_last_decoded: list | None = None  # inside keep_last_decoded(): [(file, row groups, columns, like, table)]


@contextlib.contextmanager
def keep_last_decoded():
    """While open, the span of row groups decoded last in this process is kept (one, whatever the file), so
    neighbouring row ranges of one row group decode it once, not once each: for a reader of many disjoint
    ranges in order (inference parts). Only there: a loader may hand out views of what it decoded, and a
    batch changed in place must never reach a later read of the same rows. Dropped on exit."""
    global _last_decoded
    outer, _last_decoded = _last_decoded, [None]
    try:
        yield
    finally:
        _last_decoded = outer


def decode_row_range(pf: pq.ParquetFile, start: int, stop: int, columns: list[str] | None,
                     like: pa.Schema | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file: only the row groups holding them are decoded (once for
    neighbouring ranges inside ``keep_last_decoded``)."""
    md = pf.metadata
    first, offset, parts, pos = None, 0, [], 0
    for g in range(md.num_row_groups):
        n = md.row_group(g).num_rows
        if pos + n > start and pos < stop:
            if first is None:
                first, offset = g, pos
            parts.append(g)
        pos += n
    if not parts:
        return encoding.decode(pf.schema_arrow.empty_table().select(columns) if columns else
                               pf.schema_arrow.empty_table(), like=like)
    key = (tuple(parts), None if columns is None else tuple(columns))
    memo = _last_decoded
    last = memo[0] if memo is not None else None
    if last is not None and last[0]() is pf and last[1] == key and (last[2] is like or (
            last[2] is not None and like is not None and last[2].equals(like, check_metadata=True))):
        return last[3].slice(start - offset, stop - start)
    table = pf.read_row_groups(parts, columns=columns) if len(parts) > 1 else pf.read_row_group(parts[0], columns=columns)
    table = encoding.decode(table, like=like)
    if memo is not None and stop - start < table.num_rows:  # a part of the span: the next range wants the rest
        memo[0] = (weakref.ref(pf), key, like, table)
    return table.slice(start - offset, stop - start)


def _arrow_fs(fs: fsspec.AbstractFileSystem):
    if tgfs.is_local(fs):
        return pa.fs.LocalFileSystem()
    return pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs))
