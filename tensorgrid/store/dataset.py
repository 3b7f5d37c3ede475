"""Datasets: one read API over shards, whatever holds them (a versioned store dataset, foreign Parquet/CSV
opened in place, or an in-memory Arrow table such as a SQL result)."""

from __future__ import annotations

import abc
import numbers
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import xxhash

from .. import fs as tgfs
from ..errors import (
    ColumnNotFoundError,
    CorruptManifestError,
    CorruptShardError,
    ReadOnlyError,
    TensorGridError,
)
from . import encoding, manifest
from .manifest import Manifest, Shard

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
        if type(self).read_rows is Dataset.read_rows:
            return [(s, 0, n) for s, n in enumerate(self.shard_rows) if n]
        step = max(1, int(BLOCK_BYTES // max(1.0, self.bytes_per_row())))
        return [(s, a, min(a + step, n)) for s, n in enumerate(self.shard_rows) for a in range(0, n, step)]

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        """Rows [start, stop) of a shard (the loader asks for whole blocks). Default: the shard, sliced."""
        return self.read_shard(shard, columns).slice(start, stop - start)

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
            raise TensorGridError(f"filter must be a pyarrow.compute expression such as pc.field('label') == 3, "
                                  f"got {type(filter).__name__}")
        try:
            pa.Table.from_batches([], schema=self.schema).filter(filter)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            msg = str(e).splitlines()[0]
            if "No match for FieldRef" in msg:
                raise ColumnNotFoundError(f"filter {filter} names a column {self.url or 'the dataset'} does not "
                                          f"have; columns: {self.schema.names}") from None
            raise TensorGridError(f"filter {filter} does not fit the columns' types: {msg}") from None

    def to_arrow(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        """All rows (of ``columns``, matching ``filter``, a pyarrow compute expression pushed down) as Arrow."""
        columns = self.check_columns(columns)
        self._check_filter(filter)
        n = self.num_shards
        if n == 0:
            schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
            return pa.Table.from_batches([], schema=schema)
        if n == 1:
            if isinstance(self, StoreDataset) and filter is None:
                return self.read_shard(0, columns, parallel=True)
            return self.read_shard(0, columns, filter)
        with ThreadPoolExecutor(min(n, _threads())) as pool:
            tables = list(pool.map(lambda i: self.read_shard(i, columns, filter), range(n)))
        return pa.concat_tables(tables)

    def to_pandas(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pd.DataFrame:
        """Rows as pandas; tensor columns hold numpy arrays of their shape and dtype."""
        return table_to_pandas(self.to_arrow(columns, filter))

    def head(self, n: int = 5) -> pd.DataFrame:
        if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
            raise TensorGridError(f"head(n) needs an int n >= 0, got {n!r}")
        n = int(n)
        parts, got = [], 0
        for i in range(self.num_shards):
            if got >= n:
                break
            t = self.read_shard(i).slice(0, n - got)
            parts.append(t)
            got += t.num_rows
        table = pa.concat_tables(parts) if parts else pa.Table.from_batches([], schema=self.schema)
        return table_to_pandas(table)

    def to_torch(self, batch_size: int, **options):
        """A PyTorch loader over this dataset (``tensorgrid.loader.Loader``: see its docstring for the
        options). The one sanctioned upward reference from the store: imported on use."""
        from ..loader import Loader

        return Loader(self, batch_size, **options)

    def sql(self, query: str) -> Dataset:
        """Run DuckDB SQL with this dataset as the table ``ds``."""
        from .sql import sql

        return sql(query, ds=self)

    def info(self) -> dict:
        return {"url": self.url, "version": self.version, "rows": self.num_rows, "shards": self.num_shards,
                "columns": {f.name: str(f.type) for f in self.schema}}

    def __repr__(self) -> str:
        v = "" if self.version is None else f", version={self.version}"
        return f"{type(self).__name__}({self.url!r}{v}, rows={self.num_rows}, shards={self.num_shards})"


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


# ------------------------------------------------------------------------------------------------
# Versioned store datasets

_verified: set[tuple] = set()
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class VersionInfo:
    version: int
    timestamp: str
    operation: str
    rows: int
    added_rows: int
    shards: int


class StoreDataset(Dataset):
    """A version of a dataset written by ``tg.write``: Parquet shards listed in a manifest with checksums."""

    zero_copy_reads = False  # every read decodes Parquet into new buffers

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, m: Manifest):
        self.fs, self.root, self._m = fs, root, m
        self.url = tgfs.to_url(fs, root)
        self.version = m.version
        self._schema = encoding.logical_schema(m.schema)
        self._fingerprint: str | None = None
        self._schema_key = hash(m.schema)  # a verified shard is re-checked under a manifest of another schema

    @classmethod
    def open(cls, url: str, version: int | None = None) -> StoreDataset:
        fs, root = tgfs.resolve(url)
        return cls(fs, root, manifest.load(fs, root, version))

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    @property
    def shards(self) -> list[Shard]:
        return list(self._m.shards)

    @property
    def shard_rows(self) -> list[int]:
        return [s.rows for s in self._m.shards]

    def shard_urls(self) -> list[str]:
        return [tgfs.to_url(self.fs, tgfs.join(self.root, s.path)) for s in self._m.shards]

    @property
    def size_bytes(self) -> int:
        return sum(s.bytes for s in self._m.shards)

    # --- the loader's contract: row groups are the blocks, read through the verified buffer ------
    def blocks(self) -> list[tuple[int, int, int]]:
        out = []
        for i, s in enumerate(self._m.shards):
            rg = s.row_group_rows or s.rows
            out += [(i, a, min(a + rg, s.rows)) for a in range(0, s.rows, max(1, rg))]
        return out

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        pf = _cached_handle(self, shard, lambda: pq.ParquetFile(pa.BufferReader(self._shard_buffer(self._m.shards[shard]))))
        return decode_row_range(pf, start, stop, columns, like=self._m.schema)

    def bytes_per_row(self) -> float:
        """Uncompressed bytes per row from the first shard's footer (a tail read)."""
        n = max(1, self.num_rows)
        if not self._m.shards:
            return 1.0
        try:
            with self.fs.open(tgfs.join(self.root, self._m.shards[0].path), "rb") as f:
                md = pq.read_metadata(f)
        except (OSError, pa.ArrowInvalid):  # a damaged shard is reported by the verified read itself
            md = None
        if md is not None and md.num_rows:
            return max(1.0, sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / md.num_rows)
        return max(1.0, self.size_bytes / n)

    @property
    def is_remote(self) -> bool:
        return not tgfs.is_local(self.fs)

    def cache_key(self, shard: int) -> str | None:
        s = self._m.shards[shard]
        return s.checksum.replace(":", "-") + f"-{s.bytes}"

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_handles", None)  # open files never cross a fork or a spawn
        return state

    @property
    def fingerprint(self) -> str:
        """A digest of the schema and every shard's rows and checksum: the content, whatever its URL."""
        if self._fingerprint is None:
            h = xxhash.xxh3_64(self._m.schema.serialize().to_pybytes())
            for s in self._m.shards:
                h.update(f"{s.rows}:{s.checksum};".encode())
            self._fingerprint = "store:" + h.hexdigest()
        return self._fingerprint

    @property
    def added_rows(self) -> int:
        """Rows this version added (all of them for a create or an overwrite)."""
        return self._m.added_rows

    def versions(self) -> list[VersionInfo]:
        out = []
        for v in manifest.list_versions(self.fs, self.root):
            m = self._m if v == self._m.version else manifest.load(self.fs, self.root, v)
            out.append(VersionInfo(m.version, m.timestamp, m.operation, m.num_rows, m.added_rows, len(m.shards)))
        return out

    def _check(self, shard: Shard, data, where: str) -> None:
        size = data.size if isinstance(data, pa.Buffer) else len(data)
        if size != shard.bytes:
            raise CorruptShardError(f"shard {where} has {size} bytes, the manifest says {shard.bytes}", [where])
        if manifest.checksum(data) != shard.checksum:
            raise CorruptShardError(f"shard {where} fails its checksum (bytes changed on storage)", [where])
        self._check_footer(shard, data, where)

    def _check_footer(self, shard: Shard, data, where: str) -> None:
        """The shard's own footer must agree with the manifest's rows and column types: a manifest edited
        consistently (its checksum recomputed) still cannot make a shard read as other data."""
        try:
            meta = pq.read_metadata(pa.BufferReader(data))
            theirs = meta.schema.to_arrow_schema()
        except _PARSE_ERRORS as e:
            raise CorruptShardError(f"shard {where} cannot be decoded: {e}", [where]) from None
        if meta.num_rows != shard.rows:
            raise CorruptManifestError(f"the manifest of {self.url} version {self.version} says shard {where} holds "
                                       f"{shard.rows} rows; the shard holds {meta.num_rows}", [where])
        ours = _footer_types(self._m.schema)
        if [(f.name, f.type) for f in theirs] != ours:
            raise CorruptManifestError(f"the manifest of {self.url} version {self.version} gives another schema "
                                       f"than shard {where} holds", [where])

    def _shard_buffer(self, shard: Shard, force: bool = False) -> pa.Buffer:
        """The shard's bytes, size- and checksum-checked (local files memory-mapped, checked once per process
        while their size and mtime stay the same)."""
        path = tgfs.join(self.root, shard.path)
        where = tgfs.to_url(self.fs, path)
        if tgfs.is_local(self.fs):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise CorruptShardError(f"shard {where} is missing", [where]) from None
            if st.st_size != shard.bytes:
                raise CorruptShardError(f"shard {where} has {st.st_size} bytes, the manifest says {shard.bytes}",
                                        [where])
            buf = pa.memory_map(path).read_buffer() if st.st_size else pa.py_buffer(b"")
            key = (path, st.st_size, st.st_mtime_ns, shard.checksum, shard.rows, self._schema_key)
            if force or key not in _verified:
                self._check(shard, buf, where)
                with _verified_lock:
                    if len(_verified) > 100_000:
                        _verified.clear()
                    _verified.add(key)
            return buf
        try:
            data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {where} is missing", [where]) from None
        self._check(shard, data, where)
        return pa.py_buffer(data)

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None,
                   parallel: bool = False) -> pa.Table:
        shard = self._m.shards[i]
        buf = self._shard_buffer(shard)
        try:
            if filter is None:  # the direct reader: ~1 ms less per shard than the dataset machinery
                pf = pq.ParquetFile(pa.BufferReader(buf))
                groups = pf.metadata.num_row_groups
                if parallel and groups > 1:  # Parquet decodes columns in parallel, not row groups: split them
                    with ThreadPoolExecutor(min(groups, _threads())) as pool:
                        parts = list(pool.map(lambda g: pq.ParquetFile(pa.BufferReader(buf)).read_row_group(
                            g, columns=columns), range(groups)))
                    table = pa.concat_tables(parts)
                else:
                    table = pf.read(columns=columns)
            else:
                table = pq.read_table(pa.BufferReader(buf), columns=columns, filters=filter, schema=self._m.schema)
        except _PARSE_ERRORS as e:
            where = tgfs.to_url(self.fs, tgfs.join(self.root, shard.path))
            raise CorruptShardError(f"shard {where} cannot be decoded: {e}", [where]) from None
        return encoding.decode(table, like=self._m.schema)

    def verify(self) -> dict:
        bad, nbytes = [], 0
        for shard in self._m.shards:
            try:
                buf = self._shard_buffer(shard, force=True)
                pq.read_metadata(pa.BufferReader(buf))  # the footer parses
                nbytes += shard.bytes
            except CorruptShardError as e:
                bad.append((e.shards[0], str(e)))
            except _PARSE_ERRORS as e:
                where = tgfs.to_url(self.fs, tgfs.join(self.root, shard.path))
                bad.append((where, f"shard {where} cannot be decoded: {e}"))
        if bad:
            lines = "\n  ".join(msg for _, msg in bad)
            raise CorruptShardError(f"{len(bad)} of {len(self._m.shards)} shards of {self.url} "
                                    f"(version {self.version}) are corrupt:\n  {lines}", [w for w, _ in bad])
        return {"shards": len(self._m.shards), "bytes": nbytes, "rows": self.num_rows}

    def _arrow_source(self):
        for shard in self._m.shards:  # checksums first (cached per process), then DuckDB reads the files
            self._shard_buffer(shard)
        paths = [tgfs.join(self.root, s.path) for s in self._m.shards]
        return pads.dataset(paths, schema=self._m.schema, format="parquet", filesystem=_arrow_fs(self.fs))

    def vacuum(self, min_age_s: float = 600.0) -> dict:
        """Delete files that no version references (shards of killed or failed writers).

        Files younger than ``min_age_s`` are kept: they may belong to a writer still at work. Committed
        versions never lose a file, whatever the timing (see ``store/vacuum.py``).
        """
        from .vacuum import vacuum_root

        return vacuum_root(self.fs, self.root, min_age_s)


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


def decode_row_range(pf: pq.ParquetFile, start: int, stop: int, columns: list[str] | None,
                     like: pa.Schema | None = None) -> pa.Table:
    """Rows [start, stop) of a Parquet file: only the row groups holding them are decoded."""
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
    table = pf.read_row_groups(parts, columns=columns) if len(parts) > 1 else pf.read_row_group(parts[0], columns=columns)
    return encoding.decode(table, like=like).slice(start - offset, stop - start)


@lru_cache(maxsize=64)
def _footer_types(schema: pa.Schema) -> list:
    """The (name, type) pairs a Parquet footer of shards written with ``schema`` reads back as."""
    sink = pa.BufferOutputStream()
    pq.write_table(schema.empty_table(), sink, store_schema=True)
    return [(f.name, f.type) for f in pq.read_metadata(pa.BufferReader(sink.getvalue())).schema.to_arrow_schema()]


def _arrow_fs(fs: fsspec.AbstractFileSystem):
    if tgfs.is_local(fs):
        return pa.fs.LocalFileSystem()
    return pa.fs.PyFileSystem(pa.fs.FSSpecHandler(fs))


# ------------------------------------------------------------------------------------------------
# In-memory datasets (tg.from_arrow, SQL results)

class ArrowDataset(Dataset):
    """An Arrow table in memory, split into shards of about ``shard_bytes``."""

    def __init__(self, table: pa.Table, url: str = "memory-table", shard_bytes: int = 64 << 20):
        table = table.replace_schema_metadata(None) if table.schema.metadata else table
        self._table = encoding.decode(table)
        self.url = url
        rows = self._table.num_rows
        row_bytes = max(1, self._table.nbytes // max(1, rows))
        step = max(1, shard_bytes // row_bytes)
        self._bounds = [(s, min(step, rows - s)) for s in range(0, rows, step)]
        self._fingerprint: str | None = None

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def shard_rows(self) -> list[int]:
        return [n for _, n in self._bounds]

    @property
    def size_bytes(self) -> int:
        return self._table.nbytes

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        t = self._table.slice(self._bounds[shard][0] + start, stop - start)  # zero copy
        return t.select(columns) if columns is not None else t

    def bytes_per_row(self) -> float:
        return max(1.0, self._table.nbytes / max(1, self._table.num_rows))

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        start, n = self._bounds[i]
        t = self._table.slice(start, n)
        if filter is not None:
            t = t.filter(filter)
        return t.select(columns) if columns is not None else t

    def to_arrow(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        columns = self.check_columns(columns)
        self._check_filter(filter)
        t = self._table if filter is None else self._table.filter(filter)
        return t.select(columns) if columns is not None else t

    @property
    def fingerprint(self) -> str:
        """A digest of the table's rows as Arrow IPC (only the rows, also of a slice of a bigger table),
        streamed through xxh3 in bounded memory; computed once."""
        if self._fingerprint is None:
            h = xxhash.xxh3_64(repr(self._bounds).encode())

            class Sink:  # a file-like object that hashes what the IPC writer writes
                closed = False

                def write(self, data):
                    h.update(data)
                    return len(data)

                def flush(self):
                    pass

            with pa.ipc.new_stream(pa.PythonFile(Sink(), mode="w"), self._table.schema) as w:
                w.write_table(self._table)
            self._fingerprint = "arrow:" + h.hexdigest()
        return self._fingerprint

    def verify(self) -> dict:
        self._table.validate(full=True)
        return {"shards": self.num_shards, "bytes": self._table.nbytes, "rows": self.num_rows}

    def _arrow_source(self):
        return encoding.encode(self._table, encoding.physical_schema(self._table.schema))

    def vacuum(self, min_age_s: float = 600.0) -> dict:
        raise ReadOnlyError("an in-memory dataset has no files to vacuum")


def from_arrow(table: pa.Table | pa.RecordBatch | pa.RecordBatchReader) -> ArrowDataset:
    """Wrap Arrow data as an in-memory Dataset (no copy)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    elif isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    elif not isinstance(table, pa.Table):
        from ..errors import UnsupportedDataError

        raise UnsupportedDataError(f"from_arrow takes a pyarrow Table, RecordBatch or reader, got {type(table).__name__}")
    return ArrowDataset(table)
