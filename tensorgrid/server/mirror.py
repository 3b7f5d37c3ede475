"""SQL tables mirrored to the shared store (``tensorgrid serve --store URL``): a grid's tables outlive a server.

Each table of the server's database (schema ``main``) is also a TensorGrid dataset at
``<store>/tables/<name>``, a new version after every commit that wrote it, before the client hears that
the write succeeded; its ``CREATE TABLE`` statement (keys, defaults, NOT NULL) travels in the version, on its
first column's metadata. The store is the truth: a server that starts, or that a client makes the grid's
table owner (``grid.adopt``, when the owner it used before is down or the client is new), loads every table
the store has at a newer version than its own copy, and drops the copies of tables dropped meanwhile.

A write, on a server with a store:
1. under the server's mirror lock, each table it names is brought up to the store's latest version first
   (another server may have written it since);
2. the write runs in a local transaction;
3. before it commits, each named table is exported as the next version, only if the store is still at the
   version the local copy was loaded from (``expect_version``: a compare-and-swap): a write that raced another
   server's is ``ConflictError`` and rolled back; an export that fails (store down) is rolled back too. So
   what the client was told is committed is in the store, and no server's write silently replaces another's.
   (A server killed between the export and its local commit comes back to the store's version.)
A client's own transaction (Flight SQL / ADBC) is exported the same way when it commits.
The table a statement writes is found with DuckDB's parser and tokenizer (``_target``: the name after its
verb); a write whose table it cannot tell (WITH ..., MERGE, IMPORT, EXECUTE...) exports every table.
"""

from __future__ import annotations

import contextlib
import threading
from urllib.parse import quote as url_quote
from urllib.parse import unquote

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from .. import fs as tgfs
from ..errors import ConflictError, TensorGridError
from .metadata import quote

TABLES = "tables"
# statements that only read (grid.writes_sql: every other statement may write)
READS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN, duckdb.StatementType.PRAGMA,
         duckdb.StatementType.RELATION}
SQL_KEY = b"tensorgrid.create_table"
_LOAD = "__tensorgrid_mirror_load__"


class Mirror:
    """The mirror of one server's tables in the store at ``url``."""

    def __init__(self, url: str):
        self.url = str(url).rstrip("/")
        self.known: dict[str, int] = {}  # table (lower case) -> the store version its local copy equals
        self.lock = threading.RLock()  # one mirrored write at a time on this server

    # --- the store's side ---------------------------------------------------------------------------------
    def path(self, name: str) -> str:
        return f"{self.url}/{TABLES}/{url_quote(name.lower(), safe='')}"

    def latest(self, name: str) -> int | None:
        from ..store.writer import latest

        fs, root = tgfs.resolve(self.path(name))
        found = latest(fs, root)
        return None if found is None else found.version

    def stored(self) -> dict[str, int]:
        """Every table the store holds -> its latest version."""
        from ..store import manifest
        from ..store.writer import latest

        fs, root = tgfs.resolve(f"{self.url}/{TABLES}")
        try:
            entries = fs.ls(root, detail=False)
        except FileNotFoundError:
            return {}
        out = {}
        for entry in entries:
            entry = str(entry).rstrip("/")
            if manifest.is_dataset(fs, entry):
                found = latest(fs, entry)
                if found is not None:
                    out[unquote(entry.rsplit("/", 1)[-1])] = found.version
        return out

    # --- the local database's side -------------------------------------------------------------------------
    def sync(self, cur: duckdb.DuckDBPyConnection, names=None) -> dict[str, int]:
        """Bring the local copies of ``names`` (default: every table) to the store's latest versions: load
        those the store has newer or that are missing here, drop those the store no longer has. Returns the
        versions loaded."""
        with self.lock:
            stored = self.stored() if names is None else {n: v for n in names if (v := self.latest(n)) is not None}
            local = _local_tables(cur)
            loaded = {}
            for name, version in stored.items():
                if self.known.get(name) != version or name not in local:
                    self._load(cur, name, version)
                    loaded[name] = version
            for name in list(self.known):
                if name not in stored and (names is None or name in names):
                    if name in local:  # dropped by another server: the store says so
                        cur.execute(f"DROP TABLE IF EXISTS {quote(local[name])}")
                    del self.known[name]
            return loaded

    def _load(self, cur, name: str, version: int) -> None:
        from .. import store

        table = store.open(self.path(name), version).to_arrow()
        meta = table.schema.field(0).metadata or {}
        create = meta.get(SQL_KEY, b"").decode() or None
        table = pa.table(table.columns, names=table.column_names)  # plain fields: DuckDB reads the rows only
        cur.begin()
        try:
            existing = _local_tables(cur).get(name)
            if existing is not None:
                cur.execute(f"DROP TABLE {quote(existing)}")
            cur.register(_LOAD, table)
            if create:
                cur.execute(create)
                target = _local_tables(cur)[name]
                cur.execute(f"INSERT INTO {quote(target)} SELECT * FROM {_LOAD}")
            else:
                cur.execute(f"CREATE TABLE {quote(name)} AS SELECT * FROM {_LOAD}")
            cur.commit()
        except BaseException:
            cur.rollback()
            raise
        finally:
            with contextlib.suppress(duckdb.Error):
                cur.unregister(_LOAD)
        self.known[name] = version

    def touched(self, cur, query: str) -> set[str]:
        """The tables (lower case) a write statement changes: each statement's target, the name after its
        leading keywords (INSERT INTO t, UPDATE t, DELETE FROM t, CREATE TABLE t, DROP TABLE t, ALTER TABLE t,
        COPY t, TRUNCATE t), found with DuckDB's own parser and tokenizer (its binder does not name an INSERT's
        target). A statement whose target it cannot tell (one that starts WITH ...) counts as touching every
        table; one in another schema or database, none (only schema main is mirrored)."""
        try:
            statements = duckdb.extract_statements(query)
        except duckdb.Error:
            return set()  # it will fail on its own when it runs
        names: set[str] = set()
        for statement in statements:
            if statement.type in READS:
                continue
            target = _target(statement.query)
            if target is _UNKNOWN:  # every table this server has or the store had
                return set(_local_tables(cur)) | set(self.known) | names
            if target is not None:
                names.add(target)
                if statement.type == duckdb.StatementType.ALTER and (renamed := _renamed_to(statement.query)):
                    names.add(renamed)
        return names

    @contextlib.contextmanager
    def transaction(self, cur, names: set[str]):
        """``cur`` in a local transaction for a write naming ``names``: those tables brought up to the store's
        latest versions first, exported before the commit, and the write rolled back when the store does not
        take them (ConflictError when another server wrote one meanwhile)."""
        with self.lock:
            try:
                self.sync(cur, names)
            except (OSError, TensorGridError) as exc:
                raise flight.FlightServerError(f"the grid's store {self.url} could not be read for table "
                                               f"{sorted(names)}: nothing was written ({type(exc).__name__}: "
                                               f"{exc})") from None
            cur.begin()
            try:
                yield
                dropped = self.export(cur, names)
            except BaseException:
                cur.rollback()
                raise
            try:
                cur.commit()
            except BaseException:  # the store took versions this database has not: reload them next time
                for name in names:
                    self.known.pop(name, None)
                raise
            self.remove(dropped)

    def export(self, cur, names, expected: dict | None = None) -> list[str]:
        """Each of ``names`` as read on ``cur`` (inside the write's transaction), as the next version in the
        store after the one it was read from (``expected``: table -> version, a client transaction's as of its
        BEGIN; default this server's known versions). Returns the tables dropped here, to be removed from the
        store once the local commit is done (``remove``). A failure is raised as ConflictError (another server,
        or a write here since the transaction began, wrote a table meanwhile) or an error naming the store;
        the caller rolls its transaction back. (A write over several tables whose export fails part way
        leaves the store with the first ones: the next sync brings this server to them.)"""
        expected = self.known if expected is None else expected
        dropped = []
        with self.lock:
            try:
                for name in sorted(names):
                    local = _local_tables(cur).get(name)
                    if local is None:
                        dropped.append(name)
                        continue
                    create = cur.execute("SELECT sql FROM duckdb_tables() WHERE table_name = ? AND schema_name = "
                                         "'main'", [local]).fetchall()[0][0]
                    table = cur.sql(f"SELECT * FROM {quote(local)}").arrow()
                    if isinstance(table, pa.RecordBatchReader):
                        table = table.read_all()
                    first = table.schema.field(0)
                    schema = table.schema.set(0, first.with_metadata({**(first.metadata or {}), SQL_KEY: create.encode()}))
                    ds = _write(self.path(name), pa.Table.from_arrays(table.columns, schema=schema),
                                expected.get(name, 0))
                    self.known[name] = ds.version
                return dropped
            except BaseException as exc:
                for name in names:  # the store stays the truth: the next sync reloads these from it
                    self.known.pop(name, None)
                if isinstance(exc, ConflictError):
                    raise flight.FlightServerError(
                        f"another server of the grid wrote table {sorted(names)} meanwhile: this write was rolled "
                        f"back, run it again ({exc})", extra_info=b"ConflictError") from None
                if isinstance(exc, (OSError, TensorGridError)):
                    raise flight.FlightServerError(f"the grid's store {self.url} did not take table {sorted(names)}: "
                                                   f"this write was rolled back ({type(exc).__name__}: {exc})") from None
                raise

    def remove(self, names) -> None:
        """Tables dropped here (and committed so) out of the store."""
        for name in names:
            fs, root = tgfs.resolve(self.path(name))
            if fs.exists(root):
                fs.rm(root, recursive=True)
            self.known.pop(name, None)


_UNKNOWN = object()
# words that may stand between a write's verb and its table's name
_FILLER = {"or", "replace", "ignore", "into", "from", "table", "if", "not", "exists", "temp", "temporary",
           "only", "unlogged", "persistent"}
_VERBS = {"insert", "update", "delete", "create", "drop", "alter", "copy", "truncate"}


def _tokens(sql: str) -> tuple[list, list[str], list[str]]:
    """DuckDB's tokens of ``sql`` without comments: (position, kind) pairs, their texts, lower-cased texts."""
    tokens = [(a, kind) for a, kind in duckdb.tokenize(sql) if kind != duckdb.token_type.comment]
    ends = [a for a, _ in tokens[1:]] + [len(sql)]
    texts = [sql[a:b].strip() for (a, _), b in zip(tokens, ends)]
    return tokens, texts, [t.lower() for t in texts]


def _target(sql: str):
    """The table a write statement changes (lower case): the name after its verb and the words that may
    follow it (INSERT OR REPLACE INTO t, DELETE FROM t, CREATE TABLE IF NOT EXISTS t, TRUNCATE TABLE t...);
    a name that is also a keyword (data, name, value...) counts. None when it changes no table of schema
    main (CREATE VIEW/INDEX..., another schema or database); _UNKNOWN when it cannot tell (WITH ..., MERGE,
    IMPORT, EXECUTE, anything else): the caller then takes every table."""
    tokens, texts, words = _tokens(sql)
    if not words or words[0] not in _VERBS:
        return _UNKNOWN
    if words[0] == "create" and "table" not in words[:6]:
        return None  # a view, index, sequence, schema...: no table's rows change
    if words[0] in ("drop", "alter") and (len(words) < 2 or words[1] != "table"):
        return None if words[0] == "drop" else _UNKNOWN  # DROP VIEW...; ALTER of something else
    i = 1
    while i < len(words) and words[i] in _FILLER:
        i += 1
    if i >= len(words) or tokens[i][1] not in (duckdb.token_type.identifier, duckdb.token_type.keyword):
        return _UNKNOWN
    parts = [texts[i]]
    while i + 2 < len(texts) and texts[i + 1] == "." and tokens[i + 2][1] in (duckdb.token_type.identifier,
                                                                               duckdb.token_type.keyword):
        parts.append(texts[i + 2])
        i += 2
    names = [p[1:-1].replace('""', '"') if p.startswith('"') else p for p in parts]
    if len(names) > 2 or (len(names) == 2 and names[0].lower() != "main"):
        return None  # another database's or schema's table: not mirrored
    return names[-1].lower()


def _renamed_to(sql: str) -> str | None:
    """ALTER TABLE t RENAME TO u: u (lower case), else None."""
    _, texts, words = _tokens(sql)
    for i in range(len(words) - 2):
        if words[i] == "rename" and words[i + 1] == "to":
            name = texts[i + 2]
            return (name[1:-1].replace('""', '"') if name.startswith('"') else name).lower()
    return None


def _write(url: str, table: pa.Table, expect_version: int):
    """``table`` as the version after ``expect_version`` of the dataset at ``url`` (compare-and-swap); an empty
    table (a table just created, or emptied) as one shard of no rows, which keeps its columns."""
    from ..store import encoding, writer
    from ..store.manifest import Shard

    if table.num_rows:
        return writer.write(url, table, mode="overwrite", expect_version=expect_version)

    def empty_part(fs, root, txn):
        path = f"{writer.DATA_DIR}/part-{txn}-00000.parquet"
        meta = writer.write_part(fs, tgfs.join(root, path), table)
        return [Shard(path, meta["rows"], meta["bytes"], meta["checksum"], meta["row_group_rows"])]

    return writer.write_with(url, "overwrite", encoding.physical_schema(table.schema), empty_part,
                             expect_version=expect_version)


def _local_tables(cur) -> dict[str, str]:
    """The database's base tables in schema main: lower-case name -> name."""
    return {n.lower(): n for (n,) in cur.execute("SELECT table_name FROM duckdb_tables() WHERE schema_name = 'main' "
                                                 "AND NOT temporary").fetchall()}
