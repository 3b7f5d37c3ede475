"""Compaction: a dataset fed by 1,000 one-row appends (3 numeric columns + 100 B of bytes: 1,000 shards), read
before and after ``ds.compact()`` on a local path.

    .venv/bin/python benchmarks/bench_compact.py [--appends 1000] [--data benchmarks/_data/compact]

Measured, page cache warm (every file read once first), median of 3 after 1 warm-up: ``tg.open`` (the
manifest), a full ``to_arrow()``, a loader epoch through ``ds.to_torch(batch_size=64)`` with default options
(the loader object made once and iterated per epoch, as a training loop does; its Arrow cache is on by
default, in a folder under --data: its first epoch, which starts filling the cache, is reported apart, and
warm epochs start once the background filler is done), SQL
``count(*)``, ``verify()``; and the compaction itself (once: it makes a version).

Predictions (written before measuring): per-shard costs dominate the 1,000-shard layout (a file open,
a checksum, a Parquet footer, ~0.3-1 ms each, two threads): to_arrow ~0.3-0.6 s before, ~2 ms after
(100-300x); a warm loader epoch reads 1,000 one-row blocks (one cached file each) ~0.3-1 s before, ~10-20 ms
after (30-100x); the first epoch (cache fill) a few times a warm one; verify 0.2-0.5 s before, ~1 ms after;
the compaction itself about one full read plus one shard write and a commit: ~0.5-1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, machine, median_time, table  # noqa: E402


def one_row(i: int) -> pa.Table:
    return pa.table({"id": np.array([i], np.int64), "x": np.array([i * 0.5], np.float64),
                     "y": np.array([i % 7], np.int32), "pad": [bytes([i % 256]) * 100]})


def measure(tg, cache, url: str) -> dict:
    ds = tg.open(url)
    ds.to_arrow()  # page cache warm
    loader = ds.to_torch(batch_size=64)
    t0 = time.perf_counter()
    first = sum(len(b["id"]) for b in loader)
    first_epoch = time.perf_counter() - t0
    assert first == ds.num_rows
    deadline = time.time() + 300  # the cache is filled in the background: warm epochs start once it is full
    while cache.dataset_usage(ds)["cached"] < ds.num_shards and time.time() < deadline:
        time.sleep(0.1)

    def epoch():
        assert sum(len(b["id"]) for b in loader) == ds.num_rows

    return {
        "shards": ds.num_shards,
        "open": median_time(lambda: tg.open(url)),
        "to_arrow": median_time(ds.to_arrow),
        "epoch_first": first_epoch,
        "epoch": median_time(epoch),
        "sql": median_time(lambda: tg.sql("SELECT count(*) FROM t", t=ds).to_arrow()),
        "verify": median_time(ds.verify),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--appends", type=int, default=1000)
    p.add_argument("--data", default=os.path.join(DATA, "compact"))
    a = p.parse_args()
    shutil.rmtree(a.data, ignore_errors=True)
    os.makedirs(a.data)
    os.environ["TENSORGRID_CACHE_DIR"] = os.path.join(a.data, "cache")  # never the user's ~/.cache
    import tensorgrid as tg
    from tensorgrid.loader import cache

    url = os.path.join(a.data, "ds")
    t0 = time.perf_counter()
    tg.write(url, one_row(0))
    for i in range(1, a.appends):
        tg.write(url, one_row(i), mode="append")
    appends = time.perf_counter() - t0
    before = measure(tg, cache, url)
    expected = tg.open(url).to_arrow()
    t0 = time.perf_counter()
    new = tg.open(url).compact()
    compact_s = time.perf_counter() - t0
    assert new.to_arrow().equals(expected)
    after = measure(tg, cache, url)

    def ms(s: float) -> str:
        return f"{s * 1000:.1f} ms"

    rows = [("shards", before["shards"], after["shards"], "")]
    for key, name in (("open", "tg.open (manifest)"), ("to_arrow", "to_arrow (all rows)"),
                      ("epoch_first", "loader epoch, first (fills the cache)"), ("epoch", "loader epoch, warm"),
                      ("sql", "SQL count(*)"), ("verify", "verify()")):
        rows.append((name, ms(before[key]), ms(after[key]), f"{before[key] / max(after[key], 1e-9):.0f}x"))
    print(f"machine: {machine()}")
    print(f"{a.appends:,} one-row appends (3 numeric columns + 100 B) in {appends:.1f} s "
          f"({appends / a.appends * 1000:.1f} ms each); compaction {compact_s * 1000:.0f} ms "
          f"({before['shards']:,} shards -> {after['shards']}); page cache warm, median of 3")
    print(table(rows, ("", "before compact", "after", "speed-up")))


if __name__ == "__main__":
    main()
