"""Versioned store datasets: a version of a dataset written by ``tg.write``, its Parquet shards listed
in a manifest with sizes and checksums, verified on read."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from .. import fs as tgfs
from ..errors import CorruptManifestError, CorruptShardError, VersionExpiredError
from . import encoding, evolution, manifest, remote
from .dataset import _PARSE_ERRORS, Dataset, _arrow_fs, _cached_handle, _provided, _threads, decode_row_range
from .manifest import Manifest, Shard

_verified: set[tuple] = set()
_verified_lock = threading.Lock()


def _fresh_lock() -> None:  # a forked child: a lock another thread held at the fork would never be released
    global _verified_lock
    _verified_lock = threading.Lock()


os.register_at_fork(after_in_child=_fresh_lock)


@dataclass(frozen=True)
class VersionInfo:
    version: int
    timestamp: str
    operation: str
    rows: int
    added_rows: int
    shards: int


class StoreDataset(Dataset):
    """A version of a dataset written by ``tg.write``: Parquet shards listed in a manifest with checksums."""

    zero_copy_reads = False  # every read decodes Parquet into new buffers

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, m: Manifest):
        self.fs, self.root, self._m = fs, root, m
        self.url = tgfs.to_url(fs, root)
        self.version = m.version
        self._schema = evolution.visible(encoding.logical_schema(m.schema))  # an alter's history kept out
        self._fingerprint: str | None = None
        self._schema_key = hash(m.schema)  # a verified shard is re-checked under a manifest of another schema

    @classmethod
    def open(cls, url: str, version: int | None = None) -> StoreDataset:
        fs, root = tgfs.resolve(url)
        return cls(fs, root, manifest.load(fs, root, version))

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    @property
    def shards(self) -> list[Shard]:
        return list(self._m.shards)

    @property
    def shard_rows(self) -> list[int]:
        return [s.rows for s in self._m.shards]

    def shard_urls(self) -> list[str]:
        return [tgfs.to_url(self.fs, tgfs.join(self.root, s.path)) for s in self._m.shards]

    @property
    def size_bytes(self) -> int:
        return sum(s.bytes for s in self._m.shards)

    # --- the loader's contract: row groups are the blocks, read through the verified buffer ------
    def blocks(self) -> list[tuple[int, int, int]]:
        out = []
        for i, s in enumerate(self._m.shards):
            rg = s.row_group_rows or s.rows
            out += [(i, a, min(a + rg, s.rows)) for a in range(0, s.rows, max(1, rg))]
        return out

    def read_rows(self, shard: int, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        pf = _cached_handle(self, shard, lambda: pq.ParquetFile(pa.BufferReader(self._shard_buffer(self._m.shards[shard]))))
        older = evolution.earlier_layout(self._m.schema, pf)
        if older is not None:  # written before an alter: read through this version's schema
            return self._as_listed(older.read_range(pf, start, stop, columns))
        return self._as_listed(decode_row_range(pf, start, stop, columns, like=self._m.schema))

    def _as_listed(self, table: pa.Table) -> pa.Table:
        """``table`` with the manifest's field metadata: a shard's footer keeps what its write knew (an
        append since may have added class names), the manifest what the version holds. No copy."""
        fields = [self._schema.field(n) if n in self._schema.names else f for n, f in zip(table.schema.names, table.schema)]
        if all(f.metadata == g.metadata for f, g in zip(fields, table.schema)):
            return table
        schema = pa.schema([g.with_metadata(f.metadata) if f.metadata else g.remove_metadata()
                            for f, g in zip(fields, table.schema)], metadata=table.schema.metadata)
        return pa.Table.from_arrays(table.columns, schema=schema)

    def bytes_per_row(self) -> float:
        """Uncompressed bytes per row from the first shard's footer (a tail read: one GET when remote)."""
        n = max(1, self.num_rows)
        if not self._m.shards:
            return 1.0
        first = self._m.shards[0]
        try:
            if tgfs.is_local(self.fs):
                with self.fs.open(tgfs.join(self.root, first.path), "rb") as f:
                    md = pq.read_metadata(f)
            else:
                self.fs = remote.here(self.fs)
                md = remote.footer(self.fs, tgfs.join(self.root, first.path), first.bytes)
        except (OSError, pa.ArrowInvalid):  # a damaged shard is reported by the verified read itself
            md = None
        if md is not None and md.num_rows:
            return max(1.0, sum(md.row_group(i).total_byte_size for i in range(md.num_row_groups)) / md.num_rows)
        return max(1.0, self.size_bytes / n)

    @property
    def is_remote(self) -> bool:
        return not tgfs.is_local(self.fs)

    def cache_key(self, shard: int) -> str | None:
        s = self._m.shards[shard]
        return s.checksum.replace(":", "-") + f"-{s.bytes}" + evolution.cache_suffix(self._m.schema)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_handles", None)  # open files never cross a fork or a spawn
        return state

    @property
    def fingerprint(self) -> str:
        """A digest of the schema and every shard's rows and checksum: the content, whatever its URL."""
        if self._fingerprint is None:
            h = xxhash.xxh3_64(self._m.schema.serialize().to_pybytes())
            for s in self._m.shards:
                h.update(f"{s.rows}:{s.checksum};".encode())
            self._fingerprint = "store:" + h.hexdigest()
        return self._fingerprint

    @property
    def added_rows(self) -> int:
        """Rows this version added (all of them for a create or an overwrite)."""
        return self._m.added_rows

    def versions(self) -> list[VersionInfo]:
        out = []
        for v in manifest.list_versions(self.fs, self.root):  # expired versions are not listed
            try:
                m = self._m if v == self._m.version else manifest.read(self.fs, self.root, v)
            except VersionExpiredError:  # expired and vacuumed since the listing
                continue
            out.append(VersionInfo(m.version, m.timestamp, m.operation, m.num_rows, m.added_rows, len(m.shards)))
        return out

    def _check(self, shard: Shard, data, where: str) -> None:
        size = data.size if isinstance(data, pa.Buffer) else len(data)
        if size != shard.bytes:
            raise CorruptShardError(f"shard {where} has {size} bytes, the manifest says {shard.bytes}", [where])
        if manifest.checksum(data) != shard.checksum:
            raise CorruptShardError(f"shard {where} fails its checksum (bytes changed on storage)", [where])
        self._check_footer(shard, data, where)

    def _check_footer(self, shard: Shard, data, where: str) -> None:
        """The shard's own footer must agree with the manifest's rows and column types: a manifest edited
        consistently (its checksum recomputed) still cannot make a shard read as other data."""
        try:
            meta = pq.read_metadata(pa.BufferReader(data))
            theirs = meta.schema.to_arrow_schema()
        except _PARSE_ERRORS as e:
            raise CorruptShardError(f"shard {where} cannot be decoded: {e}", [where]) from None
        if meta.num_rows != shard.rows:
            raise CorruptManifestError(f"the manifest of {self.url} version {self.version} says shard {where} holds "
                                       f"{shard.rows} rows; the shard holds {meta.num_rows}", [where])
        if evolution.layout_of(self._m.schema, theirs) is None:  # nor any earlier schema an alter left
            raise CorruptManifestError(f"the manifest of {self.url} version {self.version} gives another schema "
                                       f"than shard {where} holds", [where])

    def _shard_buffer(self, shard: Shard, force: bool = False) -> pa.Buffer:
        """The shard's bytes, size- and checksum-checked (local files memory-mapped, checked once per process
        while their size and mtime stay the same)."""
        path = tgfs.join(self.root, shard.path)
        where = tgfs.to_url(self.fs, path)
        if tgfs.is_local(self.fs):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                raise CorruptShardError(f"shard {where} is missing", [where]) from None
            except OSError as e:  # e.g. data/ replaced by a file
                raise CorruptShardError(f"shard {where} cannot be read: {e.strerror or e}", [where]) from None
            if st.st_size != shard.bytes:
                raise CorruptShardError(f"shard {where} has {st.st_size} bytes, the manifest says {shard.bytes}",
                                        [where])
            buf = pa.memory_map(path).read_buffer() if st.st_size else pa.py_buffer(b"")
            key = (path, st.st_size, st.st_mtime_ns, shard.checksum, shard.rows, self._schema_key)
            if force or key not in _verified:
                self._check(shard, buf, where)
                with _verified_lock:
                    if len(_verified) > 100_000:
                        _verified.clear()
                    _verified.add(key)
            return buf
        self.fs = remote.here(self.fs)  # a forked loader worker: an async filesystem of its own
        try:  # concurrent ranged GETs of the size the manifest gives (store/remote.py), then the whole checksum
            buf = remote.fetch(self.fs, path, shard.bytes)
        except FileNotFoundError:
            raise CorruptShardError(f"shard {where} is missing", [where]) from None
        except remote.WrongSize as e:
            raise CorruptShardError(f"shard {where} has {e.actual} bytes, the manifest says {shard.bytes}",
                                    [where]) from None
        self._check(shard, buf, where)
        return buf

    def _read_only_shard(self, columns: list[str] | None, filter: pc.Expression | None) -> pa.Table:
        return self.read_shard(0, columns, filter, parallel=filter is None)  # one shard: split its row groups

    def read_shard(self, i: int, columns: list[str] | None = None, filter: pc.Expression | None = None,
                   parallel: bool = False) -> pa.Table:
        shard = self._m.shards[i]
        buf = self._shard_buffer(shard)
        try:
            older = evolution.earlier_layout(self._m.schema, buf)
            if older is not None:  # written before an alter: read through this version's schema
                return self._as_listed(older.read(buf, columns, filter))
            if filter is None:  # the direct reader: ~1 ms less per shard than the dataset machinery
                pf = pq.ParquetFile(pa.BufferReader(buf))
                groups = pf.metadata.num_row_groups
                if parallel and groups > 1:  # Parquet decodes columns in parallel, not row groups: split them
                    with ThreadPoolExecutor(min(groups, _threads())) as pool:
                        parts = list(pool.map(lambda g: pq.ParquetFile(pa.BufferReader(buf)).read_row_group(
                            g, columns=columns), range(groups)))
                    table = pa.concat_tables(parts)
                else:
                    table = pf.read(columns=columns)
            else:
                table = pq.read_table(pa.BufferReader(buf), columns=columns, filters=filter, schema=self._m.schema)
        except _PARSE_ERRORS as e:
            where = tgfs.to_url(self.fs, tgfs.join(self.root, shard.path))
            raise CorruptShardError(f"shard {where} cannot be decoded: {e}", [where]) from None
        return self._as_listed(encoding.decode(table, like=self._m.schema))

    def verify(self) -> dict:
        bad, nbytes = [], 0
        for shard in self._m.shards:
            try:
                buf = self._shard_buffer(shard, force=True)
                pq.read_metadata(pa.BufferReader(buf))  # the footer parses
                nbytes += shard.bytes
            except CorruptShardError as e:
                bad.append((e.shards[0], str(e)))
            except _PARSE_ERRORS as e:
                where = tgfs.to_url(self.fs, tgfs.join(self.root, shard.path))
                bad.append((where, f"shard {where} cannot be decoded: {e}"))
        if bad:
            lines = "\n  ".join(msg for _, msg in bad)
            raise CorruptShardError(f"{len(bad)} of {len(self._m.shards)} shards of {self.url} "
                                    f"(version {self.version}) are corrupt:\n  {lines}", [w for w, _ in bad])
        return {"shards": len(self._m.shards), "bytes": nbytes, "rows": self.num_rows}

    def _arrow_source(self):
        # checksums first (cached per process), then DuckDB reads the files; an alter's older shards renamed
        layouts = [evolution.earlier_layout(self._m.schema, self._shard_buffer(shard)) for shard in self._m.shards]
        paths = [tgfs.join(self.root, s.path) for s in self._m.shards]
        return evolution.sql_source(self._m.schema, paths, layouts, _arrow_fs(self.fs))

    def vacuum(self, min_age_s: float = 600.0, delete_unknown: bool = False) -> dict:
        """Delete files that no version references (shards of killed or failed writers).

        Files younger than ``min_age_s`` are kept: they may belong to a writer still at work. Committed
        versions never lose a file, whatever the timing (see ``store/vacuum.py``). Files in ``data/`` that
        TensorGrid did not write are kept and listed in ``unknown`` unless ``delete_unknown``.
        """
        from .vacuum import vacuum_root

        return vacuum_root(self.fs, self.root, min_age_s, delete_unknown)

    def expire(self, *, keep_last: int | None = None, older_than=None) -> dict:
        """Expire old versions: all but the ``keep_last`` newest, or those committed more than ``older_than``
        ago (a ``timedelta``, seconds, or an aware ``datetime``); never the latest. Time travel to them then
        raises VersionExpiredError, and ``vacuum`` frees their shards once ``min_age_s`` has passed since
        (see ``store/retention.py``). Returns ``{"expired": [...], "kept": [...]}`` (version numbers)."""
        from .retention import expire_root

        return expire_root(self.fs, self.root, keep_last, older_than)

    #: Rows the ``delete`` that returned this dataset removed (None on datasets no delete returned).
    deleted_rows: int | None = None

    def compact(self, target_shard_bytes: int = 128 << 20) -> StoreDataset:
        """Merge runs of consecutive small shards of the latest version into shards of about
        ``target_shard_bytes`` (in memory, as ``tg.write``'s shard_bytes) as a new version ("compact"); big
        shards are kept as they are; the rows and their order are unchanged. Nothing to merge: the latest
        version, no new one. See ``store/compaction.py`` (loader states, races)."""
        return _provided("compact")(self, target_shard_bytes)  # store/compaction.py (registered: no circle)

    def delete(self, where) -> StoreDataset:
        """A new version ("delete") of the latest one without the rows where ``where`` holds (an SQL condition
        or a pyarrow compute expression, as ``filter`` takes); its ``deleted_rows`` says how many. No row
        matches: the latest version, no new one. Copy-on-write: see ``store/deletes.py``."""
        return _provided("delete")(self, where)  # store/deletes.py

    def alter(self, add: dict | None = None, widen: dict | None = None, rename: dict | None = None,
              expect_version: int | None = None) -> StoreDataset:
        """Change the latest version's schema as a new version ("alter"), no data rewritten: ``add`` nullable
        columns at the end ({name: type}), ``widen`` numeric columns losslessly ({name: wider type}), ``rename``
        columns ({old: new}); types as pyarrow types or names ("float32"). Shards written before are read
        through the new schema (added columns null). Anything else is SchemaMismatchError; see
        ``store/evolution.py``."""
        from .evolution import alter

        return StoreDataset(self.fs, self.root, alter(self.fs, self.root, self.url, add, widen, rename, expect_version))

    @property
    def altered(self) -> bool:
        """Whether an alter changed this version's schema (shards written before it hold an earlier one)."""
        return evolution.has_history(self._m.schema)

