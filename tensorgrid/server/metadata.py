"""Flight SQL metadata answers (SqlInfo, catalogs, schemas, tables, table types, primary and foreign keys,
XDBC type info) from DuckDB's catalog.

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
        SqlInfo.FLIGHT_SQL_SERVER_TRANSACTION: 1,  # SQL_SUPPORTED_TRANSACTION_TRANSACTION (no savepoints)
        SqlInfo.FLIGHT_SQL_SERVER_CANCEL: True,
        SqlInfo.FLIGHT_SQL_SERVER_BULK_INGESTION: True,
        SqlInfo.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED: True,
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


# -- keys (DuckDB's constraints) -------------------------------------------------------------------------------

PRIMARY_KEYS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8()), pa.field("db_schema_name", pa.utf8()),
                                 pa.field("table_name", pa.utf8(), nullable=False),
                                 pa.field("column_name", pa.utf8(), nullable=False), pa.field("key_name", pa.utf8()),
                                 pa.field("key_sequence", pa.int32(), nullable=False)])
FOREIGN_KEYS_SCHEMA = pa.schema([
    pa.field("pk_catalog_name", pa.utf8()), pa.field("pk_db_schema_name", pa.utf8()),
    pa.field("pk_table_name", pa.utf8(), nullable=False), pa.field("pk_column_name", pa.utf8(), nullable=False),
    pa.field("fk_catalog_name", pa.utf8()), pa.field("fk_db_schema_name", pa.utf8()),
    pa.field("fk_table_name", pa.utf8(), nullable=False), pa.field("fk_column_name", pa.utf8(), nullable=False),
    pa.field("key_sequence", pa.int32(), nullable=False), pa.field("fk_key_name", pa.utf8()),
    pa.field("pk_key_name", pa.utf8()), pa.field("update_rule", pa.uint8(), nullable=False),
    pa.field("delete_rule", pa.uint8(), nullable=False)])
_NO_ACTION = 3  # UpdateDeleteRules.NO_ACTION: DuckDB refuses changes that break a foreign key, cascades nothing


def primary_keys(cur: duckdb.DuckDBPyConnection, catalog: str | None, schema: str | None, table: str) -> pa.Table:
    """The primary-key columns of ``table`` (one row per column, ``key_sequence`` from 1)."""
    rows = cur.sql(
        "SELECT database_name, schema_name, table_name, constraint_column_names, constraint_name "
        "FROM duckdb_constraints() WHERE constraint_type = 'PRIMARY KEY' AND table_name = $1 "
        "AND ($2::VARCHAR IS NULL OR database_name = $2) AND ($3::VARCHAR IS NULL OR schema_name = $3) "
        "ORDER BY 1, 2, 3, 5", params=[table, catalog, schema]).fetchall()
    out = [{"catalog_name": c, "db_schema_name": s, "table_name": t, "column_name": col, "key_name": name,
            "key_sequence": k} for c, s, t, cols, name in rows for k, col in enumerate(cols, 1)]
    return pa.Table.from_pylist(out, schema=PRIMARY_KEYS_SCHEMA)


def foreign_keys(cur: duckdb.DuckDBPyConnection, pk: tuple | None, fk: tuple | None) -> pa.Table:
    """Foreign-key column pairs: those referencing table ``pk`` (exported keys), those of table ``fk``
    (imported keys), or both (cross reference); each a (catalog, schema, table) with None for any."""
    pk_catalog, pk_schema, pk_table = pk or (None, None, None)
    fk_catalog, fk_schema, fk_table = fk or (None, None, None)
    rows = cur.sql(
        "SELECT f.database_name, f.schema_name, f.table_name, f.constraint_column_names, f.constraint_name, "
        "f.referenced_table, f.referenced_column_names, p.constraint_name "
        "FROM duckdb_constraints() f LEFT JOIN duckdb_constraints() p ON p.constraint_type = 'PRIMARY KEY' "
        "AND p.database_name = f.database_name AND p.schema_name = f.schema_name "
        "AND p.table_name = f.referenced_table "
        "WHERE f.constraint_type = 'FOREIGN KEY' "
        "AND ($1::VARCHAR IS NULL OR f.referenced_table = $1) AND ($2::VARCHAR IS NULL OR f.table_name = $2) "
        "AND ($3::VARCHAR IS NULL OR f.database_name = $3) AND ($4::VARCHAR IS NULL OR f.schema_name = $4) "
        "AND ($5::VARCHAR IS NULL OR f.database_name = $5) AND ($6::VARCHAR IS NULL OR f.schema_name = $6)",
        params=[pk_table, fk_table, pk_catalog, pk_schema, fk_catalog, fk_schema]).fetchall()
    out = [{"pk_catalog_name": c, "pk_db_schema_name": s, "pk_table_name": ref, "pk_column_name": pcol,
            "fk_catalog_name": c, "fk_db_schema_name": s, "fk_table_name": t, "fk_column_name": fcol,
            "key_sequence": k, "fk_key_name": fname, "pk_key_name": pname,
            "update_rule": _NO_ACTION, "delete_rule": _NO_ACTION}
           for c, s, t, fcols, fname, ref, pcols, pname in rows
           for k, (fcol, pcol) in enumerate(zip(fcols, pcols), 1)]
    order = ("fk_catalog_name", "fk_db_schema_name", "fk_table_name", "fk_key_name") if pk and not fk else (
        "pk_catalog_name", "pk_db_schema_name", "pk_table_name", "pk_key_name")
    out.sort(key=lambda r: tuple(r[k] or "" for k in order) + (r["key_sequence"],))
    return pa.Table.from_pylist(out, schema=FOREIGN_KEYS_SCHEMA)


# -- types (JDBC/ODBC's view of DuckDB's) ---------------------------------------------------------------------------

XDBC_TYPE_INFO_SCHEMA = pa.schema([
    pa.field("type_name", pa.utf8(), nullable=False), pa.field("data_type", pa.int32(), nullable=False),
    pa.field("column_size", pa.int32()), pa.field("literal_prefix", pa.utf8()),
    pa.field("literal_suffix", pa.utf8()),
    pa.field("create_params", pa.list_(pa.field("item", pa.utf8(), nullable=False))),
    pa.field("nullable", pa.int32(), nullable=False), pa.field("case_sensitive", pa.bool_(), nullable=False),
    pa.field("searchable", pa.int32(), nullable=False), pa.field("unsigned_attribute", pa.bool_()),
    pa.field("fixed_prec_scale", pa.bool_(), nullable=False), pa.field("auto_increment", pa.bool_()),
    pa.field("local_type_name", pa.utf8()), pa.field("minimum_scale", pa.int32()),
    pa.field("maximum_scale", pa.int32()), pa.field("sql_data_type", pa.int32(), nullable=False),
    pa.field("datetime_subcode", pa.int32()), pa.field("num_prec_radix", pa.int32()),
    pa.field("interval_precision", pa.int32())])

# DuckDB type: (XDBC data_type, column size, literal quote, create params, sql_data_type, subcode, radix)
# XdbcDataType numbers: BIT -7, TINYINT -6, SMALLINT 5, INTEGER 4, BIGINT -5, REAL 7, DOUBLE 8, DECIMAL 3,
# VARCHAR 12, VARBINARY -3, DATE 91, TIME 92, TIMESTAMP 93 (sql_data_type DATETIME 9 + subcode), INTERVAL 10
_XDBC_TYPES = {
    "BOOLEAN": (-7, 1, None, None, -7, None, None),
    "TINYINT": (-6, 3, None, None, -6, None, 10),
    "SMALLINT": (5, 5, None, None, 5, None, 10),
    "INTEGER": (4, 10, None, None, 4, None, 10),
    "BIGINT": (-5, 19, None, None, -5, None, 10),
    "FLOAT": (7, 24, None, None, 7, None, 2),
    "DOUBLE": (8, 53, None, None, 8, None, 2),
    "DECIMAL": (3, 38, None, ["precision", "scale"], 3, None, 10),
    "VARCHAR": (12, None, "'", None, 12, None, None),
    "BLOB": (-3, None, "'", None, -3, None, None),
    "DATE": (91, 10, "DATE '", None, 9, 1, None),
    "TIME": (92, 15, "TIME '", None, 9, 2, None),
    "TIMESTAMP": (93, 26, "TIMESTAMP '", None, 9, 3, None),
    "TIMESTAMP WITH TIME ZONE": (93, 32, "TIMESTAMPTZ '", None, 9, 5, None),
    "INTERVAL": (10, None, "INTERVAL '", None, 10, None, None),
}


def xdbc_type_info(data_type: int | None) -> pa.Table:
    """The SQL types this server's DuckDB takes, as JDBC/ODBC describe types (``data_type``: only that one)."""
    out = []
    for name, (code, size, quote_, params, sql_type, subcode, radix) in _XDBC_TYPES.items():
        if data_type is not None and code != data_type:
            continue
        text = name in ("VARCHAR",)
        out.append({"type_name": name, "data_type": code, "column_size": size, "literal_prefix": quote_,
                    "literal_suffix": "'" if quote_ else None, "create_params": params, "nullable": 1,
                    "case_sensitive": text, "searchable": 3 if text else 2,
                    "unsigned_attribute": False if radix else None, "fixed_prec_scale": False,
                    "auto_increment": False if radix else None, "local_type_name": name,
                    "minimum_scale": 0 if name == "DECIMAL" else None, "maximum_scale": 38 if name == "DECIMAL" else None,
                    "sql_data_type": sql_type, "datetime_subcode": subcode, "num_prec_radix": radix,
                    "interval_precision": None})
    out.sort(key=lambda r: (r["data_type"], r["type_name"]))
    return pa.Table.from_pylist(out, schema=XDBC_TYPE_INFO_SCHEMA)
