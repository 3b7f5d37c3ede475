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
from ..errors import CorruptShardError, DatasetNotFoundError

META_DIR = "_tensorgrid"
DATA_DIR = "data"
FORMAT = "tensorgrid/1"
_NAME = re.compile(r"^v(\d{10})\.json$")


def checksum(data) -> str:
    """Checksum of a shard's bytes (xxh3: ~25 GB/s, so verifying on read costs little)."""
    return "xxh3_64:" + xxhash.xxh3_64_hexdigest(data)


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

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> bytes:
        return json.dumps({
            "format": FORMAT,
            "version": self.version,
            "timestamp": self.timestamp,
            "operation": self.operation,
            "added_rows": self.added_rows,
            "num_rows": self.num_rows,
            "schema": base64.b64encode(self.schema.serialize().to_pybytes()).decode(),
            "schema_text": self.schema.to_string(show_schema_metadata=False),
            "shards": [[s.path, s.rows, s.bytes, s.checksum, s.row_group_rows] for s in self.shards],
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> Manifest:
        try:
            m = json.loads(data)
            if not isinstance(m, dict):
                raise ValueError(f"expected a JSON object, found {type(m).__name__}")
            if m.get("format") != FORMAT:
                raise ValueError(f"unknown format {m.get('format')!r}")
            schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(m["schema"])))
            shards = [Shard(s[0], int(s[1]), int(s[2]), s[3], int(s[4]) if len(s) > 4 else 0) for s in m["shards"]]
            return cls(int(m["version"]), m["operation"], schema, shards, int(m["added_rows"]), m["timestamp"])
        except (ValueError, KeyError, TypeError, pa.ArrowInvalid) as e:
            raise CorruptShardError(f"manifest {where} is unreadable: {e}", [where]) from None


def manifest_path(root: str, version: int) -> str:
    return tgfs.join(root, META_DIR, f"v{version:010d}.json")


def is_dataset(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    return fs.isdir(tgfs.join(root, META_DIR))


def list_versions(fs: fsspec.AbstractFileSystem, root: str) -> list[int]:
    try:
        names = fs.ls(tgfs.join(root, META_DIR), detail=False)
    except FileNotFoundError:
        return []
    found = (_NAME.match(tgfs.name(n)) for n in names)
    return sorted(int(m.group(1)) for m in found if m)


def load(fs: fsspec.AbstractFileSystem, root: str, version: int | None = None) -> Manifest:
    versions = list_versions(fs, root)
    if not versions:
        raise DatasetNotFoundError(f"no dataset at {tgfs.to_url(fs, root)}")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise DatasetNotFoundError(f"{tgfs.to_url(fs, root)} has no version {version}; it has {versions}")
    path = manifest_path(root, version)
    return Manifest.from_json(fs.cat_file(path), tgfs.to_url(fs, path))


def commit(fs: fsspec.AbstractFileSystem, root: str, manifest: Manifest) -> bool:
    """Publish a manifest; False if that version already exists (another writer won)."""
    return tgfs.create_exclusive(fs, manifest_path(root, manifest.version), manifest.to_json())
