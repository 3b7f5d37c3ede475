"""Stopping queries that are running: DuckDB's ``interrupt()`` on the cursor a call works on.

Two ways in. A client that gives up on a call (the ADBC driver's ``adbc_cancel``, a deadline, a closed
channel) cancels its gRPC call: a watcher thread polls the call contexts of calls at work in DuckDB
(``context.is_cancelled()``) and interrupts their cursors. A client that holds a query's FlightInfo sends
``CancelFlightInfo`` (or Flight SQL's older ``CancelQuery``): the query's held result is dropped, or, when a
DoGet is streaming it, its cursor interrupted.
"""

from __future__ import annotations

import contextlib
import threading

import duckdb

POLL_SECONDS = 0.05


class Running:
    """The DuckDB cursors at work for calls in progress (by call) and for DoGets streaming (by ticket handle)."""

    def __init__(self):
        self._calls: dict[int, tuple[object, list]] = {}  # id(context) -> (context, its cursors)
        self._streams: dict[bytes, duckdb.DuckDBPyConnection] = {}
        self._local = threading.local()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="tensorgrid-cancel-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def call(self, context):
        """Around a call's work: cursors made meanwhile on this thread (``attach``) are interrupted if the client
        cancels the call."""
        if context is None:
            yield
            return
        cursors: list = []
        key = id(context)
        with self._lock:
            self._calls[key] = (context, cursors)
            self._lock.notify()
        previous, self._local.cursors = getattr(self._local, "cursors", None), cursors
        try:
            yield
        finally:
            self._local.cursors = previous
            with self._lock:
                self._calls.pop(key, None)

    def attach(self, cursor) -> None:
        """Watch ``cursor`` for the call this thread is serving (if any)."""
        cursors = getattr(self._local, "cursors", None)
        if cursors is not None:
            cursors.append(cursor)

    @contextlib.contextmanager
    def streaming(self, handle: bytes, cursor):
        """While a DoGet streams the held result ``handle`` from ``cursor``: ``cancel(handle)`` interrupts it."""
        if cursor is None:
            yield
            return
        with self._lock:
            self._streams[handle] = cursor
        try:
            yield
        finally:
            with self._lock:
                self._streams.pop(handle, None)

    def interrupt_stream(self, handle: bytes) -> bool:
        with self._lock:
            cursor = self._streams.get(handle)
        if cursor is None:
            return False
        _interrupt(cursor)
        return True

    def _watch(self) -> None:
        while True:
            with self._lock:
                while not self._calls and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                # under the lock: a call's context lives until its call leaves ``call`` (which takes the lock)
                for context, cursors in self._calls.values():
                    if context.is_cancelled():
                        for cursor in list(cursors):
                            _interrupt(cursor)
                self._lock.wait(POLL_SECONDS)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5)


def _interrupt(cursor) -> None:
    try:
        cursor.interrupt()
    except duckdb.Error:  # closed meanwhile: nothing left to stop
        pass
