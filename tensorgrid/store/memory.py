"""In-memory datasets: an Arrow table (``tg.from_arrow``, SQL results) split into shards of slices."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import xxhash

from ..errors import CorruptShardError, ReadOnlyError, UnsupportedDataError
from . import encoding
from .dataset import Dataset


class ArrowDataset(Dataset):
    """An Arrow table in memory, split into shards of about ``shard_bytes``."""

    def __init__(self, table: pa.Table, url: str = "memory-table", shard_bytes: int = 64 << 20):
        table = table.replace_schema_metadata(None) if table.schema.metadata else table
        self._table = encoding.decode(table)
        self.url = url
        rows = self._table.num_rows
        row_bytes = max(1, self._table.nbytes // max(1, rows))
        step = max(1, shard_bytes // row_bytes)
        self._bounds = [(s, min(step, rows - s)) for s in range(0, rows, step)]
        self._fingerprint: str | None = None

    @property
    def schema(self) -> pa.Schema:
        return self._table.schema

    @property
    def shard_rows(self) -> list[int]:
        return [n for _, n in self._bounds]

    @property
    def size_bytes(self) -> int:
        return self._table.nbytes

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        t = self._table.slice(self._bounds[shard][0] + start, stop - start)  # zero copy
        return t.select(columns) if columns is not None else t

    def bytes_per_row(self) -> float:
        return max(1.0, self._table.nbytes / max(1, self._table.num_rows))

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        start, n = self._bounds[i]
        t = self._table.slice(start, n)
        if filter is not None:
            t = t.filter(filter)
        return t.select(columns) if columns is not None else t

    def to_arrow(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        columns = self.check_columns(columns)
        self._check_filter(filter)
        t = self._table if filter is None else self._table.filter(filter)
        return t.select(columns) if columns is not None else t

    @property
    def fingerprint(self) -> str:
        """A digest of the table's rows as Arrow IPC (only the rows, also of a slice of a bigger table),
        streamed through xxh3 in bounded memory; computed once."""
        if self._fingerprint is None:
            self._fingerprint = "arrow:" + table_digest(self._table, repr(self._bounds))
        return self._fingerprint

    def verify(self) -> dict:
        try:
            self._table.validate(full=True)
        except (pa.ArrowInvalid, pa.ArrowException) as e:
            raise CorruptShardError(f"the in-memory table is invalid: {str(e).splitlines()[0]}", [self.url]) from None
        return {"shards": self.num_shards, "bytes": self._table.nbytes, "rows": self.num_rows}

    def _arrow_source(self):
        return encoding.encode(self._table, encoding.physical_schema(self._table.schema))

    def vacuum(self, min_age_s: float = 600.0) -> dict:
        raise ReadOnlyError("an in-memory dataset has no files to vacuum")


def from_arrow(table: pa.Table | pa.RecordBatch | pa.RecordBatchReader) -> ArrowDataset:
    """Wrap Arrow data as an in-memory Dataset (no copy)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    elif isinstance(table, pa.RecordBatchReader):
        table = table.read_all()
    elif not isinstance(table, pa.Table):
        raise UnsupportedDataError(f"from_arrow takes a pyarrow Table, RecordBatch or reader, got {type(table).__name__}")
    return ArrowDataset(table)


def table_digest(table: pa.Table, salt: str = "") -> str:
    """xxh3 (hex) of ``salt`` then the table's rows as an Arrow IPC stream, hashed as written: bounded memory,
    and only the rows (a slice of a bigger table digests like a table of those rows)."""
    h = xxhash.xxh3_64(salt.encode())

    class Sink:  # a file-like object that hashes what the IPC writer writes
        closed = False

        def write(self, data):
            h.update(data)
            return len(data)

        def flush(self):
            pass

    with pa.ipc.new_stream(pa.PythonFile(Sink(), mode="w"), table.schema) as w:
        w.write_table(table)
    return h.hexdigest()
