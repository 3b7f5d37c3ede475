"""``tg.write``: stream data into Parquet shards, then commit a new version's manifest atomically."""

from __future__ import annotations

import base64
import io
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .. import fs as tgfs
from ..args import check_choice, check_int
from ..errors import (
    ConflictError,
    CorruptShardError,
    DatasetExistsError,
    DatasetNotFoundError,
    EmptyDataError,
    ReadOnlyError,
    SchemaMismatchError,
    TensorGridError,
    UnsupportedDataError,
)
from . import claims, encoding, labels, manifest
from .convert import to_batches
from .manifest import DATA_DIR, Manifest, Shard

DEFAULT_SHARD_BYTES = 128 << 20
ROW_GROUP_BYTES = 8 << 20
MODES = ("create", "append", "overwrite")
MAX_SHARDS = 100_000  # a write's shards are numbered with 5 digits

# Test hook: called as _before_commit(fs, root, version) right before the manifest is published.
_before_commit = None


@lru_cache(maxsize=64)
def _parquet_options(schema: pa.Schema) -> dict:
    """Per-leaf-column options: big binary values (images, tensors) are stored plain, uncompressed and
    without statistics (min/max of 1 MB values would bloat the footer); everything else gets snappy and
    dictionaries."""
    sink = io.BytesIO()
    pq.write_table(schema.empty_table(), sink)
    leaves = [c.path for c in pq.ParquetFile(io.BytesIO(sink.getvalue())).schema]
    bulky = {f.name for f in schema if pa.types.is_fixed_size_binary(f.type) or pa.types.is_binary(f.type)}
    small = [p for p in leaves if p.split(".")[0] not in bulky]
    return {
        "compression": {p: ("none" if p.split(".")[0] in bulky else "snappy") for p in leaves},
        "use_dictionary": small,
        "write_statistics": small,
    }


def _encode_shard(table: pa.Table, row_group_rows: int) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=row_group_rows, store_schema=True,
                   **_parquet_options(table.schema))
    return sink.getvalue()


def _encoded(table: pa.Table) -> tuple[pa.Buffer, int]:
    """A physical table as a shard's bytes, with row groups of about ROW_GROUP_BYTES; and their rows."""
    row_bytes = max(1, table.nbytes // max(1, table.num_rows))
    rg_rows = max(1, min(table.num_rows, ROW_GROUP_BYTES // row_bytes))
    return _encode_shard(table, rg_rows), rg_rows


def write_part(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, sync_dir: bool = True) -> dict:
    """A logical table as one shard file at ``path``, written whole (a reader sees all of it or nothing),
    not committed; returns what a manifest says of it (rows, bytes, checksum, row_group_rows) and its
    physical schema (base64 IPC) so that parts written apart can be checked to agree."""
    physical = encoding.physical_schema(table.schema)
    data, rg_rows = _encoded(encoding.encode(table, physical))
    tgfs.put_atomic(fs, path, data, sync_dir)
    return {"rows": table.num_rows, "bytes": data.size, "checksum": manifest.checksum(data),
            "row_group_rows": rg_rows, "schema": base64.b64encode(physical.serialize().to_pybytes()).decode()}


def publish(fs: fsspec.AbstractFileSystem, root: str, staging: str, txn: str, parts: list[dict],
            moved: list[str], keep: bool = False) -> list[Shard]:
    """Rename staged shard files (``parts``: dicts with ``path`` relative to ``staging``, rows, bytes,
    checksum, row_group_rows, in the order the rows go) to ``data/part-<txn>-<seq>.parquet`` as the manifest
    requires; ``moved`` collects the new paths (for the caller's clean-up). ``keep``: the staged files stay
    (a hard link on local disks, a copy elsewhere), so a failed commit loses no staged work. Object stores
    copy inside the store, never through this process."""
    if len(parts) > MAX_SHARDS:
        raise UnsupportedDataError(f"the write would make {len(parts)} shards; a write holds at most {MAX_SHARDS}")
    plan = [(tgfs.join(staging, r["path"]), f"{DATA_DIR}/part-{txn}-{i:05d}.parquet") for i, r in enumerate(parts)]

    def rename(item: tuple[str, str]) -> None:
        src, rel = item
        dst = tgfs.join(root, rel)
        try:
            if tgfs.is_local(fs):
                (os.link if keep else os.rename)(src, dst)
            else:
                (fs.copy if keep else fs.mv)(src, dst)
        except FileNotFoundError:
            raise ConflictError(f"a staged shard of this write is gone ({src}): a vacuum with a min_age_s shorter "
                                "than the job removed it; nothing was committed: write the data again") from None
        moved.append(dst)

    if tgfs.is_local(fs):
        for item in plan:
            rename(item)
    else:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(rename, plan))
    return [Shard(rel, r["rows"], r["bytes"], r["checksum"], r["row_group_rows"]) for (_, rel), r in zip(plan, parts)]


def _split(batches: Iterator[pa.RecordBatch], max_rows: int | None, max_bytes: int) -> Iterator[list[pa.RecordBatch]]:
    """Group batches into shards of at most max_rows rows and about max_bytes bytes (in Arrow memory)."""
    pending: list[pa.RecordBatch] = []
    rows = nbytes = 0
    for batch in batches:
        while batch.num_rows:
            row_bytes = max(1, batch.nbytes // batch.num_rows)
            room = max(1, (max_bytes - nbytes) // row_bytes)
            if max_rows:
                room = min(room, max_rows - rows)
            take = batch.slice(0, room)
            batch = batch.slice(take.num_rows)
            pending.append(take)
            rows += take.num_rows
            nbytes += take.num_rows * row_bytes
            if (max_rows and rows >= max_rows) or nbytes >= max_bytes:
                yield pending
                pending, rows, nbytes = [], 0, 0
    if pending:
        yield pending


class _ShardWriter:
    """Encodes and uploads shards on a small thread pool, at most two in flight (bounded memory)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, physical: pa.Schema, make_dirs: bool = True):
        self.fs, self.root, self.physical, self.make_dirs = fs, root, physical, make_dirs
        self.txn = uuid.uuid4().hex[:12]
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.inflight: list[Future] = []
        self.shards: list[Shard] = []
        self.paths: list[str] = []
        self.committing = False  # set once a manifest naming these shards may exist: never delete them then
        self.seq = 0
        if not make_dirs:
            return
        try:
            fs.makedirs(tgfs.join(root, DATA_DIR), exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:  # data/ is a file: a damaged layout
            where = tgfs.to_url(fs, tgfs.join(root, DATA_DIR))
            raise CorruptShardError(f"{where} is damaged ({type(e).__name__}): it must be the folder of the "
                                    "dataset's shards", [where]) from None

    def add(self, batches: list[pa.RecordBatch]) -> None:
        table = pa.Table.from_batches([encoding.encode(b, self.physical) for b in batches], self.physical)
        rel = f"{DATA_DIR}/part-{self.txn}-{self.seq:05d}.parquet"
        self.seq += 1
        self.paths.append(tgfs.join(self.root, rel))
        while len(self.inflight) >= 2:
            self.shards.append(self.inflight.pop(0).result())
        self.inflight.append(self.pool.submit(self._write, table, rel))

    def _write(self, table: pa.Table, rel: str) -> Shard:
        data, rg_rows = _encoded(table)
        path = tgfs.join(self.root, rel)
        if tgfs.is_local(self.fs):
            if self.make_dirs:  # a concurrent failed first write may have removed it
                os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())  # a manifest naming it must never outlive it on a power loss
        else:
            self.fs.pipe_file(path, data.to_pybytes())
        return Shard(rel, table.num_rows, data.size, manifest.checksum(data), rg_rows)

    def finish(self) -> list[Shard]:
        try:
            for f in self.inflight:
                self.shards.append(f.result())
        finally:
            self.pool.shutdown(wait=True)
        return self.shards

    def missing(self) -> list[str]:
        """Shards of this write that are gone or changed size (a vacuum removed them): checked under the
        claim, right before the manifest is published."""
        out = []
        self.fs.invalidate_cache(tgfs.join(self.root, DATA_DIR))  # a cached listing would hide a deletion
        for shard in self.shards:
            path = tgfs.join(self.root, shard.path)
            try:
                size = os.stat(path).st_size if tgfs.is_local(self.fs) else self.fs.size(path)
            except FileNotFoundError:
                size = None
            if size != shard.bytes:
                out.append(shard.path)
        return out

    def sync(self) -> None:
        """Make the shards' directory entries durable (local disks) before a manifest names them."""
        if tgfs.is_local(self.fs):
            tgfs.fsync_dir(tgfs.join(self.root, DATA_DIR))

    def remove_files(self) -> None:
        """Delete every shard this write started (after ``finish``): a failed write leaves nothing."""
        for path in self.paths:
            try:
                self.fs.rm_file(path)
            except (FileNotFoundError, OSError):
                pass


def _same_schema(a: pa.Schema, b: pa.Schema) -> bool:
    """Equal as the user sees them: names, logical types (a tensor's dtype and shape live in its field
    metadata) and nullability; other metadata may differ."""
    return encoding.logical_schema(a).equals(encoding.logical_schema(b))


def _schema_diff(old: pa.Schema, new: pa.Schema) -> str:
    """The differences, in logical types (a tensor column as its tensor type, not its storage)."""
    old, new = encoding.logical_schema(old), encoding.logical_schema(new)
    old_t = {f.name: f.type for f in old}
    new_t = {f.name: f.type for f in new}
    parts = []
    for name in old.names:
        if name not in new_t:
            parts.append(f"missing column {name!r} ({old_t[name]})")
        elif not old_t[name].equals(new_t[name]):
            parts.append(f"column {name!r} is {new_t[name]}, dataset has {old_t[name]}")
        elif old.field(name).nullable != new.field(name).nullable:
            parts.append(f"column {name!r} is {'' if new.field(name).nullable else 'not '}nullable, in the dataset "
                         f"it is {'' if old.field(name).nullable else 'not '}nullable")
    parts += [f"extra column {n!r} ({new_t[n]})" for n in new.names if n not in old_t]
    if not parts and old.names != new.names:
        parts.append(f"column order {new.names} differs from {old.names}")
    return "; ".join(parts)


def _appended_schema(base: pa.Schema, new: pa.Schema, url: str) -> pa.Schema:
    """The schema of an append: the dataset's, with its field metadata kept, except the keys in TensorGrid's
    own namespace (``tensorgrid.*``, such as the class names of ``label_index``) that the new rows set:
    those describe the whole dataset as its newest writer knows it. Tensor types never change here. Class
    names only grow: rows that know fewer keep the dataset's, rows that disagree are refused (labels.py)."""
    fields = []
    for f in base:
        theirs = new.field(f.name).metadata if f.name in new.names else None
        ours = {k: v for k, v in (theirs or {}).items() if k.startswith(b"tensorgrid.") and k != encoding.TENSOR_KEY}
        if labels.NAMES_KEY in ours:
            ours[labels.NAMES_KEY] = labels.appended((f.metadata or {}).get(labels.NAMES_KEY), ours[labels.NAMES_KEY], url)
        fields.append(f.with_metadata({**(f.metadata or {}), **ours}) if ours else f)
    return pa.schema(fields, metadata=base.metadata)


def check_write_args(mode, shard_rows, shard_bytes) -> tuple[str, int | None, int | None]:
    """The options every write takes (also a Spark DataFrame's or a Ray Dataset's), checked."""
    return (check_choice("mode", mode, MODES), check_int("shard_rows", shard_rows, 1, none=True),
            check_int("shard_bytes", shard_bytes, 1, none=True))


def write(url: str, data, mode: str = "create", shard_rows: int | None = None,
          shard_bytes: int | None = None, expect_version: int | None = None):
    """Write ``data`` as a new version of the dataset at ``url`` and return it as a Dataset.

    mode: "create" (error if a dataset exists), "append" (adds rows; creates the dataset if missing) or
    "overwrite" (the new version holds only ``data``; older versions stay readable). ``expect_version``:
    commit only as the version after that one (0: none yet), else ConflictError (not retryable) and nothing
    written: a compare-and-swap, for a writer whose data was computed from that version.
    """
    mode, shard_rows, shard_bytes = check_write_args(mode, shard_rows, shard_bytes)
    fs, root, existed, base = _target(url, mode)
    _check_expected(url, base, expect_version)
    try:
        schema, batches = to_batches(data)
    except _ARROW_ERRORS as e:
        raise UnsupportedDataError(f"cannot store this data: {str(e).splitlines()[0]}") from None
    physical = encoding.physical_schema(schema)
    writer = _begin(fs, root, url, mode, base, physical)
    try:
        shards = _fill(writer, batches, shard_rows, shard_bytes)
        return _commit(fs, root, url, mode, base, physical, shards, writer)
    except ConflictError:
        raise  # its shards stay for .retry()
    except BaseException as e:
        _discard(fs, root, writer, base, existed)
        if isinstance(e, _ARROW_ERRORS):  # a type or value Parquet cannot hold: the user's data, named
            raise UnsupportedDataError(f"cannot store this data in Parquet: {str(e).splitlines()[0]}") from None
        raise


def _check_expected(url: str, base: Manifest | None, expect_version: int | None) -> None:
    if expect_version is not None and (base.version if base is not None else 0) != expect_version:
        raise ConflictError(f"{url} is at version {base.version if base is not None else 0}, not {expect_version}: "
                            "another writer committed since this data was read; nothing was written")


def write_with(url: str, mode: str, physical: pa.Schema, produce: Callable[[fsspec.AbstractFileSystem, str, str],
                                                                         list[Shard]], expect_version: int | None = None):
    """Commit shards written elsewhere (``write_staged``; inference parts) as a new version of ``url``,
    with ``write``'s checks, claim, conflict handling and clean-up. ``produce(fs, root, txn)`` returns the
    Shards it put at ``data/part-<txn>-<seq>.parquet`` (seq 0, 1, ...) and leaves no file if it raises.
    ``expect_version``: as ``write``'s."""
    check_choice("mode", mode, MODES)
    fs, root, existed, base = _target(url, mode)
    _check_expected(url, base, expect_version)
    writer = _begin(fs, root, url, mode, base, physical)
    writer.finish()  # its pool stays idle: produce writes the shards
    try:
        writer.shards = produce(fs, root, writer.txn)
        writer.paths = [tgfs.join(root, s.path) for s in writer.shards]
        if not writer.shards:
            raise EmptyDataError("no rows to write")
        return _commit(fs, root, url, mode, base, physical, writer.shards, writer)
    except ConflictError:
        raise  # its shards stay for .retry()
    except BaseException:
        _discard(fs, root, writer, base, existed)
        raise


def write_staged(url: str, mode: str, physical: pa.Schema, kind: str,
                 run: Callable[[str, str], list[dict]]):
    """Commit shards that tasks in other processes write (Spark's executors, Ray's tasks: store/spark.py,
    store/ray.py) as one new version of ``url``. ``run(staging_url, txn)`` has them written with
    ``write_shards`` into the staging folder ``data/.<kind>-<txn>/`` (its data/ made first: a task still
    running after a failed job cannot make it again) and returns their parts in row order (dicts: path
    relative to the staging folder, rows, bytes, checksum, row_group_rows); the driver renames them into
    this write's run and commits through ``write_with``. Staging is deleted on success and on failure."""

    def produce(fs, root: str, txn: str) -> list[Shard]:
        staging = tgfs.join(root, DATA_DIR, f".{kind}-{txn}")
        moved: list[str] = []
        try:
            fs.makedirs(tgfs.join(staging, DATA_DIR), exist_ok=True)
            return publish(fs, root, staging, txn, run(tgfs.to_url(fs, staging), txn), moved)
        except BaseException:
            _remove_paths(fs, moved)
            raise
        finally:
            _remove_staging(fs, staging)

    return write_with(url, mode, physical, produce)


def _remove_staging(fs, staging: str) -> None:
    """Delete the staging folder; again if a task still finishing made a file while it was being deleted."""
    for _ in range(50):
        tgfs.remove_tree(fs, staging)
        if not fs.exists(staging):
            return
        time.sleep(0.1)


def _remove_paths(fs, paths: list[str]) -> None:
    for p in paths:
        try:
            fs.rm_file(p)
        except (FileNotFoundError, OSError):
            pass


def write_shards(fs: fsspec.AbstractFileSystem, root: str, physical: pa.Schema, batches: Iterator[pa.RecordBatch],
                 shard_rows: int | None = None, shard_bytes: int | None = None) -> list[Shard]:
    """Write logical ``batches`` as shards under ``root``/data/ without committing them (a Spark task's
    partition on an executor, a Ray task's blocks: ``write_staged``); a failure deletes them. ``root``/data/
    must exist: a task still running after its job failed cannot recreate a folder the driver removed."""
    writer = _ShardWriter(fs, root, physical, make_dirs=False)
    try:
        return _fill(writer, batches, shard_rows, shard_bytes)
    except BaseException:
        writer.remove_files()
        raise


def check_target(url: str, mode: str) -> None:
    """Refuse a write to ``url`` with ``mode`` that ``write`` would refuse, before any work is done."""
    _target(url, mode)


def _target(url: str, mode: str) -> tuple[fsspec.AbstractFileSystem, str, bool, Manifest | None]:
    """Where a write goes (filesystem, root, whether it existed, latest version), refusing what it must."""
    fs, root = tgfs.resolve(url)
    existed = fs.exists(root)
    if not manifest.is_dataset(fs, root):
        if existed and not fs.isdir(root):
            raise DatasetExistsError(f"{url} is a file, not a dataset directory")
        _refuse_nested(fs, root, url)
        _refuse_foreign(fs, root, url)
    base = latest(fs, root)
    if mode == "create" and base is not None:
        raise DatasetExistsError(f"a dataset already exists at {url} (version {base.version}); "
                                 "use mode='append' or mode='overwrite'")
    return fs, root, existed, base


def _begin(fs, root: str, url: str, mode: str, base: Manifest | None, physical: pa.Schema) -> _ShardWriter:
    if mode == "append" and base is not None and not _same_schema(base.schema, physical):
        raise SchemaMismatchError(f"cannot append to {url}: {_schema_diff(base.schema, physical)}")
    if mode == "append" and base is not None:
        _appended_schema(base.schema, physical, url)  # class names that disagree: refused before any shard
    if base is None:
        mark_dataset(fs, root)
    return _ShardWriter(fs, root, physical)


def mark_dataset(fs: fsspec.AbstractFileSystem, root: str) -> None:
    """Mark a directory as a dataset before its first shard: orphans are then never taken for foreign
    Parquet, and vacuum cleans them."""
    fs.makedirs(tgfs.join(root, manifest.META_DIR), exist_ok=True)
    if not tgfs.is_local(fs):
        fs.pipe_file(tgfs.join(root, manifest.META_DIR, "format"), manifest.FORMAT.encode())


def _fill(writer: _ShardWriter, batches: Iterator[pa.RecordBatch], shard_rows: int | None,
          shard_bytes: int | None) -> list[Shard]:
    try:
        for group in _split(batches, shard_rows, shard_bytes or DEFAULT_SHARD_BYTES):
            writer.add(group)
    finally:
        shards = writer.finish()
    return shards


def _discard(fs, root: str, writer: _ShardWriter, base: Manifest | None, existed: bool) -> None:
    """After a failed write: its shards (and the folders a first write made) go."""
    if not writer.committing:  # else the outcome is unknown: the shards stay for vacuum
        writer.remove_files()
        if base is None:
            _remove_empty_dirs(fs, root, existed)


def _commit(fs, root: str, url: str, mode: str, base: Manifest | None, physical: pa.Schema, shards: list[Shard],
            writer: _ShardWriter):
    from .versioned import StoreDataset

    added = sum(s.rows for s in shards)
    writer.sync()

    def attempt(base: Manifest | None) -> StoreDataset:
        if mode == "create" and base is not None:
            raise DatasetExistsError(f"another writer created {url} first (version {base.version})")
        if mode == "append" and base is not None and not _same_schema(base.schema, physical):
            raise SchemaMismatchError(f"cannot append to {url}: {_schema_diff(base.schema, physical)}")
        kept = base.shards if (mode == "append" and base is not None) else []
        version = 1 if base is None else base.version + 1
        schema = _appended_schema(base.schema, physical, url) if (mode == "append" and base is not None) else physical
        new = Manifest(version, mode if base is not None else "create", schema, kept + shards, added)
        if _before_commit is not None:
            _before_commit(fs, root, version)
        if _publish(fs, root, url, new, writer):
            return StoreDataset(fs, root, new)
        if mode == "create":  # the loser of a create race: a retry could only fail
            writer.remove_files()
            raise DatasetExistsError(f"another writer created {url} at the same moment (version 1 is theirs); "
                                     "nothing of this write was kept: write again with mode='append' to add to it")
        raise ConflictError(
            f"another writer committed version {version} of {url} first; this write's {len(shards)} "
            f"shard(s) are kept: call .retry() on this error to commit them on the new latest version",
            retry=lambda: attempt(latest(fs, root)))

    return attempt(base)


def _publish(fs, root: str, url: str, new: Manifest, writer: _ShardWriter) -> bool:
    """Publish ``new`` under the claim on this write's transaction (see vacuum.py for why a vacuum can then
    never delete a shard a published manifest names); False if another writer has that version."""
    token = claims.take(fs, root, writer.txn, "commit")
    if token is None:
        raise ConflictError(f"a vacuum of {url} is deleting this write's shards (it ran with a min_age_s shorter "
                            "than the write took); nothing was committed: write the data again")
    taken = time.time()
    try:
        missing = writer.missing()
        if missing:
            raise ConflictError(f"a vacuum of {url} removed {len(missing)} of this write's shards ({missing[0]}, "
                                "...) before it committed; nothing was committed: write the data again")
        # a claim held this long may be taken for a dead writer's and broken: never publish without it
        if time.time() - taken > claims.STALE_S or not claims.holds(fs, root, writer.txn, token):
            raise ConflictError(f"committing to {url} stalled for over {claims.STALE_S:.0f} s (a vacuum may "
                                "take it for a dead writer's); nothing was committed: write the data again")
        writer.committing = True
        published = manifest.commit(fs, root, new)
        if published and writer.missing():  # paused past every check (SIGSTOP, a frozen VM): say so loudly
            where = tgfs.to_url(fs, manifest.manifest_path(root, new.version))
            raise CorruptShardError(f"version {new.version} of {url} was committed, but a vacuum removed some of "
                                    "its shards while this commit was paused for longer than "
                                    f"{claims.STALE_S:.0f} s: that version is unreadable; write the data again",
                                    [where])
        return published
    finally:
        claims.release(fs, root, writer.txn, token)


_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError)
_OWN_SHARD = re.compile(r"part-[0-9a-f]{12}-\d{5}\.parquet")


def _refuse_foreign(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """A directory that holds anything but a dataset's own (possibly orphaned) folders is not ours to
    write into: foreign Parquet/CSV is read-only, and a new manifest would hide the user's files."""
    try:
        entries = fs.ls(root, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        name = tgfs.name(entry)
        if name == manifest.META_DIR:
            continue
        if name == DATA_DIR and fs.isdir(entry) and all(  # shards and staging a failed write left
                _OWN_SHARD.fullmatch(tgfs.name(p)) or manifest.STAGING.fullmatch(tgfs.name(p))
                for p in fs.ls(entry, detail=False)):
            continue
        raise ReadOnlyError(f"{url} holds files that are not a TensorGrid dataset ({name!r}, ...); foreign "
                            "Parquet/CSV is opened read-only: write to a new or empty path")


def _refuse_nested(fs: fsspec.AbstractFileSystem, root: str, url: str) -> None:
    """No dataset inside another one's folders: its vacuum would delete it."""
    path = root.rstrip("/")
    while True:
        parent = posixpath.dirname(path)
        if not parent or parent == path:
            return
        if manifest.is_dataset(fs, parent):
            raise TensorGridError(f"{url} is inside the dataset {tgfs.to_url(fs, parent)}; write it elsewhere")
        path = parent


def _remove_empty_dirs(fs: fsspec.AbstractFileSystem, root: str, existed: bool) -> None:
    """After a failed first write: the folders it made, if nothing else has appeared in them."""
    if manifest.list_versions(fs, root):
        return  # another writer committed meanwhile
    meta, data = tgfs.join(root, manifest.META_DIR), tgfs.join(root, DATA_DIR)
    try:  # the marker only while no other writer has shards here (it keeps their orphans from looking foreign)
        if [tgfs.name(p) for p in fs.ls(meta, detail=False)] == ["format"] and \
                not (fs.exists(data) and fs.ls(data, detail=False)):
            fs.rm_file(tgfs.join(meta, "format"))
    except (FileNotFoundError, OSError):
        pass
    for d in [data, meta] + ([] if existed else [root]):
        try:
            if fs.exists(d) and not fs.ls(d, detail=False):
                fs.rmdir(d)
        except (FileNotFoundError, OSError):
            pass


def latest(fs: fsspec.AbstractFileSystem, root: str) -> Manifest | None:
    """The newest version's manifest, or None when there is none."""
    try:
        return manifest.load(fs, root)
    except DatasetNotFoundError:
        return None
