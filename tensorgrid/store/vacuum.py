"""Vacuum: delete the files no version references (shards of killed or failed writes, stale temporaries).

Why a committed version never loses a file, whatever the timing:
  * A manifest only names shards of the form ``data/part-<txn>-<seq>.parquet`` (the validator refuses
    anything else), so every file a version can reference belongs to a transaction ``txn``.
  * A writer publishes a manifest only while it holds the claim on its ``txn`` (claims.py), and only after
    checking, under the claim, that every one of its shards is still there with its size.
  * A vacuum deletes a transaction's files only while it holds the same claim, and only the files that no
    manifest names when listed *after* the claim was taken.
  Claims are created exclusively, so the writer's hold and the vacuum's hold never overlap. If the vacuum
  held it first, it deleted before the writer's check, which then fails: no manifest is published (the
  write raises ConflictError). If the writer held it first, its manifest was published before the vacuum
  took the claim, so the vacuum's listing sees it and keeps the files.
  The one timing assumption left is on a claim, not on a write: a claim older than ``claims.STALE_S``
  (or ``min_age_s`` if longer) is taken to be a dead process's and may be broken (exclusively, and only
  if it is still that claim: see claims.py); a writer re-checks its claim's token before publishing and
  its shards after, and a vacuum its token before deleting. ``min_age_s`` itself only spares writes in progress
  (their shards are not yet committed); it is not what keeps committed data safe.
Expired versions (retention.py) keep referencing their shards until their expiry is ``min_age_s`` old at
the vacuum's start; then the files only they named go, and their manifests: see retention.py for why.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict

import fsspec

from .. import fs as tgfs
from ..args import check_choice, check_number
from ..errors import DatasetNotFoundError, VersionExpiredError
from . import claims, manifest, retention
from .manifest import DATA_DIR, META_DIR, STAGING

# Test hook: called as _after_scan(fs, root) once the manifests have been read.
_after_scan = None


def vacuum(url: str, min_age_s: float = 600.0, delete_unknown: bool = False, storage_options: dict | None = None) -> dict:
    """Delete files under the dataset at ``url`` that no version references and that are older than
    ``min_age_s`` seconds (younger ones may belong to a write in progress). Also cleans a folder holding
    only an interrupted first write (no version yet). Files under ``data/`` that TensorGrid did not write
    (other names than its shards') are kept and listed in the result's ``unknown``, unless
    ``delete_unknown``. ``storage_options``: as ``tg.open`` takes them."""
    fs, root = tgfs.resolve(url, storage_options)
    if not manifest.is_dataset(fs, root):
        raise DatasetNotFoundError(f"no TensorGrid dataset at {url} (vacuum only cleans datasets it wrote)")
    return vacuum_root(fs, root, min_age_s, delete_unknown)


def vacuum_root(fs: fsspec.AbstractFileSystem, root: str, min_age_s: float = 600.0,
                delete_unknown: bool = False) -> dict:
    min_age_s = check_number("min_age_s", min_age_s, 0)
    delete_unknown = check_choice("delete_unknown", delete_unknown, (False, True))
    start = time.time()  # before the scan: a file must be old at the start to be a candidate
    cutoff = start - min_age_s
    versions = set(manifest.list_versions(fs, root, expired=True))
    held, dead = retention.split(fs, root, versions, cutoff)  # dead: expired before the cutoff
    referenced = _referenced(fs, root, held)
    if _after_scan is not None:
        _after_scan(fs, root)
    stale_before = start - max(min_age_s, claims.STALE_S)
    old_staging = _old_staging(fs, root, cutoff)  # before removing from them bumps their mtimes
    by_txn, loose, kept = _candidates(fs, root, referenced, cutoff, stale_before)
    unknown = [] if delete_unknown else [f for f in loose if not _ours(f[1])]
    removed, freed = _remove(fs, [f for f in loose if f not in unknown])
    for txn, files in by_txn.items():
        token = _claim(fs, root, txn, stale_before)
        if token is None:
            kept += len(files)  # a commit of these shards is under way
            continue
        try:
            newer = set(manifest.list_versions(fs, root, expired=True)) - versions  # listed after the claim
            versions |= newer
            referenced |= _referenced(fs, root, newer)
            if not claims.holds(fs, root, txn, token):  # broken meanwhile (only if we looked dead): skip
                kept += len(files)
                continue
            r, f = _remove(fs, [(p, rel, size) for p, rel, size in files if rel not in referenced])
            removed += r
            freed += f
        finally:
            claims.release(fs, root, txn, token)
    forgotten, f = retention.forget(fs, root, dead)
    removed += forgotten
    freed += f
    _break_stale_claims(fs, root, stale_before, set(by_txn))
    _remove_empty_staging(old_staging)
    return {"removed": len(removed), "bytes": freed, "kept_young": kept, "files": removed,
            "unknown": sorted(rel for _, rel, _ in unknown)}


def _ours(rel: str) -> bool:
    """Whether a file under the dataset is one TensorGrid writes: a shard, a staged file (a Spark write's, resumable inference's), or a
    temporary under the metadata folder (a user's file in data/ is none of these: vacuum keeps it)."""
    parts = rel.split("/")
    if parts[0] == META_DIR:
        return True
    return parts[0] == DATA_DIR and (
        (len(parts) == 2 and manifest.SHARD_NAME.fullmatch(parts[1]) is not None)
        or (len(parts) >= 3 and STAGING.fullmatch(parts[1]) is not None))


def _referenced(fs: fsspec.AbstractFileSystem, root: str, versions) -> set[str]:
    out: set[str] = set()
    for v in sorted(versions):
        try:
            out.update(s.path for s in manifest.load(fs, root, v, expired=True).shards)
        except VersionExpiredError:  # removed by a concurrent vacuum with a shorter min_age_s, which freed it
            continue
    return out


def _candidates(fs, root: str, referenced: set[str], cutoff: float, tmp_cutoff: float):
    """Unreferenced files older than ``cutoff``: shards grouped by transaction, and loose files (names no
    manifest can reference: stray files in data/; temporaries of manifests and claims older than
    ``tmp_cutoff``, since a commit in progress still links and unlinks its own) that need no claim."""
    by_txn: dict[str, list] = defaultdict(list)
    loose, young = [], 0
    prefix = root.rstrip("/") + "/"
    for sub in (DATA_DIR, META_DIR):
        try:
            entries = fs.find(tgfs.join(root, sub), detail=True)
        except FileNotFoundError:
            continue
        for path, info in entries.items():
            rel = path[len(prefix):] if path.startswith(prefix) else path
            name = tgfs.name(rel)
            if sub == DATA_DIR and rel in referenced:
                continue
            if sub == META_DIR and not name.startswith(".tmp-"):
                continue  # manifests, claims, the format marker
            if tgfs.mtime(info, cutoff) >= (tmp_cutoff if sub == META_DIR else cutoff):
                young += 1
                continue
            txn = manifest.txn_of(rel) if sub == DATA_DIR and "/" not in rel[len(DATA_DIR) + 1:] else None
            (by_txn[txn] if txn else loose).append((path, rel, int(info.get("size") or 0)))
    return by_txn, loose, young


def _claim(fs, root: str, txn: str, stale_before: float) -> str | None:
    """The vacuum's token on ``txn``'s claim, breaking a stale one (its holder died); None if it is held."""
    token = claims.take(fs, root, txn, "vacuum")
    if token is None and claims.break_if_stale(fs, root, txn, stale_before):
        token = claims.take(fs, root, txn, "vacuum")
    return token


def _break_stale_claims(fs, root: str, stale_before: float, done: set[str]) -> None:
    """Claims left by processes killed while holding them, on writes that have nothing left to vacuum."""
    for txn in claims.held(fs, root):
        if txn not in done:
            claims.break_if_stale(fs, root, txn, stale_before)


def _old_staging(fs, root: str, cutoff: float) -> list[str]:
    """The staging folders of failed writes (``data/.spark-<txn>/``, ``data/.stage-<key>/``) older than
    ``cutoff`` (a job under way makes its folder before its tasks write). Listed before the vacuum removes
    anything: removing files from a folder makes it look new. Object stores have no folders: none."""
    if not tgfs.is_local(fs):
        return []
    try:
        entries = fs.ls(tgfs.join(root, DATA_DIR), detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return [e["name"] for e in entries if e.get("type") == "directory" and STAGING.fullmatch(tgfs.name(e["name"]))
            and tgfs.mtime(e, cutoff) < cutoff]


def _remove_empty_staging(folders: list[str]) -> None:
    """``folders`` once no file is left in them: bottom-up, each folder only if empty (rmdir refuses one a
    writer just put a file into)."""
    for path in folders:
        for folder, _, _ in os.walk(path, topdown=False):  # the deepest first
            try:
                os.rmdir(folder)
            except OSError:  # not empty (a file left or just written), or gone
                pass


def _remove(fs, files) -> tuple[list[str], int]:
    removed, freed = [], 0
    for path, rel, size in files:
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            continue
        removed.append(rel)
        freed += size
    return removed, freed
