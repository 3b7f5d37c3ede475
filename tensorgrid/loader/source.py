"""Reading row ranges of shards inside loader processes.

A Source is built in the main process (where it computes the block layout) and pickled to workers, where
it opens files lazily: nothing open crosses a fork or a spawn. Local store shards are read through their
verified memory map; with ``cache_dir``, each shard is converted once to an uncompressed Arrow IPC file and
mapped copy-on-write, so batches are views of the page cache (zero copy) and a user writing into a batch
changes only that process's private pages, never the cache.

The cache is as trustworthy as the store: each file's size and xxh3 are recorded when it is built (a
``<file>.json`` beside it), checked the first time a process maps it (not again while its size and mtime
stay the same), and a damaged file is rebuilt from the verified shard with a ``CacheRebuiltWarning``.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
import uuid
import warnings
from collections import OrderedDict

import pyarrow as pa
import pyarrow.parquet as pq
import xxhash

from .. import fs as tgfs
from ..errors import ArgumentError, CacheRebuiltWarning
from ..store import encoding
from ..store.dataset import ArrowDataset, Dataset, StoreDataset
from ..store.foreign import ForeignDataset
from .plan import Layout

BLOCK_BYTES = 4 << 20
CACHED_BLOCK_BYTES = 256 << 10
_MAX_OPEN = 8  # open shard maps per process: their touched pages count in RSS (as clean page cache)
RECORD = ".json"  # beside each cache file: {"bytes": size, "xxh3": hex digest}, written when it is built

# Cache files this process has checked: (path, size, mtime_ns, inode). Like the store's verified shards, a
# file is hashed once per process while these stay the same, not every epoch.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()
checks = {"files": 0, "bytes": 0}  # cache files hashed by this process (read by tests and benchmarks)


def _fixed_blocks(shard_rows: list[int], row_bytes: float, block_bytes: int = BLOCK_BYTES) -> list[tuple[int, int, int]]:
    step = max(1, int(block_bytes // max(1.0, row_bytes)))
    return [(s, a, min(a + step, n)) for s, n in enumerate(shard_rows) for a in range(0, n, step)]


def _rg_blocks(shard: int, rg_rows: list[int]) -> list[tuple[int, int, int]]:
    out, a = [], 0
    for n in rg_rows:
        if n:
            out.append((shard, a, a + n))
        a += n
    return out


class Source:
    def __init__(self, dataset: Dataset, columns: list[str] | None = None, cache_dir: str | None = None,
                 cache_limit: int | None = None, memory_budget: int = 512 << 20):
        self.dataset = dataset
        self.memory_budget = memory_budget
        self.columns = dataset._check_columns(columns)
        self.cache_dir = _checked_cache_dir(cache_dir)
        self.cache_limit = cache_limit
        if self.cache_dir and not isinstance(dataset, StoreDataset):
            self.cache_dir = None  # in-memory and foreign data: nothing to cache (foreign: no checksums to key on)
        if self.cache_dir:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
            except OSError as e:
                raise ArgumentError(f"cache_dir {self.cache_dir!r} cannot be created: {e}") from None
        self.layout = Layout(tuple(dataset.shard_rows), tuple(self._blocks()))
        self._open: OrderedDict = OrderedDict()
        self._groups: OrderedDict = OrderedDict()  # decoded row groups, bounded in bytes
        self._lock = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_groups"] = OrderedDict()
        state["_lock"] = None
        if self.cache_dir:  # spawned workers start with what this process checked (forked ones inherit it)
            state["_checked"] = [k for k in _verified if os.path.dirname(k[0]) == self.cache_dir]
        return state

    def __setstate__(self, state):
        with _verified_lock:
            _verified.update(state.pop("_checked", ()))
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def row_bytes(self) -> float:
        """Average bytes per row in memory (for budgets)."""
        ds = self.dataset
        n = max(1, ds.num_rows)
        if isinstance(ds, StoreDataset):  # uncompressed size, from the first shard's footer (a tail read)
            try:
                with ds.fs.open(tgfs.join(ds.root, ds.shards[0].path), "rb") as f:
                    md = pq.read_metadata(f)
            except (OSError, pa.ArrowInvalid):  # a damaged shard is reported by the verified read itself
                md = None
            if md is not None and md.num_rows:
                return sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / md.num_rows
            return sum(s.bytes for s in ds.shards) / n
        if isinstance(ds, ArrowDataset):
            return ds._table.nbytes / n
        if isinstance(ds, ForeignDataset):
            return sum(ds.fs.size(p) for p in ds.files) / n * (3 if ds.format == "csv" else 1)
        return 1024.0

    def _blocks(self) -> list[tuple[int, int, int]]:
        ds = self.dataset
        if self.cache_dir:  # memory-mapped Arrow: any row range is free to read, so small blocks shuffle best
            return _fixed_blocks(ds.shard_rows, self.row_bytes, CACHED_BLOCK_BYTES)
        if isinstance(ds, StoreDataset):
            out = []
            for i, s in enumerate(ds.shards):
                rg = s.row_group_rows or s.rows
                out += [(i, a, min(a + rg, s.rows)) for a in range(0, s.rows, max(1, rg))]
            return out
        if isinstance(ds, ForeignDataset) and ds.format == "parquet":
            out = []
            for i, frag in enumerate(ds._fragments):
                frag.ensure_complete_metadata()
                out += _rg_blocks(i, [rg.num_rows for rg in frag.row_groups])
            return out
        if isinstance(ds, ForeignDataset):  # CSV: a file is read whole anyway
            return [(i, 0, n) for i, n in enumerate(ds.shard_rows) if n]
        return _fixed_blocks(ds.shard_rows, self.row_bytes)

    def reset(self, keep_decoded: bool = False) -> None:
        """Forget open files and maps (a new epoch maps the Arrow cache afresh, so no write into an
        earlier epoch's zero-copy batch can show) and, unless ``keep_decoded``, decoded row groups. The
        caller keeps them only when no batch can be a view of them (shuffled: every batch is gathered)."""
        self._open.clear()
        if not keep_decoded:
            self._groups.clear()

    def _handle(self, shard: int, make):
        h = self._open.get(shard)
        if h is None:
            h = make(shard)
            self._open[shard] = h
            # remote shards are held in memory: keep two; local ones are maps of the page cache
            if len(self._open) > (2 if is_remote(self.dataset) and not self.cache_dir else _MAX_OPEN):
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return h

    def read(self, shard: int, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of a shard, logical types, selected columns."""
        ds = self.dataset
        if isinstance(ds, ArrowDataset):
            s0, _ = ds._bounds[shard]
            t = ds._table.slice(s0 + start, stop - start)
            return t.select(self.columns) if self.columns else t
        if self.cache_dir:
            table = self._handle(shard, self._map_cached)
            return table.slice(start, stop - start)
        if isinstance(ds, StoreDataset):
            pf = self._handle(shard, self._store_file)
            return self._read_row_groups(pf, start, stop, shard)
        if isinstance(ds, ForeignDataset) and ds.format == "parquet" and not ds.partition_columns:
            pf = self._handle(shard, lambda i: pq.ParquetFile(ds.files[i], filesystem=ds._ds.filesystem))
            return self._read_row_groups(pf, start, stop, shard)
        table = self._handle(shard, lambda i: ds.read_shard(i, self.columns))
        return table.slice(start, stop - start)

    def _read_row_groups(self, pf: pq.ParquetFile, start: int, stop: int, shard: int) -> pa.Table:
        """Rows [start, stop) from the row groups holding them. Decoded row groups are kept (bounded in
        bytes): consecutive shuffle windows share blocks, and a row group is decoded once, not per window."""
        md = pf.metadata
        sizes = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
        starts = [0]
        for n in sizes:
            starts.append(starts[-1] + n)
        first = max(0, next(i for i in range(len(sizes)) if starts[i + 1] > start))
        last = next(i for i in range(first, len(sizes)) if starts[i + 1] >= stop)
        parts = []
        for i in range(first, last + 1):
            key = (shard, i)
            t = self._groups.get(key)
            if t is None:
                t = encoding.decode(pf.read_row_group(i, columns=self.columns),
                                    like=self.dataset._m.schema if isinstance(self.dataset, StoreDataset) else None)
                self._groups[key] = t
                limit = max(self.memory_budget // 4, 2 * t.nbytes)
                while sum(g.nbytes for g in self._groups.values()) > limit and len(self._groups) > 1:
                    self._groups.popitem(last=False)
            else:
                self._groups.move_to_end(key)
            parts.append(t)
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return table.slice(start - starts[first], stop - start)

    def _store_file(self, shard: int):
        ds: StoreDataset = self.dataset
        return pq.ParquetFile(pa.BufferReader(ds._shard_buffer(ds.shards[shard])))

    # --- the Arrow IPC cache ----------------------------------------------------------------------
    def _cache_path(self, shard: int) -> str:
        s = self.dataset.shards[shard]
        return os.path.join(self.cache_dir, s.checksum.replace(":", "-") + f"-{s.bytes}.arrow")

    def _map_cached(self, shard: int) -> pa.Table:
        path = self._cache_path(shard)
        mm = _checked_map(path)
        if mm is None:
            mm = self._build_cache(shard, path)
        table = pa.ipc.open_file(pa.py_buffer(mm)).read_all()
        return table.select(self.columns) if self.columns else table

    def _build_cache(self, shard: int, path: str) -> mmap.mmap:
        """Convert the shard (a verified read) to Arrow IPC at ``path``; returns the new file mapped."""
        table = self.dataset.read_shard(shard).combine_chunks()
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table, max_chunksize=max(1, table.num_rows))
            with open(tmp, "rb") as f:
                st = os.fstat(f.fileno())
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private copy-on-write pages
            digest = _digest(mm)
            # the record first: whoever finds the file finds its record (racing builders write identical bytes)
            _write_record(path, st.st_size, digest)
            os.replace(tmp, path)  # whole file or nothing; the inode and mtime (the check's key) stay
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _remember((path, st.st_size, st.st_mtime_ns, st.st_ino))
        self._enforce_limit(keep=path)
        return mm

    def check_cache(self) -> None:
        """Check the cache files that exist (once per process), rebuilding damaged ones here. Called before
        workers start: they inherit what was checked, so they do not hash every file again each epoch."""
        if not self.cache_dir:
            return
        for shard in range(len(self.dataset.shards)):
            path = self._cache_path(shard)
            if os.path.exists(path) and _checked_map(path) is None:
                self._build_cache(shard, path)

    def _enforce_limit(self, keep: str) -> None:
        if not self.cache_limit:
            return
        entries = []
        for name in os.listdir(self.cache_dir):
            p = os.path.join(self.cache_dir, name)
            if name.endswith(".arrow"):
                try:
                    st = os.stat(p)
                except FileNotFoundError:  # evicted by another process meanwhile
                    continue
                entries.append((st.st_atime, st.st_size, p))  # atime: last mapped (see _checked_map)
        total = sum(e[1] for e in entries)
        for _, size, p in sorted(entries):
            if total <= self.cache_limit:
                break
            if p != keep:
                try:
                    os.remove(p)  # open maps stay valid until closed; the file before its record
                    total -= size
                    os.remove(p + RECORD)
                except FileNotFoundError:
                    pass


def _checked_cache_dir(cache_dir) -> str | None:
    if cache_dir is None:
        return None
    if not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir):
        raise ArgumentError(f"cache_dir must be a folder path, got {cache_dir!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"cache_dir {path!r} is an existing file, not a folder")
    return path


def _checked_map(path: str) -> mmap.mmap | None:
    """The cache file mapped copy-on-write if its size and xxh3 match its record (read and hashed the first
    time this process maps it); None if it is missing, or damaged (then with a CacheRebuiltWarning)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None
    with f:
        st = os.fstat(f.fileno())
        key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        problem = None if key in _verified else _problem(f, st.st_size)
        if problem is None:
            _remember(key)
            try:  # LRU order for cache_limit, in atime: the mtime is part of the check's key
                os.utime(f.fileno(), ns=(time.time_ns(), st.st_mtime_ns))
            except OSError:  # a read-only cache
                pass
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private copy-on-write pages
    warnings.warn(CacheRebuiltWarning(f"Arrow cache file {path} {problem}: rebuilding it from the verified "
                                      f"shard"), stacklevel=2)
    return None


def _problem(f, size: int) -> str | None:
    """What is wrong with an open cache file, by its record (None: nothing)."""
    record = _read_record(f.name)
    if record is None:
        return f"has no readable checksum record (its {RECORD} file is missing or garbled)"
    if size != record["bytes"]:
        return "is empty" if size == 0 else f"has {size} bytes, {record['bytes']} when it was built"
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if _digest(mm) != record["xxh3"]:
            return "fails its checksum (bytes changed since it was built)"
    return None


def _read_record(path: str) -> dict | None:
    try:
        with open(path + RECORD, "rb") as f:
            record = json.loads(f.read(4096))
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return None
    ok = (isinstance(record, dict) and type(record.get("bytes")) is int and record["bytes"] > 0
          and isinstance(record.get("xxh3"), str))
    return record if ok else None


def _write_record(path: str, size: int, digest: str) -> None:
    tmp = f"{path}{RECORD}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump({"bytes": size, "xxh3": digest}, f)
    os.replace(tmp, path + RECORD)


def _digest(buf) -> str:
    checks["files"] += 1
    checks["bytes"] += len(buf)
    return xxhash.xxh3_64_hexdigest(buf)


def _remember(key: tuple) -> None:
    with _verified_lock:
        if len(_verified) > 100_000:
            _verified.clear()
        _verified.add(key)


def is_remote(ds: Dataset) -> bool:
    return isinstance(ds, (StoreDataset, ForeignDataset)) and not tgfs.is_local(ds.fs)
