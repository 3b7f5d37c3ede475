"""The Arrow Flight SQL protocol messages (package ``arrow.flight.protocol.sql``), built at import time.

The messages are declared below by name, field number and type, the facts Arrow's ``format/FlightSql.proto``
defines, and turned into protobuf classes in a private descriptor pool: no protoc step, no generated code, and
no clash with another library that registers the same package in protobuf's default pool.
Commands, tickets and action bodies travel as ``google.protobuf.Any``: ``pack`` and ``unpack`` below.
"""

from __future__ import annotations

import enum

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

PACKAGE = "arrow.flight.protocol.sql"
TYPE_URL_PREFIX = "type.googleapis.com/"

_F = descriptor_pb2.FieldDescriptorProto
_SCALAR = {"string": _F.TYPE_STRING, "bytes": _F.TYPE_BYTES, "bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32,
           "int64": _F.TYPE_INT64, "uint32": _F.TYPE_UINT32}

# message -> [(field, number, type, label)]; label "" (plain proto3), "optional" (proto3 optional, has presence)
# or "repeated". A type that is not a scalar names a message or enum of this package.
_MESSAGES: dict[str, list[tuple[str, int, str, str]]] = {
    "CommandGetSqlInfo": [("info", 1, "uint32", "repeated")],
    "CommandGetXdbcTypeInfo": [("data_type", 1, "int32", "optional")],
    "CommandGetCatalogs": [],
    "CommandGetDbSchemas": [("catalog", 1, "string", "optional"),
                            ("db_schema_filter_pattern", 2, "string", "optional")],
    "CommandGetTables": [("catalog", 1, "string", "optional"), ("db_schema_filter_pattern", 2, "string", "optional"),
                         ("table_name_filter_pattern", 3, "string", "optional"),
                         ("table_types", 4, "string", "repeated"), ("include_schema", 5, "bool", "")],
    "CommandGetTableTypes": [],
    "CommandGetPrimaryKeys": [("catalog", 1, "string", "optional"), ("db_schema", 2, "string", "optional"),
                              ("table", 3, "string", "")],
    "CommandGetExportedKeys": [("catalog", 1, "string", "optional"), ("db_schema", 2, "string", "optional"),
                               ("table", 3, "string", "")],
    "CommandGetImportedKeys": [("catalog", 1, "string", "optional"), ("db_schema", 2, "string", "optional"),
                               ("table", 3, "string", "")],
    "CommandGetCrossReference": [("pk_catalog", 1, "string", "optional"), ("pk_db_schema", 2, "string", "optional"),
                                 ("pk_table", 3, "string", ""), ("fk_catalog", 4, "string", "optional"),
                                 ("fk_db_schema", 5, "string", "optional"), ("fk_table", 6, "string", "")],
    "ActionCreatePreparedStatementRequest": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", "optional")],
    "SubstraitPlan": [("plan", 1, "bytes", ""), ("version", 2, "string", "")],
    "ActionCreatePreparedSubstraitPlanRequest": [("plan", 1, "SubstraitPlan", ""),
                                                 ("transaction_id", 2, "bytes", "optional")],
    "ActionCreatePreparedStatementResult": [("prepared_statement_handle", 1, "bytes", ""),
                                            ("dataset_schema", 2, "bytes", ""), ("parameter_schema", 3, "bytes", ""),
                                            ("is_update", 4, "bool", "optional")],
    "ActionClosePreparedStatementRequest": [("prepared_statement_handle", 1, "bytes", "")],
    "ActionBeginTransactionRequest": [],
    "ActionBeginSavepointRequest": [("transaction_id", 1, "bytes", ""), ("name", 2, "string", "")],
    "ActionBeginTransactionResult": [("transaction_id", 1, "bytes", "")],
    "ActionBeginSavepointResult": [("savepoint_id", 1, "bytes", "")],
    "ActionEndTransactionRequest": [("transaction_id", 1, "bytes", ""), ("action", 2, "int32", "")],
    "ActionEndSavepointRequest": [("savepoint_id", 1, "bytes", ""), ("action", 2, "int32", "")],
    "CommandStatementQuery": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", "optional")],
    "CommandStatementSubstraitPlan": [("plan", 1, "SubstraitPlan", ""), ("transaction_id", 2, "bytes", "optional")],
    "TicketStatementQuery": [("statement_handle", 1, "bytes", "")],
    "CommandPreparedStatementQuery": [("prepared_statement_handle", 1, "bytes", "")],
    "CommandStatementUpdate": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", "optional")],
    "CommandPreparedStatementUpdate": [("prepared_statement_handle", 1, "bytes", "")],
    "CommandStatementIngest": [("table_definition_options", 1, "CommandStatementIngest.TableDefinitionOptions", ""),
                               ("table", 2, "string", ""), ("schema", 3, "string", "optional"),
                               ("catalog", 4, "string", "optional"), ("temporary", 5, "bool", ""),
                               ("transaction_id", 6, "bytes", "optional"),
                               ("options", 1000, "map<string,string>", "repeated")],
    # a nested message comes after its parent; enums travel as int32 (the same varint on the wire):
    # TableNotExistOption and TableExistsOption below
    "CommandStatementIngest.TableDefinitionOptions": [("if_not_exist", 1, "int32", ""), ("if_exists", 2, "int32", "")],
    "DoPutUpdateResult": [("record_count", 1, "int64", "")],
    "DoPutPreparedStatementResult": [("prepared_statement_handle", 1, "bytes", "optional")],
    "ActionCancelQueryRequest": [("info", 1, "bytes", "")],
    "ActionCancelQueryResult": [("result", 1, "int32", "")],
    # Flight's own (package arrow.flight.protocol, sent raw in Action.body, not in an Any); a FlightInfo
    # message has the wire form of bytes
    "CancelFlightInfoRequest": [("info", 1, "bytes", "")],
    "CancelFlightInfoResult": [("status", 1, "int32", "")],
}


class TableNotExistOption(enum.IntEnum):
    UNSPECIFIED = 0
    CREATE = 1
    FAIL = 2


class TableExistsOption(enum.IntEnum):
    UNSPECIFIED = 0
    FAIL = 1
    APPEND = 2
    REPLACE = 3


class CancelStatus(enum.IntEnum):
    """Flight's CancelStatus (the same numbers as Flight SQL's ActionCancelQueryResult.CancelResult)."""

    UNSPECIFIED = 0
    CANCELLED = 1
    CANCELLING = 2
    NOT_CANCELLABLE = 3


class SqlInfo(enum.IntEnum):
    """The SqlInfo codes this server answers (a subset of the protocol's enum, same numbers)."""

    FLIGHT_SQL_SERVER_NAME = 0
    FLIGHT_SQL_SERVER_VERSION = 1
    FLIGHT_SQL_SERVER_ARROW_VERSION = 2
    FLIGHT_SQL_SERVER_READ_ONLY = 3
    FLIGHT_SQL_SERVER_SQL = 4
    FLIGHT_SQL_SERVER_SUBSTRAIT = 5
    FLIGHT_SQL_SERVER_TRANSACTION = 8
    FLIGHT_SQL_SERVER_CANCEL = 9
    FLIGHT_SQL_SERVER_BULK_INGESTION = 10
    FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED = 11
    FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT = 100
    FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT = 101
    SQL_DDL_CATALOG = 500
    SQL_DDL_SCHEMA = 501
    SQL_DDL_TABLE = 502
    SQL_IDENTIFIER_CASE = 503
    SQL_IDENTIFIER_QUOTE_CHAR = 504
    SQL_QUOTED_IDENTIFIER_CASE = 505


class SqlCaseSensitivity(enum.IntEnum):
    UNKNOWN = 0
    CASE_INSENSITIVE = 1
    UPPERCASE = 2
    LOWERCASE = 3


def _add_field(msg: descriptor_pb2.DescriptorProto, name: str, number: int, kind: str, label: str) -> None:
    field = msg.field.add(name=name, number=number, json_name=name)
    field.label = _F.LABEL_REPEATED if label == "repeated" else _F.LABEL_OPTIONAL
    if kind.startswith("map<"):  # a map is a repeated nested *Entry message with key = 1, value = 2
        key, value = kind[4:-1].split(",")
        entry = msg.nested_type.add(name="".join(p.title() for p in name.split("_")) + "Entry")
        entry.options.map_entry = True
        _add_field(entry, "key", 1, key, "")
        _add_field(entry, "value", 2, value, "")
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{msg.name}.{entry.name}"
    elif kind in _SCALAR:
        field.type = _SCALAR[kind]
    else:
        field.type, field.type_name = _F.TYPE_MESSAGE, f".{PACKAGE}.{kind}"
    if label == "optional":  # proto3 `optional`: a synthetic one-field oneof gives the field presence
        field.proto3_optional = True
        field.oneof_index = len(msg.oneof_decl)
        msg.oneof_decl.add(name=f"_{name}")


def _build() -> dict[str, type]:
    file = descriptor_pb2.FileDescriptorProto(name="tensorgrid/flight_sql.proto", package=PACKAGE, syntax="proto3")
    protos: dict[str, descriptor_pb2.DescriptorProto] = {}
    for full in _MESSAGES:
        outer, _, inner = full.partition(".")
        msg = (protos[outer].nested_type.add(name=inner) if inner else file.message_type.add(name=outer))
        protos[full] = msg
    for full, fields in _MESSAGES.items():
        for name, number, kind, label in fields:
            _add_field(protos[full], name, number, kind, label)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {full: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{full}"))
            for full in _MESSAGES}


MESSAGES: dict[str, type] = _build()
globals().update({name: cls for name, cls in MESSAGES.items() if "." not in name})


class ProtocolError(ValueError):
    """Bytes that are not the Flight SQL message expected here (a malformed ticket, command or action body)."""


def pack(message) -> bytes:
    """``message`` wrapped in a serialized ``google.protobuf.Any`` (how Flight SQL sends commands and tickets)."""
    wrapped = any_pb2.Any()
    wrapped.Pack(message, type_url_prefix=TYPE_URL_PREFIX)
    return wrapped.SerializeToString()


def unpack(data: bytes):
    """The Flight SQL message inside serialized ``Any`` bytes; ``ProtocolError`` when they are not one."""
    wrapped = any_pb2.Any()
    try:
        wrapped.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"not a Flight SQL message (google.protobuf.Any expected): {exc}") from None
    url = wrapped.type_url
    prefix = TYPE_URL_PREFIX + PACKAGE + "."
    name = url[len(prefix):] if url.startswith(prefix) else None
    cls = MESSAGES.get(name) if name else None
    if cls is None:
        raise ProtocolError(f"unknown Flight SQL message type {url[:120]!r}")
    return parse(cls, wrapped.value)


def parse(cls, data: bytes):
    """``cls`` parsed from raw bytes; ``ProtocolError`` when they do not parse."""
    message = cls()
    try:
        message.ParseFromString(bytes(data))
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"malformed {cls.DESCRIPTOR.name}: {exc}") from None
    return message
