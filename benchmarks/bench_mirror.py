"""What a committing write costs on a grid server whose SQL tables are mirrored to a shared store
(``GridServer(root, store=URL)``, mirror.py), as a function of the table's size, in one run.

    .venv/bin/python benchmarks/bench_mirror.py [--quick] [--sizes 0,1000,100000,1000000] [--repeat 20]
        [--repeat-big 5] [--disk-mib 256]

Two in-process GridServers on loopback, each with its own root in a temporary folder: one without a store, one
with ``store=<tmp>/store`` on the local disk. For each size n a table ``t_<n>`` (id BIGINT PRIMARY KEY, x DOUBLE,
note VARCHAR of 20 bytes) is filled on both by one ``INSERT ... SELECT ... FROM range(n)``; then, alternating
between the servers, a single-row ``INSERT`` (``g.sql`` with literals, a new id each time) and a single-row
``g.put`` (a new id: an upsert that adds a row); median over --repeat calls (--repeat-big for n >= 1M), one
warm-up call each. On the store server the export's parts are timed in-process (its methods wrapped, nothing
else changed): ``Mirror.sync`` (the store's latest version read before the write), ``Mirror.export`` whole,
its ``_write`` (the store dataset's new version), Parquet encoding (``writer._encoded``) and ``os.fsync``; the
DuckDB -> Arrow read of the whole table is export - _write. One exported version's bytes: the shard files of
the dataset at ``<store>/tables/t_<n>`` (``tensorgrid.open``). Takeover: a third server on a fresh root with the
same store, while the store holds only ``t_<n>``: seconds for ``GridServer.__init__`` (it loads every table).
Disk ceiling, same run: write + fsync a --disk-mib file in the store's folder, median of 3.

Everything (servers, temporary folders) is closed and removed at the end, also on errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import disk_write_gbs, machine, median_time, table  # noqa: E402

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
MIB = 1 << 20
NOTE = "'note-' || lpad(CAST({i} AS VARCHAR), 15, '0')"  # 20 bytes


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fsync_ms(folder: str, repeat: int = 20) -> float:
    """One small file written and fsynced, plus its folder fsynced: the floor of any durable commit, ms."""
    path = os.path.join(folder, "small.bin")

    def once():
        with open(path, "wb") as f:
            f.write(b"x" * 4096)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    t = median_time(once, repeat=repeat, warmup=2)
    os.unlink(path)
    return t * 1e3


# ====================================================================== the export's parts, timed in-process
class Probe:
    """Wraps the store server's mirror and the writer's pieces with timers; ``take()`` returns and resets the
    seconds spent in each since the last take. One client call at a time, so no attribution across calls."""

    PARTS = ("sync", "export", "write", "encode", "fsync")

    def __init__(self, server):
        from tensorgrid.server import mirror as mirror_mod
        from tensorgrid.store import writer as writer_mod

        self.acc = dict.fromkeys(self.PARTS, 0.0)
        self.lock = threading.Lock()
        self._undo = []
        m = server.mirror
        self._wrap_attr(m, "sync", "sync", instance=True)
        self._wrap_attr(m, "export", "export", instance=True)
        self._wrap_attr(mirror_mod, "_write", "write")
        self._wrap_attr(writer_mod, "_encoded", "encode")
        self._wrap_attr(os, "fsync", "fsync")

    def _wrap_attr(self, owner, attr: str, part: str, instance: bool = False) -> None:
        original = getattr(owner, attr)
        acc, lock = self.acc, self.lock

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with lock:
                    acc[part] += dt

        setattr(owner, attr, timed)
        if instance:
            self._undo.append(lambda: delattr(owner, attr))
        else:
            self._undo.append(lambda: setattr(owner, attr, original))

    def take(self) -> dict:
        with self.lock:
            out = dict(self.acc)
            for k in self.acc:
                self.acc[k] = 0.0
        return out

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo = []


# ====================================================================== one size
def fill(g, name: str, n: int) -> float:
    t0 = time.perf_counter()
    g.sql(f"CREATE TABLE {name} (id BIGINT PRIMARY KEY, x DOUBLE, note VARCHAR)")
    g.sql(f"INSERT INTO {name} SELECT i, i * 0.5, {NOTE.format(i='i')} FROM range({n}) t(i)")
    return time.perf_counter() - t0


def shard_bytes(url: str) -> tuple[int, int, int]:
    """(bytes of the shard files of the latest version, as summed by the manifest, shards)."""
    import tensorgrid as tg

    ds = tg.open(url)
    files = sum(os.path.getsize(os.path.join(ds.root, s.path)) for s in ds.shards)
    return files, ds.size_bytes, len(ds.shards)


def measure_size(n: int, repeat: int, plain, stored, probe: Probe, store: str, base: str) -> dict:
    from tensorgrid.server.grid import GridServer

    name = f"t_{n}"
    out: dict = {"rows": n, "repeat": repeat}
    out["fill_plain_s"] = fill(plain, name, n)
    out["fill_store_s"] = fill(stored, name, n)
    log(f"{name}: filled ({out['fill_plain_s']:.2f} s no store, {out['fill_store_s']:.2f} s store)")
    next_id = [n + 1_000_000_000]

    def insert(g):
        i = next_id[0]
        next_id[0] += 1
        g.sql(f"INSERT INTO {name} VALUES ({i}, 0.25, 'note-{i:015d}')")

    def put(g):
        i = next_id[0]
        next_id[0] += 1
        g.put(name, [{"id": i, "x": 0.25, "note": f"note-{i:015d}"}])

    times = {(op, srv): [] for op in ("insert", "put") for srv in ("plain", "store")}
    parts = {op: [] for op in ("insert", "put")}
    for op, fn in (("insert", insert), ("put", put)):
        fn(plain)
        fn(stored)  # warm-up
        probe.take()
        for _ in range(repeat):
            for srv, g in (("plain", plain), ("store", stored)):
                probe.take()
                t0 = time.perf_counter()
                fn(g)
                dt = time.perf_counter() - t0
                times[op, srv].append(dt)
                got = probe.take()
                if srv == "store":
                    parts[op].append(got)
    for key, ts in times.items():
        out[f"{key[0]}_{key[1]}_ms"] = statistics.median(ts) * 1e3
    for op in ("insert", "put"):
        for p in Probe.PARTS:
            out[f"{op}_{p}_ms"] = statistics.median(d[p] for d in parts[op]) * 1e3
        out[f"{op}_arrow_ms"] = statistics.median(d["export"] - d["write"] for d in parts[op]) * 1e3
    files, manifest_bytes, shards = shard_bytes(f"{store}/tables/{name}")
    out.update(export_bytes=files, manifest_bytes=manifest_bytes, shards=shards)
    log(f"{name}: insert {out['insert_plain_ms']:.1f} / {out['insert_store_ms']:.1f} ms, put "
        f"{out['put_plain_ms']:.1f} / {out['put_store_ms']:.1f} ms, export {files / 1e6:.2f} MB")

    # takeover: a fresh server on the same store while it holds only this table
    root3 = tempfile.mkdtemp(prefix="takeover-", dir=base)
    t0 = time.perf_counter()
    third = GridServer(root3, store=store)
    out["takeover_s"] = time.perf_counter() - t0
    try:
        with third._db.cursor() as cur:
            rows = cur.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
        assert rows == n + 2 * (repeat + 1), (rows, n, repeat)
    finally:
        third.close()
        shutil.rmtree(root3, ignore_errors=True)
    log(f"{name}: takeover {out['takeover_s']:.2f} s")
    for g in (plain, stored):
        g.sql(f"DROP TABLE {name}")  # on the store server: removed from the store too
    return out


# ====================================================================== report
def fit(results: list[dict], key: str) -> tuple[float, float]:
    """Least squares ms = a + b * rows over the sizes: (a ms, b ms per 100k rows)."""
    xs = np.array([r["rows"] for r in results], dtype=float)
    ys = np.array([r[key] for r in results], dtype=float)
    if len(xs) < 2 or np.ptp(xs) == 0:
        return float(ys.mean()), float("nan")
    b, a = np.polyfit(xs, ys, 1)
    return float(a), float(b * 1e5)


def report(results: list[dict], disk_mbs: float, small_fsync_ms: float) -> str:
    rows = []
    for r in results:
        export_ms = r["insert_store_ms"] - r["insert_plain_ms"]
        mb = r["export_bytes"] / 1e6
        rows.append((f"{r['rows']:,}", f"{r['insert_plain_ms']:.1f}", f"{r['insert_store_ms']:.1f}",
                     f"{r['put_plain_ms']:.1f} / {r['put_store_ms']:.1f}", f"{export_ms:.1f}",
                     f"{r['insert_export_ms']:.1f} / {r['put_export_ms']:.1f}", f"{mb:.2f}",
                     f"{mb / (r['insert_export_ms'] / 1e3):.0f}" if r["rows"] else "-",
                     f"{r['takeover_s']:.2f}"))
    main = table(rows, ("rows in table", "insert ms (no store)", "insert ms (store)", "put ms (no store / store)",
                        "export ms (insert: store - no store)",
                        "export ms timed (insert / put)", "export MB", "export MB/s",
                        "takeover s"))
    parts = []
    for r in results:
        p = lambda k, r=r: f"{r['insert_' + k + '_ms']:.1f}"  # noqa: E731
        rest = r["insert_write_ms"] - r["insert_encode_ms"] - r["insert_fsync_ms"]
        parts.append((f"{r['rows']:,}", p("sync"), p("arrow"), p("encode"), p("fsync"), f"{rest:.1f}",
                      f"{r['shards']}", f"{r['fill_store_s']:.2f} / {r['fill_plain_s']:.2f}"))
    breakdown = table(parts, ("rows in table", "sync ms", "DuckDB->Arrow ms", "Parquet encode ms", "fsync ms",
                              "other write ms (files, checksum, manifest)", "shards",
                              "fill s (store / no store)"))
    a, b = fit(results, "insert_export_ms")
    big = max(results, key=lambda r: r["rows"])
    lines = [main, "", "Export of one single-row INSERT on the store server, by part (medians):", "", breakdown, "",
             f"disk ceiling (same run): {disk_mbs:.0f} MB/s write+fsync; one small file + folder fsync "
             f"{small_fsync_ms:.1f} ms",
             f"scaling: a committing write on a mirrored table costs ~{a:.1f} ms + {b:.1f} ms per 100k rows in "
             f"the table (least squares over the sizes, timed export); takeover of the {big['rows']:,}-row table: "
             f"{big['takeover_s']:.2f} s",
             "recommendation: mirrored tables are for small tables (every commit rewrites the whole table to the "
             "store); large data belongs in datasets (tg.write + g.load), appended or versioned by themselves."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="0,1000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--repeat-big", type=int, default=5, help="repeats for tables of 1M rows or more")
    ap.add_argument("--disk-mib", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="sizes 0,1000,10000, 5 repeats, 64 MiB disk test")
    args = ap.parse_args()
    if args.quick:
        args.sizes, args.repeat, args.disk_mib = "0,1000,10000", 5, 64
    sizes = [int(s) for s in args.sizes.split(",")]

    from tensorgrid.server.client import Grid
    from tensorgrid.server.grid import GridServer
    from tensorgrid.server.griddataset import Session

    print(f"machine: {machine()}; nproc {os.cpu_count()}; load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    base = tempfile.mkdtemp(prefix="tg-bench-mirror-")
    store = os.path.join(base, "store")
    os.makedirs(store)
    servers, grids, probe = [], [], None
    try:
        log("disk ceiling")
        disk_mbs = 1000 * disk_write_gbs(os.path.join(store, "disk.bin"), args.disk_mib * MIB)
        small_fsync = fsync_ms(store)
        log(f"disk {disk_mbs:.0f} MB/s, small fsync {small_fsync:.1f} ms")
        plain_server = GridServer(os.path.join(base, "plain"))
        servers.append(plain_server)
        store_server = GridServer(os.path.join(base, "stored"), store=store)
        servers.append(store_server)
        plain, stored = Grid(Session(plain_server.url)), Grid(Session(store_server.url))
        grids += [plain, stored]
        probe = Probe(store_server)
        results = []
        for n in sizes:
            repeat = args.repeat_big if n >= 1_000_000 else args.repeat
            results.append(measure_size(n, repeat, plain, stored, probe, store, base))
        print()
        print(report(results, disk_mbs, small_fsync))
    finally:
        if probe is not None:
            probe.close()
        for g in grids:
            g.close()
        for s in servers:
            s.close()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
