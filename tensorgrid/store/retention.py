"""Retention: ``expire(keep_last=N | older_than=...)`` retires old versions, then ``vacuum`` frees the shards
only they referenced.

Expiring writes one marker, ``_tensorgrid/expired-vNNNNNNNNNN`` (created exclusively, never rewritten), which
says "every version <= N has expired" and holds the time of the expiry. Expired versions are a prefix of the
history, so one marker per expire call says it all: a killed expire has written it whole or not at all, two
expires racing for the same N create one marker (the other finds it there), and two with different N leave
both (the higher rules). The marker sits beside the manifests, so the one listing that finds the versions
(``manifest.scan``) finds it too: expiry costs a reader no extra request. Expire never deletes anything.
``manifest.list_versions``/``load`` hide a version <= the highest marker (``load`` says VersionExpiredError,
naming the oldest version kept); the markers stay, so time travel keeps saying "expired" after the vacuum
removed the manifests.

Why expiring never costs a committed version or a reader a file (extending vacuum.py's argument):
  * The latest version is never expired. ``expire`` picks N below the newest version of a fresh listing, and
    versions only grow, so N is below every version committed since, whatever the timing (a concurrent
    commit is never expired; ``manifest.scan`` also caps the floor below the newest manifest, whatever a
    marker says). The vacuum never removes the newest manifest, so writers always find the latest.
  * A freed number is never taken again. The vacuum removes expired manifests, so a writer whose base
    version B went stale during a long write (B+1, B+2 committed, all but the newest expired and vacuumed)
    could create ``v(B+1)`` exclusively again: a version born expired, its rows in none. So a commit of V
    first checks that manifest V-1 is still there (``manifest.commit``; else it is a ConflictError whose
    retry commits on the latest): the vacuum removes a dead prefix oldest first, so V's manifest is gone
    only after V-1's. After its create, a commit checks V-1 again: still there, V was free, not freed. Gone
    (a commit paused between check and create for longer than it takes others to commit, expire and wait
    a vacuum's ``min_age_s``) and V is expired: a loud CorruptManifestError, never a silent loss.
  * A commit names the shards of the version it was based on (an append keeps them) only when that version
    is the latest at publish time (else the exclusive create of its number fails: ConflictError), so a
    new manifest never names shards that only a dead version still protects.
  * A reader that opened version k a moment before it expired may still be reading its shards: a vacuum
    takes k for dead only once its expiry is older than ``min_age_s`` when the vacuum starts (the expiry's
    time: the later of the marker's own clock and its storage mtime; a shard's own mtime may be a year
    old). Until then the vacuum treats k's manifest as referencing its shards, like any live version's. So
    a reader of a version that expires has ``min_age_s`` from the expiry to finish (the same timing bound
    that spares writes in progress; readers of live versions have no bound).
  * Dead manifests are not read: the vacuum's references are those of live and recently expired versions,
    plus (under each write's claim, as before) every manifest that appeared since its scan, expired or not.
    The files only dead versions named are removed under the same claims as any unreferenced shard, then
    the dead manifests themselves, then markers made redundant (a lower floor once no manifest at or below
    it is left: the highest one keeps answering "expired"). A vacuum killed between those steps leaves
    expired manifests or orphaned shards that the next one removes; a vacuum that finds a manifest it
    still protects removed by a concurrent one with a shorter ``min_age_s`` skips it (that vacuum freed it).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import socket
import time
from datetime import datetime, timedelta, timezone

import fsspec

from .. import fs as tgfs
from ..args import check_int
from ..errors import ArgumentError, DatasetNotFoundError, VersionExpiredError
from . import manifest
from .manifest import META_DIR

# Test hooks: _before_mark(fs, root, floor) once the versions to expire are chosen, before the marker exists;
# _before_forget(fs, root, dead) in a vacuum once shards are removed, before the dead manifests are.
_before_mark = None
_before_forget = None

_AGE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhd]?)\s*", re.IGNORECASE)
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def expire(url: str, *, keep_last: int | None = None, older_than=None, storage_options: dict | None = None) -> dict:
    """Expire old versions of the dataset at ``url``: all but the ``keep_last`` newest, or those committed
    more than ``older_than`` ago (a ``timedelta``, seconds, or an aware ``datetime``: before it); exactly one
    of the two. The latest version is never expired. Time travel to an expired version raises
    VersionExpiredError; ``vacuum`` frees the shards only expired versions referenced, once ``min_age_s``
    has passed since the expiry (readers that opened one before may still be at work). Returns
    ``{"expired": [versions this call expired], "kept": [versions kept]}``."""
    keep_last, cutoff = check_args(keep_last, older_than)
    fs, root = tgfs.resolve(url, storage_options)
    if not manifest.is_dataset(fs, root):
        raise DatasetNotFoundError(f"no TensorGrid dataset at {url} (expire only retires versions it wrote)")
    return _expire(fs, root, keep_last, cutoff)


def expire_root(fs: fsspec.AbstractFileSystem, root: str, keep_last: int | None = None, older_than=None) -> dict:
    """``expire`` on a resolved filesystem and root (``StoreDataset.expire``)."""
    return _expire(fs, root, *check_args(keep_last, older_than))


def check_args(keep_last, older_than) -> tuple[int | None, float | None]:
    """(keep_last, cutoff as epoch seconds): exactly one given, checked before anything is read."""
    if (keep_last is None) == (older_than is None):
        raise ArgumentError("expire takes exactly one of keep_last= (versions to keep, >= 1) or older_than= "
                            f"(a timedelta, seconds or an aware datetime); got keep_last={keep_last!r}, "
                            f"older_than={older_than!r}")
    if keep_last is not None:
        return check_int("keep_last", keep_last, 1), None
    return None, _cutoff(older_than)


def _cutoff(older_than) -> float:
    """Versions committed before this epoch time expire."""
    if isinstance(older_than, datetime):
        if older_than.tzinfo is None or older_than.utcoffset() is None:
            raise ArgumentError(f"older_than={older_than!r} is a naive datetime: give an aware one, e.g. "
                                "datetime.now(timezone.utc) - timedelta(days=30)")
        return older_than.timestamp()
    if isinstance(older_than, timedelta):
        seconds = older_than.total_seconds()
    elif isinstance(older_than, numbers.Real) and not isinstance(older_than, bool):
        seconds = float(older_than)
    else:
        raise ArgumentError(f"older_than must be a timedelta, a number of seconds or an aware datetime, got "
                            f"{type(older_than).__name__} {older_than!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ArgumentError(f"older_than must be a finite age >= 0, got {older_than!r}")
    return time.time() - seconds


def parse_age(text: str) -> float:
    """An age as the command line gives it (``3600``, ``90s``, ``30m``, ``12h``, ``30d``) in seconds."""
    m = _AGE.fullmatch(text or "")
    if m is None:
        raise ArgumentError(f"--older-than takes an age like 3600, 90s, 30m, 12h or 30d, got {text!r}")
    seconds = float(m.group(1)) * _UNIT_S[m.group(2).lower()]
    if not math.isfinite(seconds):
        raise ArgumentError(f"--older-than {text!r} is too large")
    return seconds


def _expire(fs, root: str, keep_last: int | None, cutoff: float | None) -> dict:
    versions, floor = manifest.scan(fs, root)
    live = [v for v in versions if v > floor]
    if not live:
        raise DatasetNotFoundError(f"no dataset at {tgfs.to_url(fs, root)}")
    new = _keep_last_floor(live, keep_last) if keep_last is not None else _older_than_floor(fs, root, live, cutoff)
    if new > floor:  # the latest (live[-1]) is never below it
        if _before_mark is not None:
            _before_mark(fs, root, new)
        body = {"floor": new, "time": time.time(), "host": socket.gethostname(), "pid": os.getpid()}
        # False: a concurrent expire made this very marker first; the outcome is the same
        tgfs.create_exclusive(fs, manifest.expired_path(root, new), json.dumps(body).encode())
    return {"expired": [v for v in live if v <= new], "kept": manifest.list_versions(fs, root)}


def _keep_last_floor(live: list[int], keep_last: int) -> int:
    return live[-keep_last - 1] if len(live) > keep_last else 0


def _older_than_floor(fs, root: str, live: list[int], cutoff: float) -> int:
    """The newest version of the oldest run committed before ``cutoff`` (never the latest). Expiry stops
    at the first younger version: writers' clocks may disagree, and keeping a version is the safe side."""
    floor = 0
    for v in live[:-1]:
        try:
            stamp = _epoch(manifest.read(fs, root, v).timestamp)
        except VersionExpiredError:  # a concurrent expire and vacuum got there first
            floor = v
            continue
        if stamp >= cutoff:
            break
        floor = v
    return floor


def _epoch(stamp: str) -> float:
    t = datetime.fromisoformat(stamp)
    return (t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)).timestamp()


# --- the vacuum's side -----------------------------------------------------------------------------------
def _listing(fs, root: str) -> list[dict]:
    meta = tgfs.join(root, META_DIR)
    fs.invalidate_cache(meta)
    try:
        return fs.ls(meta, detail=True)
    except FileNotFoundError:
        return []


def markers(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[int, float, str]]:
    """Every expiry marker as (floor, time of the expiry, path), lowest floor first. The time is the later
    of what the marker says (the expirer's clock) and its storage mtime; one it does not say (an unreadable
    marker) is taken as now: its versions stay protected."""

    out = []
    for info in _listing(fs, root):
        m = manifest.EXPIRED_NAME.match(tgfs.name(info["name"]))
        if m is None:
            continue
        try:
            said = float(json.loads(fs.cat_file(info["name"]))["time"])
        except (OSError, ValueError, KeyError, TypeError):
            said = time.time()
        out.append((int(m.group(1)), max(said, tgfs.mtime(info, said)), info["name"]))
    return sorted(out)


def split(fs: fsspec.AbstractFileSystem, root: str, versions: set[int], before: float) -> tuple[set[int], set[int]]:
    """``versions`` (manifests on storage) as (held, dead): dead ones expired at or before ``before`` (the
    vacuum's start minus ``min_age_s``): no reader of theirs is protected any longer; held, the others
    (live, or expired since), whose manifests keep referencing their shards."""
    marks = markers(fs, root) if versions else []
    top = max(versions, default=0)
    dead = set()
    for v in versions:
        times = [t for floor, t, _ in marks if floor >= v]  # v expired when the first marker covering it came
        if v < top and times and min(times) <= before:
            dead.add(v)
    return versions - dead, dead


def forget(fs: fsspec.AbstractFileSystem, root: str, dead: set[int]) -> tuple[list[str], int]:
    """Remove the manifests of dead versions (their shards are gone or orphaned), then the markers made
    redundant (a floor with no manifest at or below it left; never the highest): the relative paths
    removed and their bytes."""
    if not dead:
        return [], 0
    if _before_forget is not None:
        _before_forget(fs, root, dead)
    sizes = {tgfs.name(e["name"]): int(e.get("size") or 0) for e in _listing(fs, root)}
    removed, freed = [], 0
    for v in sorted(dead):
        path = manifest.manifest_path(root, v)
        if _remove(fs, path):
            removed.append(f"{META_DIR}/{tgfs.name(path)}")
            freed += sizes.get(tgfs.name(path), 0)
    versions = manifest.list_versions(fs, root, expired=True)
    for floor, _, path in markers(fs, root)[:-1]:
        if not any(v <= floor for v in versions) and _remove(fs, path):
            removed.append(f"{META_DIR}/{tgfs.name(path)}")
            freed += sizes.get(tgfs.name(path), 0)
    return removed, freed


def _remove(fs, path: str) -> bool:
    try:
        fs.rm_file(path)
        return True
    except FileNotFoundError:  # a concurrent vacuum removed it
        return False
