"""The grid's DuckDB database, locked down so that SQL from clients reaches tables only.

External access off (no reading, writing, globbing or attaching files by path, no COPY / EXPORT), extensions
neither installed nor loaded, a memory limit, then the configuration locked so that a client's ``SET`` cannot
undo any of it. Arrow tables registered on a cursor by the server itself still work (measured).
"""

from __future__ import annotations

import os

import duckdb
import pyarrow.flight as flight

DATABASE_FILE = "grid.duckdb"


def open_database(root: str, *, memory_limit: str = "4GB", threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """The durable, sandboxed DuckDB database ``<root>/grid.duckdb`` (created with ``root`` when missing)."""
    os.makedirs(root, exist_ok=True)
    config = {"enable_external_access": False, "autoinstall_known_extensions": False,
              "autoload_known_extensions": False, "memory_limit": memory_limit}
    if threads is not None:
        config["threads"] = threads
    con = duckdb.connect(os.path.join(root, DATABASE_FILE), config=config)
    con.execute("SET lock_configuration = true")
    return con


def one_line(exc: BaseException) -> str:
    """DuckDB's message without the caret diagram and hints it adds on the following lines."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def flight_error(exc: BaseException) -> flight.FlightError:
    """The Flight error a client sees for a failed statement: refusals by the sandbox as PERMISSION_DENIED,
    everything else DuckDB raised as a server error; DuckDB's one-line message either way, no traceback."""
    if isinstance(exc, flight.FlightError):
        return exc
    if isinstance(exc, duckdb.PermissionException) or "configuration has been locked" in str(exc):
        return flight.FlightUnauthorizedError(one_line(exc))
    if isinstance(exc, duckdb.InterruptException):
        return flight.FlightCancelledError(one_line(exc))
    if isinstance(exc, duckdb.OutOfMemoryException):
        return flight.FlightUnavailableError(one_line(exc))
    return flight.FlightServerError(one_line(exc))
