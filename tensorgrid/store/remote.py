"""Reading shards over a network: a shard's bytes fetched by concurrent ranged GETs into one buffer, a
footer by one GET of the file's tail, and filesystems that work again in a forked child.

Why ranges: one GET of an object store streams at one connection's speed; ranges of ~8 MiB fetched at once
use several, 16 MiB each (AWS's own advice for S3: byte-range GETs of 8 or 16 MB in parallel; s3fs is async, so they
share one event loop, no thread per range). The manifest gives each shard's size, so no HEAD request is
needed first; the last range asks for one byte past the end, so an object longer than the manifest says
shows without one too. The whole shard is still checked against the manifest's xxh3 by the caller: reading
only the column chunks a query needs would skip bytes the checksum covers, and a whole-shard checksum cannot
verify part of a shard. A server whose range reads cost the whole object (moto's does) is better read by one
GET per shard: ``$TENSORGRID_RANGE_BYTES=0``.

Why ``here``: fsspec's async filesystems (s3fs, gcsfs, http) run on an event loop thread of the process
that made them, and refuse to run in a forked child ("This class is not fork-safe"): a loader worker
forked from a process that read a dataset on S3 makes its own instance from the same constructor
arguments (fsspec's cache of instances is per process), keeping the inherited one referenced, so that its
finalizer (which would try to close the parent's connections on a loop no thread runs) never fires here.
"""

from __future__ import annotations

import asyncio
import os
import threading

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.memory import MemoryFileSystem

from ..errors import ArgumentError

# one GET's part of a shard (a shard is up to 128 MiB by default: one round of 8 ranges). 16 MiB, not 8: on a
# server whose range reads cost more than their bytes (moto: the whole object) it halves the penalty, and AWS
# advises 8-16 MB parts
RANGE_BYTES = 16 << 20
RANGE_ENV = "TENSORGRID_RANGE_BYTES"  # another part size; 0: one GET per shard
IN_FLIGHT = 8  # ranges of one shard requested at once (bounds the bodies held besides the shard's buffer)
TAIL_BYTES = 64 << 10  # a footer read asks for this much of the file's end: most footers fit, one GET

_inherited: dict[int, tuple[fsspec.AbstractFileSystem, fsspec.AbstractFileSystem]] = {}
_inherited_lock = threading.Lock()


def _fresh_lock() -> None:  # a forked child: a lock another thread held at the fork would never be released
    global _inherited_lock
    _inherited_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock)


class WrongSize(Exception):
    """The object does not hold the number of bytes asked for: ``actual`` it holds."""

    def __init__(self, actual: int):
        super().__init__(actual)
        self.actual = actual


def here(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """``fs``, or, in a process forked after an async filesystem was made, an instance of this process
    with the same constructor arguments (made once per inherited instance)."""
    made_in = getattr(fs, "_pid", None)
    if made_in is None or made_in == os.getpid() or not getattr(fs, "async_impl", False):
        return fs
    with _inherited_lock:
        old_new = _inherited.get(id(fs))
        if old_new is None or old_new[0] is not fs:
            make, args = fs.__reduce__()  # fsspec: (make_instance, (cls, args, storage options))
            old_new = _inherited[id(fs)] = (fs, make(*args))
    return old_new[1]


def range_bytes() -> int:
    """Bytes per ranged GET: ``$TENSORGRID_RANGE_BYTES``, else RANGE_BYTES. 0 fetches a shard by one GET:
    for a server whose range reads cost in proportion to the whole object (moto reads it all for any range:
    1 byte of a 128 MiB object took 112 ms, of an 8 MiB one 12 ms; 8 MiB ranges fetched a shard 3x slower
    than one GET there, measured), where ranges only multiply the work."""
    raw = os.environ.get(RANGE_ENV, "").strip()
    if not raw:
        return RANGE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ArgumentError(f"${RANGE_ENV} must be an int >= 0 (bytes per ranged GET of a shard; 0: one GET per "
                            f"shard), got {raw!r}")
    return value


def ranges(size: int, part: int) -> list[tuple[int, int]]:
    """[start, stop) byte ranges of near-equal size (at most ``part``) covering ``size`` bytes."""
    n = max(1, -(-size // max(1, part)))
    step = max(1, -(-size // n))
    return [(a, min(a + step, size)) for a in range(0, size, step)]


def fetch(fs: fsspec.AbstractFileSystem, path: str, size: int, part: int | None = None) -> pa.Buffer:
    """The ``size`` bytes of the object at ``path``: one GET up to ``part`` (``range_bytes()``) bytes, else
    concurrent ranged GETs into one buffer. FileNotFoundError when it is missing, WrongSize when it holds
    another number of bytes."""
    part = range_bytes() if part is None else part
    parts = ranges(size, part if part > 0 else size)
    # one plain read: no network (memory://), one part, or a driver without concurrent ranged reads (sync
    # drivers such as pyarrow's HDFS through fsspec read ranges by seeking a stream, which some cannot)
    if size == 0 or len(parts) == 1 or isinstance(fs, MemoryFileSystem) or not getattr(fs, "async_impl", False):
        data = fs.cat_file(path)
        if len(data) != size:
            raise WrongSize(len(data))
        return pa.py_buffer(data)
    out = pa.allocate_buffer(size)
    view = memoryview(out).cast("B")
    results = fsspec.asyn.sync(fs.loop, _gather, fs, path, parts, size, view)
    _settle(fs, path, size, results)
    return out


def _end(b: int, size: int) -> int:
    """Where a range read stops: the last one goes one byte past the end, to see an object grown since."""
    return b + 1 if b == size else b


async def _gather(fs, path: str, parts: list[tuple[int, int]], size: int, view: memoryview) -> list:
    """Every range through the async filesystem's own coroutines, IN_FLIGHT at a time, each copied into
    ``view`` as it arrives (no list of bodies to join)."""
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(a: int, b: int):
        async with gate:
            try:
                data = await fs._cat_file(path, start=a, end=_end(b, size))
            except Exception as e:  # noqa: BLE001 - told apart by _settle
                return e
        if len(data) != b - a:
            return len(data)
        view[a:b] = data
        return None

    return await asyncio.gather(*(one(a, b) for a, b in parts))


def _settle(fs, path: str, size: int, results: list) -> None:
    """Raise what the ranges met: FileNotFoundError if the object is gone, WrongSize if it holds another
    number of bytes (asked of the store only now, on this rare path), else the first error as is (a
    network failure is not damage)."""
    bad = [r for r in results if r is not None]
    if not bad:
        return
    gone = next((r for r in bad if isinstance(r, FileNotFoundError)), None)
    if gone is not None:
        raise gone
    try:
        actual = fs.size(path)  # FileNotFoundError: deleted meanwhile
    except FileNotFoundError:
        raise
    except Exception:  # noqa: BLE001 - the ranges' own error, raised below, says more
        actual = None
    if actual is not None and actual != size:
        raise WrongSize(actual)
    error = next((r for r in bad if isinstance(r, BaseException)), None)
    if error is not None:
        raise error
    raise OSError(f"{path}: a ranged read returned {bad[0]} bytes of an object of {size}: the object changed "
                  f"while it was read")


def footer(fs: fsspec.AbstractFileSystem, path: str, size: int) -> pq.FileMetaData:
    """A Parquet file's footer from one GET of its tail (two for a footer over TAIL_BYTES), no HEAD: the
    size comes from the manifest. Not verified (the shard's checksum covers the whole file): for estimates
    only. pa.ArrowInvalid when the tail is not a Parquet footer."""
    start = max(0, size - TAIL_BYTES)
    tail = fs.cat_file(path, start=start, end=size)
    if len(tail) < 8 or tail[-4:] != b"PAR1":
        raise pa.ArrowInvalid(f"{path}: no Parquet footer at its end")
    need = int.from_bytes(tail[-8:-4], "little") + 8
    if need > size - 4:
        raise pa.ArrowInvalid(f"{path}: a footer of {need} bytes in a file of {size}")
    if need > len(tail):
        tail = fs.cat_file(path, start=size - need, end=size)
    return pq.read_metadata(pa.BufferReader(b"PAR1" + tail[-need:]))  # the magic the reader checks at the start
