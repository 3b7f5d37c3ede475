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

import numpy as np
import pyarrow as pa
import xxhash

from ..errors import ArgumentError, CacheRebuiltWarning
from ..store.dataset import Dataset, fixed_blocks
from .plan import Layout

CACHED_BLOCK_BYTES = 256 << 10
_MAX_OPEN = 8  # open shard maps per process: their touched pages count in RSS (as clean page cache)
RECORD = ".json"  # beside each cache file: {"bytes": size, "xxh3": hex digest}, written when it is built

# Cache files this process has checked: (path, size, mtime_ns, inode). Like the store's verified shards, a
# file is hashed once per process while these stay the same, not every epoch.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()
checks = {"files": 0, "bytes": 0}  # cache files hashed by this process (read by tests and benchmarks)


class Source:
    def __init__(self, dataset: Dataset, columns: list[str] | None = None, cache_dir: str | None = None,
                 cache_limit: int | None = None, memory_budget: int = 512 << 20):
        self.dataset = dataset
        self.memory_budget = memory_budget
        self.columns = dataset.check_columns(columns)
        self.cache_dir = _checked_cache_dir(cache_dir)
        self.cache_limit = cache_limit
        if self.cache_dir and any(dataset.cache_key(i) is None for i in range(dataset.num_shards)):
            self.cache_dir = None  # shards without a content key (in memory, foreign files): nothing to cache
        if self.cache_dir:
            try:
                os.makedirs(self.cache_dir, exist_ok=True)
            except OSError as e:
                raise ArgumentError(f"cache_dir {self.cache_dir!r} cannot be created: {e}") from None
        self.row_bytes = float(dataset.bytes_per_row())  # average bytes per row in memory (for budgets)
        self.layout = Layout(tuple(dataset.shard_rows), tuple(self._blocks()))
        self._starts = _block_starts(self.layout.blocks, dataset.num_shards)
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

    def _blocks(self) -> list[tuple[int, int, int]]:
        if self.cache_dir:  # memory-mapped Arrow: any row range is free to read, so small blocks shuffle best
            return fixed_blocks(self.dataset.shard_rows, self.row_bytes, CACHED_BLOCK_BYTES)
        return self.dataset.blocks()

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
            if len(self._open) > _MAX_OPEN:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return h

    def read(self, shard: int, start: int, stop: int) -> pa.Table:
        """Rows [start, stop) of a shard, logical types, selected columns: a slice of the mapped Arrow
        cache; or, through the dataset's contract, one read of views (in-memory kinds) or the blocks
        holding the rows, each read once and kept while the budget allows."""
        if self.cache_dir:
            return self._handle(shard, self._map_cached).slice(start, stop - start)
        if self.dataset.zero_copy_reads and self.dataset.reads_ranges:  # views: nothing worth keeping
            return self.dataset.read_rows(shard, start, stop, self.columns)
        starts, stops = self._starts[shard]
        if not len(starts):  # a shard without rows
            return self.dataset.read_rows(shard, 0, 0, self.columns)
        first = int(np.searchsorted(stops, start, side="right"))
        parts = []
        for b in range(first, len(starts)):
            if starts[b] >= stop and parts:
                break
            parts.append(self._block(shard, int(starts[b]), int(stops[b])))
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return table.slice(start - int(starts[first]), stop - start)

    def _block(self, shard: int, a: int, b: int) -> pa.Table:
        """A block, decoded once and kept (bounded in bytes): consecutive shuffle windows share blocks."""
        key = (shard, a)
        t = self._groups.get(key)
        if t is not None:
            self._groups.move_to_end(key)
            return t
        t = self.dataset.read_rows(shard, a, b, self.columns)
        self._groups[key] = t
        limit = max(self.memory_budget // 4, 2 * t.nbytes)
        while sum(g.nbytes for g in self._groups.values()) > limit and len(self._groups) > 1:
            self._groups.popitem(last=False)
        return t

    # --- the Arrow IPC cache ----------------------------------------------------------------------
    def _cache_path(self, shard: int) -> str:
        return os.path.join(self.cache_dir, self.dataset.cache_key(shard) + ".arrow")

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
        for shard in range(self.dataset.num_shards):
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


def _block_starts(blocks, shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per shard, the sorted starts and stops of its blocks (to find the blocks holding a row range)."""
    arr = np.asarray(blocks, dtype=np.int64).reshape(-1, 3)
    arr = arr[np.lexsort((arr[:, 1], arr[:, 0]))]
    out = []
    for s in range(shards):
        mine = arr[arr[:, 0] == s]
        out.append((mine[:, 1].copy(), mine[:, 2].copy()))
    return out
