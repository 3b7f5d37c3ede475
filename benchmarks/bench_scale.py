"""Issue 14 (the path to 100 nodes and 100 TB): the few costs docs/scale.md extrapolates from, measured here.

    .venv/bin/python benchmarks/bench_scale.py [--real-shards 500,2000] [--synthetic 2000,20000,100000]
        [--members 100] [--partitions 400,10000,100000]

1. Manifest, real: ``tg.write(url, table, shard_rows=1)`` of N one-row shards (an int64 id + a 1 KiB
   ``fixed_size_binary``), then the manifest's bytes per shard and ``tg.open``'s time (median of 5).
2. Manifest, synthetic: the same schema, N shard entries shaped like full shards (128 MiB, 16 row groups,
   written by appends of 2,000 shards each), committed with ``manifest.commit`` into an empty dataset folder
   (no shard files: ``tg.open`` reads only the manifest). Measured: JSON bytes, ``to_json`` (what every commit
   pays: a version rewrites the whole shard list), ``tg.open`` (list + parse + checksum + validate, median of
   3), ``ds.blocks()`` (the loader's row-group list: time, and its Python memory by tracemalloc). The cap of one write's shard names (5 digits) is checked.
3. Placement: ``placement.replicas_of`` for one partition (what a reader computes per partition) and
   ``placement.assignment(name, P, members, 2)`` (what ``GridCluster.load`` computes once), with the spread of
   partitions per member (max / mean).

Predictions (written before measuring): a shard entry is ~100 bytes of JSON (RESULTS: 300 shards in 31 kB) and
parses at ~1 µs a field, so ~3-5 µs a shard: 800 k shards ~80 MB and ~3-4 s to open; placement ranks 100
members per partition with 100 xxh3 hashes and a sort, ~100 µs, so 10^5 partitions ~10 s.
Everything runs in one process, in a temporary folder removed at the end; light on purpose (a shared host).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import tracemalloc

import numpy as np
import pyarrow as pa

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine, median_time, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid import fs as tgfs  # noqa: E402
from tensorgrid.errors import CorruptManifestError  # noqa: E402
from tensorgrid.server import placement  # noqa: E402
from tensorgrid.store import manifest  # noqa: E402

SHARD_BYTES = 128 << 20
ROW_GROUPS = 16  # 128 MiB shards of ~8 MiB row groups
ROW_BYTES = 1 << 10  # synthetic rows of 1 KiB: 131,072 a shard
SHARDS_PER_WRITE = 2_000  # an append of ~256 GiB
TARGET_SHARDS = 100 * 10**12 // SHARD_BYTES  # 100 TB in 128 MiB shards: ~745 k


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed(fn, repeat: int) -> float:
    return median_time(fn, repeat=repeat, warmup=0)


def rows_table(n: int) -> pa.Table:
    pad = np.random.default_rng(0).integers(0, 256, size=n * ROW_BYTES, dtype=np.uint8)
    blob = pa.FixedSizeBinaryArray.from_buffers(pa.binary(ROW_BYTES), n, [None, pa.py_buffer(pad)])
    return pa.table({"id": pa.array(np.arange(n, dtype=np.int64)), "blob": blob})


def manifest_file(url: str) -> str:
    meta = os.path.join(url, manifest.META_DIR)
    return os.path.join(meta, max(f for f in os.listdir(meta) if f.endswith(".json")))


def real_manifest(tmp: str, shards: int) -> tuple:
    url = os.path.join(tmp, f"real{shards}")
    t0 = time.perf_counter()
    tg.write(url, rows_table(shards), shard_rows=1)
    write_s = time.perf_counter() - t0
    size = os.path.getsize(manifest_file(url))
    tg.open(url)  # warm: imports, page cache
    open_s = timed(lambda: tg.open(url), 5)
    return url, (f"real, {shards:,} shards", f"{size:,}", f"{size / shards:.0f}", "-",
                 f"{open_s * 1e3:.1f}", f"{open_s / shards * 1e6:.1f}", "-", f"tg.write {write_s:.1f} s")


def synthetic(schema: pa.Schema, shards: int) -> manifest.Manifest:
    rows = SHARD_BYTES // ROW_BYTES
    entries = []
    for w in range(-(-shards // SHARDS_PER_WRITE)):
        txn = f"{w:012x}"
        for seq in range(min(SHARDS_PER_WRITE, shards - w * SHARDS_PER_WRITE)):
            digest = f"xxh3_64:{(w * 1_000_003 + seq) & 0xFFFFFFFFFFFFFFFF:016x}"
            entries.append(manifest.Shard(f"data/part-{txn}-{seq:05d}.parquet", rows, SHARD_BYTES, digest,
                                          rows // ROW_GROUPS))
    return manifest.Manifest(1, "create", schema, entries, shards * rows)


def synthetic_manifest(tmp: str, schema: pa.Schema, shards: int) -> tuple:
    url = os.path.join(tmp, f"synthetic{shards}")
    m = synthetic(schema, shards)
    to_json_s = timed(m.to_json, 3 if shards <= 20_000 else 1)
    fs, root = tgfs.resolve(url)
    fs.makedirs(os.path.join(root, manifest.META_DIR), exist_ok=True)
    assert manifest.commit(fs, root, m)
    size = os.path.getsize(manifest_file(url))
    ds = tg.open(url)
    open_s = timed(lambda: tg.open(url), 3)
    blocks_s = timed(ds.blocks, 1)
    tracemalloc.start()
    blocks = ds.blocks()
    blocks_mb = tracemalloc.get_traced_memory()[0] / 1e6
    tracemalloc.stop()
    return (f"synthetic, {shards:,} shards", f"{size:,}", f"{size / shards:.0f}", f"{to_json_s * 1e3:.0f}",
            f"{open_s * 1e3:.0f}", f"{open_s / shards * 1e6:.1f}", f"{blocks_s * 1e3:.0f}",
            f"{len(blocks):,} blocks, {blocks_mb:.0f} MB"), \
        (size / shards, to_json_s / shards, open_s / shards, blocks_s / shards, blocks_mb / shards)


def write_name_cap(schema: pa.Schema) -> str:
    """One write's shards are numbered in 5 digits: the validator refuses a 100,001st."""
    m = manifest.Manifest(1, "create", schema, [manifest.Shard(f"data/part-{0:012x}-{s:05d}.parquet", 1, 1,
                                                               f"xxh3_64:{s:016x}", 1) for s in range(100_001)], 100_001)
    try:
        manifest.Manifest.from_json(m.to_json(), "synthetic", 1)
    except CorruptManifestError as exc:
        return f"refused: {str(exc).split(': ', 1)[1][:130]}"
    return "accepted"


def placement_rows(members: int, partitions: list[int]) -> list[tuple]:
    names = [f"tg-grid-0123abcd-{i}" for i in range(members)]
    one = timed(lambda: [placement.replicas_of("images", k, names, 2) for k in range(200)], 3) / 200
    out = [(f"replicas_of, 1 partition, {members} members", "-", f"{one * 1e6:.0f} µs", "-", "-")]
    for p in partitions:
        log(f"placement.assignment P={p:,}")
        t0 = time.perf_counter()
        held = placement.assignment("images", p, names, 2)
        s = time.perf_counter() - t0
        counts = [len(v) for v in held.values()]
        mean = p * 2 / members
        out.append((f"assignment, {members} members, R=2", f"{p:,}", f"{s:.2f} s", f"{mean:.0f}",
                    f"{min(counts)}..{max(counts)} ({max(counts) / mean:.2f}x)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real-shards", default="500,2000")
    ap.add_argument("--synthetic", default="2000,20000,100000")
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--partitions", default="400,10000,100000")
    args = ap.parse_args()
    t_start = time.perf_counter()
    print(f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} at the start")
    tmp = tempfile.mkdtemp(prefix="tg-bench-scale-")
    try:
        rows, schema = [], None
        for n in (int(x) for x in args.real_shards.split(",") if x):
            log(f"tg.write of {n:,} one-row shards")
            url, row = real_manifest(tmp, n)
            rows.append(row)
            schema = tg.open(url).schema if schema is None else schema
        schema = schema or tg.open(real_manifest(tmp, 10)[0]).schema
        per = None
        for n in (int(x) for x in args.synthetic.split(",") if x):
            log(f"synthetic manifest of {n:,} shards")
            row, per = synthetic_manifest(tmp, schema, n)
            rows.append(row)
        if per is not None:
            b, j, o, k, mb = per
            rows.append((f"extrapolated, {TARGET_SHARDS:,} shards (100 TB)", f"~{b * TARGET_SHARDS / 1e6:.0f} MB",
                         f"{b:.0f}", f"~{j * TARGET_SHARDS:.0f} s", f"~{o * TARGET_SHARDS:.0f} s", "-",
                         f"~{k * TARGET_SHARDS:.0f} s", f"{TARGET_SHARDS * ROW_GROUPS:,} blocks, ~{mb * TARGET_SHARDS / 1e3:.1f} GB"))
        print("\n## Manifest: one JSON per version listing every shard (local disk, page cache warm)\n")
        print(table(rows, ("manifest", "JSON bytes", "bytes/shard", "to_json ms", "tg.open ms", "open µs/shard",
                           "ds.blocks() ms", "note")))
        print(f"\none write's shard names (part-<txn>-<5 digits>): a 100,001st shard -> {write_name_cap(schema)}")
        parts = [int(x) for x in args.partitions.split(",") if x]
        print(f"\n## Placement: rendezvous hashing, {args.members} members, replicas=2 (pure function, nothing stored)\n")
        print(table(placement_rows(args.members, parts),
                    ("call", "partitions P", "time", "mean per member", "per member min..max (max/mean)")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
