"""Reading row ranges of shards inside loader processes.

A Source is built in the main process (where it computes the block layout) and pickled to workers, where
it opens files lazily: nothing open crosses a fork or a spawn. A row range is a slice of the shard's
memory-mapped Arrow cache file (``cache.py``; on by default) when that file is there, else read through
the dataset's contract (decoded row groups, kept while the budget allows; views of in-memory data). The rows
are the same either way, so a shard not yet in the cache (the first epoch, while a background thread fills
it; evicted; too big for the limit) is simply read from Parquet.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from ..errors import ArgumentError, CacheRebuiltWarning  # noqa: F401 - CacheRebuiltWarning: re-exported
from ..store.dataset import Dataset
from . import cache as _cache
from .buffers import BufferPool
from .cache import _verified, checks  # noqa: F401 - the process's checked files and counters (tests)
from .plan import Layout

_MAX_OPEN = 8  # open shard maps per process: their touched pages count in RSS (as clean page cache)
LOOK_EVERY_S = 0.5  # while a shard is not cached yet, how often a read looks for its file


class Source:
    def __init__(self, dataset: Dataset, columns: list[str] | None = None, cache_dir=None,
                 cache_limit: int | str | None = None, memory_budget: int = 512 << 20, fill: bool = True):
        self.dataset = dataset
        self.fill_cache = fill  # False: read the cache files that are there, never build any (one pass)
        self.memory_budget = memory_budget
        self.buffers = BufferPool(memory_budget)  # gathers' output and scratch, reused once unreferenced
        self.columns = dataset.check_columns(columns)
        folder = _cache.resolve_dir(cache_dir)
        # shards without a content key (in memory: already zero-copy; foreign files) are never cached
        self._keys = [dataset.cache_key(i) for i in range(dataset.num_shards)] if folder else []
        self.cache = _cache.Cache(folder, _cache.resolve_limit(cache_limit)) if any(self._keys) else None
        if self.cache is not None:
            try:
                self.cache.makedirs()
            except ArgumentError:
                if cache_dir is not None and cache_dir is not True:
                    raise  # a folder the user named
                self.cache = None  # the default folder cannot be made (a read-only home): no cache
        self.row_bytes = float(dataset.bytes_per_row())  # average bytes per row in memory (for budgets)
        self.layout = Layout(tuple(dataset.shard_rows), tuple(self._blocks()))
        self._starts = _block_starts(self.layout.blocks, dataset.num_shards)
        self._open: OrderedDict = OrderedDict()
        self._packs: dict[int, list] = {}  # shard -> its cache file's row-major packs (names, 2-D view)
        self._groups: OrderedDict = OrderedDict()  # decoded row groups, bounded in bytes
        self._group_bytes = 0  # their total (a running sum: adding one never walks them all)
        self._lock = threading.Lock()
        self._owner = os.getpid()  # the process that fills the cache (workers only read it)
        self._ready: set[int] = set()  # shards whose cache file this process has seen built or mapped
        self._no_room: set[int] = set()  # shards that did not fit under the limit: read from Parquet
        self._next_look: dict[int, float] = {}
        self._missing: int | None = None  # a shard just found not cached, asked for once its read is done
        self._later: list[int] = []  # shards to ask the filler for once the chunk being built is out
        self._serving = False
        self._backwards = False  # the direction read_all reads a chunk's shards in, alternating
        self.refresh()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()
        state["_packs"] = {}
        state["_groups"] = OrderedDict()
        state["_group_bytes"] = 0
        state["_lock"] = None
        if self.cache is not None:  # spawned workers start with what this process checked (forked ones inherit it)
            state["_checked"] = _cache.verified_in(self.cache.dir)
        return state

    def __setstate__(self, state):
        _cache.remember_all(state.pop("_checked", ()))
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def cache_dir(self) -> str | None:
        """The cache folder when every read of this epoch is a slice of the mapped cache (every shard's file
        was there when the epoch started), else None: the collate path then copies what a user may write
        into, and reads only the blocks it needs."""
        return self.cache.dir if self.cache is not None and self._serving else None

    def refresh(self) -> bool:
        """Whether the epoch that starts now is served from the cache (fixed until the next one)."""
        self._serving = self._all_cached()
        return self._serving

    def cache_complete(self) -> bool:
        """Whether the cache holds every shard (looked at again while it does not)."""
        return self._serving or self._all_cached()

    def _all_cached(self) -> bool:
        return self.cache is not None and all(self._keys) and all(
            s in self._open or os.path.exists(self.cache.path(k)) for s, k in enumerate(self._keys))

    def _blocks(self) -> list[tuple[int, int, int]]:
        """The data's own blocks, with the cache or without: the order (plan.py) never depends on the cache."""
        return self.dataset.blocks()

    def reset(self, keep_decoded: bool = False) -> None:
        """Forget open files and maps (a new epoch maps the Arrow cache afresh, so no write into an
        earlier epoch's zero-copy batch can show) and, unless ``keep_decoded``, decoded row groups. The
        caller keeps them only when no batch can be a view of them (shuffled: every batch is gathered)."""
        self._open.clear()
        self._packs.clear()
        if not keep_decoded:
            self._groups.clear()
            self._group_bytes = 0
        if self.cache is not None:
            self.refresh()

    def read_all(self, segs) -> list[pa.Table]:
        """The rows of each range (shard, start, stop) of ``segs``, in order. Over a network, a window's
        ranges (pieces of every block of its span, in random order) are read shard by shard, each block
        decoded once for all its pieces: a shard is fetched at most once per chunk, not once per piece (the
        dataset keeps two fetched shards). The direction alternates, so the blocks decoded last are read
        first next time: one way round, an LRU a little smaller than the span would evict each block just
        before its turn. Measured, a shuffled epoch of 8 shards of 32 MiB: 5x its bytes fetched in random
        order, 2x so; with a 128 MB budget 48x, 10x one way round, 6x alternating."""
        segs = [(int(sh), int(a), int(b)) for sh, a, b in segs]
        if not self.dataset.is_remote or self.dataset.takes_rows or len(segs) < 2:
            return [self.read(*s) for s in segs]
        self._backwards = not self._backwards
        held: dict = {}
        out: list = [None] * len(segs)
        for i in sorted(range(len(segs)), key=lambda i: segs[i], reverse=self._backwards):
            out[i] = self.read(*segs[i], held=held)
        return out

    def read(self, shard: int, start: int, stop: int, held: dict | None = None) -> pa.Table:
        """Rows [start, stop) of a shard, logical types, selected columns: a slice of the mapped Arrow
        cache; or, through the dataset's contract, one read of views (in-memory kinds) or the blocks
        holding the rows, each read once and kept while the budget allows."""
        if self.cache is not None:
            table = self._cached(shard)
            if table is not None:
                return table.slice(start, stop - start)
            if self._serving:  # the epoch hands out views as if cached: a fresh read, never kept, is safe
                return self.dataset.read_rows(shard, start, stop, self.columns)
            table = self._read_through(shard, start, stop, held)
            if self._missing is not None:  # asked for once the chunk is built (start_fills): a filler decoding
                self._later.append(self._missing)  # beside the chunk's reads would share the cores and
                self._missing = None  # Arrow's thread pool with them (the first batch waited 0.5 s for it)
            return table
        return self._read_through(shard, start, stop, held)

    def packs(self, shard: int, start: int, stop: int) -> list[tuple[tuple, np.ndarray]]:
        """Rows [start, stop) of the shard's row-major packs of wide columns ((names, 2-D view), ...) when the
        epoch is served from the cache, else []: only what ``read`` returned for the same rows may be packed."""
        if not self._serving or self._cached(shard) is None:
            return []
        return [(names, v[start:stop]) for names, v in self._packs.get(shard, ())]

    @property
    def takes_rows(self) -> bool:
        """Whether rows are fetched by number (``take``): a remote kind that sends just the rows asked for."""
        return self.dataset.takes_rows and self.cache is None

    def take(self, shard: int, rows: np.ndarray) -> pa.Table:
        """Rows ``rows`` (sorted, distinct) of a shard, fetched as such."""
        return self.dataset.read_take(shard, rows, self.columns)

    def _read_through(self, shard: int, start: int, stop: int, held: dict | None = None) -> pa.Table:
        """Rows [start, stop) through the dataset's contract (no cache); blocks also kept in ``held``."""
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
            parts.append(self._block(shard, int(starts[b]), int(stops[b]), held))
        table = parts[0] if len(parts) == 1 else pa.concat_tables(parts)
        return table.slice(start - int(starts[first]), stop - start)

    def _block(self, shard: int, a: int, b: int, held: dict | None = None) -> pa.Table:
        """A block, decoded once and kept (bounded in bytes): consecutive shuffle windows share blocks.
        ``held``: the blocks one chunk read, kept for it whatever the bound evicts meanwhile."""
        key = (shard, a)
        if held is not None and key in held:
            return held[key]
        with self._lock:  # chunks of a remote dataset are fetched by two threads at once
            t = self._groups.get(key)
            if t is not None:
                self._groups.move_to_end(key)
                if held is not None:
                    held[key] = t
                return t
        t = self.dataset.read_rows(shard, a, b, self.columns)
        if held is not None:
            held[key] = t
        with self._lock:
            size = t.nbytes
            old = self._groups.pop(key, None)  # another thread decoded it meanwhile
            if old is not None:
                self._group_bytes -= old.nbytes
            self._groups[key] = t
            self._group_bytes += size
            limit = max(self.memory_budget // 2, 2 * size)  # a span of the plan, decoded
            if self.dataset.is_remote:  # a span ends with the block that crosses its size: over a network
                limit += 2 * size  # a block evicted each chunk would fetch a whole shard again
            while self._group_bytes > limit and len(self._groups) > 1:
                self._group_bytes -= self._groups.popitem(last=False)[1].nbytes
        return t

    # --- the Arrow IPC cache ----------------------------------------------------------------------
    def _cached(self, shard: int) -> pa.Table | None:
        """The shard's mapped cache file as a table, or None (not cached yet: the caller reads Parquet).
        While the epoch is served from the cache a missing or damaged file is built here and now, as
        before; otherwise the background filler is asked for it and the read goes on from Parquet."""
        t = self._open.get(shard)
        if t is not None:
            self._open.move_to_end(shard)
            return t
        key = self._keys[shard]
        if key is None or shard in self._no_room:
            return None
        if not self._serving and shard not in self._ready:
            now = time.monotonic()
            if now < self._next_look.get(shard, 0.0):
                return None
            self._next_look[shard] = now + LOOK_EVERY_S
            if not os.path.exists(self.cache.path(key)):
                self._missing = shard
                return None
        mm, problem = self.cache.open(key)
        if problem is not None:  # damaged: never served, rebuilt here and now
            self.cache.warn_damaged(key, problem)
        if mm is None and (self._serving or problem is not None) and self.fill_cache:
            mm = self._fill_map(shard)
        if mm is None:
            self._ready.discard(shard)
            self._want(shard)
            return None
        table, packs = _cache.split_packs(pa.ipc.open_file(pa.py_buffer(mm)).read_all())
        if self.columns:  # a pack serves only when every column it holds is selected
            table = table.select(self.columns)
            packs = [(names, v) for names, v in packs if set(names) <= set(self.columns)]
        if not self._agrees(shard, table):  # the file holds the shard's bytes, the dataset says otherwise
            self._no_room.add(shard)  # never from the cache: reads go through the contract, which names it
            return None
        self._ready.add(shard)
        self._open[shard] = table
        self._packs[shard] = packs
        if len(self._open) > _MAX_OPEN:
            self._packs.pop(self._open.popitem(last=False)[0], None)
        return table

    def _agrees(self, shard: int, table: pa.Table) -> bool:
        """Whether a cache file's rows and column types are what the dataset says this shard holds. The file
        is keyed by the shard's content (checksum and size), so a manifest edited since it was built (rows,
        types) would otherwise be served the old shape: such a shard is read through the dataset instead,
        whose own checks (the footer against the manifest) name the damage."""
        if table.num_rows != self.dataset.shard_rows[shard]:
            return False
        want = self.dataset.schema
        return all(f.name in want.names and want.field(f.name).type == f.type for f in table.schema)

    def _fill_map(self, shard: int, wait: bool = True):
        """Build (or wait for another process to build) the shard's cache file; None when it does not fit."""
        mm = self.cache.fill(self._keys[shard], lambda: _cache.with_packs(self.dataset.read_shard(shard)), self._meta(shard),
                             wait=wait, protect=self._protected())
        if mm is None:
            self._no_room.add(shard)
        return mm

    def fill(self, shard: int, wait: bool = True) -> bool:
        """Build the shard's cache file unless it is there (the background filler's job); False when
        another process is building it and ``wait`` is False."""
        key = self._keys[shard]
        if key is None or shard in self._no_room:
            return True
        path = self.cache.path(key)
        if shard in self._ready or (os.path.exists(path) and os.path.exists(path + _cache.RECORD)):
            self._ready.add(shard)
            return True
        try:
            mm = self._fill_map(shard, wait)
        except _cache.Busy:
            return False
        if mm is not None:
            mm.close()
            self._ready.add(shard)
        return True

    def start_fills(self) -> None:
        """Ask the filler for the shards the chunk just built found missing (called once it is handed out)."""
        later, self._later = self._later, []
        for shard in dict.fromkeys(later):
            self._want(shard)

    def _want(self, shard: int) -> None:
        """Ask this process's filler for the shard first, then the others (only in the process that made
        the loader: workers read)."""
        if os.getpid() != self._owner or not self.fill_cache:
            return
        rest = [s for s, k in enumerate(self._keys) if k and s not in self._ready and s not in self._no_room]
        _cache.filler().want(self, rest)
        _cache.filler().want(self, [shard], first=True)

    def fill_in_background(self) -> None:
        """Start filling every shard not cached yet (in this process's filler thread)."""
        if self.cache is not None and os.getpid() == self._owner and not self._serving and self.fill_cache:
            rest = [s for s, k in enumerate(self._keys) if k and s not in self._ready and s not in self._no_room]
            if rest:
                _cache.filler().want(self, rest)

    def wait_filled(self, timeout: float | None = None) -> bool:
        """Until the background fills of this process are done (tests, benchmarks)."""
        return _cache.wait_filled(timeout)

    def _meta(self, shard: int) -> dict:
        """What a cache file's record says it holds (shown by ``tensorgrid cache``)."""
        return {"url": self.dataset.url or "", "version": self.dataset.version, "shard": shard,
                "rows": int(self.dataset.shard_rows[shard])}

    def _protected(self) -> set:
        return {k for k in self._keys if k}

    def check_cache(self) -> None:
        """Check the cache files that exist (once per process), rebuilding damaged ones here. Called before
        workers start: they inherit what was checked, so they do not hash every file again each epoch."""
        if self.cache is None:
            return
        for shard, key in enumerate(self._keys):
            if key and os.path.exists(self.cache.path(key)):
                mm, problem = self.cache.open(key)
                if problem is not None:
                    self.cache.warn_damaged(key, problem)
                    mm = self._fill_map(shard) if self.fill_cache else None
                if mm is not None:
                    mm.close()
                    self._ready.add(shard)
        self.refresh()
        self.fill_in_background()


def _block_starts(blocks, shards: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per shard, the sorted starts and stops of its blocks (to find the blocks holding a row range)."""
    arr = np.asarray(blocks, dtype=np.int64).reshape(-1, 3)
    arr = arr[np.lexsort((arr[:, 1], arr[:, 0]))]
    out = []
    for s in range(shards):
        mine = arr[arr[:, 0] == s]
        out.append((mine[:, 1].copy(), mine[:, 2].copy()))
    return out
