"""Remote reads: the same dataset on the local disk and on S3 (moto's S3 server on loopback, s3fs client),
read whole (to_arrow) and by the loader, beside the machine's ceilings and moto's own GET speed measured in
the same run, so that what our protocol path costs is told apart from what the server costs.

    python benchmarks/bench_remote.py [--mb 256] [--repeat 3] [--moto-in-process]

Two shapes of ~``--mb`` MiB each, random bytes (incompressible, like JPEG): 1 KiB rows (an int64 id and a
uint8 tensor of 1,024) and 100 KiB image-like rows (a uint8 tensor of 100 x 1,024). Written with the
default shard size (128 MiB: 2 shards each). moto runs in a child process by default (its Python and the
client's do not share one interpreter's lock; it keeps objects in memory, not in temporary files);
``--moto-in-process`` runs it as the test suite does (a thread of this process).

Prediction (written before measuring; 2 shared cores): memcpy ~10 GB/s, TCP over loopback 2-3 GB/s (GUIDE);
moto is a Python HTTP server, so one GET streams at ~0.3-0.5 GB/s, and 8 MiB ranges 8 at a time gain only
where client and server overlap (~1.3x: 2 cores). to_arrow locally ~1.5-2 GB/s (memory map + xxh3 + decode of
fixed-size binary on 2 threads); over S3 the fetch dominates: ~0.3 GB/s, S3/local ~0.2. The loader without
its Arrow cache follows the same ratio; its default first epoch over S3 also fetches every shard a second
time for the cache (the filler), so ~0.6x the cache-off figure; the second epoch reads the local cache: the
same speed as local.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, drop_caches, machine, median_time, memcpy_gbs, table  # noqa: E402

MiB = 1 << 20
SHAPES = {"1 KiB rows": (1024,), "100 KiB rows": (100, 1024)}
MOTO = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the benchmark closes our stdin (or dies)
server.stop()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto(in_process: bool):
    """moto's S3 server on a free loopback port, the environment pointing s3fs at it (as tests/conftest.py
    does); returns a function that stops it."""
    port = free_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    if in_process:
        from moto.server import ThreadedMotoServer

        os.environ["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 30)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        return server.stop
    env = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(1 << 30)}  # objects in memory, not temp files
    proc = subprocess.Popen([sys.executable, "-c", MOTO, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout.readline().strip() == b"ready"

    def stop():
        proc.stdin.close()
        proc.wait(timeout=30)

    return stop


def new_bucket() -> str:
    import boto3

    name = f"bench-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=name)
    return name


# --- ceilings ------------------------------------------------------------------------------------------
def tcp_loopback_gbs(nbytes: int = 1 << 30) -> float:
    """One TCP stream over loopback, 1 MiB sends into a reused buffer: the network path's ceiling here."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    buf = np.ones(MiB, dtype=np.uint8)

    def send():
        conn, _ = srv.accept()
        with conn:
            for _ in range(nbytes // MiB):
                conn.sendall(memoryview(buf))

    t = threading.Thread(target=send)
    t.start()
    sink = bytearray(4 * MiB)
    with socket.create_connection(srv.getsockname()) as c:
        got, t0 = 0, time.perf_counter()
        while got < nbytes:
            n = c.recv_into(sink)
            if not n:
                break
            got += n
        secs = time.perf_counter() - t0
    t.join()
    srv.close()
    return got / secs / 1e9


def disk_read_gbs(path: str, nbytes: int = 1 << 30) -> dict:
    """Reading a 1 GiB file in 8 MiB reads: warm (page cache) and, where the cache can be dropped, cold."""
    with open(path, "wb") as f:
        f.write(np.ones(nbytes, dtype=np.uint8))
    out_buf = bytearray(8 * MiB)

    def read():
        with open(path, "rb", buffering=0) as f:
            while f.readinto(out_buf):
                pass

    read()
    out = {"warm": nbytes / median_time(read, repeat=3, warmup=0) / 1e9}
    if drop_caches():
        t0 = time.perf_counter()
        read()
        out["cold"] = nbytes / (time.perf_counter() - t0) / 1e9
    os.unlink(path)
    return out


def raw_gets(bucket: str, repeat: int) -> list[tuple]:
    """moto's own speed for one 128 MiB object: s3fs's cat_file, one GET, our ranged fetch (+ xxh3)."""
    import fsspec

    from tensorgrid.store import manifest, remote

    fs = fsspec.filesystem("s3")
    size = 128 * MiB
    data = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8).tobytes()
    path = f"{bucket}/raw/object.bin"
    fs.pipe_file(path, data)
    rows = []

    def add(label, fn):
        secs = median_time(fn, repeat=repeat)
        rows.append((label, f"{size / secs / 1e9:.2f}"))
        return secs

    add("s3fs cat_file (HEAD, then 50 MiB parts, 10 at a time)", lambda: fs.cat_file(path))
    add("one GET (a single range, no HEAD)", lambda: fs.cat_file(path, start=0, end=size))
    for part in (4, 8, 16, 32):
        add(f"remote.fetch: {part} MiB ranges, {remote.IN_FLIGHT} in flight", lambda p=part: remote.fetch(fs, path, size, p * MiB))
    add("remote.fetch 8 MiB + xxh3 check (what a shard read does before decoding)",
        lambda: manifest.checksum(remote.fetch(fs, path, size, 8 * MiB)))
    add("remote.fetch, one GET + xxh3 check ($TENSORGRID_RANGE_BYTES=0)",
        lambda: manifest.checksum(remote.fetch(fs, path, size, 0)))
    small = f"{bucket}/raw/small.bin"
    fs.pipe_file(small, data[:8 * MiB])
    for label, p in (("128 MiB", path), ("8 MiB", small)):  # moto reads the whole object for any range
        secs = median_time(lambda p=p: fs.cat_file(p, start=0, end=1), repeat=repeat)
        rows.append((f"moto: a 1-byte range of a {label} object", f"{secs * 1e3:.0f} ms"))
    fs.rm(path)
    fs.rm(small)
    return rows


# --- the datasets and their reads ------------------------------------------------------------------------
def dataset(shape: tuple, mb: int) -> pa.Table:
    row = int(np.prod(shape))
    rows = mb * MiB // row
    values = np.random.default_rng(0).integers(0, 256, (rows, *shape), dtype=np.uint8)
    return pa.table({"id": np.arange(rows), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(values)})


def timed_epoch(url: str, cache_dir, **kw) -> float:
    import tensorgrid as tg

    loader = tg.open(url).to_torch(batch_size=256, cache_dir=cache_dir, **kw)
    t0 = time.perf_counter()
    n = sum(len(b["id"]) for b in loader)
    secs = time.perf_counter() - t0
    assert n == tg.open(url).num_rows
    loader.source.wait_filled(120)  # a fill still going on must not run into the next figure
    return secs


def reads(url: str, repeat: int, cache_root: str) -> dict:
    """Seconds (median) of each read of the dataset at ``url``."""
    import tensorgrid as tg
    from tensorgrid.store import versioned

    def whole():
        versioned._verified.clear()  # local shards: verified on each timed read, as remote ones are
        tg.open(url).to_arrow()

    def fresh_cache():
        shutil.rmtree(cache_root, ignore_errors=True)
        os.makedirs(cache_root)
        return cache_root

    out = {"to_arrow()": median_time(whole, repeat=repeat)}
    out["loader epoch, cache off"] = median_time(lambda: timed_epoch(url, False), repeat=repeat)
    firsts, seconds = [], []
    for _ in range(repeat):  # the default: epoch 1 reads storage while the cache fills, epoch 2 reads the cache
        root = fresh_cache()
        firsts.append(timed_epoch(url, root))
        seconds.append(timed_epoch(url, root))
    out["loader epoch 1, default (cache filling)"] = sorted(firsts)[len(firsts) // 2]
    out["loader epoch 2, default (from the cache)"] = sorted(seconds)[len(seconds) // 2]
    out["loader shuffled epoch, cache off"] = median_time(
        lambda: timed_epoch(url, False, shuffle=True), repeat=repeat)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=256, help="MiB per dataset shape")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--moto-in-process", action="store_true")
    a = p.parse_args()
    root = os.path.join(DATA, "remote")
    shutil.rmtree(root, ignore_errors=True)
    os.makedirs(root)
    os.environ["TENSORGRID_CACHE_DIR"] = os.path.join(root, "cache")  # never the user's cache
    stop = start_moto(a.moto_in_process)
    try:
        import tensorgrid as tg
        from tensorgrid.store import remote

        print(f"machine: {machine()}")
        bucket = new_bucket()
        ceilings = [("numpy memcpy", f"{memcpy_gbs():.2f}"), ("TCP over loopback, one stream", f"{tcp_loopback_gbs():.2f}")]
        disk = disk_read_gbs(os.path.join(root, "disk.bin"))
        ceilings.append(("local disk read, page cache warm", f"{disk['warm']:.2f}"))
        if "cold" in disk:
            ceilings.append(("local disk read, cold", f"{disk['cold']:.2f}"))
        where = "in this process" if a.moto_in_process else "a child process"
        print(f"\n## Ceilings and moto's own speed (moto server in {where}; one 128 MiB object; median of "
              f"{a.repeat})\n")
        print(table(ceilings + raw_gets(bucket, a.repeat), ("what", "GB/s")))
        for name, shape in SHAPES.items():
            t = dataset(shape, a.mb)
            nbytes = t.num_rows * int(np.prod(shape))
            local, s3 = os.path.join(root, name.split()[0] + "k"), f"s3://{bucket}/{name.split()[0]}k"
            for url in (local, s3):
                tg.write(url, t)
            shards = tg.open(s3).num_shards
            del t
            cache = os.path.join(root, "cache-run")
            got = {"local": reads(local, a.repeat, cache), "s3": reads(s3, a.repeat, cache)}
            os.environ[remote.RANGE_ENV] = "0"
            got["s3, one GET"] = reads(s3, a.repeat, cache)
            del os.environ[remote.RANGE_ENV]
            n = tg.open(local).num_rows
            rows = []
            for what, lo in got["local"].items():
                ranged, one = got["s3"][what], got["s3, one GET"][what]
                rows.append((what, f"{n / lo:,.0f}", f"{nbytes / lo / 1e9:.2f}", f"{n / ranged:,.0f}",
                             f"{nbytes / ranged / 1e9:.2f}", f"{lo / ranged:.2f}", f"{nbytes / one / 1e9:.2f}",
                             f"{lo / one:.2f}"))
            print(f"\n## {name}: {nbytes / MiB:.0f} MiB, {n:,} rows, {shards} shards (local page cache warm; "
                  f"median of {a.repeat})\n")
            print(table(rows, ("read", "local rows/s", "local GB/s", "S3 rows/s", "S3 GB/s", "S3 / local",
                               "S3 one GET GB/s", "one GET / local")))
    finally:
        stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
