"""Stopping queries that are running: DuckDB's ``interrupt()`` on the cursor a call works on.

Three ways in. A client that gives up on a call (the ADBC driver's ``adbc_cancel``, a deadline, a closed
channel) cancels its gRPC call; a call that works longer than the server's time limit (``--query-timeout``)
has run away. One watcher thread polls the calls at work in DuckDB for both (``context.is_cancelled()``, the
time since each cursor was attached to the call) and interrupts their cursors. Each call has its own clock,
so a statement in a transaction begun long ago is timed from its own start, on the transaction's long-lived
cursor. A client that holds a query's FlightInfo sends ``CancelFlightInfo`` (or Flight SQL's older
``CancelQuery``): the query's held result is dropped, or, when a DoGet is streaming it, its cursor interrupted.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05


@dataclass(eq=False)
class _Work:
    """A cursor at work and when it was attached (its clock starts there)."""

    cursor: object  # the cursor, or a weak reference to it when it works outside any call
    started: float
    timed_out: bool = False


class Running:
    """The DuckDB cursors at work for calls in progress (by call) and for DoGets streaming (by ticket handle).
    ``limit``: seconds a cursor may work for one call before it is interrupted (None: no limit)."""

    def __init__(self, limit: float | None = None):
        self.limit = limit
        self._calls: dict[int, tuple[object, list[_Work]]] = {}  # id(context) -> (context, its cursors)
        self._loose: list[_Work] = []  # cursors attached outside any call: timed only (weakly held)
        self._streams: dict[bytes, duckdb.DuckDBPyConnection] = {}
        self._local = threading.local()
        self._lock = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="tensorgrid-cancel-watch", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def call(self, context):
        """Around a call's work: cursors attached meanwhile on this thread are interrupted if the client
        cancels the call, or once they worked longer than the limit in it (the client is then told so)."""
        if context is None:
            yield
            return
        work: list[_Work] = []
        key = id(context)
        with self._lock:
            self._calls[key] = (context, work)
            self._lock.notify()
        previous, self._local.work = getattr(self._local, "work", None), work
        try:
            yield
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            if any(w.timed_out for w in work) and _interrupted(exc):
                raise flight.FlightCancelledError(f"the query was interrupted after {self.limit:g} s: this server's "
                                                  "time limit for one call (--query-timeout)") from None
            raise
        finally:
            self._local.work = previous
            with self._lock:
                self._calls.pop(key, None)

    def attach(self, cursor) -> None:
        """Watch ``cursor`` for the call this thread is serving, its clock starting now (a cursor attached
        again in a later call, a transaction's, is timed afresh); outside any call, for the limit only."""
        work = getattr(self._local, "work", None)
        if work is None and self.limit is None:
            return
        with self._lock:
            if work is not None:
                work.append(_Work(cursor, time.monotonic()))
            else:
                self._loose.append(_Work(weakref.ref(cursor), time.monotonic()))
            self._lock.notify()

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
                while not self._calls and not self._loose and not self._closed:
                    self._lock.wait()
                if self._closed:
                    return
                now = time.monotonic()
                # under the lock: a call's context lives until its call leaves ``call`` (which takes the lock)
                for context, work in self._calls.values():
                    cancelled = context.is_cancelled()
                    for w in work:  # again at every poll: an interrupt only stops a query already running
                        if cancelled or self._over(w, now):
                            _interrupt(w.cursor)
                loose, self._loose = self._loose, []
                for w in loose:
                    cursor = w.cursor()
                    if cursor is not None and self._over(w, now):
                        _interrupt(cursor)  # once: it belongs to no call that could be told
                    elif cursor is not None:
                        self._loose.append(w)
                self._lock.wait(POLL_SECONDS)

    def _over(self, w: _Work, now: float) -> bool:
        """Whether ``w`` worked longer than the limit (logged the first time)."""
        if self.limit is None or now - w.started <= self.limit:
            return False
        if not w.timed_out:
            w.timed_out = True
            log.warning("interrupted a query after its limit of %g s", self.limit)
        return True

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


def _interrupted(exc: BaseException) -> bool:
    """Whether a call failed because its query was interrupted (DuckDB's arrow stream reports it as an
    ArrowException or OSError carrying DuckDB's message)."""
    return isinstance(exc, duckdb.InterruptException) or "interrupt" in str(exc).lower()
