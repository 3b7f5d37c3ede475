"""Compaction: ``ds.compact(target_shard_bytes)`` merges runs of consecutive small shards (many small appends
leave one file each: slow to list, open and read) into shards of about ``target_shard_bytes`` as a new
version (operation "compact", no rows added); big shards are kept as they are, not rewritten.

Sizes are bytes in memory, as ``tg.write``'s ``shard_bytes`` (a shard's Parquet footer gives its
uncompressed size; it is read only for files under half the target, since a bigger file never holds less
in memory). A shard under half the target is small; a run of them is rewritten only if that makes fewer
shards, so compacting a compacted version finds nothing to do and makes no version.

Rows and their order are unchanged: a loader with ``shuffle=False`` reads the same sequence. A shuffled
loader shuffles blocks (row groups), and the new shards have other blocks, so the same seed gives another
order; and the new version's fingerprint (its shards' checksums) is new, so a loader state or checkpoint
saved over the version before is refused on it (ResumeError). It still resumes over that version
(``tg.open(url, version=N)``) for as long as it is kept (expire, vacuum).

Written and committed by ``rewrite.py`` (as ``tg.write`` writes shards, under the same claim); an append
meanwhile is rebased over, anything that changed a merged run is ConflictError with ``retry()``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pyarrow as pa
import pyarrow.parquet as pq

from .. import fs as tgfs
from ..args import check_int
from . import remote, rewrite
from .rewrite import Rewrite, Run
from .versioned import StoreDataset
from .writer import DEFAULT_SHARD_BYTES

SMALL = 0.5  # a shard holding under this share of the target is small
READ_AHEAD = 16  # shards of a run read ahead of the writer (and at most the target's bytes of them)


def compact(ds: StoreDataset, target_shard_bytes: int = DEFAULT_SHARD_BYTES) -> StoreDataset:
    """Merge runs of small shards of ``ds``'s latest version into shards of about ``target_shard_bytes``
    (in memory) as a new version; the latest version itself when there is nothing to merge."""
    target = check_int("target_shard_bytes", target_shard_bytes, 1)
    base = rewrite.latest(ds)
    runs = plan(base, target)
    if not runs:
        return base
    rw = Rewrite(base, "compact")
    rw.write(base._m, [Run(a, b, partial(_rows, base, a, b, target), target) for a, b in runs])
    rw.keep(lambda old, new: len(new) < len(old))  # the estimate was wrong: that run gains nothing
    if not rw.done:
        return base
    return rw.commit(retry=lambda: compact(rewrite.latest(base), target))


def plan(ds: StoreDataset, target: int) -> list[tuple[int, int]]:
    """The runs (start, stop) of consecutive small shards worth merging: two or more, fewer afterwards."""
    sizes = memory_sizes(ds, target)
    runs, start = [], None
    for i, size in enumerate([*sizes, None]):
        small = size is not None and size < target * SMALL
        if small and start is None:
            start = i
        elif not small and start is not None:
            if i - start >= 2 and math.ceil(sum(sizes[start:i]) / target) < i - start:
                runs.append((start, i))
            start = None
    return runs


def memory_sizes(ds: StoreDataset, target: int) -> list[int]:
    """Each shard's bytes in memory, estimated: its file's size when that is half the target or more (Parquet
    only shrinks data), else its footer's uncompressed size (one small read each, a few at once)."""
    shards = ds._m.shards

    def size(shard) -> int:
        if shard.bytes >= target * SMALL:
            return shard.bytes
        path = tgfs.join(ds.root, shard.path)
        try:
            if tgfs.is_local(ds.fs):
                md = pq.read_metadata(path)
            else:
                md = remote.footer(ds.fs, path, shard.bytes)
        except (OSError, pa.ArrowInvalid):  # a damaged shard: its verified read says so, by name
            return shard.bytes
        return sum(md.row_group(g).total_byte_size for g in range(md.num_row_groups))

    if tgfs.is_local(ds.fs):
        return [size(s) for s in shards]
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(size, shards))


def _rows(ds: StoreDataset, start: int, stop: int, budget: int) -> Iterator[pa.Table]:
    """Shards ``start:stop`` of ``ds`` in order, each verified, read a few ahead on a small pool (at most
    ``budget`` bytes of files ahead)."""
    shards = ds._m.shards
    with ThreadPoolExecutor(4) as pool:
        ahead: deque = deque()
        nxt, held = start, 0
        while ahead or nxt < stop:
            while nxt < stop and len(ahead) < READ_AHEAD and (not ahead or held + shards[nxt].bytes <= budget):
                ahead.append((pool.submit(ds.read_shard, nxt), shards[nxt].bytes))
                held += shards[nxt].bytes
                nxt += 1
            future, size = ahead.popleft()
            held -= size
            yield future.result()
