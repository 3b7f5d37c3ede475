"""Issue 14 (a grid of several servers): read throughput of a grid of 1, 2 and 3 servers over loopback against
one plain server, and what a failover costs a reader, in one run.

    .venv/bin/python benchmarks/bench_cluster.py [--quick] [--rows1mb 512] [--records 2000000] [--rounds 3]
        [--trials 5]

Every server is a real ``tensorgrid serve`` process (``--grid 127.0.0.1:p1,... --replicas R --allow <data>``
for a grid, none of those for the plain server); this process only reads. Data and server roots live in a
temporary folder, removed at the end with every server, also on errors. Page cache warm (written just before).

1. Throughput: (a) rows of 1 MiB (int64 id + a 1 MiB fixed_size_binary), (b) 100-byte records (int64 id + a
   92-byte fixed_size_binary). Read by ``ds.to_arrow()`` from: a plain server (``tg.connect(url).dataset``,
   loaded with partitions=4), and grids of 1, 2 and 3 servers (replicas=1, 4 partitions per server; the
   1-server grid is a ``GridCluster`` built over its one member, since ``tg.connect`` to a grid of one member
   gives a plain ``Grid``). All seven servers run at once; each round reads every setup once (order reversed
   every other round), one warm-up round first; best of the rounds, and the spread. Client and server CPU
   over the best pass (/proc) show who used the 2 cores.
2. Failover: 3 servers, replicas=2, the 1 MiB rows in 12 partitions. A fresh client streams a partition
   (``ds.stream(part)``); after the first batch the server it comes from is SIGKILLed; measured: ms from the
   kill to the first batch the client gets afterwards, to the first batch after the failover was recorded
   (``g.failovers``: the read going on from the next replica), and to the failover's record; every row
   checked once and in order. The killed server is restarted on the same root, port and --grid list between
   trials (it reloads its partitions from its catalog) and ``g.load`` is called again.

Predictions (written before measuring; memcpy ~10 GB/s; a plain server's to_arrow of 1 MiB rows measured
1.35 GB/s in bench_grid): the client's to_arrow is the bound, not the servers: its Flight reads decode on 2
threads (``Dataset.to_arrow`` reads min(8, cores) partitions at a time) and every server shares the same 2
cores, so 2 or 3 servers add no CPU: 1 MiB rows ~1-1.5 GB/s for every setup (grid within +-15% of plain);
100-byte records ~1 GB/s = ~10 M rows/s (fixed-width columns: no per-row decode). Failover: the kernel
closes the dead server's sockets at once, so the client sees the reset within ~1 ms; a new DoGet on the next
replica (a new connection, then one 8 MiB message) ~10-30 ms.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine, memcpy_gbs, table  # noqa: E402

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
MIB = 1 << 20
RECORD_PAD = 92  # + an int64 id: 100 bytes a record
PARTS_PER_SERVER = 4
URL_LINE = re.compile(r"serving (grpc://\S+)")


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ====================================================================== servers as processes
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Server:
    """One `tensorgrid serve` process; its stdout and stderr go to files in its root's folder (a pipe nobody
    drains could block it)."""

    def __init__(self, root: str, port: int, extra: list[str]):
        self.root, self.port, self.extra = root, port, extra
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        self._out = self.root + ".out"
        with open(self._out, "w") as out, open(self.root + ".err", "a") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "tensorgrid.cli", "serve", "--root", self.root,
                                          "--port", str(self.port), "--memory-limit", "1GB", *self.extra],
                                         stdout=out, stderr=err, stdin=subprocess.DEVNULL)
        self.url = None

    def wait(self, timeout: float = 120.0) -> str:
        """The URL the server prints once it serves (after it reloaded its catalog)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with open(self._out) as f:
                match = URL_LINE.search(f.read())
            if match:
                self.url = match.group(1)
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        with open(self.root + ".err") as f:
            err = f.read()[-2000:]
        raise RuntimeError(f"tensorgrid serve on port {self.port} printed no URL in {timeout:g} s "
                           f"(exit {self.proc.poll()}): {err}")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def cpu_seconds(self) -> float:
        return proc_cpu(self.proc.pid)


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def grid_servers(base: str, tag: str, n: int, replicas: int, data: str) -> list[Server]:
    ports = free_ports(n)
    members = ",".join(f"127.0.0.1:{p}" for p in ports)
    return [Server(os.path.join(base, f"{tag}-{i}"), p, ["--grid", members, "--replicas", str(replicas),
                                                          "--allow", data]) for i, p in enumerate(ports)]


def start_all(servers: list[Server]) -> None:
    """Start every server at once (their imports overlap), then wait for each."""
    for s in servers:
        s.start()
    for s in servers:
        s.wait()


# ====================================================================== data
def write_data(data: str, rows1mb: int, records: int) -> dict[str, str]:
    import pyarrow as pa

    import tensorgrid as tg

    rng = np.random.default_rng(0)
    urls = {"rows1mb": os.path.join(data, "rows1mb"), "records": os.path.join(data, "records")}
    blob = rng.integers(0, 256, rows1mb * MIB, dtype=np.uint8)
    big = pa.FixedSizeBinaryArray.from_buffers(pa.binary(MIB), rows1mb, [None, pa.py_buffer(blob)])
    tg.write(urls["rows1mb"], pa.table({"id": np.arange(rows1mb, dtype=np.int64), "blob": big}), shard_rows=64)
    del big, blob
    pad = rng.integers(0, 256, records * RECORD_PAD, dtype=np.uint8)
    small = pa.FixedSizeBinaryArray.from_buffers(pa.binary(RECORD_PAD), records, [None, pa.py_buffer(pad)])
    tg.write(urls["records"], pa.table({"id": np.arange(records, dtype=np.int64), "pad": small}),
             shard_rows=250_000)
    return urls


# ====================================================================== 1. throughput
def connect_setups(plain: Server, grids: dict[int, list[Server]], urls: dict[str, str]) -> dict:
    """Every setup's client, each dataset loaded: name -> (client, servers)."""
    import tensorgrid as tg
    from tensorgrid.server.cluster import GridCluster
    from tensorgrid.server.griddataset import Session

    setups = {}
    g = tg.connect(plain.url, timeout=120)
    for name, url in urls.items():
        g.load(name, url, partitions=PARTS_PER_SERVER)
    setups["plain server"] = (g, [plain])
    for n, servers in grids.items():
        if n == 1:  # tg.connect to a grid of one member gives a plain Grid: the cluster client over it
            g = GridCluster([Session(servers[0].url, timeout=120)], 1)
        else:
            g = tg.connect(servers[-1].url, timeout=120)
        assert isinstance(g, GridCluster) and len(g.members) == n, g
        for name, url in urls.items():
            info = g.load(name, url, partitions=PARTS_PER_SERVER * n)
            assert sorted(k for held in info["held"].values() for k in held) == list(range(PARTS_PER_SERVER * n))
        setups[f"grid of {n}"] = (g, servers)
    return setups


def bench_throughput(setups: dict, name: str, rounds: int) -> dict:
    """``rounds`` passes of ``ds.to_arrow()`` per setup after a warm-up round, setups alternating."""
    order = list(setups)
    passes = {k: [] for k in order}
    expect = None
    for r in range(rounds + 1):
        for key in (order if r % 2 == 0 else order[::-1]):
            g, servers = setups[key]
            ds = g.dataset(name)
            c0, s0 = os.times(), sum(s.cpu_seconds() for s in servers)
            t0 = time.perf_counter()
            t = ds.to_arrow()
            secs = time.perf_counter() - t0
            c1, s1 = os.times(), sum(s.cpu_seconds() for s in servers)
            if expect is None:
                expect = (t.num_rows, t.nbytes)
            assert (t.num_rows, t.nbytes) == expect, (key, t.num_rows, t.nbytes, expect)
            del t
            if r > 0:  # round 0 warms every connection and both sides' allocators
                passes[key].append({"s": secs, "client_cpu": (c1.user + c1.system - c0.user - c0.system) / secs,
                                    "server_cpu": (s1 - s0) / secs})
        log(f"{name} round {r}: " + ", ".join(f"{k} {expect[1] / passes[k][-1]['s'] / 1e9:.2f} GB/s"
                                                for k in order if r > 0))
    return {"rows": expect[0], "bytes": expect[1], "passes": passes}


def throughput_table(res: dict, memcpy: float) -> str:
    rows = []
    for label, o in res.items():
        plain = min(p["s"] for p in o["passes"]["plain server"])
        for key, ps in o["passes"].items():
            best = min(ps, key=lambda p: p["s"])
            worst = max(p["s"] for p in ps)
            rows.append((label, key, f"{o['bytes'] / best['s'] / 1e9:.2f}",
                         f"{o['bytes'] / worst / 1e9:.2f}..{o['bytes'] / best['s'] / 1e9:.2f}",
                         f"{o['rows'] / best['s']:,.0f}", f"{plain / best['s']:.2f}",
                         f"{o['bytes'] / best['s'] / 1e9 / memcpy:.3f}",
                         f"{best['client_cpu'] * 100:.0f}% / {best['server_cpu'] * 100:.0f}%"))
    return table(rows, ("data", "read from", "GB/s best", "spread", "rows/s best", "x plain", "x memcpy",
                        "CPU client / servers (best pass)"))


# ====================================================================== 2. failover
def bench_failover(base: str, data: str, url: str, rows1mb: int, trials: int) -> list[dict]:
    import tensorgrid as tg

    servers = grid_servers(base, "failover", 3, 2, data)
    parts = PARTS_PER_SERVER * 3
    out = []
    try:
        start_all(servers)
        g = tg.connect(servers[0].url, timeout=60)
        g.load("rows1mb", url, partitions=parts)
        g.close()
        for trial in range(trials):
            g = tg.connect(servers[(trial + 1) % 3].url, timeout=60)  # fresh: no member marked as failed
            ds = g.dataset("rows1mb")
            part = (trial * 5) % parts
            victim_url = ds.replicas(part)[0]
            victim = next(s for s in servers if s.url == victim_url)
            stream = ds.stream(part, columns=["id", "blob"])
            first = next(stream)
            wall_kill, t_kill = time.time(), time.perf_counter()
            victim.kill()
            arrivals = []  # (seconds after the kill, rows, failovers recorded so far)
            ids = [first.column(0).to_numpy()]
            for batch in stream:
                arrivals.append((time.perf_counter() - t_kill, batch.num_rows, len(g.failovers)))
                ids.append(batch.column(0).to_numpy())
            victim.proc.wait(timeout=30)
            ids = np.concatenate(ids)
            start = sum(ds.shard_rows[:part])
            assert ids.tolist() == list(range(start, start + ds.shard_rows[part])), f"trial {trial}: rows wrong"
            after = [a for a in arrivals if a[2] > 0]
            rec = {"part": part, "rows": ds.shard_rows[part], "first_rows": first.num_rows,
                   "failovers": len(g.failovers),
                   "next_ms": arrivals[0][0] * 1e3 if arrivals else float("nan"),
                   "replica_ms": after[0][0] * 1e3 if after else float("nan"),
                   "detect_ms": (g.failovers[0]["time"] - wall_kill) * 1e3 if g.failovers else float("nan"),
                   "buffered": sum(1 for a in arrivals if a[2] == 0)}
            g.close()
            t0 = time.perf_counter()
            victim.start()  # same root, port and --grid list: it reloads its partitions from its catalog
            victim.wait()
            rec["restart_s"] = time.perf_counter() - t0
            g = tg.connect(victim.url, timeout=60)
            g.load("rows1mb", url, partitions=parts)
            g.close()
            out.append(rec)
            log(f"failover trial {trial}: partition {part} ({rec['rows']} rows, first batch {rec['first_rows']}), "
                f"next batch {rec['next_ms']:.1f} ms, from the next replica {rec['replica_ms']:.1f} ms, failover "
                f"recorded {rec['detect_ms']:.1f} ms after the kill; restart {rec['restart_s']:.1f} s")
    finally:
        for s in servers:
            s.stop()
    return out


def failover_table(trials: list[dict]) -> str:
    def stat(key, fn):
        vals = [t[key] for t in trials if t[key] == t[key]]
        return f"{fn(vals):.1f}" if vals else "n/a"

    rows = [(label, stat(key, statistics.median), stat(key, max), stat(key, min))
            for label, key in (("kill -> next batch received", "next_ms"),
                               ("kill -> first batch from the next replica", "replica_ms"),
                               ("kill -> failover recorded (g.failovers time)", "detect_ms"))]
    rows.append(("restart of the killed server until it serves (s)", stat("restart_s", statistics.median),
                 stat("restart_s", max), stat("restart_s", min)))
    return table(rows, (f"{len(trials)} trials, ms unless said", "median", "max", "min"))


# ====================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="128 rows of 1 MiB, 500k records, 2 rounds, 3 trials")
    ap.add_argument("--rows1mb", type=int, default=512)
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--trials", type=int, default=5)
    a = ap.parse_args()
    if a.quick:
        a.rows1mb, a.records, a.rounds, a.trials = 128, 500_000, 2, 3

    import pyarrow as pa

    t_start = time.perf_counter()
    print(f"machine: {machine()}, pyarrow {pa.__version__}")
    print(f"load average at start: {loadavg()}; rows of 1 MiB: {a.rows1mb}; 100-byte records: {a.records:,}",
          flush=True)
    base = tempfile.mkdtemp(prefix="bench_cluster-")
    data = os.path.join(base, "data")
    servers: list[Server] = []
    setups = {}
    try:
        urls = write_data(data, a.rows1mb, a.records)
        memcpy0 = memcpy_gbs()
        plain = Server(os.path.join(base, "plain"), free_ports(1)[0], ["--allow", data])
        grids = {n: grid_servers(base, f"grid{n}", n, 1, data) for n in (1, 2, 3)}
        servers = [plain, *(s for ss in grids.values() for s in ss)]
        t0 = time.perf_counter()
        start_all(servers)
        setups = connect_setups(plain, grids, urls)
        log(f"{len(servers)} servers started and loaded in {time.perf_counter() - t0:.1f} s")
        res = {f"1 MiB rows x {a.rows1mb}": bench_throughput(setups, "rows1mb", a.rounds),
               f"100-byte records x {a.records:,}": bench_throughput(setups, "records", a.rounds)}
        for g, _ in setups.values():
            g.close()
        setups = {}
        for s in servers:
            s.stop()
        print(f"\n## Read throughput over loopback: ds.to_arrow(), best of {a.rounds} after a warm-up round, "
              f"setups alternating (memcpy {memcpy0:.1f} GB/s)\n")
        print(throughput_table(res, memcpy0))
        print("\nCPU: % of one core over the best pass (client: this process; servers: all of that setup's). "
              "Dataset.to_arrow reads min(8, cores) = 2 partitions at a time\nin client threads; the servers "
              "(all seven idle but the setup read) share the same 2 cores, so more servers add no CPU to a "
              "loopback read.", flush=True)

        trials = bench_failover(base, data, urls["rows1mb"], a.rows1mb, a.trials)
        print(f"\n## Failover: 3 servers, replicas=2, {PARTS_PER_SERVER * 3} partitions of the 1 MiB rows; "
              f"ds.stream(part), SIGKILL of its server after the first batch\n")
        print(failover_table(trials))
        no_failover = sum(1 for t in trials if t["failovers"] == 0)
        print(f"\nrows per partition {trials[0]['rows']} (~{trials[0]['rows']} MiB), first batch "
              f"{trials[0]['first_rows']} rows; batches received after the kill but before the failover (already "
              f"in the client's buffers): {[t['buffered'] for t in trials]}; trials that finished without "
              f"failing over: {no_failover}")
    finally:
        for g, _ in setups.values():
            g.close()
        for s in servers:
            try:
                s.stop()
            except Exception as exc:  # noqa: BLE001 - stop the others and remove the folder anyway
                log(f"could not stop the server on port {s.port}: {exc}")
        shutil.rmtree(base, ignore_errors=True)
    memcpy1 = memcpy_gbs()
    print(f"\nmemcpy {memcpy0:.1f} GB/s at the start, {memcpy1:.1f} at the end; load average at the end: "
          f"{loadavg()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
