"""Store figures: write/read GB/s of 1 MB rows (the Ignite benchmark's shape) against memcpy, the cost of
checksum verification on read, and packed vs loose small image files (the HopsFS small-file figure).

    python benchmarks/bench_store.py [--rows 10000] [--files 20000]

Prediction (written before measuring): read = memory-map + xxh3 (~25 GB/s) + Parquet decode of plain
fixed_size_binary (~2.2 GB/s a core, one copy) on 2 threads -> ~3-4 GB/s; write = encode + checksum + write
to page cache -> ~1 GB/s; verification ~10% of read time; packed small files >100x loose (one read per shard
instead of one open+read per file).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, disk_write_gbs, drop_caches, machine, median_time, memcpy_gbs, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid.store import manifest  # noqa: E402
from tensorgrid.store import versioned as tgds  # noqa: E402

ROW = 1 << 20


def big_rows(rows: int, url: str) -> dict:
    rng = np.random.default_rng(0)
    block = rng.integers(0, 255, (64, 1024, 1024), dtype=np.uint8)  # reused: generation is not the figure

    def batches():
        for start in range(0, rows, 64):
            n = min(64, rows - start)
            yield pa.record_batch({"id": np.arange(start, start + n),
                                   "x": pa.FixedShapeTensorArray.from_numpy_ndarray(block[:n])})

    shutil.rmtree(url, ignore_errors=True)
    t0 = time.perf_counter()
    ds = tg.write(url, batches())
    write_s = time.perf_counter() - t0
    total = rows * ROW

    def read():
        tgds._verified.clear()  # verify every shard on each timed read
        t = tg.open(url).to_arrow()
        assert t.num_rows == rows
        return t

    read()  # warm the page cache deliberately
    read_s = median_time(read, repeat=3, warmup=0)
    # verification alone: memory-map + xxh3 of every shard
    shards = tg.open(url).shards

    def verify_only():
        for s in shards:
            buf = pa.memory_map(os.path.join(url, s.path)).read_buffer()
            assert manifest.checksum(buf) == s.checksum

    verify_s = median_time(verify_only, repeat=3)

    def read_cached():  # verification remembered from the previous read in this process
        return tg.open(url).to_arrow()

    cached_s = median_time(read_cached, repeat=3)
    disk = sum(s.bytes for s in shards)
    return {"total": total, "write_s": write_s, "read_s": read_s, "verify_s": verify_s, "cached_s": cached_s,
            "shards": ds.num_shards, "disk": disk}


def make_small_files(root: str, n: int) -> int:
    rng = np.random.default_rng(1)
    shutil.rmtree(root, ignore_errors=True)
    total = 0
    base = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    for i in range(n):
        d = os.path.join(root, f"class{i % 10}")
        os.makedirs(d, exist_ok=True)
        size = 20 + (i % 4) * 6  # 20..38 px: 1-4 KB JPEGs
        img = base[:size, :size] ^ rng.integers(0, 32, (size, size, 3), dtype=np.uint8)
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        with open(os.path.join(d, f"{i:06d}.jpg"), "wb") as f:
            f.write(buf.getvalue())
        total += buf.tell()
    return total


def read_loose(root: str) -> int:
    n = 0
    for d in sorted(os.listdir(root)):
        for name in sorted(os.listdir(os.path.join(root, d))):
            with open(os.path.join(root, d, name), "rb") as f:
                f.read()
            n += 1
    return n


def small_files(n: int, root: str, url: str) -> dict:
    nbytes = make_small_files(root, n)
    shutil.rmtree(url, ignore_errors=True)
    t0 = time.perf_counter()
    ds = tg.ingest_images(root, url)
    ingest_s = time.perf_counter() - t0
    assert ds.num_rows == n

    def packed():
        tgds._verified.clear()
        t = tg.open(url).to_arrow(columns=["image"])
        assert t.num_rows == n

    out = {"files": n, "bytes": nbytes, "ingest_s": ingest_s}
    out["loose_warm_s"] = median_time(lambda: read_loose(root), repeat=3)
    out["packed_warm_s"] = median_time(packed, repeat=3)
    if drop_caches():
        out["loose_cold_s"] = _cold(lambda: read_loose(root))
        out["packed_cold_s"] = _cold(packed)
    return out


def integrity_costs(root: str, rows: int = 1000, versions: int = 300) -> dict:
    """What durability and manifest integrity cost: 1 MB-row writes with and without fsync (os.fsync made
    a no-op for the comparison), small commits, a manifest's checksum + validation, a vacuum's scan."""
    out: dict = {}
    real_fsync = os.fsync
    url = os.path.join(root, "small")
    for label, fsync in (("fsync", real_fsync), ("no fsync", lambda fd: None)):
        os.fsync = fsync
        try:
            times = []
            for _ in range(3):
                times.append(big_rows_write_only(rows, os.path.join(root, "fs")))
            out[f"write {label}"] = sorted(times)[1]
            shutil.rmtree(url, ignore_errors=True)
            tg.write(url, pa.table({"a": [0]}))
            out[f"commit {label}"] = median_time(
                lambda: tg.write(url, pa.table({"a": [1]}), mode="append"), repeat=50, warmup=3)
        finally:
            os.fsync = real_fsync
    # ~54 versions from the commits above; grow to `versions`
    while tg.open(url).version < versions:
        tg.write(url, pa.table({"a": [1]}), mode="append")
    m = tg.open(url)._m
    data = m.to_json()
    out["manifest_shards"] = len(m.shards)
    out["manifest_bytes"] = len(data)
    out["manifest_load"] = median_time(lambda: manifest.Manifest.from_json(data, "bench", m.version), repeat=20)
    out["manifest_checksum"] = median_time(lambda: manifest._content_checksum(__import__("json").loads(data)),
                                           repeat=20) - median_time(lambda: __import__("json").loads(data), repeat=20)
    out["disk"] = disk_write_gbs(os.path.join(root, "disk.bin"))
    out["vacuum_versions"] = versions
    out["vacuum"] = median_time(lambda: tg.vacuum(url, min_age_s=0), repeat=3)
    shutil.rmtree(root, ignore_errors=True)
    return out


def big_rows_write_only(rows: int, url: str) -> float:
    block = np.random.default_rng(0).integers(0, 255, (64, 1024, 1024), dtype=np.uint8)
    shutil.rmtree(url, ignore_errors=True)
    t0 = time.perf_counter()
    tg.write(url, (pa.record_batch({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(block[:min(64, rows - s)])})
                   for s in range(0, rows, 64)))
    return time.perf_counter() - t0


def _cold(fn) -> float:
    times = []
    for _ in range(3):
        drop_caches()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--files", type=int, default=20_000)
    a = p.parse_args()
    os.makedirs(DATA, exist_ok=True)
    print(f"machine: {machine()}")
    ceiling = memcpy_gbs()
    r = big_rows(a.rows, os.path.join(DATA, "rows1mb"))
    gb = r["total"] / 1e9
    print(f"\n## {a.rows:,} rows of 1 MB ({gb:.1f} GB, {r['shards']} shards, page cache warm)\n")
    print(table([
        ("numpy memcpy (ceiling)", f"{ceiling:.2f}", "1.00"),
        ("tg.write", f"{gb / r['write_s']:.2f}", f"{gb / r['write_s'] / ceiling:.2f}"),
        ("tg.open().to_arrow(), checksums verified", f"{gb / r['read_s']:.2f}", f"{gb / r['read_s'] / ceiling:.2f}"),
        ("to_arrow(), verification cached", f"{gb / r['cached_s']:.2f}", f"{gb / r['cached_s'] / ceiling:.2f}"),
        ("xxh3 verification alone", f"{gb / r['verify_s']:.2f}", f"{gb / r['verify_s'] / ceiling:.2f}"),
        ("Apache Ignite, published (local)", "0.85", "-"),
    ], ("operation", "GB/s", "x memcpy")))
    print(f"\nverification cost on read: {r['verify_s'] / r['read_s']:.1%} of read time "
          f"(read {r['read_s']:.2f} s, verify {r['verify_s']:.2f} s)")
    shutil.rmtree(os.path.join(DATA, "rows1mb"), ignore_errors=True)

    c = integrity_costs(os.path.join(DATA, "integrity"))
    wgb = 1000 * ROW / 1e9
    print("\n## What integrity costs (page cache warm; fsync timed against os.fsync made a no-op)\n")
    print(table([
        ("write 1,000 rows of 1 MB", f"{wgb / c['write fsync']:.2f} GB/s", f"{wgb / c['write no fsync']:.2f} GB/s",
         f"{c['write fsync'] / c['write no fsync'] - 1:+.0%}"),
        ("commit a 1-row append", f"{c['commit fsync'] * 1e3:.1f} ms", f"{c['commit no fsync'] * 1e3:.1f} ms",
         f"{c['commit fsync'] / c['commit no fsync'] - 1:+.0%}"),
        ("disk: write 1 GiB + fsync (durable ceiling)", f"{c['disk']:.2f} GB/s", "-", "-"),
    ], ("operation", "with fsync", "without", "cost")))
    print(f"\nmanifest of {c['manifest_shards']} shards ({c['manifest_bytes'] / 1e3:.0f} kB): parse + checksum + "
          f"validate {c['manifest_load'] * 1e3:.2f} ms, of which the checksum {c['manifest_checksum'] * 1e3:.2f} ms; "
          f"vacuum over {c['vacuum_versions']} versions: {c['vacuum']:.2f} s")

    s = small_files(a.files, os.path.join(DATA, "loose"), os.path.join(DATA, "packed"))
    n = s["files"]
    rows = [("ingest_images (decode-checked)", f"{n / s['ingest_s']:,.0f}", "-"),
            ("read loose files, warm", f"{n / s['loose_warm_s']:,.0f}", "1"),
            ("read packed dataset, warm", f"{n / s['packed_warm_s']:,.0f}",
             f"{s['loose_warm_s'] / s['packed_warm_s']:.0f}x")]
    if "loose_cold_s" in s:
        rows += [("read loose files, cold", f"{n / s['loose_cold_s']:,.0f}", "1"),
                 ("read packed dataset, cold", f"{n / s['packed_cold_s']:,.0f}",
                  f"{s['loose_cold_s'] / s['packed_cold_s']:.0f}x")]
    print(f"\n## {n:,} small JPEG files ({s['bytes'] / n / 1024:.1f} KB average)\n")
    print(table(rows, ("operation", "files/s", "packed / loose")))
    if "loose_cold_s" not in s:
        print("\n(page cache could not be dropped here: cold figures omitted)")


if __name__ == "__main__":
    main()
