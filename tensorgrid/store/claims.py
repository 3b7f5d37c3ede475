"""Claims: the handshake between a commit and a vacuum over one write's shards.

A write (transaction ``txn``) names its shards ``data/part-<txn>-<seq>.parquet``. Before publishing a
manifest that names them, the writer creates ``_tensorgrid/claims/<txn>`` exclusively ("commit"); before
deleting them, a vacuum does the same ("vacuum"). Exclusive create lets only one hold the claim, so a
vacuum and a commit of the same shards never overlap: see ``vacuum.py`` for why no committed version
can lose a file. Each claim holds a random token, so a holder can tell its claim from a newer one, and
a stale claim (of a process that died holding it) is broken only under a second, exclusive breaker
claim, and only if it is still the very claim that was judged stale.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

import fsspec

from .. import fs as tgfs
from ..errors import CorruptManifestError
from .manifest import CLAIMS_DIR, META_DIR

# A claim is held for one step (a commit: a stat per shard and one create; a vacuum: deleting one write's
# files). One older than this belonged to a process that died holding it, and may be broken.
STALE_S = 600.0
BREAK = ".break"  # suffix of the breaker claim


def path(root: str, txn: str) -> str:
    return tgfs.join(root, META_DIR, CLAIMS_DIR, txn)


def take(fs: fsspec.AbstractFileSystem, root: str, txn: str, holder: str) -> str | None:
    """Claim ``txn`` for ``holder`` ("commit" or "vacuum"): its token, or None if someone else holds it."""
    token = uuid.uuid4().hex
    body = json.dumps({"holder": holder, "time": time.time(), "token": token, "pid": os.getpid(),
                       "host": socket.gethostname()})
    return token if _create(fs, root, path(root, txn), body.encode()) else None


def holds(fs: fsspec.AbstractFileSystem, root: str, txn: str, token: str) -> bool:
    """Whether the claim on ``txn`` is still the one taken with ``token``."""
    body = _read(fs, root, txn)
    return body is not None and _parse(body).get("token") == token


def release(fs: fsspec.AbstractFileSystem, root: str, txn: str, token: str | None = None) -> None:
    """Remove the claim on ``txn`` (only if it still holds ``token``, when one is given)."""
    if token is not None and not holds(fs, root, txn, token):
        return
    _remove(fs, path(root, txn))


def taken_at(fs: fsspec.AbstractFileSystem, root: str, txn: str) -> float | None:
    """When the claim on ``txn`` was taken (None if nobody holds it; -inf if it is unreadable)."""
    body = _read(fs, root, txn)
    return None if body is None else _time(body)


def break_if_stale(fs: fsspec.AbstractFileSystem, root: str, txn: str, stale_before: float) -> bool:
    """Remove the claim on ``txn`` if it was taken before ``stale_before`` (its holder died); True if a
    stale claim was removed. Breakers are serialised by an exclusive breaker claim, and the claim is
    removed only if it is still the one judged stale (not a fresh claim taken meanwhile)."""
    body = _read(fs, root, txn)
    if body is None or _time(body) >= stale_before:
        return False
    lock = path(root, txn) + BREAK
    if not _create(fs, root, lock, json.dumps({"time": time.time()}).encode()):
        lock_body = _read_path(fs, lock)
        if lock_body is not None and _time(lock_body) < stale_before:
            _remove(fs, lock)  # a breaker died holding it; the next vacuum breaks the claim
        return False
    try:
        if _read(fs, root, txn) != body:
            return False
        _remove(fs, path(root, txn))
        return True
    finally:
        _remove(fs, lock)


def held(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every transaction currently claimed."""
    folder = tgfs.join(root, META_DIR, CLAIMS_DIR)
    fs.invalidate_cache(folder)
    try:
        names = [tgfs.name(p) for p in fs.ls(folder, detail=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [n for n in names if not n.startswith(".") and not n.endswith(BREAK)]


def _create(fs, root: str, p: str, body: bytes) -> bool:
    try:
        return tgfs.create_exclusive(fs, p, body, durable=False)
    except (FileExistsError, NotADirectoryError, IsADirectoryError) as e:  # claims/ is not a folder
        where = tgfs.to_url(fs, tgfs.join(root, META_DIR, CLAIMS_DIR))
        raise CorruptManifestError(f"{where} is damaged ({type(e).__name__}): it must be a folder of claim "
                                   "files", [where]) from None


def _read(fs, root: str, txn: str) -> bytes | None:
    return _read_path(fs, path(root, txn))


def _read_path(fs, p: str) -> bytes | None:
    try:
        return fs.cat_file(p)
    except FileNotFoundError:
        return None
    except OSError:  # a folder or worse where a claim should be: treated as an unreadable claim
        return b""


def _parse(body: bytes) -> dict:
    try:
        d = json.loads(body)
        return d if isinstance(d, dict) else {}
    except ValueError:
        return {}


def _time(body: bytes) -> float:
    try:
        return float(_parse(body)["time"])
    except (KeyError, TypeError, ValueError):
        return float("-inf")


def _remove(fs, p: str) -> None:
    try:
        if fs.isdir(p):
            fs.rm(p, recursive=True)
        else:
            fs.rm_file(p)
    except FileNotFoundError:
        pass
