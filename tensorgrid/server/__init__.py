"""The grid server: Arrow Flight SQL over a durable, sandboxed DuckDB database, store datasets held in memory
and served by partition (no torch here); ``connect`` is its Python client."""

from .client import Grid
from .cluster import connect
from .grid import GridServer
from .griddataset import (
    GridAuthenticationError,
    GridConnectionError,
    GridDataset,
    GridError,
    GridPermissionError,
    GridTimeoutError,
    SnapshotError,
)
from .sandbox import DATABASE_FILE

__all__ = ["GridServer", "DATABASE_FILE", "connect", "Grid", "GridDataset", "GridError", "GridConnectionError",
           "GridAuthenticationError", "GridPermissionError", "GridTimeoutError", "SnapshotError"]
