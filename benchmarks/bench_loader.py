"""Loader figures (issue: the loader), tensorgrid side; peers come from benchmarks/peers/run_all.py.

    python benchmarks/bench_loader.py [--rows1mb 2000] [--records 2000000] [--mnist 600000] [--jpegs 20000]
    python benchmarks/bench_loader.py --only gpu     # batches prefetched to the GPU (or: no CUDA device: skipped)

Predictions (before measuring): 1 MB rows through the Arrow IPC cache are zero-copy views, so delivery is
bounded by per-batch overhead, far above memcpy; without the cache, one Parquet decode copy per batch
(~memcpy speed on one core). Shuffled small records: one Arrow take per window (~2-4 GB/s of rows) plus
~5 us per batch -> ~10-20 M rows/s for 108-byte rows, ~3-5 M/s for 28x28 images. JPEG decode: Pillow-bound,
the same per core as a plain Dataset, near-linear in workers.

The Arrow cache check (``--only cachecheck``): each cache file is hashed (xxh3) the first time a process
maps it. Prediction: xxh3 over page-cache-warm files at ~1.5-2x memcpy (~20-35 GB/s), so one pass over the
cache: ~0.1 s for the 2 GB of rows1mb, ~10 ms for records100 and mnist; relative to a first epoch that is
large where the epoch itself is nearly free (zero-copy sequential rows1mb: views, no bytes touched) and a
few % where it gathers rows. Cold, the check reads each file once at disk speed (~100-200 MB/s here), pages
a training epoch reads anyway.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, machine, memcpy_gbs, table  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))
import datagen  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid import transforms as T  # noqa: E402

RESULTS: list[dict] = []
PEER_DATA = os.path.join(DATA, "peers")
HEADLINE = {"rows1mb": "sequential, Arrow IPC cache (zero-copy)", "records100": "shuffled, Arrow IPC cache",
            "mnist": "shuffled, Arrow IPC cache"}


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


def _source(figure: str, rows: int) -> dict:
    """The peers' source arrays (benchmarks/peers/datagen.py): every loader reads the same data."""
    datagen.generate(PEER_DATA, figure, rows)
    return datagen.load(PEER_DATA, figure)


def _write_tensors(url: str, src: dict, image_col: str) -> None:
    if os.path.exists(url):
        return
    x, y = src["x"], src["label"]
    step = max(1, (64 << 20) // (x.itemsize * int(np.prod(x.shape[1:]))))
    tg.write(url, (pa.record_batch({image_col: pa.FixedShapeTensorArray.from_numpy_ndarray(np.asarray(x[i:i + step])),
                                    "label": y[i:i + step]}) for i in range(0, len(x), step)))


def rows1mb(n: int, root: str) -> None:
    url = os.path.join(root, "rows1mb")
    _write_tensors(url, _source("rows1mb", n), "x")
    ds = tg.open(url)
    cache = os.path.join(root, "cache-rows1mb")
    for variant, kw in ((HEADLINE["rows1mb"], {"cache_dir": cache}),
                        ("sequential, Parquet (one decode copy)", {}),
                        ("shuffled, Arrow IPC cache", {"cache_dir": cache, "shuffle": True})):
        rows, secs, first = best_of(lambda kw=kw: ds.to_torch(batch_size=16, columns=["x"], **kw), "x")
        record("rows1mb", variant, rows, secs, rows * (1 << 20), first)


def small_records(figure: str, n: int, root: str, image_col: str, row_bytes: int) -> None:
    url = os.path.join(root, figure)
    _write_tensors(url, _source(figure, n), image_col)
    ds = tg.open(url)
    cache = os.path.join(root, f"cache-{figure}")
    for variant, kw in ((HEADLINE[figure], {"cache_dir": cache, "shuffle": True}),
                        ("shuffled, Parquet", {"shuffle": True}),
                        ("sequential, Arrow IPC cache", {"cache_dir": cache}),
                        ("sequential, Parquet", {})):
        rows, secs, first = best_of(lambda kw=kw: ds.to_torch(batch_size=256, **kw), "label")
        record(figure, variant, rows, secs, rows * row_bytes, first)


def raw_gather(figure: str, root: str, repeat: int = 3) -> None:
    """The issue's reference: the whole table in memory, then one pyarrow take per shuffled batch of 256,
    each column to numpy. Not a loader (no partitioning, no resume, no bound on memory): a yardstick."""
    import pyarrow.compute as pc

    t = tg.open(os.path.join(root, figure)).to_arrow().combine_chunks()
    t = pa.table({n: (c.storage if isinstance(c.type, pa.ExtensionType) else c)
                  for n, c in zip(t.column_names, t.columns)})
    perm = np.random.default_rng(0).permutation(t.num_rows)
    secs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for i in range(0, t.num_rows, 256):
            b = t.take(pa.array(perm[i:i + 256]))
            for c in b.columns:
                c = c.chunk(0)
                (pc.list_flatten(c) if pa.types.is_fixed_size_list(c.type) else c).to_numpy(zero_copy_only=False)
        secs.append(time.perf_counter() - t0)
    record(figure, "raw pyarrow take per batch (reference)", t.num_rows, sorted(secs)[len(secs) // 2])


def jpegs(n: int, root: str) -> None:
    url = os.path.join(root, "jpeg64")
    if not os.path.exists(url):
        src = _source("jpeg64", n)
        offsets, blob = src["offsets"], src["jpeg"]
        images = pa.Array.from_buffers(pa.binary(), len(offsets) - 1,
                                       [None, pa.py_buffer(np.ascontiguousarray(offsets).astype(np.int32)),
                                        pa.py_buffer(np.ascontiguousarray(blob))])
        tg.write(url, pa.table({"image": images, "label": src["label"]}))
    ds = tg.open(url)
    for workers in (0, 1, 2):
        rows, secs, first = best_of(lambda w=workers: ds.to_torch(
            batch_size=256, shuffle=True, transform=T.decode_image, num_workers=w), "image", repeat=1)
        record("jpeg64", f"decode in {workers} workers", rows, secs, rows * 64 * 64 * 3, first)


def resume_time(root: str) -> float:
    """Seconds from load_state_dict at the last batch of an epoch to that batch (records100)."""
    ds = tg.open(os.path.join(root, "records100"))
    loader = ds.to_torch(batch_size=256, shuffle=True, cache_dir=os.path.join(root, "cache-records100"))
    state = {**loader.state_dict(), "batch": len(loader) - 1}
    t0 = time.perf_counter()
    fresh = tg.open(os.path.join(root, "records100")).to_torch(
        batch_size=256, shuffle=True, cache_dir=os.path.join(root, "cache-records100"))
    fresh.load_state_dict(state)
    next(iter(fresh))
    return time.perf_counter() - t0


def shuffle_quality(root: str) -> float:
    """Spearman rank correlation between storage position and epoch position (0 = no trace of order)."""
    ds = tg.open(os.path.join(root, "records100"))
    t = ds.to_arrow(columns=["label"])
    n = t.num_rows
    ids = tg.from_arrow(pa.table({"id": np.arange(n)}))
    order = np.concatenate([b["id"].numpy() for b in ids.to_torch(batch_size=256, shuffle=True,
                                                                   memory_budget=512 << 20)])
    return float(np.corrcoef(np.arange(n), order)[0, 1])


def _evict(paths: list[str]) -> None:
    """Drop these files' pages from this VM's page cache (only theirs: the machine is shared; the host under
    the virtual disk may still hold them, so this is not a cold disk)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _hash_files(paths: list[str]) -> float:
    """Seconds to xxh3 every file through a map, as the loader's check does."""
    import mmap

    import xxhash

    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            xxhash.xxh3_64_hexdigest(mm)
    return time.perf_counter() - t0


def cache_check(root: str, ceiling: float, repeat: int = 5) -> list[tuple]:
    """What checking the Arrow cache costs: xxh3 vs memcpy, and a first epoch with vs without the check
    (same process, page cache warm; 'without' = files this process already checked, as every later epoch)."""
    import numpy as np
    import xxhash

    from tensorgrid.loader import source

    buf = np.ones(1 << 30, dtype=np.uint8)
    xxh3_mem = (1 << 30) / statistics.median(
        [_timed(lambda: xxhash.xxh3_64_hexdigest(buf)) for _ in range(repeat)]) / 1e9
    rows = [(f"xxh3 of a 1 GiB buffer (memcpy here {ceiling:.1f} GB/s)", f"{xxh3_mem:.1f} GB/s",
             f"{xxh3_mem / ceiling:.2f}x memcpy", "-")]
    for figure, key, kw in (("rows1mb", "x", dict(batch_size=16, columns=["x"])),
                            ("records100", "label", dict(batch_size=256, shuffle=True)),
                            ("mnist", "label", dict(batch_size=256, shuffle=True))):
        ds, cache = tg.open(os.path.join(root, figure)), os.path.join(root, f"cache-{figure}")
        make = lambda ds=ds, cache=cache, kw=kw: ds.to_torch(cache_dir=cache, **kw)  # noqa: E731
        epoch(make(), key)  # builds (or rebuilds) the cache, warms its pages
        files = sorted(glob.glob(os.path.join(cache, "*.arrow")))
        size = sum(os.path.getsize(p) for p in files)
        checked, unchecked = [], []
        for _ in range(repeat):  # alternated, so drift on the shared machine hits both alike
            source._verified.clear()  # what a new process starts with
            checked.append(epoch(make(), key)[1])
            unchecked.append(epoch(make(), key)[1])
        c, u = statistics.median(checked), statistics.median(unchecked)
        rows.append((f"{figure}: first epoch with cache, warm ({size / 1e9:.2f} GB in {len(files)} files)",
                     f"{c * 1000:.1f} ms checked / {u * 1000:.1f} ms not", f"+{(c - u) * 1000:.1f} ms",
                     f"{size / statistics.median([_hash_files(files) for _ in range(repeat)]) / 1e9:.1f} GB/s"))
        rows.append(_build_cost(figure, make_into=lambda c, ds=ds, kw=kw: ds.to_torch(cache_dir=c, **kw), key=key,
                                scratch=cache + "-build", rate=size / statistics.median(
                                    [_hash_files(files) for _ in range(repeat)])))
        cold = []
        for _ in range(3):
            _evict(files)
            cold.append(_hash_files(files))
        rows.append((f"{figure}: the check alone, files evicted from this VM's page cache", f"{statistics.median(cold):.2f} s",
                     "-", f"{size / statistics.median(cold) / 1e9:.2f} GB/s"))
        epoch(make(), key)  # warm again for the figures that follow
    print(f"\n## The Arrow cache check (median of {repeat}; warm unless said)\n")
    print(table(rows, ("what", "time", "check costs", "xxh3 rate")))
    return rows


def _build_cost(figure: str, make_into, key: str, scratch: str, rate: float, repeat: int = 3) -> tuple:
    """A first epoch that builds the cache (an empty cache_dir), and the share of it spent hashing the new
    files (their bytes at the file-hash rate just measured)."""
    import shutil

    from tensorgrid.loader import source

    times, hashed = [], 0
    for _ in range(repeat):
        shutil.rmtree(scratch, ignore_errors=True)
        n0 = source.checks["bytes"]
        times.append(epoch(make_into(scratch), key)[1])
        hashed = source.checks["bytes"] - n0
    shutil.rmtree(scratch, ignore_errors=True)
    t = statistics.median(times)
    return (f"{figure}: first epoch building the cache (empty cache_dir; Parquet read warm)", f"{t:.2f} s",
            f"~{hashed / rate * 1000:.0f} ms hashing ({hashed / rate / t:.1%})", f"{rate / 1e9:.1f} GB/s")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def gpu(root: str, records: int, mnist: int) -> None:
    """Batches prefetched to the GPU: each batch's tensors copied with ``.to(device, non_blocking=True)`` on a
    side stream one batch ahead, the consumer waiting on that stream (what a training loop overlaps with its
    step). Pinned (the default on CUDA) vs ``pin_memory=False``. Prediction: pinned copies are asynchronous
    DMA at ~10-25 GB/s, so rows/s stays at the CPU loader's rate; unpinned copies are synchronous staging
    copies, a few % slower for 108-byte rows and visibly slower for 28x28 images at high rates."""
    import torch

    device = torch.device("cuda")
    stream = torch.cuda.Stream()

    def to_device(batch):
        with torch.cuda.stream(stream):
            return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def prefetched(loader):
        it = iter(loader)
        nxt = next(it, None)
        ready = to_device(nxt) if nxt is not None else None
        while ready is not None:
            nxt = next(it, None)
            upcoming = to_device(nxt) if nxt is not None else None
            torch.cuda.current_stream().wait_stream(stream)
            for v in ready.values():
                if isinstance(v, torch.Tensor):
                    v.record_stream(torch.cuda.current_stream())
            yield ready
            ready = upcoming

    def on_device_epoch(ds, pin, key):
        t0 = time.perf_counter()
        first, rows = None, 0
        for b in prefetched(ds.to_torch(batch_size=256, shuffle=True, pin_memory=pin)):
            if first is None:
                first = time.perf_counter() - t0
            rows += len(b[key])
        torch.cuda.synchronize()
        return rows, time.perf_counter() - t0, first

    print(f"CUDA device: {torch.cuda.get_device_name(device)}")
    for figure, n, col, row_bytes in (("records100", records, "x", 108), ("mnist", mnist, "image", 792)):
        _write_tensors(os.path.join(root, figure), _source(figure, n), col)
        ds = tg.open(os.path.join(root, figure))
        for pin in (True, False):
            on_device_epoch(ds, pin, "label")  # warm: page cache, Arrow cache, CUDA context
            runs = sorted((on_device_epoch(ds, pin, "label") for _ in range(3)), key=lambda r: r[1])
            rows, secs, first = runs[1]
            record(figure, f"shuffled, prefetched to {device} ({'pinned' if pin else 'not pinned'})", rows, secs,
                   rows * row_bytes, first)


def peers(a, only) -> None:
    """Run the peers on the same source data, then print tensorgrid / peer ratios."""
    import subprocess

    out = a.peers_json or os.path.join(DATA, "peers-results.json")
    if not a.peers_json:
        sizes = f"rows1mb={a.rows1mb},records100={a.records},mnist={a.mnist},jpeg64={a.jpegs}"
        subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers",
                                                     "run_all.py"),
                        "--data", PEER_DATA, "--figures", ",".join(sorted(only)), "--rows", sizes, "--json", out],
                       check=False)
    with open(out) as f:
        res = json.load(f)
    res = res if isinstance(res, list) else res.get("results", [])
    ours = {}
    for r in RESULTS:
        key = (r["figure"], int(r["variant"].split()[2]) if r["figure"] == "jpeg64" else 0)
        if r["figure"] == "jpeg64" or r["variant"] == HEADLINE.get(r["figure"]):
            ours[key] = r["rows_per_s"]
    rows = []
    for p in res:
        key = (p["figure"], p.get("workers") or 0)
        mine = ours.get(key)
        if p.get("error") or not p.get("rows_per_s"):
            rows.append((p["figure"], p["peer"], key[1], "-", f"{mine:,.0f}" if mine else "-", "-",
                         f"error: {p.get('error')}"[:70]))
            continue
        rows.append((p["figure"], p["peer"], key[1], f"{p['rows_per_s']:,.0f}", f"{mine:,.0f}" if mine else "-",
                     f"{mine / p['rows_per_s']:.1f}x" if mine else "-", ""))
    print("\n## tensorgrid vs peers (same data, same machine, this run; rows/s)\n")
    print(table(rows, ("figure", "peer", "workers", "peer rows/s", "tensorgrid rows/s", "tg / peer", "note")))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows1mb", type=int, default=2000)
    p.add_argument("--records", type=int, default=2_000_000)
    p.add_argument("--mnist", type=int, default=600_000)
    p.add_argument("--jpegs", type=int, default=20_000)
    p.add_argument("--only", default="rows1mb,records100,mnist,jpeg64,cachecheck")
    p.add_argument("--json", default=os.path.join(DATA, "tensorgrid_loader.json"))
    p.add_argument("--peers", action="store_true", help="also run every peer (benchmarks/peers) on the same data")
    p.add_argument("--peers-json", help="compare with peer results already measured by peers/run_all.py")
    a = p.parse_args()
    root = os.path.join(DATA, "tg")
    os.makedirs(root, exist_ok=True)
    only = set(a.only.split(","))
    if "gpu" in only and not _has_cuda():
        print("no CUDA device: skipped")
        only.discard("gpu")
        if not only:
            return
    print(f"machine: {machine()}")
    ceiling = memcpy_gbs()
    print(f"numpy memcpy ceiling: {ceiling:.2f} GB/s (page cache warm for every figure below)\n")
    if "rows1mb" in only:
        rows1mb(a.rows1mb, root)
    if "records100" in only:
        small_records("records100", a.records, root, "x", 108)
        raw_gather("records100", root)
    if "mnist" in only:
        small_records("mnist", a.mnist, root, "image", 792)
        raw_gather("mnist", root)
    if "jpeg64" in only:
        jpegs(a.jpegs, root)
    if "gpu" in only:
        gpu(root, a.records, a.mnist)
    if "cachecheck" in only:
        for figure, n, col in (("rows1mb", a.rows1mb, "x"), ("records100", a.records, "x"), ("mnist", a.mnist, "image")):
            _write_tensors(os.path.join(root, figure), _source(figure, n), col)
        cache_check(root, ceiling)
    rows = [(r["figure"], r["variant"], f"{r['rows_per_s']:,.0f}",
             "-" if r["gb_per_s"] is None else f"{r['gb_per_s']:.2f}",
             "-" if r["gb_per_s"] is None else f"{r['gb_per_s'] / ceiling:.2f}",
             "-" if r["first_batch_s"] is None else f"{r['first_batch_s'] * 1000:.1f}") for r in RESULTS]
    if rows:
        print(table(rows, ("figure", "tensorgrid variant", "rows/s", "GB/s", "x memcpy", "first batch ms")))
    if "records100" in only:
        print(f"\nshuffle quality (records100, Spearman rank correlation storage vs epoch position): "
              f"{shuffle_quality(root):+.4f}")
        print(f"resume at the last batch of an epoch -> first batch: {resume_time(root):.3f} s")
    if a.peers or a.peers_json:
        peers(a, only)
    with open(a.json, "w") as f:
        json.dump({"machine": machine(), "memcpy_gbs": ceiling, "results": RESULTS}, f, indent=1)


if __name__ == "__main__":
    main()
