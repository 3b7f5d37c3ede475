"""The grid server: Arrow Flight SQL over a durable, sandboxed DuckDB database (no torch here)."""

from .grid import GridServer
from .sandbox import DATABASE_FILE

__all__ = ["GridServer", "DATABASE_FILE"]
