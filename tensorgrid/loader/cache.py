"""The loader's Arrow cache: each shard converted once to an uncompressed Arrow IPC file and memory-mapped
copy-on-write, so batches are views of the page cache (zero copy) and a user writing into a batch changes
only that process's private pages, never the cache.

On by default, at ``$TENSORGRID_CACHE_DIR``, else ``$XDG_CACHE_HOME/tensorgrid``, else
``~/.cache/tensorgrid`` (the files in its ``arrow-v1`` folder: another format gets another folder);
``cache_dir=False`` or ``TENSORGRID_CACHE=off`` turns it off.

Wide tables gather like one column: a file also holds, for each group of two or more 1-D numeric columns of
one dtype without nulls, a row-major copy of the group (a ``fixed_size_list`` column, ``with_packs``), so a
shuffled batch reads one contiguous row per sample instead of one cache line per column (25 float columns
gathered 3x faster, measured). The loader strips these columns (``split_packs``): every table it hands on
has the dataset's own columns. Files are named by the shard's content key
(``Dataset.cache_key``: a store shard's checksum and size), so an entry is never stale and datasets or
URLs holding the same shard share it.

Trustworthy as the store: each file's size and xxh3 are recorded when it is built (``<file>.json``, with
the dataset it was built for), checked the first time a process maps it (not again while its size and
mtime stay the same), and a damaged file is rebuilt from the verified shard with a ``CacheRebuiltWarning``.

Shared by processes: a file is written to a temporary name and renamed (whole or absent), and built under
an exclusive ``flock`` on ``<key>.lock``, so a process that wants a shard another is building waits for it
instead of building it again. Bounded: by ``cache_limit`` / ``$TENSORGRID_CACHE_LIMIT``, else half of the
free disk plus what the cache holds (re-evaluated at every fill); least recently mapped files go first (an
unlinked file stays valid for whoever maps it). Filled by a background thread per process (``Filler``) while
the first epoch reads Parquet: the rows are the same either way.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import errno
import fcntl
import json
import mmap
import os
import re
import shutil
import sys
import threading
import time
import uuid
import warnings
import weakref

import numpy as np
import pyarrow as pa
import xxhash

from ..errors import ArgumentError, CacheRebuiltWarning

FORMAT = "arrow-v2"  # the folder of this file format under the cache root (v2: row-major packs of wide columns)
OLD_FORMATS = ("arrow-v1",)  # folders of earlier formats: never read, removed by `tensorgrid cache clear`
PACK_META = b"tensorgrid.pack"  # field metadata of a pack column: the JSON list of the columns it holds
SUFFIX, RECORD, LOCK = ".arrow", ".json", ".lock"  # a file, its checksum record, its fill lock
MARKER = ".tensorgrid-cache"  # in a folder the cache made (clear removes its stray locks and temporaries only there)
OFF = ("off", "0", "false", "no")
ON = ("", "on", "1", "true", "yes")

# Cache files this process has checked: (path, size, mtime_ns, inode). Like the store's verified shards, a
# file is hashed once per process while these stay the same, not every epoch.
_verified: set[tuple] = set()
_verified_lock = threading.Lock()
checks = {"files": 0, "bytes": 0}  # cache files hashed by this process (read by tests and benchmarks)
fills = {"files": 0, "bytes": 0}  # cache files this process built (read by tests and benchmarks)


# --- row-major packs of wide columns ------------------------------------------------------------
def _packable(col: pa.ChunkedArray) -> bool:
    t = col.type
    return (pa.types.is_integer(t) or pa.types.is_floating(t)) and not pa.types.is_float16(t) and col.null_count == 0


def with_packs(table: pa.Table) -> pa.Table:
    """``table`` plus one row-major column per group of two or more packable columns of one dtype."""
    groups: dict = {}
    for name, col in zip(table.column_names, table.columns):
        if _packable(col):
            groups.setdefault(col.type, []).append(name)
    for i, (dtype, names) in enumerate(g for g in groups.items() if len(g[1]) > 1):
        values = np.empty((table.num_rows, len(names)), dtype.to_pandas_dtype())
        for j, name in enumerate(names):
            values[:, j] = table.column(name).to_numpy()
        field = pa.field(f"__tensorgrid_pack_{i}", pa.list_(dtype, len(names)), nullable=False,
                         metadata={PACK_META: json.dumps(names).encode()})
        while field.name in table.column_names:
            field = field.with_name(field.name + "_")
        arr = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), dtype), len(names))
        table = table.append_column(field, arr)
    return table


def split_packs(table: pa.Table) -> tuple[pa.Table, list[tuple[tuple, np.ndarray]]]:
    """(the table without its pack columns, [(column names, row-major numpy view), ...])."""
    packs, keep = [], []
    for i, field in enumerate(table.schema):
        members = (field.metadata or {}).get(PACK_META)
        if members is None:
            keep.append(i)
            continue
        col = table.column(i)
        if col.num_chunks == 1:
            names = tuple(json.loads(members))
            packs.append((names, col.chunk(0).flatten().to_numpy().reshape(len(col), len(names))))
    return (table if len(keep) == table.num_columns else table.select(keep)), packs


# --- where, and how big -----------------------------------------------------------------------------
def default_root() -> str:
    """The cache root: $TENSORGRID_CACHE_DIR, else $XDG_CACHE_HOME/tensorgrid, else ~/.cache/tensorgrid."""
    root = os.environ.get("TENSORGRID_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = os.path.join(xdg if xdg and os.path.isabs(xdg) else os.path.join("~", ".cache"), "tensorgrid")
    return os.path.abspath(os.path.expanduser(root))


def env_enabled() -> bool:
    value = os.environ.get("TENSORGRID_CACHE", "").strip().lower()
    if value in OFF:
        return False
    if value in ON:
        return True
    raise ArgumentError(f"$TENSORGRID_CACHE must be on or off, got {value!r}")


def resolve_dir(cache_dir) -> str | None:
    """The folder of Arrow files for a loader's ``cache_dir``: None (or True) the default folder unless
    $TENSORGRID_CACHE=off, False none, a path that folder itself."""
    if cache_dir is False:
        return None
    if cache_dir is None or cache_dir is True:
        return os.path.join(default_root(), FORMAT) if env_enabled() else None
    if not isinstance(cache_dir, (str, os.PathLike)) or not os.fspath(cache_dir):
        raise ArgumentError(f"cache_dir must be a folder path, or False for no cache, got {cache_dir!r}")
    path = os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ArgumentError(f"cache_dir {path!r} is an existing file, not a folder")
    return path


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_size(name: str, value) -> int:
    """Bytes from an int or a size such as "20G", "512 MiB", "1.5TB" (powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ArgumentError(f"{name} must be an int >= 0 or a size such as '20G', got {value!r}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgtp]?)(?:i?b)?\s*", value, re.I) if isinstance(value, str) else None
    if m is None:
        raise ArgumentError(f"{name} must be an int >= 0 or a size such as '20G', got {value!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def resolve_limit(cache_limit) -> int | None:
    """Bytes the cache may hold: ``cache_limit``, else $TENSORGRID_CACHE_LIMIT, else None (half of the free
    disk plus what the cache holds, evaluated at each fill). 0: no limit."""
    if cache_limit is not None:
        return parse_size("cache_limit", cache_limit)
    env = os.environ.get("TENSORGRID_CACHE_LIMIT", "").strip()
    return parse_size("$TENSORGRID_CACHE_LIMIT", env) if env else None


# --- one cache folder ---------------------------------------------------------------------------------
class Busy(Exception):
    """Another process holds the fill lock of that file (asked not to wait)."""


class Cache:
    """The Arrow files of one folder, named by content key."""

    def __init__(self, folder: str, limit: int | None = None):
        self.dir, self.limit = folder, limit

    def path(self, key: str) -> str:
        return os.path.join(self.dir, key + SUFFIX)

    def makedirs(self) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
            marker = os.path.join(self.dir, MARKER)
            if not os.path.exists(marker):
                with open(marker, "w") as f:
                    f.write("a TensorGrid Arrow cache: `tensorgrid cache clear` deletes the files it built\n")
        except OSError as e:
            raise ArgumentError(f"cache_dir {self.dir!r} cannot be created: {e}") from None

    # --- reading ------------------------------------------------------------------------------------
    def open(self, key: str) -> tuple[mmap.mmap | None, str | None]:
        """(the file mapped copy-on-write, None) if its size and xxh3 match its record (hashed the first time
        this process maps it); (None, None) if it is missing; (None, what is wrong) if it is damaged."""
        return _checked_map(self.path(key))

    def warn_damaged(self, key: str, problem: str) -> None:
        warnings.warn(CacheRebuiltWarning(f"Arrow cache file {self.path(key)} {problem}: rebuilding it from the "
                                          f"verified shard"), stacklevel=4)

    # --- filling ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, key: str, wait: bool = True):
        """An exclusive flock on ``<key>.lock``; raises Busy when ``wait`` is False and another holds it."""
        path = os.path.join(self.dir, key + LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise Busy(key) from None
                raise
            try:  # the lock file may have been removed (evicted, cleared) while we waited: lock the new one
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield
        finally:
            # unlock explicitly: a process forked meanwhile (a DataLoader worker) shares this descriptor, and
            # closing ours alone would leave the lock held until that process exits
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def fill(self, key: str, read, meta: dict, wait: bool = True, protect=()) -> mmap.mmap | None:
        """The file of ``key`` mapped, built from ``read()`` (a verified Arrow table) unless another process
        built it meanwhile: under its lock, so two processes never convert one shard twice. None when it
        does not fit under the limit without evicting ``protect`` (keys in use), or the disk is full."""
        self.makedirs()
        path = self.path(key)
        with self.locked(key, wait):
            mm, _ = _checked_map(path)  # a damaged file is replaced (the reader that found it said so)
            if mm is not None:
                return mm  # built by another process while we waited (or before)
            self._remove_leftovers(key)
            try:
                return self._write(path, read().combine_chunks(), meta, protect={*protect, key})
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    return None
                raise

    def _write(self, path: str, table: pa.Table, meta: dict, protect) -> mmap.mmap | None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table, max_chunksize=max(1, table.num_rows))  # one chunk: slices stay zero-copy
            if not self.make_room(os.path.getsize(tmp), protect):
                return None
            with open(tmp, "rb") as f:
                st = os.fstat(f.fileno())
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private copy-on-write pages
            digest = _digest(mm)
            # the record first: whoever finds the file finds its record
            _write_record(path, {"bytes": st.st_size, "xxh3": digest, **meta, "built": time.time()})
            os.replace(tmp, path)  # whole file or nothing; the inode and mtime (the check's key) stay
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _remember((path, st.st_size, st.st_mtime_ns, st.st_ino))
        fills["files"] += 1
        fills["bytes"] += st.st_size
        return mm

    def _remove_leftovers(self, key: str) -> None:
        """Temporary files of this key: left by a killed fill (we hold its lock, so nobody writes them)."""
        prefix = key + SUFFIX + ".tmp-"
        with contextlib.suppress(OSError):
            for name in os.listdir(self.dir):
                if name.startswith(prefix):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(self.dir, name))

    # --- size ---------------------------------------------------------------------------------------
    def entries(self) -> list[dict]:
        """The cache files (key, path, bytes, last used) with their records' fields, least recently used first."""
        out = []
        try:
            names = os.listdir(self.dir)
        except OSError:
            return []
        for name in names:
            if not name.endswith(SUFFIX):
                continue
            p = os.path.join(self.dir, name)
            try:
                st = os.stat(p)
            except OSError:  # evicted by another process meanwhile
                continue
            record = _read_record(p)
            if record is None:  # not a file of ours (or its record is gone): never listed, evicted or cleared
                continue
            out.append({**record, "key": name[:-len(SUFFIX)], "path": p, "bytes": st.st_size,
                        "used": st.st_atime})  # atime: last mapped (see _checked_map)
        return sorted(out, key=lambda e: e["used"])

    def effective_limit(self, held: int) -> int | None:
        """The limit in bytes now (None: none). The default is half of what is free plus what is held."""
        if self.limit == 0:
            return None
        if self.limit is not None:
            return self.limit
        try:
            free = shutil.disk_usage(self.dir).free
        except OSError:
            return None
        return (free + held) // 2

    def make_room(self, need: int, protect=()) -> bool:
        """Evict least recently used files until ``need`` more bytes fit under the limit; False (evicting
        nothing) when they cannot without evicting ``protect``. Temporaries of fills that were killed (their
        lock free) go first."""
        self._sweep()
        entries = self.entries()
        held = sum(e["bytes"] for e in entries)
        limit = self.effective_limit(held)
        if limit is None or held + need <= limit:
            return True
        victims, freed = [], 0
        for e in entries:
            if held - freed + need <= limit:
                break
            if e["key"] not in protect:
                victims.append(e)
                freed += e["bytes"]
        if held - freed + need > limit:
            return False
        for e in victims:
            self.remove(e["key"])
        return True

    def _sweep(self) -> None:
        """Delete the temporaries of killed fills (a training rank leaves with os._exit) in a folder the cache
        made, where no process holds their key's lock."""
        if not os.path.exists(os.path.join(self.dir, MARKER)):
            return
        for name in os.listdir(self.dir):
            if ".tmp-" in name and name.split(SUFFIX)[0]:
                key = name.split(SUFFIX)[0]
                with contextlib.suppress(Busy, OSError), self.locked(key, wait=False):
                    os.remove(os.path.join(self.dir, name))

    def remove(self, key: str) -> None:
        """Delete a file (mapped copies stay valid until unmapped), then its record; its lock file when free."""
        path = self.path(key)
        for p in (path, path + RECORD):
            with contextlib.suppress(FileNotFoundError):
                os.remove(p)
        with contextlib.suppress(Busy, OSError), self.locked(key, wait=False):
            os.remove(os.path.join(self.dir, key + LOCK))

    def clear(self) -> dict:
        """Delete every file not being filled right now; returns counts of removed and busy files."""
        removed, nbytes, busy = 0, 0, 0
        for e in self.entries():
            try:
                with self.locked(e["key"], wait=False):
                    for p in (e["path"], e["path"] + RECORD):
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(p)
                    os.remove(os.path.join(self.dir, e["key"] + LOCK))
                removed += 1
                nbytes += e["bytes"]
            except Busy:
                busy += 1
        ours = os.path.exists(os.path.join(self.dir, MARKER))  # a folder the cache made: its strays are its own
        for name in (os.listdir(self.dir) if ours else []):  # killed fills, stray records, locks
            if name.endswith(LOCK) or ".tmp-" in name or name.endswith(SUFFIX + RECORD):
                key = name.split(SUFFIX)[0].removesuffix(LOCK)
                with contextlib.suppress(Busy, OSError), self.locked(key, wait=False):
                    for p in {os.path.join(self.dir, name), os.path.join(self.dir, key + LOCK)}:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(p)
        if os.path.basename(self.dir) == FORMAT:  # files of an earlier format beside it are never read again
            for old in OLD_FORMATS:
                folder = os.path.join(os.path.dirname(self.dir), old)
                if os.path.exists(os.path.join(folder, MARKER)):
                    got = Cache(folder).clear()
                    removed, nbytes, busy = removed + got["removed"], nbytes + got["bytes"], busy + got["busy"]
                    with contextlib.suppress(OSError):  # only when nothing else is in it
                        if sorted(os.listdir(folder)) == [MARKER]:
                            os.remove(os.path.join(folder, MARKER))
                            os.rmdir(folder)
        return {"removed": removed, "bytes": nbytes, "busy": busy}


# --- checks -------------------------------------------------------------------------------------------
def _checked_map(path: str) -> tuple[mmap.mmap | None, str | None]:
    """(the file mapped copy-on-write, None) if its size and xxh3 match its record; (None, None) if it is
    missing; (None, what is wrong) if it is damaged."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return None, None
    with f:
        st = os.fstat(f.fileno())
        key = (path, st.st_size, st.st_mtime_ns, st.st_ino)
        problem = None if key in _verified else _problem(f, st.st_size)
        if problem is not None:
            if st.st_nlink == 0 or not _same_file(path, st):  # evicted meanwhile (file, then record): missing,
                return None, None  # not damaged (no warning; the reader fills or reads Parquet)
            return None, problem
        _remember(key)
        try:  # LRU order for the limit, in atime: the mtime is part of the check's key
            os.utime(f.fileno(), ns=(time.time_ns(), st.st_mtime_ns))
        except OSError:  # a read-only cache
            pass
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), None  # private copy-on-write pages


def _same_file(path: str, st: os.stat_result) -> bool:
    try:
        now = os.stat(path)
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_dev) == (st.st_ino, st.st_dev)


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
            record = json.loads(f.read(1 << 16))
    except (OSError, ValueError):  # missing, unreadable, not JSON (UnicodeDecodeError is a ValueError)
        return None
    ok = (isinstance(record, dict) and type(record.get("bytes")) is int and record["bytes"] > 0
          and isinstance(record.get("xxh3"), str))
    return record if ok else None


def _write_record(path: str, record: dict) -> None:
    tmp = f"{path}{RECORD}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(record, f)
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


def verified_in(folder: str) -> list[tuple]:
    """What this process checked in ``folder`` (handed to spawned workers)."""
    with _verified_lock:
        return [k for k in _verified if os.path.dirname(k[0]) == folder]


def remember_all(keys) -> None:
    with _verified_lock:
        _verified.update(keys)


# --- the background filler ------------------------------------------------------------------------------
class Filler:
    """One thread per process that builds cache files for the Sources that ask (a shard being read first),
    one at a time. A file another process is building is skipped and waited for last: two processes share
    the work and neither converts a shard twice."""

    def __init__(self):
        self.pid = os.getpid()
        self._jobs: collections.OrderedDict = collections.OrderedDict()  # (id(source), shard) -> (ref, shard)
        self._cond = threading.Condition()
        self._busy = False
        self._waiting: list = []  # jobs whose file another process is building: waited for once nothing else is left
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tensorgrid-cache-fill", daemon=True)
        self._thread.start()

    def want(self, source, shards, first: bool = False) -> None:
        ref = weakref.ref(source)
        with self._cond:
            for s in shards:
                k = (id(source), s)
                self._jobs[k] = (ref, s)
                self._jobs.move_to_end(k, last=not first)
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Until nothing is queued or being built (True), or ``timeout`` seconds (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._jobs or self._busy or self._waiting:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stop = True
            self._jobs.clear()
            self._cond.notify_all()
        self._thread.join(timeout)

    def _run(self) -> None:
        _lowest_priority()
        busy = self._waiting
        while True:
            with self._cond:
                while not self._jobs and not busy and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                if self._jobs:
                    (ref, shard), wait = self._jobs.popitem(last=False)[1], False
                else:
                    (ref, shard), wait = busy.pop(0), True
                self._busy = True
            try:
                source = ref()
                if source is not None and not source.fill(shard, wait=wait):
                    busy.append((ref, shard))
            except Exception as e:  # noqa: BLE001 - a fill that fails leaves the shard to Parquet reads
                warnings.warn(f"tensorgrid: the Arrow cache could not be filled ({type(e).__name__}: {e}); "
                              "reading Parquet instead", RuntimeWarning, stacklevel=1)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()


def _lowest_priority() -> None:
    """Run this thread at the lowest CPU priority (Linux: a thread's own nice value), so the fill takes the
    cores' idle time. With the cores busy (training, other work) a fill at normal priority made the first
    epoch on an empty cache 2-4x slower than with the cache off (2 cores, 28x28 shuffled: 0.5-1.06 s against
    0.18-0.25 s); niced, as fast. On an idle machine it still costs 1.3-1.7x: its decode runs in Arrow's
    thread pool, which this does not reach, and its disk write (measured: RESULTS.md, issue 10)."""
    if not sys.platform.startswith("linux"):  # elsewhere the id would name a process, not this thread
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except OSError:  # not allowed (a sandbox): the fill runs at the process's priority
        pass


_filler: Filler | None = None
_filler_lock = threading.Lock()


def filler() -> Filler:
    """This process's filler, started on first use."""
    global _filler
    with _filler_lock:
        if _filler is None or _filler.pid != os.getpid():
            _filler = Filler()
        return _filler


def wait_filled(timeout: float | None = None) -> bool:
    """Until this process's background fills are done (True) or ``timeout`` seconds passed (False)."""
    f = _filler
    return True if f is None or f.pid != os.getpid() else f.wait(timeout)


def _forget_filler() -> None:
    """In a forked child: no filler thread (it starts its own if it needs one), and fresh locks (the filler
    may have held one at the fork: the child would wait for it forever)."""
    global _filler, _filler_lock, _verified_lock
    _filler, _filler_lock, _verified_lock = None, threading.Lock(), threading.Lock()


def _stop_at_exit() -> None:
    """Let the shard being built finish for a few seconds (it would be wasted), start no other; a fill cut
    short leaves a temporary that the next fill or eviction removes."""
    f = _filler
    if f is not None and f.pid == os.getpid():
        f.stop(timeout=5)


os.register_at_fork(after_in_child=_forget_filler)
atexit.register(_stop_at_exit)


# --- for `tensorgrid cache` and `tensorgrid info` ------------------------------------------------------------
def default_cache(folder: str | None = None) -> Cache:
    """The cache of a folder (default: the default folder, even when $TENSORGRID_CACHE=off)."""
    return Cache(folder and resolve_dir(folder) or os.path.join(default_root(), FORMAT), resolve_limit(None))


def describe_limit(cache: Cache, held: int) -> tuple[int | None, str]:
    """The limit now in bytes (None: none) and where it comes from."""
    if cache.limit == 0:
        return None, "$TENSORGRID_CACHE_LIMIT=0"
    if cache.limit is not None:
        return cache.limit, "$TENSORGRID_CACHE_LIMIT"
    return cache.effective_limit(held), "half of the free disk plus what the cache holds"


def dataset_usage(ds, cache: Cache | None = None) -> dict | None:
    """How much of ``ds`` the cache holds: shards, cached shards, bytes; None if it has no content keys."""
    keys = [ds.cache_key(i) for i in range(ds.num_shards)]
    if not any(keys):
        return None
    cache = cache or default_cache()
    sizes = []
    for k in keys:
        with contextlib.suppress(OSError, TypeError):
            sizes.append(os.path.getsize(cache.path(k)))
    return {"dir": cache.dir, "shards": len(keys), "cached": len(sizes), "bytes": sum(sizes)}
