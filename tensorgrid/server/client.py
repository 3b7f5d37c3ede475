"""``tg.connect``: a grid server from Python. SQL goes through Flight SQL (prepared statements, as the ADBC
driver sends them), so what this client can do any Flight SQL client can; datasets, key lookups, upserts and
loads go through the server's ``datasets`` service. No torch here.

    g = tg.connect("grpc://localhost:8815", username="ignite", password="ignite")
    g.sql("CREATE TABLE kitten (id BIGINT PRIMARY KEY, name VARCHAR)")
    g.get("kitten", 2); g.put("kitten", df); g.load("digits", "digits")
    g.dataset("digits").to_torch(batch_size=256, shuffle=True)
"""

from __future__ import annotations

import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight

from .. import fs as tgfs
from ..errors import ArgumentError, SQLError
from . import sqlproto
from .griddataset import (
    GridAuthenticationError,
    GridConnectionError,
    GridDataset,
    GridError,
    GridPermissionError,
    GridTimeoutError,
    Session,
    SnapshotError,
)

DEFAULT_PORT = 8815
TABLE_COLUMNS = ["name", "kind", "rows", "partitions", "bytes", "source", "version", "error"]

__all__ = ["Grid", "GridDataset", "GridError", "GridConnectionError", "GridAuthenticationError",
           "GridPermissionError", "GridTimeoutError", "SnapshotError"]


class Grid:
    """A grid server's tables and loaded datasets (from ``tg.connect``)."""

    def __init__(self, session: Session):
        self.session = session

    @property
    def url(self) -> str:
        return self.session.url

    # --- SQL -----------------------------------------------------------------------------------------------
    def sql(self, query: str, params=None):
        """Run SQL on the server (DuckDB's dialect; ``?`` or ``$1`` placeholders take ``params``, a sequence).
        A query returns its rows as an in-memory Dataset (``.to_arrow()``, ``.to_pandas()``); a statement that
        changes data returns the number of rows it changed (0 for DDL)."""
        if not isinstance(query, str) or not query.strip():
            raise SQLError(f"the query must be a non-empty SQL string, got {query!r}")
        parameters = _parameters(params)
        body = sqlproto.pack(sqlproto.ActionCreatePreparedStatementRequest(query=query))
        results = self._call(lambda c, o: [r.body.to_pybytes() for r in
                                           c.do_action(flight.Action("CreatePreparedStatement", body), o)])
        prepared = sqlproto.unpack(results[0])
        handle = prepared.prepared_statement_handle
        try:
            if prepared.is_update:
                command = sqlproto.CommandPreparedStatementUpdate(prepared_statement_handle=handle)
                answer = self._put(command, parameters if parameters is not None else pa.table({}))
                return int(sqlproto.parse(sqlproto.DoPutUpdateResult, answer).record_count)
            command = sqlproto.CommandPreparedStatementQuery(prepared_statement_handle=handle)
            if parameters is not None:
                self._put(command, parameters)
            return _from_arrow(self._read_info(flight.FlightDescriptor.for_command(sqlproto.pack(command))))
        finally:
            close = sqlproto.pack(sqlproto.ActionClosePreparedStatementRequest(prepared_statement_handle=handle))
            try:
                self._call(lambda c, o: list(c.do_action(flight.Action("ClosePreparedStatement", close), o)))
            except GridError:
                pass  # the statement expires on the server anyway; the real error (if any) is the one above

    def _call(self, fn):
        return self.session.call(fn, default=SQLError)

    def _put(self, command, table: pa.Table) -> bytes:
        descriptor = flight.FlightDescriptor.for_command(sqlproto.pack(command))

        def put(client, options):
            writer, reader = client.do_put(descriptor, table.schema, options)
            writer.write_table(table)
            writer.done_writing()
            answer = reader.read()
            writer.close()
            return answer.to_pybytes() if answer is not None else b""

        return self._call(put)

    def _read_info(self, descriptor) -> pa.Table:
        def read(client, options):
            info = client.get_flight_info(descriptor, options)
            tables = [client.do_get(e.ticket, options).read_all() for e in info.endpoints]
            return pa.concat_tables(tables) if tables else info.schema.empty_table()

        return self._call(read)

    # --- datasets and tables ---------------------------------------------------------------------------------
    def dataset(self, name: str, partition: int | None = None) -> GridDataset:
        """A table or loaded dataset as a Dataset (the loader, SQL and the trainer take it): the rows as of
        now, read from the server by partition and row range. ``partition=k`` (default: ``TENSORGRID_PART``
        when set) reads only partition k."""
        _check_name(name)
        if partition is None and os.environ.get("TENSORGRID_PART", "").strip():
            try:
                partition = int(os.environ["TENSORGRID_PART"])
            except ValueError:
                raise ArgumentError(f"TENSORGRID_PART must be a partition number, got "
                                    f"{os.environ['TENSORGRID_PART']!r}") from None
        return GridDataset(self.session, name, partition)

    def get(self, name: str, key) -> dict | None:
        """The row of table ``name`` whose primary key is ``key`` (a value; a tuple or a dict by column for a
        composite key) as a dict, or None when there is none (like ``dict.get``)."""
        _check_name(name)
        answer = self.session.action("datasets.get", {"name": name, "key": _plain(key)})
        rows = pa.ipc.open_stream(answer[0]).read_all().to_pylist()
        return rows[0] if rows else None

    def put(self, name: str, data) -> int:
        """Upsert rows (pandas, Arrow, a list of dicts) into table ``name``: INSERT OR REPLACE on its primary
        key, matched to its columns by name (a table without a primary key gets them appended). Returns the
        number of rows written. One transaction: a failed put changes nothing."""
        _check_name(name)
        from ..store.convert import to_batches

        schema, batches = to_batches(data)
        descriptor = flight.FlightDescriptor.for_path("datasets", name)

        def put(client, options):
            writer, reader = client.do_put(descriptor, schema, options)
            for batch in batches:
                writer.write_batch(batch)
            writer.done_writing()
            answer = reader.read()
            writer.close()
            return json.loads(answer.to_pybytes()) if answer is not None else {}

        return int(self.session.call(put).get("rows", 0))

    def load(self, name: str, url: str | os.PathLike | None = None, partitions: int | None = None,
             refresh: bool = False, storage_options: dict | None = None) -> dict:
        """Hold the store dataset at ``url`` in the server's memory as ``name`` (SQL sees it as a table; reads
        come from RAM). ``url`` is read by the server: a relative path is under the server's root, and only
        the places the server allows are read. The dataset's current version is pinned (kept across server
        restarts) until ``refresh=True`` moves it to the latest (``url`` may then be left out).
        ``partitions``: P equal row ranges instead of one partition per shard. ``storage_options``: fsspec's
        options for ``url``'s store, sent to the server, which keeps them in memory for that bucket (never on
        disk: after a restart it reloads with its own, from its environment or ``--storage-option``); send
        credentials only over TLS."""
        _check_name(name)
        storage_options = tgfs.check_storage_options(storage_options)
        if isinstance(url, os.PathLike):
            url = os.fspath(url)
        if partitions is not None and (isinstance(partitions, bool) or not isinstance(partitions, int)
                                       or partitions < 1):
            raise ArgumentError(f"partitions must be a positive int, got {partitions!r}")
        request = {"name": name, "url": url, "partitions": partitions, "refresh": bool(refresh)}
        if storage_options:
            request["storage_options"] = storage_options
        answer = self.session.action("datasets.load", request)
        return json.loads(answer[0])

    def drop(self, name: str) -> None:
        """Release a loaded dataset from the server's memory (the store keeps it; tables: use SQL DROP)."""
        _check_name(name)
        self.session.action("datasets.drop", {"name": name})

    def tables(self) -> pd.DataFrame:
        """Tables and loaded datasets: name, kind (table, view, dataset), rows, partitions, bytes in memory
        (a table's: of the snapshot readers use, when one is held), source URL and version (loaded datasets),
        error (a loaded dataset that did not load again when the server restarted)."""
        rows = json.loads(self.session.action("datasets.tables")[0])
        frame = pd.DataFrame(rows, columns=TABLE_COLUMNS)
        return frame.astype({c: "Int64" for c in ("rows", "partitions", "bytes", "version")})

    # --- lifetime ----------------------------------------------------------------------------------------------
    def close(self) -> None:
        self.session.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"Grid({self.url!r})"


def _server_url(url: str | None, tls: bool) -> str:
    if url is None:
        host = os.environ.get("TENSORGRID_HOST", "").strip() or "localhost"
        port = os.environ.get("TENSORGRID_PORT", "").strip() or str(DEFAULT_PORT)
        url = host if "://" in host else f"{host}:{port}"
    if not isinstance(url, str) or not url:
        raise ArgumentError(f"url must be grpc://host:port or grpc+tls://host:port, got {url!r}")
    if "://" not in url:
        url = ("grpc+tls://" if tls else "grpc://") + url
    scheme = url.split("://", 1)[0]
    if scheme not in ("grpc", "grpc+tcp", "grpc+tls"):
        raise ArgumentError(f"a grid server URL is grpc://host:port or grpc+tls://host:port, got {url!r}")
    return url


def _pem(name: str, value) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (str, os.PathLike)):
        try:
            with open(value, "rb") as f:
                return f.read()
        except OSError as exc:
            raise ArgumentError(f"{name}: cannot read {value}: {exc.strerror}") from None
    raise ArgumentError(f"{name} must be PEM bytes or a file path, got {type(value).__name__}")


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or "/" in name:
        raise ArgumentError(f"a table or dataset name is a non-empty string without '/', got {name!r}")


def _parameters(params) -> pa.Table | None:
    """One row of positional parameters as the table Flight SQL binds (columns in placeholder order)."""
    if params is None:
        return None
    if isinstance(params, (str, bytes, dict)) or not hasattr(params, "__iter__"):
        raise ArgumentError(f"params must be a sequence of values (one per placeholder), got {params!r}")
    values = [_plain(v) for v in params]
    try:
        return pa.table({str(i): pa.array([v]) for i, v in enumerate(values)})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ArgumentError(f"a parameter cannot be sent as Arrow: {exc}") from None


def _plain(value):
    """numpy scalars as Python values (JSON and Arrow take them); tuples as lists."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        return value.item()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _from_arrow(table: pa.Table):
    from ..store import from_arrow

    return from_arrow(table.replace_schema_metadata(None) if table.schema.metadata else table)
