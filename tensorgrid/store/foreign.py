"""Plain Parquet and CSV opened in place (read-only, no copy): Spark or DuckDB output, exports, globs."""

from __future__ import annotations

import os
import re
import stat

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import xxhash

from .. import fs as tgfs
from ..errors import (
    CorruptShardError,
    DatasetNotFoundError,
    ReadOnlyError,
    SchemaMismatchError,
    UnsupportedFormatError,
)
from . import encoding
from .dataset import _PARSE_ERRORS, Dataset, _arrow_fs, _cached_handle, decode_row_range

PARQUET_EXT = (".parquet", ".parq", ".pq")
CSV_EXT = (".csv", ".tsv", ".csv.gz", ".tsv.gz", ".csv.bz2")


def _hidden(path: str, root: str) -> bool:
    rel = path[len(root):].lstrip("/") if path.startswith(root) else path.rsplit("/", 1)[-1]
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _format_of(path: str, fs: fsspec.AbstractFileSystem) -> str | None:
    low = path.lower()
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(CSV_EXT):
        return "csv"
    try:
        with fs.open(path, "rb") as f:
            head = f.read(4)
    except (OSError, ValueError):
        return None
    return "parquet" if head == b"PAR1" else None


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def find_files(url: str) -> tuple[fsspec.AbstractFileSystem, str, list[str]]:
    """The data files at a path, directory (recursive, hidden and _-prefixed entries skipped) or glob,
    and their common format. Raises when there are none or the format is not Parquet or CSV."""
    fs, path = tgfs.resolve(url)
    if tgfs.is_local(fs) and fs.exists(path) and not fs.isdir(path) and not _regular(path):
        raise UnsupportedFormatError(f"{url} is not a regular file (a FIFO, socket or device): nothing to read")
    if fsspec.core.has_magic(path):
        candidates = sorted(p for p in fs.glob(path) if fs.isfile(p))
    elif fs.isdir(path):
        candidates = sorted(p for p in fs.find(path) if not _hidden(p, path))
    elif fs.isfile(path):
        candidates = [path]
    else:
        raise DatasetNotFoundError(f"no dataset, Parquet or CSV at {url}")
    if tgfs.is_local(fs):  # a FIFO, socket or device would block or fail a reader: never opened
        candidates = [p for p in candidates if _regular(p)]
    if not candidates:
        raise DatasetNotFoundError(f"no files at {url}")
    formats = {p: _format_of(p, fs) for p in candidates}
    parquet = [p for p, f in formats.items() if f == "parquet"]
    csv = [p for p, f in formats.items() if f == "csv"]
    if parquet and not csv:
        return fs, "parquet", parquet
    if csv and not parquet:
        return fs, "csv", csv
    if parquet and csv:
        raise UnsupportedFormatError(f"{url} mixes Parquet ({len(parquet)} files) and CSV ({len(csv)} files); "
                                     "open one of them with a glob")
    sample = ", ".join(candidates[:3])
    raise UnsupportedFormatError(f"{url} holds neither Parquet nor CSV (e.g. {sample}); "
                                 "TensorGrid opens datasets, Parquet and CSV in place (ingest other data with "
                                 "`tensorgrid ingest`)")


_HIVE = re.compile(r"^[^=/]+=[^/]*$")


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether pyarrow reads a column of type ``src`` as ``dst`` (numeric widths, units, nulls...). Text
    into another type would be parsed value by value, and fail on the first that is not a number."""
    text = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary, pa.types.is_large_binary)
    if any(t(src) for t in text) and not any(t(dst) for t in text):
        return False
    try:
        pa.array([], src).cast(dst)
        return True
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return False


class ForeignDataset(Dataset):
    """Parquet or CSV files read in place through pyarrow.dataset; each file is a shard."""

    zero_copy_reads = False  # every read decodes the files into new buffers

    def __init__(self, url: str):
        fs, fmt, files = find_files(url)
        self.fs, self.format, self.files = fs, fmt, files
        self.url = url
        self.version = None
        fs_, base = tgfs.resolve(url)
        options: dict = {}
        if fmt == "csv" and all(p.lower().endswith((".tsv", ".tsv.gz")) for p in files):
            options["format"] = pads.CsvFileFormat(parse_options=pacsv.ParseOptions(delimiter="\t"))
        if fs_.isdir(base) and any(_HIVE.match(part) for p in files for part in p[len(base):].split("/")[:-1]):
            # Hive-style folders (key=value/...): the keys are columns, as Spark and DuckDB wrote them
            options.update(partitioning="hive", partition_base_dir=base)
        try:
            self._ds = pads.dataset(files, **{"format": fmt, **options}, filesystem=_arrow_fs(fs))
            self._fragments = list(self._ds.get_fragments())
            self.partition_columns = set(self._ds.schema.names) - set(self._fragments[0].physical_schema.names) \
                if options.get("partitioning") else set()
        except _PARSE_ERRORS as e:
            raise UnsupportedFormatError(f"cannot read {url} as {fmt}: {e}") from None
        self._schema = encoding.logical_schema(self._ds.schema)
        self._rows: list[int] | None = None
        self._checked: set[int] = set()

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    @property
    def shard_rows(self) -> list[int]:
        if self._rows is None:  # Parquet: from footers; CSV: needs one scan
            self._rows = [self._guard(i, lambda f: f.count_rows()) for i, f in enumerate(self._fragments)]
        return self._rows

    def shard_urls(self) -> list[str]:
        return [tgfs.to_url(self.fs, p) for p in self.files]

    @property
    def size_bytes(self) -> int:
        return sum(self.fs.size(p) for p in self.files)

    # --- the loader's contract: Parquet row groups are the blocks; a CSV file is one ------------
    def blocks(self) -> list[tuple[int, int, int]]:
        if self.format != "parquet" or self.partition_columns:  # CSV, Hive folders: a file is read whole
            return [(i, 0, n) for i, n in enumerate(self.shard_rows) if n]
        out = []
        for i, frag in enumerate(self._fragments):
            self._guard(i, lambda f: f.ensure_complete_metadata())
            a = 0
            for rg in frag.row_groups:
                if rg.num_rows:
                    out.append((i, a, a + rg.num_rows))
                a += rg.num_rows
        return out

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        if self.format != "parquet" or self.partition_columns:  # Hive keys are added by pyarrow.dataset
            return super().read_rows(shard, start, stop, columns)
        pf = _cached_handle(self, shard, lambda: self._guard(
            shard, lambda f: pq.ParquetFile(self.files[shard], filesystem=self._ds.filesystem)))
        return self._guard(shard, lambda f: decode_row_range(pf, start, stop, columns))

    def bytes_per_row(self) -> float:
        return max(1.0, self.size_bytes / max(1, self.num_rows) * (3 if self.format == "csv" else 1))

    @property
    def is_remote(self) -> bool:
        return not tgfs.is_local(self.fs)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_handles", None)
        return state

    def cache_key(self, shard: int) -> str | None:
        """Local Parquet files (the loader's Arrow cache keeps them): a digest of the file's absolute path,
        size, mtime and footer bytes and of the schema they are read as. Foreign files carry no checksums, so
        a rewrite keeping size, mtime and footer alike would go unseen; any other change gives a new key."""
        if self.format != "parquet" or self.partition_columns or not tgfs.is_local(self.fs):
            return None
        try:
            path = os.path.abspath(self.files[shard])
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                f.seek(max(0, st.st_size - 8))
                n = int.from_bytes(f.read(4), "little")
                f.seek(max(0, st.st_size - 8 - n))
                footer = f.read(n)
        except OSError:
            return None  # unreadable now: read (and fail) through the contract, uncached
        h = xxhash.xxh3_64(f"{path}|{st.st_size}|{st.st_mtime_ns}|".encode())
        h.update(footer)
        h.update(self._schema.serialize().to_pybytes())
        return f"files-{h.hexdigest()}-{st.st_size}"

    @property
    def fingerprint(self) -> str:
        """Foreign files carry no checksums: a digest of each file's absolute path, size and mtime."""
        h = xxhash.xxh3_64(self._ds.schema.serialize().to_pybytes())
        for path in self.files:
            info = self.fs.info(path)
            h.update(f"{path}:{info.get('size')}:{info.get('mtime') or info.get('LastModified') or ''};".encode())
        return "files:" + h.hexdigest()

    def _guard(self, i: int, fn):
        if i not in self._checked:
            self._check_columns_of(i)
        try:
            return fn(self._fragments[i])
        except _PARSE_ERRORS as e:
            where = tgfs.to_url(self.fs, self.files[i])
            raise CorruptShardError(f"{where} cannot be read as {self.format}: {e}", [where]) from None

    def _check_columns_of(self, i: int) -> None:
        """Files of one foreign dataset must have the same columns (pyarrow would silently take the first
        file's and fill the others' with nulls)."""
        try:
            names = self._fragments[i].physical_schema.names
        except _PARSE_ERRORS as e:
            where = tgfs.to_url(self.fs, self.files[i])
            raise CorruptShardError(f"{where} cannot be read as {self.format}: {e}", [where]) from None
        expected = [n for n in self._ds.schema.names if n not in self.partition_columns]
        first, this = tgfs.to_url(self.fs, self.files[0]), tgfs.to_url(self.fs, self.files[i])
        if sorted(names) != sorted(expected):
            raise SchemaMismatchError(f"{this} has columns {names}, but {first} has {expected}: "
                                      "files read as one dataset must share their columns")
        mine = self._fragments[i].physical_schema
        for name in names:
            a, b = self._ds.schema.field(name).type, mine.field(name).type
            if not a.equals(b) and not _castable(b, a):
                raise SchemaMismatchError(f"column {name!r} is {b} in {this} but {a} in {first}: "
                                          "files read as one dataset must share their column types")
        self._checked.add(i)

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        table = self._guard(i, lambda f: f.to_table(schema=self._ds.schema, columns=columns, filter=filter))
        return encoding.decode(table)

    def to_arrow(self, columns: list[str] | None = None, filter: pc.Expression | None = None) -> pa.Table:
        columns = self.check_columns(columns)
        self._check_filter(filter)
        for i in range(len(self._fragments)):
            self._guard(i, lambda f: None)
        try:
            table = self._ds.to_table(columns=columns, filter=filter)
        except _PARSE_ERRORS as e:
            raise CorruptShardError(f"{self.url} cannot be read as {self.format}: {e}", self.files) from None
        return encoding.decode(table)

    def verify(self) -> dict:
        """Foreign files carry no checksums: check that every file parses end to end."""
        bad = []
        for i in range(len(self._fragments)):
            try:
                self._guard(i, lambda f: f.to_table(schema=self._ds.schema))
            except CorruptShardError as e:
                bad.append((e.shards[0] if e.shards else tgfs.to_url(self.fs, self.files[i]), str(e)))
        if bad:
            raise CorruptShardError(f"{len(bad)} of {len(self.files)} files are unreadable:\n  " +
                                    "\n  ".join(msg for _, msg in bad), [url for url, _ in bad])
        return {"shards": len(self.files), "bytes": sum(self.fs.size(p) for p in self.files), "rows": self.num_rows}

    def _arrow_source(self):
        return self._ds

    def vacuum(self, min_age_s: float = 600.0) -> dict:
        raise ReadOnlyError(f"{self.url} is foreign data opened in place; TensorGrid does not modify it")
