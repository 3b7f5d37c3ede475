"""Claims: the handshake between a commit and a vacuum over one write's shards.

A write (transaction ``txn``) names its shards ``data/part-<txn>-<seq>.parquet``. Before publishing a
manifest that names them, the writer creates ``_tensorgrid/claims/<txn>`` exclusively ("commit"); before
deleting them, a vacuum does the same ("vacuum"). Exclusive create lets only one hold the claim, so a
vacuum and a commit of the same shards never overlap: see ``vacuum.py`` for why no committed version
can lose a file.
"""

from __future__ import annotations

import json
import os
import socket
import time

import fsspec

from .. import fs as tgfs
from .manifest import CLAIMS_DIR, META_DIR

# A claim is held for one step (a commit: a stat per shard and one create; a vacuum: deleting one write's
# files). One older than this belonged to a process that died holding it, and may be broken.
STALE_S = 600.0


def path(root: str, txn: str) -> str:
    return tgfs.join(root, META_DIR, CLAIMS_DIR, txn)


def take(fs: fsspec.AbstractFileSystem, root: str, txn: str, holder: str) -> bool:
    """Claim ``txn`` for ``holder`` ("commit" or "vacuum"); False if someone else holds it."""
    body = json.dumps({"holder": holder, "time": time.time(), "pid": os.getpid(), "host": socket.gethostname()})
    return tgfs.create_exclusive(fs, path(root, txn), body.encode(), durable=False)


def release(fs: fsspec.AbstractFileSystem, root: str, txn: str) -> None:
    try:
        fs.rm_file(path(root, txn))
    except FileNotFoundError:
        pass


def taken_at(fs: fsspec.AbstractFileSystem, root: str, txn: str) -> float | None:
    """When the claim on ``txn`` was taken (None if nobody holds it; -inf if it is unreadable)."""
    try:
        return float(json.loads(fs.cat_file(path(root, txn)))["time"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError):
        return float("-inf")


def held(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every transaction currently claimed."""
    folder = tgfs.join(root, META_DIR, CLAIMS_DIR)
    fs.invalidate_cache(folder)
    try:
        return [tgfs.name(p) for p in fs.ls(folder, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
