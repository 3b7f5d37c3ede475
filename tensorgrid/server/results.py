"""What the server holds between calls, and how results leave it.

A Flight SQL query runs in GetFlightInfo and its rows are read by a later DoGet; a prepared statement lives
between its Create and Close actions. A client that never comes back must not pin memory or DuckDB cursors
forever, so both are held in an ``Expiring`` store: a cap on the number held (oldest dropped first) and a
time to live. Results leave in batches capped by bytes, because DuckDB sizes its batches by rows and the
ADBC driver refuses gRPC messages over 16 MiB.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator

import pyarrow as pa


def new_handle() -> bytes:
    """An opaque, unguessable handle for a held result or a prepared statement."""
    return os.urandom(16)


class Expiring:
    """Items by handle, at most ``max_items`` and each for at most ``ttl`` seconds since its last use;
    ``on_drop(item)`` releases what an expired or evicted item holds. Thread-safe."""

    def __init__(self, max_items: int, ttl: float, on_drop: Callable[[object], None] | None = None):
        self.max_items, self.ttl, self._on_drop = max_items, ttl, on_drop
        self._items: OrderedDict[bytes, tuple[float, object]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, item) -> bytes:
        handle = new_handle()
        with self._lock:
            self._items[handle] = (time.monotonic(), item)
            dropped = self._expire_locked()
            while len(self._items) > self.max_items:
                dropped.append(self._items.popitem(last=False)[1][1])
        self._drop(dropped)
        return handle

    def get(self, handle: bytes):
        """The item (its time to live restarted), or None when unknown or expired."""
        with self._lock:
            dropped = self._expire_locked()
            entry = self._items.pop(handle, None)
            if entry is not None:
                self._items[handle] = (time.monotonic(), entry[1])
        self._drop(dropped)
        return None if entry is None else entry[1]

    def pop(self, handle: bytes):
        """The item, removed (a held result is read once), or None when unknown or expired."""
        with self._lock:
            dropped = self._expire_locked()
            entry = self._items.pop(handle, None)
        self._drop(dropped)
        return None if entry is None else entry[1]

    def clear(self) -> None:
        with self._lock:
            dropped = [item for _, item in self._items.values()]
            self._items.clear()
        self._drop(dropped)

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def _expire_locked(self) -> list:
        deadline, dropped = time.monotonic() - self.ttl, []
        while self._items:
            handle, (used, item) = next(iter(self._items.items()))
            if used > deadline:
                break  # ordered by last use: the rest are younger
            del self._items[handle]
            dropped.append(item)
        return dropped

    def _drop(self, items: list) -> None:
        if self._on_drop is not None:
            for item in items:
                self._on_drop(item)


def batches_by_bytes(batches, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """``batches`` re-cut so that none holds more than ``max_bytes`` of buffers (a single row larger
    than that goes alone). Slices are zero-copy; the IPC writer sends only each slice's range."""
    for batch in batches:
        yield from _split(batch, max_bytes)


def _split(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    size = batch.nbytes
    if size <= max_bytes or batch.num_rows <= 1:
        yield batch
        return
    rows = max(1, int(batch.num_rows * max_bytes / size))  # rows of even width fit; skewed ones split again
    for start in range(0, batch.num_rows, rows):
        piece = batch.slice(start, rows)
        if piece.nbytes > max_bytes and piece.num_rows > 1:
            half = piece.num_rows // 2
            yield from _split(piece.slice(0, half), max_bytes)
            yield from _split(piece.slice(half), max_bytes)
        else:
            yield piece
