"""Versions of a dataset: one immutable JSON manifest per version under ``<root>/_tensorgrid/``.

A manifest lists every shard of its version (path relative to the root, rows, bytes, xxh3 checksum) and
the physical Arrow schema. Version N+1 is committed by creating ``vNNNNNNNNNN.json`` exclusively: a manifest
is never overwritten, so two writers racing for the same version cannot both win.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

import fsspec
import pyarrow as pa
import xxhash

from .. import fs as tgfs
from ..errors import CorruptManifestError, DatasetNotFoundError, UnsupportedFormatError, VersionExpiredError

META_DIR = "_tensorgrid"
DATA_DIR = "data"
# data/.spark-<txn>/, data/.ray-<txn>/ (a Spark or Ray write's staged shards: writer.write_staged),
# data/.stage-<key>/ (resumable inference's parts)
STAGING = re.compile(r"\.(?:spark|ray|stage)-[0-9a-f]{12}")
CLAIMS_DIR = "claims"  # under META_DIR: one file per transaction being committed or vacuumed
FORMAT = "tensorgrid/2"  # v2: a checksum over the manifest's content
_READABLE = {"tensorgrid/1": 1, "tensorgrid/2": 2}
_NAME = re.compile(r"^v(\d{10})\.json$")
EXPIRED_NAME = re.compile(r"^expired-v(\d{10})$")  # retention.py's markers, beside the manifests: one listing finds both
SHARD_NAME = re.compile(r"part-([0-9a-f]{12})-\d{5}\.parquet")
_SHARD_PATH = re.compile(DATA_DIR + "/" + SHARD_NAME.pattern)
_CHECKSUM = re.compile(r"xxh3_64:[0-9a-f]{16}")
# create/append/overwrite: tg.write; compact, delete, alter: upkeep that rewrites or re-describes existing
# rows as a new version (store/compaction.py, store/deletes.py, store/evolution.py): they add no rows
OPERATIONS = ("create", "append", "overwrite", "compact", "delete", "alter")
_ADDS_ALL = ("create", "overwrite")  # a version whose rows are all new


def checksum(data) -> str:
    """Checksum of a shard's bytes (xxh3: ~25 GB/s, so verifying on read costs little)."""
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)


def txn_of(path: str) -> str | None:
    """The transaction (one write) a shard file belongs to, from its name."""
    m = SHARD_NAME.fullmatch(tgfs.name(path))
    return m.group(1) if m else None


@dataclass(frozen=True)
class Shard:
    path: str  # relative to the dataset root
    rows: int
    bytes: int
    checksum: str
    row_group_rows: int = 0  # rows per Parquet row group (the last may hold fewer); 0 = unknown


@dataclass
class Manifest:
    version: int
    operation: str
    schema: pa.Schema  # physical (as stored in the shards)
    shards: list[Shard]
    added_rows: int
    timestamp: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="milliseconds"))
    format: str = FORMAT  # what the file said when read (a v1 manifest is rewritten as v2 by the next commit)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> bytes:
        body = {
            "format": FORMAT,
            "version": self.version,
            "timestamp": self.timestamp,
            "operation": self.operation,
            "added_rows": self.added_rows,
            "num_rows": self.num_rows,
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
            "schema_text": self.schema.to_string(show_schema_metadata=False),
            "shards": [[s.path, s.rows, s.bytes, s.checksum, s.row_group_rows] for s in self.shards],
        }
        body["checksum"] = _content_checksum(body)
        return json.dumps(body, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str, version: int | None = None) -> Manifest:
        """Parse and validate a manifest; ``version`` is the one its file name says. Any damage or
        inconsistency is CorruptManifestError naming the file; a newer format, UnsupportedFormatError."""
        try:
            return _parse(data, version)
        except _Invalid as e:
            raise CorruptManifestError(f"manifest {where} is corrupt or unreadable: {e}", [where]) from None
        except (ValueError, TypeError, RecursionError, OverflowError, OSError, pa.ArrowException) as e:
            raise CorruptManifestError(f"manifest {where} is corrupt or unreadable: {type(e).__name__}: {e}", [where]) from None
        except _NewerFormat as e:
            raise UnsupportedFormatError(f"manifest {where} has format {e}, written by a newer TensorGrid; this "
                                         f"version reads {sorted(_READABLE)}: upgrade tensorgrid") from None


class _Invalid(Exception):
    pass


class _NewerFormat(Exception):
    pass


def _content_checksum(body: dict) -> str:
    """xxh3 over the canonical JSON of every field but the checksum itself."""
    canon = json.dumps({k: v for k, v in body.items() if k != "checksum"}, sort_keys=True, separators=(",", ":"))
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(canon.encode())


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Invalid(what)


def _int(value, name: str, lo: int = 0) -> int:
    _need(type(value) is int and value >= lo, f"{name} must be an int >= {lo}, found {value!r}")
    return value


def _parse(data: bytes, expected_version: int | None) -> Manifest:
    m = json.loads(data)
    _need(isinstance(m, dict), f"expected a JSON object, found {type(m).__name__}")
    fmt = m.get("format")
    if fmt not in _READABLE:
        if isinstance(fmt, str) and re.fullmatch(r"tensorgrid/\d+", fmt) and int(fmt.split("/")[1]) > 2:
            raise _NewerFormat(fmt)
        raise _Invalid(f"unknown format {fmt!r}")
    keys = {"format", "version", "timestamp", "operation", "added_rows", "num_rows", "schema", "schema_text",
            "shards"} | ({"checksum"} if _READABLE[fmt] >= 2 else set())
    _need(set(m) == keys, f"fields {sorted(set(m) ^ keys)} are missing or unexpected")
    if _READABLE[fmt] >= 2:
        _need(m["checksum"] == _content_checksum(m), "its checksum does not match its content (bytes changed)")
    version = _int(m["version"], "version", 1)
    _need(expected_version is None or version == expected_version,
          f"it says version {version} but is the file of version {expected_version}")
    _need(m["operation"] in OPERATIONS, f"unknown operation {m['operation']!r}")
    _need((version == 1) == (m["operation"] == "create"), f"operation {m['operation']!r} at version {version}")
    _need(isinstance(m["timestamp"], str), "timestamp must be a string")
    datetime.fromisoformat(m["timestamp"])
    _need(isinstance(m["schema"], str) and isinstance(m["schema_text"], str), "schema must be a string")
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(m["schema"], validate=True)))
    _need(len(set(schema.names)) == len(schema.names), "the schema has duplicate column names")
    _need(isinstance(m["shards"], list), "shards must be a list")
    shards = [_shard(entry, i) for i, entry in enumerate(m["shards"])]
    _need(len({s.path for s in shards}) == len(shards), "a shard is listed twice")
    _check_order(shards)
    num_rows = _int(m["num_rows"], "num_rows")
    _need(num_rows == sum(s.rows for s in shards), f"num_rows {num_rows} is not the sum of its shards' rows")
    added = _int(m["added_rows"], "added_rows")
    _need(added <= num_rows and (m["operation"] not in _ADDS_ALL or added == num_rows),
          f"added_rows {added} does not fit a {m['operation']} of {num_rows} rows")
    return Manifest(version, m["operation"], schema, shards, added, m["timestamp"], fmt)


def _check_order(shards: list[Shard]) -> None:
    """A write's shards keep the order it numbered them in (0, 1, 2...): one listed before an earlier one of its
    write is damage. A rewrite (compact, delete: store/rewrite.py) may drop some of a write's shards and put
    its own between the rest, so a write's numbers may have gaps and its run may be split."""
    last: dict[str, int] = {}
    for s in shards:
        txn, seq = _txn_seq(s.path)
        _need(seq > last.get(txn, -1), f"shard {s.path} is out of its write's order")
        last[txn] = seq


def _txn_seq(path: str) -> tuple[str, int]:
    name = tgfs.name(path)
    return name[5:17], int(name[18:23])


def _shard(entry, i: int) -> Shard:
    _need(isinstance(entry, list) and len(entry) in (4, 5), f"shard entry {i} is not [path, rows, bytes, checksum, "
                                                              "row_group_rows]")
    path, rows, size, digest = entry[:4]
    _need(isinstance(path, str) and _SHARD_PATH.fullmatch(path) is not None,
          f"shard entry {i} has path {path!r}, not a shard of this dataset's {DATA_DIR}/ folder")
    _need(isinstance(digest, str) and _CHECKSUM.fullmatch(digest) is not None,
          f"shard entry {i} has checksum {digest!r}")
    rows, size = _int(rows, f"shard {path} rows"), _int(size, f"shard {path} bytes", 1)
    rg = _int(entry[4], f"shard {path} row_group_rows") if len(entry) > 4 else 0
    _need(rg <= max(rows, 1), f"shard {path} has row groups of {rg} rows but {rows} rows")
    return Shard(path, rows, size, digest, rg)


def manifest_path(root: str, version: int) -> str:
    return tgfs.join(root, META_DIR, f"v{version:010d}.json")


def is_dataset(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    return fs.isdir(tgfs.join(root, META_DIR))


def expired_path(root: str, floor: int) -> str:
    """The marker saying versions <= ``floor`` have expired (retention.py)."""
    return tgfs.join(root, META_DIR, f"expired-v{floor:010d}")


def scan(fs: fsspec.AbstractFileSystem, root: str) -> tuple[list[int], int]:
    """Every manifest on storage (expired ones too) and the expiry floor (versions <= it have expired), from
    one fresh listing (fsspec's directory cache could hide a new one). The newest manifest is never expired,
    whatever a marker says."""
    meta = tgfs.join(root, META_DIR)
    fs.invalidate_cache(meta)
    try:
        names = [tgfs.name(n) for n in fs.ls(meta, detail=False)]
    except FileNotFoundError:
        return [], 0
    versions = sorted(int(m.group(1)) for m in map(_NAME.match, names) if m)
    floor = max((int(m.group(1)) for m in map(EXPIRED_NAME.match, names) if m), default=0)
    return versions, min(floor, versions[-1] - 1 if versions else 0)


def list_versions(fs: fsspec.AbstractFileSystem, root: str, expired: bool = False) -> list[int]:
    """Every committed version not expired (with ``expired``: every manifest still on storage)."""
    versions, floor = scan(fs, root)
    return versions if expired else [v for v in versions if v > floor]


def expired_error(fs: fsspec.AbstractFileSystem, root: str, version: int, oldest: int | None) -> VersionExpiredError:
    kept = f"the oldest version kept is {oldest}" if oldest is not None else "no version is left"
    return VersionExpiredError(f"version {version} of {tgfs.to_url(fs, root)} has expired (retention: expire); "
                               f"{kept}")


def load(fs: fsspec.AbstractFileSystem, root: str, version: int | None = None, expired: bool = False) -> Manifest:
    """The manifest of ``version`` (default: the latest); an expired one is VersionExpiredError unless
    ``expired`` (a vacuum reads them while their shards are still protected)."""
    versions, floor = scan(fs, root)
    live = [v for v in versions if v > floor]
    if not live:
        raise DatasetNotFoundError(f"no dataset at {tgfs.to_url(fs, root)}")
    if version is None:
        version = live[-1]
    elif version not in (versions if expired else live):
        if 1 <= version <= floor:
            raise expired_error(fs, root, version, live[0])
        raise DatasetNotFoundError(f"{tgfs.to_url(fs, root)} has no version {version}; it has {live}")
    return read(fs, root, version)


def read(fs: fsspec.AbstractFileSystem, root: str, version: int) -> Manifest:
    """The manifest file of ``version``, without listing; gone and expired: VersionExpiredError."""
    path = manifest_path(root, version)
    try:
        data = fs.cat_file(path)
    except OSError as e:  # listed, yet gone, a folder, a dangling link...: never taken for "no such version"
        if isinstance(e, FileNotFoundError):
            versions, floor = scan(fs, root)
            if version <= floor:  # a vacuum removed it since the listing
                raise expired_error(fs, root, version, next((v for v in versions if v > floor), None)) from None
        where = tgfs.to_url(fs, path)
        raise CorruptManifestError(f"manifest {where} of version {version} cannot be read: "
                                   f"{getattr(e, 'strerror', None) or type(e).__name__}", [where]) from None
    return Manifest.from_json(data, tgfs.to_url(fs, path), version)


def commit(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> bool:
    """Publish a manifest; False if that version already exists (another writer won), or if the version
    it follows is gone: expired and vacuumed while this write ran, so this number may be one the vacuum
    freed (retention.py), and taking it would commit a version born expired."""
    v = manifest.version
    if v > 1 and not _exists(fs, manifest_path(root, v - 1)):
        return False
    if _before_create is not None:
        _before_create(fs, root, v)
    if not tgfs.create_exclusive(fs, manifest_path(root, v), manifest.to_json()):
        return False
    # a vacuum removes manifests oldest first: v - 1 still there means v was free, not freed
    if v > 1 and not _exists(fs, manifest_path(root, v - 1)) and v <= scan(fs, root)[1]:
        where = tgfs.to_url(fs, manifest_path(root, v))
        raise CorruptManifestError(f"version {v} of {tgfs.to_url(fs, root)} was committed, but is expired already: "
                                   "this commit was paused for longer than a vacuum's min_age_s, and its number was "
                                   "most likely one retention had freed, so its rows may be in no version; write the "
                                   "data again", [where])
    return True


# Test hook: called as _before_create(fs, root, version) between commit's check and its exclusive create.
_before_create = None


def _exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    fs.invalidate_cache(path.rsplit("/", 1)[0])  # a listing cached before a vacuum removed it
    return fs.exists(path)
