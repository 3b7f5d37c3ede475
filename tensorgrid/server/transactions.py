"""Flight SQL transactions (``BeginTransaction`` / ``EndTransaction``): each open transaction is a DuckDB
cursor of its own with a transaction begun on it, held by an unguessable id. Statements that carry the id run on
that cursor, one at a time (its lock), and their results are read whole before the call returns: a held
reader would be invalidated by the transaction's next statement. A transaction its client abandons is rolled
back when it expires (a time to live since its last use); when the cap on open transactions is reached, a
new one is refused (never another's rolled back to make room).

DB-API drivers reuse a prepared statement across commits (the ADBC driver prepares ``SELECT ...`` once per
cursor and runs it again after ``commit()``), but a Flight SQL prepared statement names the transaction it was
prepared in. So a statement whose transaction has ended runs in the transaction its connection (the same gRPC
peer, the same user) began since: ``successor``.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import duckdb
import pyarrow.flight as flight

from .results import Expiring

COMMIT, ROLLBACK = 1, 2  # ActionEndTransactionRequest.EndTransaction


@dataclass(eq=False)
class Transaction:
    cursor: duckdb.DuckDBPyConnection
    owner: str | None  # the user who began it: nobody else may use it
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: bool = False
    touched: set = field(default_factory=set)  # tables it wrote (lower case): exported to the store on commit
    expected: dict = field(default_factory=dict)  # with a store: table -> its version when the transaction began

    @contextlib.contextmanager
    def use(self):
        """The cursor, for one statement at a time; a clear error once the transaction has ended (between
        finding it and taking its lock, another call may have committed it)."""
        with self.lock:
            if self.done:
                raise flight.FlightServerError("the transaction has ended: begin a new one")
            yield self.cursor

    def finish(self, action: int, before_commit=None) -> None:
        """Commit or roll back, then close the cursor (once; later calls do nothing). ``before_commit(self)``
        runs first on a commit (the store's export of a mirrored table): its failure rolls back instead."""
        with self.lock:
            if self.done:
                return
            self.done = True
            try:
                if action == COMMIT:
                    try:
                        if before_commit is not None:
                            before_commit(self)
                    except BaseException:
                        self.cursor.rollback()
                        raise
                    self.cursor.commit()
                else:
                    self.cursor.rollback()
            finally:
                self.cursor.close()


def _abandon(txn: Transaction) -> None:
    try:
        txn.finish(ROLLBACK)
    except duckdb.Error:  # already aborted by an error or an interrupt: closing is all that is left
        pass


class Transactions:
    """The open transactions of a server, by id."""

    def __init__(self, max_open: int, ttl: float):
        self._open = Expiring(max_open, ttl, on_drop=_abandon)
        self._max = max_open
        self._lock = threading.Lock()
        self._peer_of: OrderedDict[bytes, str] = OrderedDict()  # transaction id -> the peer that began it
        self._latest: OrderedDict[str, bytes] = OrderedDict()  # peer -> the transaction it began last

    def begin(self, cursor: duckdb.DuckDBPyConnection, owner: str | None, peer: str | None = None) -> bytes:
        with self._lock:
            if len(self._open) >= self._max:  # never evicted: that would roll back someone's open work
                raise flight.FlightServerError(f"{self._max} transactions are open on this server: commit or roll "
                                               "back one first (an unused one is rolled back after "
                                               f"{self._open.ttl:g} s)")
            cursor.begin()
            transaction_id = self._open.put(Transaction(cursor, owner))
            if peer:
                self._peer_of[transaction_id] = peer
                self._latest[peer] = transaction_id
                self._latest.move_to_end(peer)
                for book in (self._peer_of, self._latest):  # bounded: 16 per transaction that may be open
                    while len(book) > 16 * self._max:
                        book.popitem(last=False)
        return transaction_id

    def successor(self, transaction_id: bytes, peer: str | None) -> bytes | None:
        """The transaction ``peer`` began after ``transaction_id`` (which it began too), or None."""
        with self._lock:
            if not peer or self._peer_of.get(bytes(transaction_id)) != peer:
                return None
            latest = self._latest.get(peer)
        return latest if latest != bytes(transaction_id) else None

    def get(self, transaction_id: bytes, owner: str | None) -> Transaction:
        """The open transaction (its time to live restarted); a clear error when unknown, expired or another's."""
        txn = self._open.get(bytes(transaction_id))
        if txn is None or txn.done or txn.owner != owner:
            raise flight.FlightServerError("unknown, finished or expired transaction id: begin a new transaction "
                                           f"(an unused transaction is rolled back after {self._open.ttl:g} s)")
        return txn

    def end(self, transaction_id: bytes, owner: str | None, action: int, before_commit=None) -> None:
        if action not in (COMMIT, ROLLBACK):
            raise flight.FlightServerError(f"EndTransaction takes COMMIT (1) or ROLLBACK (2), got {action}")
        txn = self.get(transaction_id, owner)
        if self._open.pop(bytes(transaction_id)) is not txn:  # a COMMIT and a ROLLBACK at once: one wins
            raise flight.FlightServerError("the transaction has ended: begin a new one")
        txn.finish(action, before_commit)

    def clear(self) -> None:
        self._open.clear()

    def __len__(self) -> int:
        return len(self._open)
