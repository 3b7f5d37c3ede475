"""Issue 11 ("Performance" of the grid server): the grid measured against its transport, the local store and
Ignite, in one run, server and clients in separate processes.

    .venv/bin/python benchmarks/bench_grid.py [--data benchmarks/_data/grid] [--json out.json]
        [--only ignite,cold,loader,sql] [--rows1mb 4000] [--records 200000] [--images 60000]

Processes: the grid server (``GridServer``) and a bare ``pyarrow.flight`` server (a trivial FlightServerBase
serving an in-memory table) each run in a child process of this script; the throughput clients run in this
process (which serves nothing); the cold-pass probes and the concurrent ``get`` clients are fresh child
processes. Everything over loopback (grpc://127.0.0.1), no TLS, no users.

1. The Ignite shape: rows of 1 MiB (a uint8 tensor column of 1024x1024 + an int64 id), 4,000 rows (4.2 GB)
   unless the machine has too little free memory (then fewer: said in the output). The same bytes through:
   a bare DoGet of an in-memory table (the transport's ceiling; the same rows, re-cut into the same <= 8 MiB
   messages the grid sends), our client (``g.dataset(name).to_arrow()``: one DoGet per partition), the
   loader over the grid into torch (``to_torch(16, cache_dir=False)``, sequential, batches as handed over),
   the ADBC driver (``SELECT * FROM t`` + ``fetch_arrow_table``), a local store read (``tg.open(url)
   .to_arrow()``, page cache warm, checksums verified once before) and the local loader; numpy memcpy.
   The SQL path goes through DuckDB, which cannot take a 1 MiB tensor as nested ARRAY (it runs out of
   memory: shown as an error row); so ADBC is also measured on a fixed_size_binary twin of the first
   1,000 rows, with our client and a bare DoGet of the same rows beside it.
   Protocol: a first (cold) pass of each variant reported apart, then 3 passes alternating variants (order
   reversed every other round); best pass and spread (worst..best).
2. Cold passes: fresh client processes, each doing 4 bare DoGets of 1 GiB in a row, with the client's
   allocator and connection varied; minor page faults counted on both sides (getrusage in the client,
   /proc/<pid>/stat of the server).
3. Loader over the grid vs the local store, shuffled, batch 256, ``cache_dir=False`` on both, each pass a new
   loader's first epoch: 100-byte records (25 float32 as one tensor column + int32 label) and 28x28 uint8
   images + int64 label.
4. Small queries: ``SELECT * FROM t WHERE id BETWEEN ? AND ?`` (100 rows) through our client and ADBC
   (rows/s, one connection, sequential); ``g.get(table, key)`` latency p50/p99 with 1 and 8 client
   PROCESSES at once (each its own connection; 8 clients + the server share 2 cores).

Predictions (written before measuring; memcpy ~10-20 GB/s, loopback TCP 2-3 GB/s, bare DoGet warm 1.3-1.6):
- bare DoGet warm 1.2-1.8 GB/s, cold first pass 0.2-0.5 GB/s; our client's to_arrow 0.85-0.95x bare (same
  messages, one DoGet per partition: ~30 partitions, ~1 ms each); ADBC ~0.3-0.6x bare (DuckDB scans the
  table and copies every blob into its own vectors, then to Arrow again); local to_arrow 4-9 GB/s (memory
  map + one decode), i.e. 3-6x the grid; loader over the grid 0.5-0.8x to_arrow (one DoGet per ~4 MiB
  block: 4 rows per round trip). Ignite's 0.8 GB/s: bare and client at 1.5-2x.
- cold pass: client-side page faults of fresh allocator memory for every received message (~256 faults per
  MiB at 4 KiB pages, ~0.1-0.2 us each ... plus zeroing): a fresh process pays them until its allocator
  keeps the pages; pre-touching or a non-purging allocator should take pass 1 to the warm rate. gRPC's
  flow-control windows grow within the first few MiB (BDP probing), so a new connection in a warm process
  should cost < 5%.
- loader, shuffled, first epoch: local 1-3 M records/s, 0.5-1.5 M images/s; grid: the data is 20 MB / 47 MB,
  read in ~4 MiB blocks by DoGet at ~1 GB/s => the transfer is 20-50 ms, so the grid reaches 0.7-0.95x of
  local (target >= 0.5).
- small queries: each g.sql is 4 round trips (prepare, bind parameters by DoPut, GetFlightInfo which runs
  the query, DoGet) + close = 5, each ~0.3-1 ms in Python gRPC on this machine => 200-600 queries/s =
  20-60 k rows/s; ADBC similar or 1.5x (C++ client, but the same server round trips). get: 1 action round
  trip + a DuckDB point query: p50 0.5-1.5 ms with 1 client; with 8 processes on 2 cores p50 ~3-8x higher,
  p99 10-30 ms (CPU contention; the server's Python handlers hold the GIL).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import DATA, machine, memcpy_gbs, table  # noqa: E402

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
warnings.filterwarnings("ignore", category=UserWarning, module="adbc_driver_manager")
MIB = 1 << 20
PASSES = 3
IGNITE_REMOTE_GBS, IGNITE_LOCAL_GBS = 0.8, 0.85
MAX_BATCH_BYTES = 8 << 20  # GridServer's default message cap: the bare server sends the same messages


# ====================================================================== child processes
def child_grid_server(root: str, allow: str) -> None:
    """A grid server in this process: prints its URL, serves until stdin closes."""
    from tensorgrid.server.grid import GridServer

    server = GridServer(root, allow=[allow])
    _serve(server, server.url)


def child_bare_server(url: str) -> None:
    """A trivial FlightServerBase over the store dataset at ``url`` read into memory: ticket b"<n>" -> the
    first n rows, in the grid's message sizes."""
    import pyarrow as pa
    import pyarrow.flight as flight

    import tensorgrid as tg
    from tensorgrid.server.results import batches_by_bytes

    data = tg.open(url).to_arrow().combine_chunks()
    data = pa.Table.from_batches(list(batches_by_bytes(data.to_batches(), MAX_BATCH_BYTES)), data.schema)

    class Bare(flight.FlightServerBase):
        def do_get(self, context, ticket):
            return flight.RecordBatchStream(data.slice(0, int(ticket.ticket)))

    server = Bare("grpc://127.0.0.1:0")
    _serve(server, f"grpc://127.0.0.1:{server.port}")


def _serve(server, url: str) -> None:
    print(url, flush=True)
    threading.Thread(target=lambda: (sys.stdin.read(), server.shutdown()), daemon=True).start()
    server.serve()


def child_cold(url: str, rows: int, mode: str, server_pid: int) -> None:
    """Four bare DoGets of ``rows`` rows in a fresh process: seconds and minor faults (client, server) each."""
    import pyarrow as pa
    import pyarrow.flight as flight

    if mode == "pretouch":  # the bytes of one read, allocated from Arrow's pool in 8 MiB pieces, written, freed
        bufs = [pa.allocate_buffer(MAX_BATCH_BYTES + MIB) for _ in range(rows * MIB // MAX_BATCH_BYTES + 8)]
        for b in bufs:
            np.ndarray(b.size, np.uint8, buffer=memoryview(b)).fill(1)
        del bufs
    client = flight.FlightClient(url)
    out = []
    for _ in range(4):
        if mode == "newconn":
            client.close()
            client = flight.FlightClient(url)
        f0, s0, t0 = _minflt_self(), _minflt(server_pid), time.perf_counter()
        t = client.do_get(flight.Ticket(str(rows).encode())).read_all()
        secs = time.perf_counter() - t0
        out.append({"s": secs, "gbs": t.nbytes / secs / 1e9, "client_faults": _minflt_self() - f0,
                    "server_faults": _minflt(server_pid) - s0, "bytes": t.nbytes})
        del t
    print(json.dumps({"pool": pa.default_memory_pool().backend_name, "passes": out}), flush=True)


def child_get(url: str, table_name: str, keys: int, n: int, start_at: float) -> None:
    """``n`` g.get calls on random keys from one fresh process; prints their latencies (s)."""
    import tensorgrid as tg

    g = tg.connect(url)
    rng = np.random.default_rng(os.getpid())
    for k in rng.integers(0, keys, 20):  # warm-up: the connection, the server's handler path
        g.get(table_name, int(k))
    time.sleep(max(0.0, start_at - time.time()))
    lat = []
    for k in rng.integers(0, keys, n):
        t0 = time.perf_counter()
        row = g.get(table_name, int(k))
        lat.append(time.perf_counter() - t0)
        assert row is not None and row["id"] == int(k)
    print(json.dumps({"lat": lat, "t0": start_at, "t1": time.time()}), flush=True)


def _minflt_self() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _minflt(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])  # field 10: minflt
    except (OSError, ValueError, IndexError):
        return -1


class Child:
    """A server started as ``python bench_grid.py --child-* ...``: its URL from the first stdout line."""

    def __init__(self, *args, env=None):
        self.p = subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        self.url = self.p.stdout.readline().strip()
        if not self.url.startswith("grpc://"):
            self.stop()
            raise RuntimeError(f"server child {args} did not start (exit {self.p.returncode})")

    @property
    def pid(self) -> int:
        return self.p.pid

    def rss_gb(self) -> float:
        try:
            with open(f"/proc/{self.p.pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20
        except (OSError, StopIteration):
            return -1.0

    def stop(self) -> None:
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()


# ====================================================================== data
def write_datasets(data: str, rows1mb: int, records: int, images: int, wanted: set) -> dict:
    """Store datasets under ``data`` (written once, kept for the next run), those in ``wanted``: {name: url}."""
    import pyarrow as pa

    import tensorgrid as tg

    rng = np.random.default_rng(0)
    urls = {k: os.path.join(data, "store", f"{k}-{n}") for k, n in
            (("rows1mb", rows1mb), ("records", records), ("images", images))}
    urls["fsb1mb"] = os.path.join(data, "store", f"fsb1mb-{min(rows1mb, 1000)}")

    def rows1mb_batches(n, fsb=False):
        for i in range(0, n, 64):
            k = min(64, n - i)
            x = rng.integers(0, 256, (k, MIB), dtype=np.uint8)
            col = (pa.FixedSizeBinaryArray.from_buffers(pa.binary(MIB), k, [None, pa.py_buffer(x)]) if fsb
                   else pa.FixedShapeTensorArray.from_numpy_ndarray(x.reshape(k, 1024, 1024)))
            yield pa.record_batch({"x": col, "id": np.arange(i, i + k, dtype=np.int64)})

    makers = {
        "rows1mb": lambda: rows1mb_batches(rows1mb),
        "fsb1mb": lambda: rows1mb_batches(min(rows1mb, 1000), fsb=True),
        "records": lambda: [pa.record_batch({
            "x": pa.FixedShapeTensorArray.from_numpy_ndarray(rng.standard_normal((records, 25), dtype=np.float32)),
            "label": rng.integers(0, 10, records, dtype=np.int32)})],
        "images": lambda: [pa.record_batch({
            "image": pa.FixedShapeTensorArray.from_numpy_ndarray(rng.integers(0, 256, (images, 28, 28), dtype=np.uint8)),
            "label": rng.integers(0, 10, images, dtype=np.int64)})],
    }
    for k, url in urls.items():
        if k not in wanted:
            continue
        if not os.path.exists(url):
            t0 = time.perf_counter()
            tg.write(url + ".tmp", makers[k]())
            os.replace(url + ".tmp", url)
            log(f"wrote {url} in {time.perf_counter() - t0:.1f}s")
    return urls


def warm_files(root: str) -> None:
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                while f.read(16 << 20):
                    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ====================================================================== timing
def timed(variants: list[tuple[str, object]], passes: int = PASSES) -> dict:
    """A first pass of each variant (reported as 'cold'), then ``passes`` passes each, alternating (order
    reversed every other round). ``variants``: (name, fn) where fn() returns the units moved (bytes, rows)."""
    out = {}
    for name, fn in variants:
        t0 = time.perf_counter()
        try:
            units = fn()
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a result (shown as an error row)
            out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
            log(f"  {name}: FAILED {out[name]['error']}")
            continue
        out[name] = {"units": units, "first_s": time.perf_counter() - t0, "passes": []}
        log(f"  first {name}: {units / out[name]['first_s']:,.0f}/s")
    for r in range(passes):
        for name, fn in (variants if r % 2 == 0 else variants[::-1]):
            if "error" in out[name]:
                continue
            t0 = time.perf_counter()
            fn()
            out[name]["passes"].append(time.perf_counter() - t0)
            log(f"  pass {r + 1} {name}: {out[name]['units'] / out[name]['passes'][-1]:,.0f}/s")
    for o in out.values():
        if "passes" in o:
            rates = [o["units"] / s for s in o["passes"]]
            o.update(best=max(rates), worst=min(rates), first=o["units"] / o["first_s"])
    return out


def fmt(x: float, scale: float = 1.0, digits: int = 2) -> str:
    return f"{x / scale:,.{digits}f}"


# ====================================================================== 1. the Ignite shape
def bench_ignite(urls: dict, grid_url: str, bare_url: str, rows: int, memcpy: float) -> dict:
    import adbc_driver_flightsql.dbapi as adbc
    import pyarrow.flight as flight

    import tensorgrid as tg

    g = tg.connect(grid_url)
    bare = flight.FlightClient(bare_url)
    adbc_conn = adbc.connect(grid_url)
    fsb_rows = min(rows, 1000)

    def bare_get(n):
        t = bare.do_get(flight.Ticket(str(n).encode())).read_all()
        return t.nbytes

    def client_arrow(name):
        return g.dataset(name).to_arrow().nbytes

    def loader(ds):
        n = 0
        for b in ds.to_torch(batch_size=16, cache_dir=False):
            n += b["x"].numel() + 8 * len(b["id"])  # the bytes handed over (views allowed: not touched)
        return n

    def adbc_arrow(name):
        with adbc_conn.cursor() as cur:
            cur.execute(f"SELECT * FROM {name}")
            return cur.fetch_arrow_table().nbytes

    local = {k: tg.open(urls[k]) for k in ("rows1mb", "fsb1mb")}
    for ds in local.values():
        ds.to_arrow()  # checksums verified once by this process: the local figure is a warm read

    log(f"1 MiB rows: {rows} rows")
    big = timed([
        ("bare DoGet", lambda: bare_get(rows)),
        ("client to_arrow", lambda: client_arrow("rows1mb")),
        ("local to_arrow", lambda: local["rows1mb"].to_arrow().nbytes),
        ("client loader -> torch", lambda: loader(g.dataset("rows1mb"))),
        ("local loader -> torch", lambda: loader(local["rows1mb"])),
        ("ADBC SELECT *", lambda: adbc_arrow("rows1mb")),
    ])
    log(f"fixed_size_binary twin: {fsb_rows} rows")
    small = timed([
        ("bare DoGet", lambda: bare_get(fsb_rows)),
        ("client to_arrow", lambda: client_arrow("fsb1mb")),
        ("client g.sql SELECT *", lambda: g.sql("SELECT * FROM fsb1mb").to_arrow().nbytes),
        ("ADBC SELECT *", lambda: adbc_arrow("fsb1mb")),
        ("local to_arrow", lambda: local["fsb1mb"].to_arrow().nbytes),
    ])
    adbc_conn.close()
    g.close()
    bare.close()
    return {"rows": rows, "fsb_rows": fsb_rows, "tensor": big, "fsb": small, "memcpy_gbs": memcpy}


def ignite_table(res: dict, memcpy: float) -> str:
    rows = []
    for part, label in (("tensor", f"{res['rows']:,} x 1 MiB uint8 tensor"),
                        ("fsb", f"{res['fsb_rows']:,} x 1 MiB fixed_size_binary")):
        ceiling = res[part]["bare DoGet"].get("best")
        for name, o in res[part].items():
            if "error" in o:
                rows.append((label, name, "-", "-", "-", "-", "fails: " + o["error"].split("Error: ", 1)[-1][:60]))
                continue
            rows.append((label, name, fmt(o["best"], 1e9), f"{fmt(o['worst'], 1e9)}..{fmt(o['best'], 1e9)}",
                         fmt(o["first"], 1e9), f"{o['best'] / ceiling:.2f}" if ceiling else "-",
                         f"{o['best'] / IGNITE_REMOTE_GBS / 1e9:.1f}x"))
        label = label  # noqa: PLW0127
    rows.append(("", "numpy memcpy (ceiling)", fmt(memcpy), "", "", "", ""))
    rows.append(("", "Apache Ignite, published remote (local 0.85)", "0.80", "", "", "", "1.0x"))
    return table(rows, ("data", "read", "GB/s best", "spread", "first pass", "x bare DoGet", "x Ignite / note"))


# ====================================================================== 2. cold passes
COLD_MODES = [
    ("default pool, 1 connection", "plain", {}),
    ("new connection every pass", "newconn", {}),
    ("pre-touched pool (alloc+write+free 1 GiB first)", "pretouch", {}),
    ("mimalloc, purge never (MIMALLOC_PURGE_DELAY=-1)", "plain", {"MIMALLOC_PURGE_DELAY": "-1"}),
    ("pre-touch + mimalloc purge never", "pretouch", {"MIMALLOC_PURGE_DELAY": "-1"}),
    ("system pool (glibc malloc)", "plain", {"ARROW_DEFAULT_MEMORY_POOL": "system"}),
    ("system pool, glibc no trim/mmap", "plain", {"ARROW_DEFAULT_MEMORY_POOL": "system",
                                                   "MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                                   "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}),
    ("glibc no trim/mmap (gRPC's buffers), mimalloc pool", "plain", {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                                                     "MALLOC_TRIM_THRESHOLD_": str(1 << 34)}),
    ("glibc no trim/mmap + mimalloc purge never", "plain", {"MALLOC_MMAP_THRESHOLD_": str(1 << 30),
                                                            "MALLOC_TRIM_THRESHOLD_": str(1 << 34),
                                                            "MIMALLOC_PURGE_DELAY": "-1"}),
    ("jemalloc pool", "plain", {"ARROW_DEFAULT_MEMORY_POOL": "jemalloc"}),
]


def bench_cold(bare: Child, rows: int) -> dict:
    out = {}
    for label, mode, env in COLD_MODES:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-cold", bare.url, str(rows), mode,
                            str(bare.pid)], capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
        try:
            out[label] = json.loads(p.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out[label] = {"error": (p.stderr.strip().splitlines() or ["?"])[-1][:160]}
        o = out[label]
        log(f"  cold {label}: " + (o.get("error") or " ".join(f"{x['gbs']:.2f}" for x in o["passes"])))
    return out


def cold_table(res: dict) -> str:
    rows = []
    for label, o in res.items():
        if "error" in o:
            rows.append((label, "-", "-", "-", "-", o["error"][:80], "", ""))
            continue
        p = o["passes"]
        mib = p[0]["bytes"] / MIB
        rows.append((label, o["pool"], *(fmt(x["gbs"]) for x in p),
                     " / ".join(f"{x['client_faults'] / mib:.0f}" for x in p),
                     " / ".join(f"{x['server_faults'] / mib:.0f}" for x in p)))
    return table(rows, ("client process (fresh)", "pool", "pass 1 GB/s", "pass 2", "pass 3", "pass 4",
                        "client faults/MiB (passes 1-4)", "server faults/MiB"))


# ====================================================================== 3. loader, shuffled
def bench_loader(urls: dict, grid_url: str) -> dict:
    import tensorgrid as tg

    g = tg.connect(grid_url)
    out = {}
    for name in ("records", "images"):
        local = tg.open(urls[name])
        local.to_arrow()  # verified once: a warm local read

        def epoch(ds):
            n = 0
            for b in ds.to_torch(batch_size=256, shuffle=True, cache_dir=False):
                n += len(b["label"])
            return n

        log(f"loader {name}: {local.num_rows} rows")
        out[name] = timed([("local store", lambda local=local: epoch(local)),
                           ("grid", lambda name=name: epoch(g.dataset(name)))])
        out[name]["partitions"] = len(g.dataset(name).shard_rows)
    g.close()
    return out


def loader_table(res: dict) -> str:
    rows = []
    for name, label in (("records", "100-byte records (25 float32 + label)"), ("images", "28x28 uint8 + label")):
        o = res[name]
        for v in ("local store", "grid"):
            x = o[v]
            ratio = x["best"] / o["local store"]["best"]
            rows.append((label, v, fmt(x["best"], 1e6), f"{fmt(x['worst'], 1e6)}..{fmt(x['best'], 1e6)}",
                         fmt(x["first"], 1e6), f"{ratio:.2f}"))
    return table(rows, ("data (shuffled, batch 256, first epoch)", "over", "M rows/s best", "spread",
                        "first pass", "x local"))


# ====================================================================== 4. small queries
def bench_sql(grid_url: str, keys: int, seconds: float) -> dict:
    import adbc_driver_flightsql.dbapi as adbc

    import tensorgrid as tg

    g = tg.connect(grid_url)
    g.sql("CREATE TABLE IF NOT EXISTS t (id BIGINT PRIMARY KEY, a DOUBLE, b VARCHAR)")
    if g.sql("SELECT count(*) AS n FROM t").to_arrow()["n"][0].as_py() == 0:
        g.sql(f"INSERT INTO t SELECT i, i * 0.5, 'row ' || i FROM range({keys}) r(i)")
    query = "SELECT * FROM t WHERE id BETWEEN ? AND ?"
    rng = np.random.default_rng(1)
    conn = adbc.connect(grid_url)
    adbc_cur = conn.cursor()  # one cursor, as a DB-API loop would: the driver may reuse the prepared statement

    def client_query():
        lo = int(rng.integers(0, keys - 100))
        n = g.sql(query, [lo, lo + 99]).num_rows
        assert n == 100, n
        return n

    def adbc_query():
        lo = int(rng.integers(0, keys - 100))
        adbc_cur.execute(query, (lo, lo + 99))
        n = adbc_cur.fetch_arrow_table().num_rows
        assert n == 100, n
        return n

    def loop(fn):  # as many queries as fit in ``seconds``: rows moved
        def run():
            t0, rows = time.perf_counter(), 0
            while time.perf_counter() - t0 < seconds:
                rows += fn()
            return rows
        return run

    # rates need a fixed amount of work per pass: count queries in a calibration, then run that many
    out = {}
    for name, fn in (("client g.sql", client_query), ("ADBC", adbc_query)):
        rows = loop(fn)()
        n = max(20, rows // 100)
        out[name] = timed([(name, lambda fn=fn, n=n: sum(fn() for _ in range(n)))])[name]
        out[name]["queries"] = n
    adbc_cur.close()
    conn.close()

    # g.get latency: 1 and 8 client processes at once, 3 passes each
    out["get"] = {}
    for clients in (1, 8):
        per = 1500 // clients
        passes = []
        for r in range(PASSES):
            start_at = time.time() + 4.0  # after every child imported tensorgrid and connected
            procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child-get", grid_url, "t",
                                       str(keys), str(per), str(start_at)], stdout=subprocess.PIPE, text=True)
                     for _ in range(clients)]
            results = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
            lat = np.concatenate([r["lat"] for r in results])
            wall = max(r["t1"] for r in results) - start_at
            late = max(0.0, min(r["t1"] - sum(r["lat"]) for r in results) - start_at)
            passes.append({"p50_ms": float(np.percentile(lat, 50) * 1e3), "p99_ms": float(np.percentile(lat, 99) * 1e3),
                           "gets_per_s": len(lat) / wall, "calls": len(lat), "late_start_s": late})
            log(f"  get x{clients} pass {r + 1}: p50 {passes[-1]['p50_ms']:.2f} ms p99 {passes[-1]['p99_ms']:.2f} ms "
                f"{passes[-1]['gets_per_s']:,.0f}/s")
        out["get"][clients] = passes
    g.close()
    try:
        out["anatomy"] = get_anatomy(keys)
    except ImportError as exc:  # private helpers of datasets.py: they may move
        out["anatomy"] = {f"n/a ({exc})"[:100]: float("nan")}
    return out


def get_anatomy(keys: int) -> dict:
    """What the server's DuckDB work for one ``get`` costs, in this process on an in-memory copy of table t:
    the calls DatasetsService.get makes (catalog look-ups, then the point query), each timed alone (ms)."""
    import duckdb

    from tensorgrid.server import datasets as ds

    con = duckdb.connect()
    con.sql("CREATE TABLE t (id BIGINT PRIMARY KEY, a DOUBLE, b VARCHAR)")
    con.sql(f"INSERT INTO t SELECT i, i * 0.5, 'row ' || i FROM range({keys}) r(i)")
    cur = con.cursor()
    steps = {"_table_name (catalog)": lambda: ds._table_name(cur, "t"),
             "_primary_key (catalog)": lambda: ds._primary_key(cur, "t"),
             "SELECT * WHERE id = ? -> Arrow": lambda: cur.sql("SELECT * FROM t WHERE id = ?", params=[5]).to_arrow_table(),
             "SELECT BETWEEN ? AND ? -> Arrow (the range query)": lambda: cur.sql(
                 "SELECT * FROM t WHERE id BETWEEN ? AND ?", params=[5, 104]).to_arrow_reader(1024).read_all()}
    out = {}
    for name, fn in steps.items():
        fn()
        t0 = time.perf_counter()
        for _ in range(200):
            fn()
        out[name] = (time.perf_counter() - t0) / 200 * 1e3
    con.close()
    return out


def sql_tables(res: dict) -> str:
    rows = []
    for name in ("client g.sql", "ADBC"):
        o = res[name]
        rows.append((name, fmt(o["best"], 1, 0), f"{fmt(o['worst'], 1, 0)}..{fmt(o['best'], 1, 0)}",
                     fmt(o["best"] / 100, 1, 0), fmt(100 / o["best"] * 1e3, 1, 2)))
    t1 = table(rows, ("SELECT * FROM t WHERE id BETWEEN ? AND ? (100 rows)", "rows/s best", "spread",
                      "queries/s", "ms per query"))
    rows = []
    for clients, passes in res["get"].items():
        best = min(passes, key=lambda p: p["p50_ms"])
        rows.append((f"{clients} process{'es' if clients > 1 else ''}", f"{best['p50_ms']:.2f}",
                     f"{min(p['p50_ms'] for p in passes):.2f}..{max(p['p50_ms'] for p in passes):.2f}",
                     f"{best['p99_ms']:.2f}", f"{min(p['p99_ms'] for p in passes):.2f}..{max(p['p99_ms'] for p in passes):.2f}",
                     f"{max(p['gets_per_s'] for p in passes):,.0f}"))
    t2 = table(rows, ("g.get(table, key) clients", "p50 ms (best pass)", "p50 spread", "p99 ms (that pass)",
                      "p99 spread", "gets/s all clients (best)"))
    t3 = table([(k, f"{v:.2f}") for k, v in res["anatomy"].items()],
               ("server-side DuckDB work, timed alone in-process", "ms per call"))
    return t1 + "\n\n" + t2 + "\n\n" + t3


# ====================================================================== main
def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(DATA, "grid"))
    ap.add_argument("--only", default="ignite,cold,loader,sql")
    ap.add_argument("--rows1mb", type=int, default=4000)
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--cold-rows", type=int, default=1024, help="rows of 1 MiB per cold-probe DoGet (1 GiB)")
    ap.add_argument("--sql-seconds", type=float, default=2.0)
    ap.add_argument("--json")
    ap.add_argument("--child-grid-server", nargs=2)
    ap.add_argument("--child-bare-server")
    ap.add_argument("--child-cold", nargs=4)
    ap.add_argument("--child-get", nargs=5)
    a = ap.parse_args()
    if a.child_grid_server:
        return child_grid_server(*a.child_grid_server)
    if a.child_bare_server:
        return child_bare_server(a.child_bare_server)
    if a.child_cold:
        u, n, mode, pid = a.child_cold
        return child_cold(u, int(n), mode, int(pid))
    if a.child_get:
        u, name, keys, n, start_at = a.child_get
        return child_get(u, name, int(keys), int(n), float(start_at))

    import pyarrow as pa
    import torch

    t_start = time.perf_counter()
    only = set(a.only.split(","))
    # memory: the grid server holds the rows, the bare server holds them, this process receives them
    avail = mem_available_gb()
    rows1mb = a.rows1mb
    # 3 copies + the 1 GiB twin twice + headroom for the other engineers' tests: a 4,000-row run with 21 GiB
    # free stalled this shared machine in reclaim (kswapd) on 2026-12-01, so the rule leaves 8 GiB spare
    fit = int((avail - 8.0) / 6.0 * 1024)  # 6: ADBC SELECT * adds DuckDB's result and the driver's copy
    note = ""
    if rows1mb > fit:
        note = f" (asked {a.rows1mb:,}: only {avail:.1f} GiB free; 6 copies + 8 GiB spare must fit)"
        rows1mb = max(256, fit)
    os.makedirs(a.data, exist_ok=True)
    head = [f"machine: {machine()}, torch {torch.__version__}, pyarrow {pa.__version__}, "
            f"Arrow pool {pa.default_memory_pool().backend_name}",
            f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
            f"MemAvailable {avail:.1f} GiB; 1 MiB rows: {rows1mb:,}{note}"]
    print("\n".join(head), flush=True)
    wanted = ({"rows1mb", "fsb1mb"} if only & {"ignite", "cold"} else set()) | (
        {"records", "images"} if "loader" in only else set())
    urls = write_datasets(a.data, rows1mb, a.records, a.images, wanted)
    warm_files(os.path.join(a.data, "store"))
    memcpy0 = memcpy_gbs()
    results = {"machine": head, "memcpy_gbs_start": memcpy0}

    server_root = os.path.join(a.data, "server")
    shutil.rmtree(server_root, ignore_errors=True)  # a fresh grid: no datasets.json from an earlier run
    os.makedirs(server_root)
    grid = bare = None
    try:
        grid = Child("--child-grid-server", server_root, os.path.join(a.data, "store"))
        import tensorgrid as tg

        g = tg.connect(grid.url)
        t0 = time.perf_counter()
        for name in (["rows1mb", "fsb1mb"] if "ignite" in only else []) + (["records", "images"] if "loader" in only else []):
            g.load(name, urls[name])
        log(f"grid server loaded in {time.perf_counter() - t0:.1f}s, RSS {grid.rss_gb():.1f} GiB")
        g.close()
        if "ignite" in only or "cold" in only:
            bare = Child("--child-bare-server", urls["rows1mb"])
        if "cold" in only:
            cold_rows = min(a.cold_rows, rows1mb)
            res = bench_cold(bare, cold_rows)
            results["cold"] = {"rows": cold_rows, "modes": res}
            print(f"\n## Cold passes: fresh client processes, 4 bare DoGets of {cold_rows:,} x 1 MiB each "
                  f"(server already serving)\n")
            print(cold_table(res), flush=True)
        if "ignite" in only:
            res = bench_ignite(urls, grid.url, bare.url, rows1mb, memcpy0)
            res["server_rss_gb"] = {"grid": grid.rss_gb(), "bare": bare.rss_gb()}
            results["ignite"] = res
            print(f"\n## The Ignite shape: 1 MiB rows over loopback (page cache warm; first pass apart, then best "
                  f"of {PASSES} alternating)\n")
            print(ignite_table(res, memcpy0), flush=True)
        if bare is not None:
            bare.stop()
            bare = None
        if "loader" in only:
            res = bench_loader(urls, grid.url)
            results["loader"] = res
            print(f"\n## Loader over the grid vs the local store (cache_dir=False on both; "
                  f"{a.records:,} records, {a.images:,} images; partitions "
                  f"{res['records']['partitions']}/{res['images']['partitions']})\n")
            print(loader_table(res), flush=True)
        if "sql" in only:
            res = bench_sql(grid.url, 100_000, a.sql_seconds)
            results["sql"] = res
            print("\n## Small queries (table t: 100,000 rows, id BIGINT PRIMARY KEY, a DOUBLE, b VARCHAR)\n")
            print(sql_tables(res), flush=True)
    finally:
        for c in (bare, grid):
            if c is not None:
                c.stop()
    memcpy1 = memcpy_gbs()
    results["memcpy_gbs_end"] = memcpy1
    tail = (f"\nmemcpy {memcpy0:.1f} GB/s at the start, {memcpy1:.1f} at the end; load average at the end: "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; total {time.perf_counter() - t_start:.0f} s")
    print(tail)
    results["tail"] = tail.strip()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
