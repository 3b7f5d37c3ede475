"""Loader figures (issue: the loader), tensorgrid side; peers come from benchmarks/peers/run_all.py.

    python benchmarks/bench_loader.py [--rows1mb 2000] [--records 2000000] [--mnist 600000] [--jpegs 20000]

Predictions (before measuring): 1 MB rows through the Arrow IPC cache are zero-copy views, so delivery is
bounded by per-batch overhead, far above memcpy; without the cache, one Parquet decode copy per batch
(~memcpy speed on one core). Shuffled small records: one Arrow take per window (~2-4 GB/s of rows) plus
~5 us per batch -> ~10-20 M rows/s for 108-byte rows, ~3-5 M/s for 28x28 images. JPEG decode: Pillow-bound,
the same per core as a plain Dataset, near-linear in workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, machine, memcpy_gbs, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid import transforms as T  # noqa: E402

RESULTS: list[dict] = []


def record(figure, variant, rows, seconds, nbytes=None, first=None, note=""):
    r = {"figure": figure, "variant": variant, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
         "gb_per_s": (nbytes / seconds / 1e9) if nbytes else None, "first_batch_s": first, "note": note}
    RESULTS.append(r)
    return r


def epoch(loader, key) -> tuple[int, float, float]:
    """Rows and seconds for one epoch, and the time to the first batch."""
    t0 = time.perf_counter()
    first, rows = None, 0
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        rows += len(b[key])
    return rows, time.perf_counter() - t0, first


def best_of(make_loader, key, repeat=3):
    make_loader and epoch(make_loader(), key)  # warm: page cache, Arrow cache, imports
    runs = [epoch(make_loader(), key) for _ in range(repeat)]
    runs.sort(key=lambda r: r[1])
    return runs[len(runs) // 2]


def rows1mb(n: int, root: str) -> None:
    url = os.path.join(root, "rows1mb")
    if not os.path.exists(url):
        block = np.random.default_rng(0).integers(0, 255, (64, 1024, 1024), dtype=np.uint8)
        tg.write(url, (pa.record_batch({"id": np.arange(s, s + min(64, n - s)),
                                        "x": pa.FixedShapeTensorArray.from_numpy_ndarray(block[:min(64, n - s)])})
                       for s in range(0, n, 64)))
    ds = tg.open(url)
    cache = os.path.join(root, "cache-rows1mb")
    for variant, kw in (("sequential, Arrow IPC cache (zero-copy)", {"cache_dir": cache}),
                        ("sequential, Parquet (one decode copy)", {}),
                        ("shuffled, Arrow IPC cache", {"cache_dir": cache, "shuffle": True}),
                        ("sequential, IPC cache, 2 workers", {"cache_dir": cache, "num_workers": 2})):
        rows, secs, first = best_of(lambda kw=kw: ds.to_torch(batch_size=16, columns=["x"], **kw), "x")
        record("rows1mb", variant, rows, secs, rows * (1 << 20), first)


def records(n: int, root: str) -> None:
    url = os.path.join(root, "records100")
    if not os.path.exists(url):
        rng = np.random.default_rng(1)
        x = rng.standard_normal((n, 25), dtype=np.float32)
        tg.write(url, pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                                "label": rng.integers(0, 10, n)}))
    ds = tg.open(url)
    cache = os.path.join(root, "cache-records100")
    for variant, kw in (("shuffled, Arrow IPC cache", {"cache_dir": cache, "shuffle": True}),
                        ("shuffled, Parquet", {"shuffle": True}),
                        ("sequential, Arrow IPC cache", {"cache_dir": cache})):
        rows, secs, first = best_of(lambda kw=kw: ds.to_torch(batch_size=256, **kw), "label")
        record("records100", variant, rows, secs, rows * 108, first)


def mnist(n: int, root: str) -> None:
    url = os.path.join(root, "mnist")
    if not os.path.exists(url):
        rng = np.random.default_rng(2)
        x = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        tg.write(url, pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                                "label": rng.integers(0, 10, n)}))
    ds = tg.open(url)
    cache = os.path.join(root, "cache-mnist")
    for variant, kw in (("shuffled, Arrow IPC cache", {"cache_dir": cache, "shuffle": True}),
                        ("shuffled, Parquet", {"shuffle": True}),
                        ("sequential, Arrow IPC cache", {"cache_dir": cache})):
        rows, secs, first = best_of(lambda kw=kw: ds.to_torch(batch_size=256, **kw), "label")
        record("mnist", variant, rows, secs, rows * 792, first)


class LooseJpegs(torch.utils.data.Dataset):
    """The baseline: a plain PyTorch Dataset reading loose files with Pillow."""

    def __init__(self, files):
        self.files = files

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB"))).permute(2, 0, 1)


def jpegs(n: int, root: str) -> None:
    folder = os.path.join(root, "jpeg64-files")
    url = os.path.join(root, "jpeg64")
    if not os.path.exists(url):
        rng = np.random.default_rng(3)
        shutil.rmtree(folder, ignore_errors=True)
        base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        for i in range(n):
            d = os.path.join(folder, f"c{i % 10}")
            os.makedirs(d, exist_ok=True)
            img = (base.astype(np.int16) + rng.integers(-20, 20, (64, 64, 3))).clip(0, 255).astype(np.uint8)
            Image.fromarray(img).save(os.path.join(d, f"{i:06d}.jpg"), quality=90)
        tg.ingest_images(folder, url)
    ds = tg.open(url)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    for workers in (0, 1, 2):
        rows, secs, first = best_of(lambda w=workers: ds.to_torch(
            batch_size=256, columns=["image", "label_index"], shuffle=True, transform=T.decode_image,
            num_workers=w), "image", repeat=1)
        record("jpeg64", f"tensorgrid, decode in {workers} workers", rows, secs, None, first)
        rows, secs, first = best_of(lambda w=workers: torch.utils.data.DataLoader(
            LooseJpegs(files), batch_size=256, shuffle=True, num_workers=w), 0, repeat=1) if False else \
            _loose(files, workers)
        record("jpeg64", f"plain DataLoader over files, {workers} workers", rows, secs, None, first)


def _loose(files, workers):
    def make():
        return torch.utils.data.DataLoader(LooseJpegs(files), batch_size=256, shuffle=True, num_workers=workers)

    epoch_ = lambda: _epoch_list(make())  # noqa: E731
    epoch_()
    return epoch_()


def _epoch_list(loader):
    t0, first, rows = time.perf_counter(), None, 0
    for b in loader:
        if first is None:
            first = time.perf_counter() - t0
        rows += len(b)
    return rows, time.perf_counter() - t0, first


def shuffle_quality(root: str) -> float:
    """Spearman rank correlation between storage position and epoch position (0 = no trace of order)."""
    ds = tg.open(os.path.join(root, "records100"))
    t = ds.to_arrow(columns=["label"])
    n = t.num_rows
    ids = tg.from_arrow(pa.table({"id": np.arange(n)}))
    order = np.concatenate([b["id"].numpy() for b in ids.to_torch(batch_size=256, shuffle=True,
                                                                   memory_budget=512 << 20)])
    return float(np.corrcoef(np.arange(n), order)[0, 1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows1mb", type=int, default=2000)
    p.add_argument("--records", type=int, default=2_000_000)
    p.add_argument("--mnist", type=int, default=600_000)
    p.add_argument("--jpegs", type=int, default=20_000)
    p.add_argument("--only", default="rows1mb,records100,mnist,jpeg64")
    p.add_argument("--json", default=os.path.join(DATA, "tensorgrid_loader.json"))
    a = p.parse_args()
    root = os.path.join(DATA, "tg")
    os.makedirs(root, exist_ok=True)
    only = set(a.only.split(","))
    print(f"machine: {machine()}")
    ceiling = memcpy_gbs()
    print(f"numpy memcpy ceiling: {ceiling:.2f} GB/s (page cache warm for every figure below)\n")
    if "rows1mb" in only:
        rows1mb(a.rows1mb, root)
    if "records100" in only:
        records(a.records, root)
    if "mnist" in only:
        mnist(a.mnist, root)
    if "jpeg64" in only:
        jpegs(a.jpegs, root)
    rows = [(r["figure"], r["variant"], f"{r['rows_per_s']:,.0f}",
             "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}",
             "-" if r["gb_per_s"] is None else f"{r['gb_per_s'] / ceiling:.2f}",
             f"{r['first_batch_s'] * 1000:.1f}") for r in RESULTS]
    print(table(rows, ("figure", "tensorgrid variant", "rows/s", "GB/s", "x memcpy", "first batch ms")))
    if "records100" in only:
        print(f"\nshuffle quality (records100, Spearman rank correlation storage vs epoch position): "
              f"{shuffle_quality(root):+.4f}")
    with open(a.json, "w") as f:
        json.dump({"machine": machine(), "memcpy_gbs": ceiling, "results": RESULTS}, f, indent=1)


if __name__ == "__main__":
    main()
