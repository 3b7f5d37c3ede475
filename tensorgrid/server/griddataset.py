"""A table or loaded dataset on a grid server as a ``Dataset`` kind: the loader, SQL and the trainer read it
like any other. Its shards are the server's partitions; ``read_rows`` fetches only the rows asked for (one
DoGet of a row range), so a loader rank never downloads rows it does not use. It pickles by (server URL,
credentials, name, snapshot, partition) and opens its connection lazily in each process (a gRPC channel
does not survive a fork). No torch here.

Loader worker processes must be started with ``multiprocessing_context="spawn"`` (or "forkserver"): a process
forked from one that has used gRPC hangs in its first call (measured here, with the client closed or not).

Also here: ``Session``, the picklable connection this, ``tg.connect`` (client.py) and ``grid://`` (gridfs.py,
with errors of its own) call through, and the named errors a grid call raises: a Flight error from the server
becomes a TensorGrid error with the server's one-line message (no gRPC noise).
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import weakref
import zlib
from dataclasses import dataclass, field
from urllib.parse import quote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import xxhash

from .. import errors
from ..errors import ArgumentError, TensorGridError
from ..store.dataset import Dataset


class GridError(TensorGridError):
    """The grid server refused or failed a call (its one-line message)."""


class GridConnectionError(GridError, ConnectionError):
    """The grid server cannot be reached (not running, wrong address, killed mid-call)."""


class GridAuthenticationError(GridError, PermissionError):
    """The server did not accept the credentials (UNAUTHENTICATED)."""


class GridPermissionError(GridError, PermissionError):
    """The caller may not do this (PERMISSION_DENIED): a read-only user writing, a load from a place the
    server does not allow, SQL reaching for files."""


class GridTimeoutError(GridError, TimeoutError):
    """A call took longer than the connection's ``timeout``."""


class SnapshotError(GridError):
    """The rows a reader opened are gone: the table was written to, or the dataset loaded again at another
    version, and the server no longer holds the old rows. Open the dataset again."""


_NAMED = {cls.__name__: cls for cls in (GridError, SnapshotError, GridPermissionError)}


def error_class(name: str):
    return _NAMED.get(name) or getattr(errors, name, None)


_NOISE = re.compile(r"\. Detail: [^\n]*$|^Flight returned [a-z ]+ error, with message: ", re.S)


def translate(exc: BaseException, url: str, default: type = GridError) -> TensorGridError:
    """The TensorGrid error a user sees for a failed Flight call."""
    message = _NOISE.sub("", str(exc).split("gRPC client debug context")[0].strip()).strip()
    message = message.splitlines()[0] if message else type(exc).__name__
    kind = getattr(exc, "extra_info", b"") or b""
    named = error_class(kind.decode("ascii", "replace")) if kind else None
    if named is not None and issubclass(named, TensorGridError):
        return named(message)
    if isinstance(exc, flight.FlightUnavailableError):
        reason = message.rsplit(": ", 1)[-1]
        return GridConnectionError(f"cannot reach the grid server at {url}: {reason}")
    if isinstance(exc, flight.FlightUnauthenticatedError):
        return GridAuthenticationError(f"the grid server at {url} refused the credentials: {message}")
    if isinstance(exc, flight.FlightUnauthorizedError):
        return GridPermissionError(message)
    if isinstance(exc, flight.FlightTimedOutError):
        return GridTimeoutError(f"the grid server at {url} did not answer in time: {message}")
    if isinstance(exc, flight.FlightServerError):
        return default(message)
    return GridError(message)


_OPEN: weakref.WeakSet = weakref.WeakSet()  # sessions with a Flight client open in this process
_HELD: list = []  # while a fork is under way: every open client, so that a forked child holds them too
_INHERITED: list = []  # in a forked child: the parent's clients, never closed here


def _before_fork() -> None:
    for _ in range(3):  # another thread may open a session meanwhile: the set changes under iteration
        try:
            _HELD[:] = [s._client for s in list(_OPEN) if s._client is not None]
            return
        except RuntimeError:
            continue


def _after_fork_in_parent() -> None:
    _HELD.clear()


def _after_fork_in_child() -> None:
    """A client inherited from the parent must never be closed or freed in the child: its gRPC threads did not
    come along, and closing it waits for them forever (measured: fsspec frees its cached filesystems in a
    forked child, a ``grid://`` one with its client, and the child of a ``subprocess.Popen(preexec_fn=...)``,
    as Ray starts its processes, hung before its exec). The child keeps them (``_HELD`` kept them alive
    through the fork) and opens its own on first use."""
    _INHERITED.extend(_HELD)
    _HELD.clear()
    for session in list(_OPEN):
        session._client = session._options = None
    _OPEN.clear()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


@dataclass(eq=False)
class Session:
    """Where a grid server is and who calls it; the Flight client is opened on first use in each process."""

    url: str
    username: str | None = None
    password: str | None = None
    token: str | None = None
    tls_root_certs: bytes | None = None
    cert_chain: bytes | None = None
    private_key: bytes | None = None
    timeout: float | None = None
    _client: object = field(default=None, repr=False, compare=False)
    _options: object = field(default=None, repr=False, compare=False)
    _pid: int | None = field(default=None, repr=False, compare=False)
    _lock: object = field(default_factory=threading.Lock, repr=False, compare=False)

    def __getstate__(self):
        """What another process connects with: never the password. A session that signed in with one sends
        a bearer token minted for the copy (workers, Ray and Spark tasks use it; it expires ``token_ttl``
        after its last use, and the copy cannot sign in again: its calls then fail with
        GridAuthenticationError)."""
        state = self.__dict__.copy()
        state.update(_client=None, _options=None, _pid=None, _lock=None)
        if self.password is not None and self.token is None:
            state.update(password=None, token=self._mint_token())
        return state

    def _mint_token(self) -> str:
        client, _ = self.connection()
        try:
            _, value = client.authenticate_basic_token(self.username or "", self.password)
        except (flight.FlightError, pa.ArrowException, OSError) as exc:
            raise translate(exc, self.url) from None
        return value.decode().split(" ", 1)[1]  # b"Bearer <token>"

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def connection(self, error=None):
        """(FlightClient, FlightCallOptions) of this process (a forked child opens its own); a failure to open
        it raised as ``error(exc)`` (default: the TensorGrid error ``translate`` makes)."""
        if self._client is None or self._pid != os.getpid():
            with self._lock:
                if self._client is None or self._pid != os.getpid():
                    from .connection import open_flight

                    try:
                        self._client, self._options = open_flight(
                            self.url, self.username, self.password, self.token, self.tls_root_certs,
                            self.cert_chain, self.private_key, self.timeout)
                    except (flight.FlightError, pa.ArrowException, OSError) as exc:
                        raise (error or (lambda e: translate(e, self.url)))(exc) from None
                    self._pid = os.getpid()
                    _OPEN.add(self)
        return self._client, self._options

    def call(self, fn, default: type = GridError, error=None):
        """``fn(client, options)``, its failures raised as ``error(exc)`` (default: TensorGrid errors by
        ``translate``; ``grid://`` raises OSErrors). A session that signed in with a password signs in again
        once when its token was refused (it expires ``token_ttl`` after its last use): the server checks the
        token before doing anything, so the call is safe to repeat."""
        error = error or (lambda e: translate(e, self.url, default))
        for attempt in (0, 1):
            client, options = self.connection(error)
            try:
                return fn(client, options)
            except flight.FlightUnauthenticatedError as exc:
                if attempt or self.password is None or self.token is not None:
                    raise error(exc) from None
            except (flight.FlightError, pa.ArrowException, OSError) as exc:
                raise error(exc) from None
            self._drop(client)  # the next attempt signs in on a new channel

    def _drop(self, client) -> None:
        """Close ``client`` if it is still this session's (another thread may have replaced it already, and
        closed it): the next call opens another, and the dropped channel is not leaked."""
        with self._lock:
            if self._client is not client:
                return
            self._client = self._options = None
        client.close()

    def action(self, verb: str, request: dict | None = None) -> list[bytes]:
        body = json.dumps(request or {}).encode()
        return self.call(lambda c, o: [r.body.to_pybytes() for r in c.do_action(flight.Action(verb, body), o)])

    def do_get(self, ticket: bytes) -> pa.Table:
        return self.call(lambda c, o: c.do_get(flight.Ticket(ticket), o).read_all())

    def close(self) -> None:
        """Close this process's client (the next call opens another)."""
        client, self._client, self._options = self._client, None, None
        _OPEN.discard(self)
        if client is not None and self._pid == os.getpid():
            client.close()




class ServedRows(Dataset):
    """A Dataset whose shards a grid serves: every read is ``_fetch(shard, start, stop, columns, rows)``."""

    zero_copy_reads = False  # every read is fresh buffers from the network
    takes_rows = True  # a loader rank fetches only its own rows of a shuffled window (read_take)
    fork_safe = False  # a process forked after gRPC ran hangs on its first call: loader workers are spawned

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        table = self._fetch(i, None, None, columns)
        return table.filter(filter) if filter is not None else table

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        return self._fetch(shard, start, stop, columns)

    def read_take(self, shard: int, rows, columns: list[str] | None = None) -> pa.Table:
        """Rows ``rows`` (sorted, distinct) of a partition, and only those, from the server."""
        return self._fetch(shard, None, None, columns, rows=rows)

    @property
    def is_remote(self) -> bool:
        return True

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_handles", None)
        return state

    def _fetch(self, shard: int, start, stop, columns, rows=None) -> pa.Table:
        raise NotImplementedError


class GridDataset(ServedRows):
    """A table or loaded dataset of a grid server (``g.dataset(name)``): the rows of one snapshot, read by
    partition and row range. ``partition=k`` reads only that partition (its one shard)."""

    def __init__(self, session: Session, name: str, partition: int | None = None):
        self.session = session
        self.name = name
        info = session.call(lambda c, o: c.get_flight_info(flight.FlightDescriptor.for_path("datasets", name), o))
        meta = json.loads(info.app_metadata or b"{}")
        self._schema = info.schema
        self.kind = meta.get("kind")
        self.snapshot = meta.get("snapshot")
        self.source = meta.get("source")
        self.version = meta.get("version")
        self._all_rows = [int(n) for n in meta.get("partition_rows", [])]
        self._bytes = int(meta.get("bytes") or 0)
        if partition is not None:
            if isinstance(partition, bool) or not isinstance(partition, int):
                raise ArgumentError(f"partition must be an int, got {partition!r}")
            if not 0 <= partition < len(self._all_rows):
                raise ArgumentError(f"{name!r} has partitions 0..{len(self._all_rows) - 1}, not {partition}")
        self.partition = partition
        self.url = f"{session.url}/{name}"
        self._fingerprint = None

    # --- the contract ------------------------------------------------------------------------------------
    @property
    def shard_rows(self) -> list[int]:
        return [self._all_rows[self.partition]] if self.partition is not None else list(self._all_rows)

    def bytes_per_row(self) -> float:
        total = sum(self._all_rows)
        return max(1.0, self._bytes / total) if total else 1.0

    @property
    def size_bytes(self) -> int:
        """Bytes the rows take in the server's memory (of the whole dataset, all partitions)."""
        return self._bytes

    @property
    def fingerprint(self) -> str:
        """The snapshot (a digest of a table's rows; a loaded dataset's store version and partitions) and the
        partition read: the same from any process, server address or restart of the server."""
        if self._fingerprint is None:
            h = xxhash.xxh3_64(f"{self.kind}|{self.name.lower()}|{self.snapshot}|{self.partition}".encode())
            self._fingerprint = "grid:" + h.hexdigest()
        return self._fingerprint

    # --- more than the contract ----------------------------------------------------------------------------
    def partitions(self) -> list[dict]:
        """The server's partitions of this dataset: [{"partition": k, "rows": n}, ...]."""
        return [{"partition": k, "rows": n} for k, n in enumerate(self._all_rows)]

    def __iter__(self):
        """Rows as dicts, partition by partition."""
        for i in range(self.num_shards):
            yield from self.read_shard(i).to_pylist()

    def info(self) -> dict:
        return {**super().info(), "server": self.session.url, "name": self.name, "kind": self.kind,
                "partition": self.partition, "source": self.source, "snapshot": self.snapshot}

    def _fetch(self, shard: int, start: int | None, stop: int | None, columns: list[str] | None,
               rows=None) -> pa.Table:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"{self.url} has {self.num_shards} shards, not {shard}")
        part = self.partition if self.partition is not None else shard
        columns = self.check_columns(columns)
        table = self.session.do_get(ticket_bytes(self.name, part, self.snapshot, start, stop, columns, rows))
        return table.replace_schema_metadata(None) if table.schema.metadata else table


def ticket_bytes(name: str, part: int, snapshot: str | None = None, start: int | None = None,
                 stop: int | None = None, columns: list[str] | None = None, rows=None) -> bytes:
    """``datasets/<name>/<partition>?snapshot=..&start=..&stop=..&columns=..&rows=..`` (each part optional;
    ``rows``: sorted distinct row numbers, ``encode_rows``)."""
    query = [f"{k}={quote(str(v), safe='')}" for k, v in (("snapshot", snapshot), ("start", start), ("stop", stop))
             if v is not None]
    if columns is not None:
        query.append("columns=" + quote(json.dumps(list(columns)), safe=""))
    if rows is not None:
        query.append("rows=" + encode_rows(rows))
    return f"datasets/{quote(name, safe='')}/{part}{'?' + '&'.join(query) if query else ''}".encode()


def encode_rows(rows) -> str:
    """Sorted distinct row numbers as URL-safe text: the first, then the gaps (uint32), zlib-compressed (a
    rank's share of a shuffled window, every other row or so, costs about a byte per 10 rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    gaps = np.diff(rows, prepend=np.int64(0))
    if len(rows) and (rows[0] < 0 or (gaps[1:] <= 0).any() or gaps.max() >= 2**32):
        raise ArgumentError("rows must be sorted, distinct and non-negative")
    return base64.urlsafe_b64encode(zlib.compress(gaps.astype("<u4").tobytes(), 1)).decode()


def decode_rows(text: str, limit: int) -> np.ndarray:
    """The row numbers of ``encode_rows`` (ValueError when malformed, unsorted or beyond ``limit`` rows)."""
    try:
        packed = base64.b64decode(text.encode("ascii"), altchars=b"-_", validate=True)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(packed, 4 * limit + 4)
    except (zlib.error, ValueError, UnicodeEncodeError) as e:
        raise ValueError(f"malformed rows: {e}") from None
    if not inflate.eof or len(raw) % 4 or len(raw) > 4 * limit:
        raise ValueError("malformed rows (not a whole list, or more rows than the range holds)")
    gaps = np.frombuffer(raw, dtype="<u4").astype(np.int64)
    if len(gaps) > 1 and (gaps[1:] == 0).any():
        raise ValueError("rows must be sorted and distinct")
    return np.cumsum(gaps)
