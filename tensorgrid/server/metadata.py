"""Flight SQL metadata answers (SqlInfo, catalogs, schemas, tables, table types) from DuckDB's catalog.

Each function returns an Arrow table in the schema the protocol fixes for its command. Only databases the
server opened itself are listed (DuckDB's internal ``system`` catalog is left out), and ``temp``, where DuckDB
keeps the views of loaded datasets, when any is loaded (its views are the datasets: ``temp.main.<name>``).
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from .sqlproto import SqlCaseSensitivity, SqlInfo

CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])
DB_SCHEMAS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()),
                               pa.field("db_schema_name", pa.utf8(), nullable=False)])
TABLES_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
                           pa.field("table_name", pa.utf8(), nullable=False),
                           pa.field("table_type", pa.utf8(), nullable=False)])
TABLES_WITH_SCHEMA_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))
TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])
TABLE_TYPES = ["LOCAL TEMPORARY", "TABLE", "VIEW"]

# the dense union of a SqlInfo value; the type code of each member is its position here
_INFO_MEMBERS = [
    pa.field("string_value", pa.utf8()),
    pa.field("bool_value", pa.bool_()),
    pa.field("bigint_value", pa.int64()),
    pa.field("int32_bitmask", pa.int32()),
    pa.field("string_list", pa.list_(pa.field("item", pa.utf8()))),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.field("item", pa.int32())))),
]
_INFO_TYPE = pa.dense_union(_INFO_MEMBERS)
SQL_INFO_SCHEMA = pa.schema([pa.field("info_name", pa.uint32(), nullable=False),
                             pa.field("value", _INFO_TYPE, nullable=False)])
_KIND = {str: 0, bool: 1}  # other values are int32 (code 3); bigint_value is unused so far


def server_info(version: str) -> dict[int, object]:
    """The SqlInfo values this server states about itself."""
    return {
        SqlInfo.FLIGHT_SQL_SERVER_NAME: "TensorGrid",
        SqlInfo.FLIGHT_SQL_SERVER_VERSION: version,
        SqlInfo.FLIGHT_SQL_SERVER_ARROW_VERSION: pa.__version__,
        SqlInfo.FLIGHT_SQL_SERVER_READ_ONLY: False,
        SqlInfo.FLIGHT_SQL_SERVER_SQL: True,
        SqlInfo.FLIGHT_SQL_SERVER_SUBSTRAIT: False,
        SqlInfo.FLIGHT_SQL_SERVER_TRANSACTION: 0,  # SQL_SUPPORTED_TRANSACTION_NONE (no Flight SQL transactions)
        SqlInfo.FLIGHT_SQL_SERVER_CANCEL: False,
        SqlInfo.FLIGHT_SQL_SERVER_BULK_INGESTION: True,
        SqlInfo.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED: False,
        SqlInfo.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT: 0,
        SqlInfo.FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT: 0,
        SqlInfo.SQL_DDL_CATALOG: False,
        SqlInfo.SQL_DDL_SCHEMA: True,
        SqlInfo.SQL_DDL_TABLE: True,
        SqlInfo.SQL_IDENTIFIER_CASE: int(SqlCaseSensitivity.CASE_INSENSITIVE),
        SqlInfo.SQL_IDENTIFIER_QUOTE_CHAR: '"',
        SqlInfo.SQL_QUOTED_IDENTIFIER_CASE: int(SqlCaseSensitivity.CASE_INSENSITIVE),
    }


def sql_info(info: dict[int, object], wanted) -> pa.Table:
    """Rows (info_name, value) for the codes asked for (all known ones when none are); unknown codes are left out."""
    codes = [int(c) for c in wanted if int(c) in info] if len(wanted) else sorted(info)
    types, offsets, children = [], [], [[] for _ in _INFO_MEMBERS]
    for code in codes:
        value = info[code]
        kind = _KIND.get(type(value), 3)
        types.append(kind)
        offsets.append(len(children[kind]))
        children[kind].append(value)
    arrays = [pa.array(values, type=field.type) for values, field in zip(children, _INFO_MEMBERS)]
    union = pa.UnionArray.from_dense(pa.array(types, pa.int8()), pa.array(offsets, pa.int32()), arrays,
                                     [f.name for f in _INFO_MEMBERS])
    return pa.Table.from_arrays([pa.array(codes, pa.uint32()), union], schema=SQL_INFO_SCHEMA)


# the server's own databases, and ``temp`` when it holds views: the loaded datasets, registered on the cursor
_OWN_DATABASES = ("SELECT database_name FROM duckdb_databases() WHERE NOT internal OR database_name IN "
                  "(SELECT table_catalog FROM information_schema.tables WHERE table_catalog = 'temp')")


def catalogs(cur: duckdb.DuckDBPyConnection) -> pa.Table:
    rows = cur.sql(_OWN_DATABASES + " ORDER BY 1").fetchall()
    return pa.Table.from_pylist([{"catalog_name": r[0]} for r in rows], schema=CATALOGS_SCHEMA)


def db_schemas(cur: duckdb.DuckDBPyConnection, catalog: str | None, pattern: str | None) -> pa.Table:
    rows = cur.sql(
        f"SELECT catalog_name, schema_name FROM information_schema.schemata WHERE catalog_name IN ({_OWN_DATABASES})"
        " AND ($1::VARCHAR IS NULL OR catalog_name = $1) AND ($2::VARCHAR IS NULL OR schema_name LIKE $2) ORDER BY 1, 2",
        params=[catalog, pattern]).fetchall()
    return pa.Table.from_pylist([{"catalog_name": c, "db_schema_name": s} for c, s in rows], schema=DB_SCHEMAS_SCHEMA)


def tables(cur: duckdb.DuckDBPyConnection, catalog: str | None, schema_pattern: str | None,
           table_pattern: str | None, table_types: list[str], include_schema: bool, schema_of=None) -> pa.Table:
    """The tables and views that match; with their Arrow schemas (``schema_of(cur, catalog, schema, table)``,
    default ``table_schema``) when ``include_schema``."""
    rows = cur.sql(
        "SELECT table_catalog, table_schema, table_name, CASE table_type WHEN 'BASE TABLE' THEN 'TABLE' "
        "ELSE table_type END AS kind FROM information_schema.tables "
        f"WHERE table_catalog IN ({_OWN_DATABASES}) AND ($1::VARCHAR IS NULL OR table_catalog = $1) "
        "AND ($2::VARCHAR IS NULL OR table_schema LIKE $2) AND ($3::VARCHAR IS NULL OR table_name LIKE $3) "
        "AND (len($4::VARCHAR[]) = 0 OR list_contains($4::VARCHAR[], kind)) ORDER BY 1, 2, 3, 4",
        params=[catalog, schema_pattern, table_pattern, list(table_types)]).fetchall()
    out = [{"catalog_name": c, "db_schema_name": s, "table_name": t, "table_type": k} for c, s, t, k in rows]
    if not include_schema:
        return pa.Table.from_pylist(out, schema=TABLES_SCHEMA)
    schema_of = schema_of or table_schema
    for row in out:
        row["table_schema"] = schema_of(cur, row["catalog_name"], row["db_schema_name"],
                                        row["table_name"]).serialize().to_pybytes()
    return pa.Table.from_pylist(out, schema=TABLES_WITH_SCHEMA_SCHEMA)


def table_types() -> pa.Table:
    return pa.Table.from_pylist([{"table_type": t} for t in TABLE_TYPES], schema=TABLE_TYPES_SCHEMA)


def quote(*names: str | None) -> str:
    """A qualified SQL identifier, each part double-quoted (parts that are None are left out)."""
    return ".".join('"' + n.replace('"', '""') + '"' for n in names if n is not None)


def table_schema(cur: duckdb.DuckDBPyConnection, catalog: str | None, schema: str | None, table: str) -> pa.Schema:
    """The Arrow schema a ``SELECT *`` of the table returns."""
    return cur.sql(f"SELECT * FROM {quote(catalog, schema, table)} LIMIT 0").to_arrow_table().schema
