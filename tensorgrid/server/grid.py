"""The grid server: Arrow Flight SQL on a durable, sandboxed DuckDB database under ``root``.

Third-party Flight SQL clients (the ADBC driver, through its DB-API) work unchanged. A query runs in
GetFlightInfo; its reader is held under a ticket (expiring) until a DoGet streams it in byte-capped batches.
Every request works on its own DuckDB cursor: a connection shared between Flight's threads would hand one
thread another's results. Errors reach clients as Flight errors carrying DuckDB's one-line message.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import threading
from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from ..args import check_int, check_number
from ..errors import ArgumentError
from . import auth, metadata, sqlproto
from .cancel import Running
from .datasets import DatasetsService
from .files import FilesService
from .ingest import ingest, tensors_back
from .members import MembersService, member_urls
from .mirror import READS, Mirror
from .results import Expiring, batches_by_bytes
from .sandbox import flight_error, open_database
from .sqlproto import CancelStatus, ProtocolError
from .transactions import Transaction, Transactions

_VERSION = "0.1.0"


@dataclass
class _Held:
    """A result between GetFlightInfo and DoGet: the reader and the cursor it reads from."""

    reader: pa.RecordBatchReader
    cursor: duckdb.DuckDBPyConnection | None = None

    def close(self) -> None:
        try:
            self.reader.close()
        except Exception:  # noqa: BLE001 - closing a reader that failed must not hide the real error
            pass
        if self.cursor is not None:
            self.cursor.close()


@dataclass
class _Prepared:
    """A prepared statement: its SQL and the parameter rows a client bound last (by DoPut)."""

    query: str
    parameters: pa.Table | None = None
    transaction_id: bytes | None = None  # runs in this transaction (prepared with one)


def _guarded(handler):
    """Every failure of a handler reaches the client as a Flight error with a one-line message: malformed
    input as an invalid request, DuckDB's errors as they are, a bug as an internal error (no traceback)."""

    @functools.wraps(handler)
    def wrapper(self, *args):
        try:
            return handler(self, *args)
        except flight.FlightError:
            raise
        except ProtocolError as exc:
            raise flight.FlightServerError(f"invalid request: {exc}") from None
        except duckdb.Error as exc:
            raise flight_error(exc) from None
        except (pa.ArrowException, ValueError, TypeError, KeyError) as exc:
            raise flight.FlightServerError(f"invalid request: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - a server bug must not crash the call or leak a traceback
            raise flight.FlightInternalError(f"internal error: {type(exc).__name__}: {exc}") from None

    return wrapper


class GridServer(flight.FlightServerBase):
    """A Flight SQL server over the DuckDB database ``<root>/grid.duckdb``; serving starts on construction.

    ``location`` is where to listen (port 0 picks a free one: read ``.port`` / ``.url``). The remaining
    keywords (``tls_certificates``, ``verify_client``, ``root_certificates``, ``auth_handler``, ``middleware``)
    pass through to ``pyarrow.flight.FlightServerBase``. ``max_held_results`` and ``result_ttl`` bound what
    clients can leave behind between GetFlightInfo and DoGet (and unclosed prepared statements). ``allow``: the
    local folders and URL prefixes ``load`` may read store datasets from (default: under ``root``).
    ``query_timeout``: seconds a call may keep DuckDB at work (a query, and separately the streaming of its
    rows; a statement in a transaction from its own start) before it is interrupted; None: no limit.
    """

    def __init__(self, root: str | os.PathLike, location: str = "grpc://127.0.0.1:0", *,
                 memory_limit: str = "4GB", threads: int | None = None, max_held_results: int = 256,
                 result_ttl: float = 300.0, max_batch_bytes: int = 8 << 20, rows_per_batch: int = 1024,
                 allow: list[str] | None = None, query_timeout: float | None = None, services=None,
                 grid: list[str] | str | None = None, replicas: int = 1, store: str | None = None,
                 **flight_options):
        if not isinstance(root, (str, os.PathLike)):
            raise ArgumentError(f"root must be a local directory path, got {root!r}")
        self.root = os.path.abspath(os.fspath(root))
        self.max_batch_bytes = check_int("max_batch_bytes", max_batch_bytes, 1)
        self.rows_per_batch = check_int("rows_per_batch", rows_per_batch, 1)
        # a query in a transaction is read whole before the call returns (the next statement would end its
        # stream): at most this much, so that one client cannot take the server's memory
        self.max_transaction_result_bytes = 256 << 20
        if allow is not None and (isinstance(allow, (str, bytes)) or
                                  not all(isinstance(a, (str, os.PathLike)) for a in allow)):
            raise ArgumentError(f"allow must be a list of folders or URL prefixes, got {allow!r}")
        self.allow = [os.fspath(a) for a in allow] if allow is not None else None
        self._writes = itertools.count(1)
        self.generation = 0  # changes whenever a write starts or ends (snapshots of tables are reused until then)
        self._generation_lock = threading.Lock()
        check_int("max_held_results", max_held_results, 1)
        check_number("result_ttl", result_ttl, 0.001)
        query_timeout = check_number("query_timeout", query_timeout, 0.001, none=True)
        self._db = open_database(self.root, memory_limit=memory_limit,
                                 threads=check_int("threads", threads, 1, none=True))
        # tables mirrored to a shared store (mirror.py): this server's copies are brought to the store's now
        self.mirror = Mirror(store) if store is not None else None
        self._results = Expiring(max_held_results, result_ttl, on_drop=_Held.close)
        self._prepared = Expiring(max_held_results, result_ttl)
        self._transactions = Transactions(max_held_results, result_ttl)  # unused ones roll back after result_ttl
        # cursors at work, interrupted when their call or query is cancelled or their call runs past the limit
        self._running = Running(query_timeout)
        self._info = metadata.server_info(_VERSION)
        self._scheme, _, rest = str(location).partition("://")
        self._host = rest.rsplit(":", 1)[0]
        # a member of a grid of several servers (cluster.py): the list every member is given, and replicas
        self.grid_members = member_urls(grid, self._scheme) if grid is not None else []
        self.replicas = check_int("replicas", replicas, 1)
        if self.grid_members and self.replicas > len(self.grid_members):
            raise ArgumentError(f"replicas={self.replicas} needs at least that many servers in the grid, got "
                                f"{len(self.grid_members)}")
        try:
            # what the server offers beside Flight SQL (``services.py``): by prefix
            self.services = {svc.prefix: svc for svc in (default_services(self) if services is None else services)}
            if self.mirror is not None:
                with self._db.cursor() as cur:
                    self.mirror.sync(cur)
            super().__init__(location, **flight_options)
        except BaseException:
            for svc in getattr(self, "services", {}).values():
                svc.close()
            self._running.close()
            self._db.close()
            raise

    @property
    def url(self) -> str:
        """``grpc://host:port`` (``grpc+tls://`` with TLS) where clients reach this server."""
        return f"{self._scheme}://{self._host}:{self.port}"

    def close(self) -> None:
        """Stop serving, drop held results, close the database (idempotent)."""
        self.shutdown()
        for svc in self.services.values():
            svc.close()
        self._results.clear()
        self._prepared.clear()
        self._transactions.clear()
        self._running.close()
        self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- Flight RPCs ---------------------------------------------------------------------------------------

    @_guarded
    def list_actions(self, context):
        return [("CreatePreparedStatement", "prepare a SQL statement (Flight SQL)"),
                ("ClosePreparedStatement", "release a prepared statement (Flight SQL)"),
                ("BeginTransaction", "begin a transaction: statements carrying its id run in it (Flight SQL)"),
                ("EndTransaction", "commit or roll back a transaction (Flight SQL)"),
                ("CancelFlightInfo", "cancel the query of a FlightInfo (Flight)"),
                ("CancelQuery", "cancel the query of a FlightInfo (Flight SQL, deprecated form)"),
                *((f"{p}.{verb}", doc) for p, svc in self.services.items() for verb, doc in svc.actions().items())]

    @_guarded
    def do_action(self, context, action):
        body = action.body.to_pybytes() if action.body is not None else b""
        prefix, dot, verb = action.type.partition(".")
        if dot and prefix in self.services:  # watched: a client that cancels the call stops its DuckDB work
            with self._running.call(context):
                return [flight.Result(pa.py_buffer(r)) for r in self.services[prefix].do_action(context, verb, body)]
        if action.type == "CreatePreparedStatement":
            request = _expect(sqlproto.unpack(body), sqlproto.ActionCreatePreparedStatementRequest)
            auth.require(context, auth.WRITE if writes_sql(request.query) else auth.READ)
            txn = _optional(request, "transaction_id")
            if txn is not None:
                self._transaction(context, txn)  # known and the caller's
            return [flight.Result(sqlproto.pack(self._prepare(request.query, txn)))]
        if action.type == "ClosePreparedStatement":
            request = _expect(sqlproto.unpack(body), sqlproto.ActionClosePreparedStatementRequest)
            self._prepared.pop(request.prepared_statement_handle)
            return []
        if action.type == "BeginTransaction":
            _expect(sqlproto.unpack(body), sqlproto.ActionBeginTransactionRequest)
            auth.require(context, auth.READ)
            txn = self._transactions.begin(self._db.cursor(), _owner(context), _peer(context))
            if self.mirror is not None:  # the store's versions its snapshot starts from: its commit expects them
                self._transactions.get(txn, _owner(context)).expected = dict(self.mirror.known)
            return [flight.Result(sqlproto.pack(sqlproto.ActionBeginTransactionResult(transaction_id=txn)))]
        if action.type == "EndTransaction":
            request = _expect(sqlproto.unpack(body), sqlproto.ActionEndTransactionRequest)
            auth.require(context, auth.READ)
            with self.writing():  # a commit changes what snapshots see
                if self.mirror is None:
                    self._transactions.end(request.transaction_id, _owner(context), request.action)
                else:
                    self._end_mirrored(request.transaction_id, _owner(context), request.action)
            return []
        if action.type == "CancelFlightInfo":  # Flight's own: raw messages, not in an Any
            request = sqlproto.parse(sqlproto.CancelFlightInfoRequest, body)
            status = self._cancel(context, request.info)
            return [flight.Result(pa.py_buffer(sqlproto.CancelFlightInfoResult(status=status).SerializeToString()))]
        if action.type == "CancelQuery":
            request = _expect(sqlproto.unpack(body), sqlproto.ActionCancelQueryRequest)
            status = self._cancel(context, request.info)
            return [flight.Result(sqlproto.pack(sqlproto.ActionCancelQueryResult(result=status)))]
        raise flight.FlightServerError(f"unknown action {action.type[:80]!r}: this server knows "
                                       f"{', '.join(name for name, _ in self.list_actions(context))}")

    @_guarded
    def get_flight_info(self, context, descriptor):
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            svc, path = self._service_of(descriptor)
            with self._running.call(context):
                return svc.get_flight_info(context, descriptor, path)
        command = _command(descriptor)
        writes = _writes(command) or (type(command) is sqlproto.CommandPreparedStatementQuery and writes_sql(
            self._prepared_statement(command.prepared_statement_handle).query))
        auth.require(context, auth.WRITE if writes else auth.READ)
        with self._running.call(context):
            held = self._run_command(command, context)
        try:
            handle = self._results.put(held)
        except BaseException:
            held.close()
            raise
        ticket = flight.Ticket(sqlproto.pack(sqlproto.TicketStatementQuery(statement_handle=handle)))
        return flight.FlightInfo(held.reader.schema, descriptor, [flight.FlightEndpoint(ticket, [])], -1, -1)

    @_guarded
    def get_schema(self, context, descriptor):
        command = _command(descriptor)
        fixed = _METADATA_SCHEMAS.get(type(command).DESCRIPTOR.name)
        if fixed is not None:
            return flight.SchemaResult(fixed(command) if callable(fixed) else fixed)
        raise flight.FlightServerError("GetSchema answers metadata commands only; run the query with "
                                       "GetFlightInfo to learn its schema")

    @_guarded
    def do_get(self, context, ticket):
        prefix, slash, _ = ticket.ticket.partition(b"/")
        if slash and prefix.decode("ascii", "replace") in self.services:
            return self.services[prefix.decode("ascii")].do_get(context, ticket.ticket)
        auth.require(context, auth.READ)
        request = _expect(sqlproto.unpack(ticket.ticket), sqlproto.TicketStatementQuery)
        held = self._results.pop(request.statement_handle)
        if held is None:
            raise flight.FlightServerError("unknown or expired ticket (or its query was cancelled): results are "
                                           f"read once and held for {self._results.ttl:g} s; run the query again")
        return flight.GeneratorStream(held.reader.schema, self._stream(held, request.statement_handle, context))

    @_guarded
    def do_put(self, context, descriptor, reader, writer):
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            svc, path = self._service_of(descriptor)
            with self._running.call(context):
                return svc.do_put(context, descriptor, path, reader, writer)
        command = _command(descriptor)
        kind = type(command)
        # binding parameters to a prepared query reads; every other DoPut writes (DuckDB decides at run time)
        auth.require(context, auth.READ if kind is sqlproto.CommandPreparedStatementQuery and
                     not writes_sql(self._prepared_statement(command.prepared_statement_handle).query)
                     else auth.WRITE)
        with self._running.call(context):
            self._put_command(context, command, reader, writer)

    def _put_command(self, context, command, reader, writer) -> None:
        kind = type(command)
        if kind is sqlproto.CommandStatementUpdate:
            count = self._update(command.query, None, self._transaction(context, _optional(command, "transaction_id")))
        elif kind is sqlproto.CommandPreparedStatementUpdate:
            prepared = self._prepared_statement(command.prepared_statement_handle)
            parameters = _read_parameters(reader)
            count = self._update(prepared.query, parameters if parameters is not None else prepared.parameters,
                                 self._prepared_transaction(context, prepared))
        elif kind is sqlproto.CommandPreparedStatementQuery:
            prepared = self._prepared_statement(command.prepared_statement_handle)
            prepared.parameters = _read_parameters(reader)
            result = sqlproto.DoPutPreparedStatementResult(prepared_statement_handle=command.prepared_statement_handle)
            writer.write(pa.py_buffer(result.SerializeToString()))  # raw, not in an Any (measured with ADBC)
            return
        elif kind is sqlproto.CommandStatementIngest:
            txn = self._transaction(context, _optional(command, "transaction_id"))
            if txn is not None:
                with self.writing(), txn.use() as cur:
                    self._running.attach(cur)
                    count = ingest(cur, command, reader.to_reader(), own_transaction=False)
                    txn.touched.add(command.table.lower())
            else:
                names = {command.table.lower()} if not command.HasField("schema") else None
                with self.writing(), self._cursor() as cur, self.mirrored(cur, names) as ours:
                    count = ingest(cur, command, reader.to_reader(), own_transaction=not ours)
        else:
            raise flight.FlightServerError(f"DoPut does not take {kind.DESCRIPTOR.name}")
        writer.write(pa.py_buffer(sqlproto.DoPutUpdateResult(record_count=count).SerializeToString()))

    # -- work ----------------------------------------------------------------------------------------------

    def _service_of(self, descriptor):
        path = [p.decode("utf-8", "replace") if isinstance(p, bytes) else str(p) for p in descriptor.path]
        if not path or path[0] not in self.services:
            raise ProtocolError(f"unknown path {path[:1]!r}: this server serves {sorted(self.services)}")
        return self.services[path[0]], path[1:]

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        cur = self._db.cursor()
        self._running.attach(cur)  # interrupted if the call it serves is cancelled or runs past the time limit
        return cur

    def _transaction(self, context, transaction_id: bytes | None) -> Transaction | None:
        """The caller's open transaction ``transaction_id`` (None for none); a clear error when unknown."""
        return None if transaction_id is None else self._transactions.get(transaction_id, _owner(context))

    def _prepared_transaction(self, context, prepared: _Prepared) -> Transaction | None:
        """The transaction a prepared statement runs in: its own, or when that ended, the one its connection
        began since (DB-API drivers reuse prepared statements across commits: transactions.py)."""
        if prepared.transaction_id is None:
            return None
        try:
            return self._transaction(context, prepared.transaction_id)
        except flight.FlightServerError:
            successor = self._transactions.successor(prepared.transaction_id, _peer(context))
            if successor is None:
                raise
            txn = self._transaction(context, successor)
            prepared.transaction_id = successor
            return txn

    def _cancel(self, context, info: bytes) -> int:
        """Cancel the query of a serialized FlightInfo: its held result dropped, or its streaming interrupted."""
        auth.require(context, auth.READ)
        try:
            endpoints = flight.FlightInfo.deserialize(bytes(info)).endpoints
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise ProtocolError(f"a cancel request carries a serialized FlightInfo: {exc}") from None
        found = False
        for endpoint in endpoints:
            ticket = endpoint.ticket.ticket
            try:
                handle = sqlproto.unpack(ticket).statement_handle
            except (ProtocolError, AttributeError):
                return int(CancelStatus.NOT_CANCELLABLE)  # a dataset's partitions: nothing runs to stop
            held = self._results.pop(handle)
            if held is not None:
                held.close()
                found = True
            found = self._running.interrupt_stream(handle) or found
        if not found:
            raise flight.FlightServerError("no such query in progress or held: it finished, was read, or was "
                                           "cancelled already")
        return int(CancelStatus.CANCELLED)

    def _sql_cursor(self, views: str | bool) -> duckdb.DuckDBPyConnection:
        """A cursor for client SQL, loaded datasets registered on it as views: all of them (``views=True``,
        for metadata) or those a query names (``views=<sql>``)."""
        return self._registered(views)[0]

    def _registered(self, views: str | bool) -> tuple[duckdb.DuckDBPyConnection, dict]:
        """``_sql_cursor`` and the registered datasets' tensor columns (by name, for ``tensors_back``)."""
        cur = self._cursor()
        datasets = self.services.get("datasets")
        if not hasattr(datasets, "register"):
            return cur, {}
        try:
            return cur, datasets.register(cur, None if views is True else views) or {}
        except BaseException:
            cur.close()
            raise

    @contextlib.contextmanager
    def writing(self):
        """Around a write: the generation moves when it starts and when it ends, so a snapshot taken meanwhile
        is not reused afterwards."""
        self._bump()
        try:
            yield
        finally:
            self._bump()

    def _bump(self) -> None:
        with self._generation_lock:
            self.generation = next(self._writes)

    def _prepare(self, query: str, transaction_id: bytes | None = None):
        statements = duckdb.extract_statements(query)  # parses: bad SQL fails here, at prepare time
        if not statements:
            raise flight.FlightServerError("empty SQL statement")
        handle = self._prepared.put(_Prepared(query, transaction_id=transaction_id))
        return sqlproto.ActionCreatePreparedStatementResult(prepared_statement_handle=handle,
                                                            is_update=writes_sql(query))

    def _prepared_statement(self, handle: bytes) -> _Prepared:
        prepared = self._prepared.get(handle)
        if prepared is None:
            raise flight.FlightServerError("unknown or expired prepared statement handle: prepare it again")
        return prepared

    def _run_command(self, command, context=None) -> _Held:
        kind = type(command).DESCRIPTOR.name
        if kind == "CommandStatementQuery":
            return self._query(command.query, None, self._transaction(context, _optional(command, "transaction_id")))
        if kind == "CommandPreparedStatementQuery":
            prepared = self._prepared_statement(command.prepared_statement_handle)
            return self._query(prepared.query, prepared.parameters, self._prepared_transaction(context, prepared))
        answer = self._metadata(command)
        return _Held(pa.RecordBatchReader.from_batches(answer.schema, answer.to_batches()))

    def _metadata(self, command) -> pa.Table:
        kind = type(command).DESCRIPTOR.name
        if kind == "CommandGetSqlInfo":
            return metadata.sql_info(self._info, command.info)
        if kind == "CommandGetTableTypes":
            return metadata.table_types()
        if kind == "CommandGetXdbcTypeInfo":
            return metadata.xdbc_type_info(_optional(command, "data_type"))
        with self._sql_cursor(True) as cur:
            if kind == "CommandGetCatalogs":
                return metadata.catalogs(cur)
            if kind == "CommandGetDbSchemas":
                return metadata.db_schemas(cur, _optional(command, "catalog"),
                                           _optional(command, "db_schema_filter_pattern"))
            if kind == "CommandGetTables":
                return metadata.tables(cur, _optional(command, "catalog"),
                                       _optional(command, "db_schema_filter_pattern"),
                                       _optional(command, "table_name_filter_pattern"),
                                       list(command.table_types), command.include_schema, self._table_schema)
            if kind == "CommandGetPrimaryKeys":
                return metadata.primary_keys(cur, _optional(command, "catalog"), _optional(command, "db_schema"),
                                             command.table)
            if kind == "CommandGetExportedKeys":  # keys of other tables that reference this one
                return metadata.foreign_keys(cur, _table_of(command, ""), None)
            if kind == "CommandGetImportedKeys":  # this table's keys that reference others
                return metadata.foreign_keys(cur, None, _table_of(command, ""))
            if kind == "CommandGetCrossReference":
                return metadata.foreign_keys(cur, _table_of(command, "pk_"), _table_of(command, "fk_"))
        raise flight.FlightServerError(f"{kind} is not supported by this server yet")

    def _table_schema(self, cur, catalog: str | None, schema: str | None, table: str) -> pa.Schema:
        """What a ``SELECT *`` of the table answers (a loaded dataset's tensor columns as tensors)."""
        datasets = self.services.get("datasets")
        tensors = datasets.tensor_columns(table) if hasattr(datasets, "tensor_columns") else {}
        relation = cur.sql(f"SELECT * FROM {metadata.quote(catalog, schema, table)} LIMIT 0")
        return tensors_back(_relation_reader(relation, 1), tensors).schema

    def _query(self, query: str, parameters: pa.Table | None, txn: Transaction | None = None) -> _Held:
        rows = _parameter_rows(parameters)
        if txn is not None:
            with self.writing() if writes_sql(query) else contextlib.nullcontext():
                table = self._in_transaction(txn, query, rows or [None], read=True)
            return _Held(pa.RecordBatchReader.from_batches(table.schema, table.to_batches()))
        if writes_sql(query):
            with self.writing():  # runs now: a write's relation is executed when made
                return self._query_on(query, rows, write=True)
        return self._query_on(query, rows)

    def _query_on(self, query: str, rows: list[list], write: bool = False) -> _Held:
        cur, tensors = self._registered(query)
        try:
            names = self.mirror.touched(cur, query) if write and self.mirror is not None else None
            if names:  # a write to mirrored tables: read whole, in the transaction its export commits with
                with self.mirror.transaction(cur, names):
                    tables = [tensors_back(_relation_reader(cur.sql(query, params=row), self.rows_per_batch),
                                           tensors).read_all() for row in rows or [None]]
                result = pa.concat_tables(tables)
                cur.close()
                return _Held(pa.RecordBatchReader.from_batches(result.schema, result.to_batches()))
            if len(rows) <= 1:  # the common case: stream straight from DuckDB
                relation = cur.sql(query, params=rows[0] if rows else None)
                reader = tensors_back(_relation_reader(relation, self.rows_per_batch), tensors)
                return _Held(reader, cur)
            tables = [tensors_back(_relation_reader(cur.sql(query, params=row), self.rows_per_batch), tensors).read_all()
                      for row in rows]
            result = pa.concat_tables(tables)
            cur.close()
            return _Held(pa.RecordBatchReader.from_batches(result.schema, result.to_batches()))
        except BaseException:
            cur.close()
            raise

    def _update(self, query: str, parameters: pa.Table | None, txn: Transaction | None = None) -> int:
        rows = _parameter_rows(parameters) or [None]
        with self.writing():
            if txn is not None:
                return self._in_transaction(txn, query, rows, read=False)
            with self._sql_cursor(query) as cur:
                names = self.mirror.touched(cur, query) if self.mirror is not None else None
                with self.mirrored(cur, names):
                    return sum(_count(cur.sql(query, params=row)) for row in rows)

    def _end_mirrored(self, transaction_id: bytes, owner: str | None, action: int) -> None:
        """End a client transaction on a server with a store: the tables it wrote exported (expecting the
        versions its snapshot began from) before its commit, under the mirror's lock until the commit is
        done; on any failure this server's copies go back to the store's versions."""
        mirror, txn = self.mirror, self._transactions.get(transaction_id, owner)
        dropped: list[str] = []
        with mirror.lock:
            try:
                self._transactions.end(transaction_id, owner, action, before_commit=lambda t: dropped.extend(
                    mirror.export(t.cursor, t.touched, t.expected)) if t.touched else None)
            except BaseException:
                for name in txn.touched:
                    mirror.known.pop(name, None)
                with contextlib.suppress(Exception), self._cursor() as cur:
                    mirror.sync(cur, txn.touched)
                raise
            mirror.remove(dropped)

    @contextlib.contextmanager
    def mirrored(self, cur, names: set[str] | None):
        """Around a write outside a client transaction: with a store and tables named, ``cur`` in a local
        transaction that commits only once the store took those tables (mirror.py); yields whether it is
        (the caller then begins none of its own)."""
        if self.mirror is None or not names:
            yield False
            return
        with self.mirror.transaction(cur, names):
            yield True

    def _in_transaction(self, txn: Transaction, query: str, rows: list, read: bool):
        """Run ``query`` once per parameter row on the transaction's cursor, one statement at a time: the rows
        of a query read whole (a held reader would not survive the transaction's next statement), or the
        number of rows an update changed."""
        with txn.use() as cur:
            datasets = self.services.get("datasets")
            tensors = datasets.register(cur, query) or {} if hasattr(datasets, "register") else {}
            if self.mirror is not None and (not read or writes_sql(query)):  # exported when it commits
                txn.touched |= self.mirror.touched(cur, query)
            self._running.attach(cur)
            if not read:
                return sum(_count(cur.sql(query, params=row)) for row in rows)
            batches, size = [], 0
            for row in rows:
                reader = tensors_back(_relation_reader(cur.sql(query, params=row), self.rows_per_batch), tensors)
                for batch in reader:
                    size += batch.nbytes
                    if size > self.max_transaction_result_bytes:  # held in this server's memory: bounded
                        raise flight.FlightServerError(
                            f"a query's result inside a transaction is read whole on the server, and this one "
                            f"passes {self.max_transaction_result_bytes >> 20} MiB: run it outside the "
                            "transaction (ADBC: autocommit=True) to stream it")
                    batches.append(batch)
                schema = reader.schema
            return pa.Table.from_batches(batches, schema=schema)

    def _stream(self, held: _Held, handle: bytes, context=None):
        try:
            # CancelFlightInfo interrupts it, and so does the client cancelling this DoGet (the generator runs
            # after do_get returned: the call is watched from here, for as long as the stream lasts)
            with self._running.streaming(handle, held.cursor), self._running.call(context):
                if held.cursor is not None:
                    self._running.attach(held.cursor)
                yield from batches_by_bytes(held.reader, self.max_batch_bytes)
        except (duckdb.Error, pa.ArrowException, OSError) as exc:  # errors that only show while rows are produced
            raise flight_error(exc) from None  # (DuckDB's arrow stream reports them as OSError/ArrowException)
        except Exception as exc:  # noqa: BLE001 - no traceback to the client
            raise flight.FlightInternalError(f"internal error: {type(exc).__name__}: {exc}") from None
        finally:
            held.close()


_METADATA_SCHEMAS = {
    "CommandGetSqlInfo": metadata.SQL_INFO_SCHEMA,
    "CommandGetCatalogs": metadata.CATALOGS_SCHEMA,
    "CommandGetDbSchemas": metadata.DB_SCHEMAS_SCHEMA,
    "CommandGetTables": lambda c: metadata.TABLES_WITH_SCHEMA_SCHEMA if c.include_schema else metadata.TABLES_SCHEMA,
    "CommandGetTableTypes": metadata.TABLE_TYPES_SCHEMA,
    "CommandGetPrimaryKeys": metadata.PRIMARY_KEYS_SCHEMA,
    "CommandGetExportedKeys": metadata.FOREIGN_KEYS_SCHEMA,
    "CommandGetImportedKeys": metadata.FOREIGN_KEYS_SCHEMA,
    "CommandGetCrossReference": metadata.FOREIGN_KEYS_SCHEMA,
    "CommandGetXdbcTypeInfo": metadata.XDBC_TYPE_INFO_SCHEMA,
}


def _writes(command) -> bool:
    """Whether a GetFlightInfo command may change data: a statement or prepared query that is not a read."""
    kind = type(command).DESCRIPTOR.name
    if kind == "CommandStatementQuery":
        return writes_sql(command.query)
    return False  # metadata (a prepared query: its SQL is looked up by the caller)


def writes_sql(query: str) -> bool:
    """Whether SQL holds any statement but a read (SELECT, EXPLAIN, SHOW/DESCRIBE...). Unparsable SQL counts as
    a read here: DuckDB refuses it when it runs."""
    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error:
        return False
    return any(st.type not in READS for st in statements)



def default_services(server) -> list:
    """What a GridServer offers beside Flight SQL (``services.py``): its datasets and its files."""
    return [DatasetsService(server), FilesService(server),
            MembersService(server, getattr(server, "grid_members", None), getattr(server, "replicas", 1))]


def _command(descriptor: flight.FlightDescriptor):
    if descriptor.descriptor_type != flight.DescriptorType.CMD:
        raise ProtocolError("a Flight SQL command descriptor is expected, not a path")
    return sqlproto.unpack(descriptor.command)


def _expect(message, cls):
    if not isinstance(message, cls):
        raise ProtocolError(f"{cls.DESCRIPTOR.name} expected, got {type(message).DESCRIPTOR.name}")
    return message


def _optional(message, name: str):
    return getattr(message, name) if message.HasField(name) else None


def _table_of(command, prefix: str) -> tuple:
    """(catalog, schema, table) of a key command's fields ``<prefix>catalog``, ``<prefix>db_schema``, ``<prefix>table``."""
    return (_optional(command, prefix + "catalog"), _optional(command, prefix + "db_schema"),
            getattr(command, prefix + "table"))


def _owner(context) -> str | None:
    """Who owns what a call opens (a transaction): the signed-in user (None on a server without users)."""
    who = auth.caller(context)
    return getattr(who, "name", None)


def _peer(context) -> str | None:
    """The client connection of a call (``ipv4:127.0.0.1:port``): one gRPC channel, one peer."""
    try:
        return context.peer()
    except Exception:  # noqa: BLE001 - a context without a peer
        return None


def _count(relation) -> int:
    """The rows a data-changing statement reports (DuckDB answers a one-cell ``Count``; DDL nothing)."""
    counted = relation.fetchall() if relation is not None and relation.columns == ["Count"] else []
    return int(counted[0][0]) if counted and counted[0][0] is not None else 0


MAX_PARAMETER_BYTES = 64 << 20  # parameters are held in memory with their statement: a client cannot send GBs


def _read_parameters(reader) -> pa.Table | None:
    """Parameter rows a client bound to a prepared statement (None when it sent no columns), at most
    MAX_PARAMETER_BYTES of them (bulk rows go through ingest, which streams into DuckDB)."""
    batches, size = [], 0
    for chunk in reader:
        size += chunk.data.nbytes
        if size > MAX_PARAMETER_BYTES:
            raise flight.FlightServerError(f"parameters over {MAX_PARAMETER_BYTES >> 20} MiB: send bulk rows with "
                                           f"ingest (adbc_ingest, g.put) instead")
        batches.append(chunk.data)
    table = pa.Table.from_batches(batches, reader.schema)
    return table if table.num_columns else None


def _parameter_rows(parameters: pa.Table | None) -> list[list]:
    if parameters is None:
        return []
    return [list(row.values()) for row in parameters.to_pylist()]


def _relation_reader(relation, rows_per_batch: int) -> pa.RecordBatchReader:
    if relation is None:  # a statement that returned nothing
        return pa.RecordBatchReader.from_batches(pa.schema([]), [])
    return relation.to_arrow_reader(rows_per_batch)
