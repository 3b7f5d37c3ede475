"""locality=True against the default loader on a grid on Ray: rows read across nodes, padding, epoch time.

    .venv/bin/python benchmarks/bench_locality.py [--kind both|records|mib] [--records 2000000]
        [--mib-rows 600] [--partitions 12] [--nodes 2] [--rounds 3] [--warmup 1]

A ``ray.cluster_utils.Cluster`` of ``--nodes`` nodes on this machine (one CPU each, as tests/conftest.py's
``ray_cluster``), a grid of 3 servers started on it (``tg.grid.start_on_ray(servers=3, replicas=2)``: server
i on node i mod n, each partition on 2 servers), a store dataset written to a temporary folder and loaded
with ``--partitions`` partitions. Two kinds of data (``--kind``): 100-byte records (int64 id + a float32
tensor of 23 = 92 bytes) and rows of 1 MiB (int64 id + a uint8 tensor of 1024x1024).

For each mode (``locality=False``, the default: every global batch split across the ranks, each rank reading
rows of every partition from its own node's replica when there is one; ``locality=True``: each rank reads
only ``ds.rank_partitions(W)``, shuffled within, padded to the same batch count) ``W`` = 2 ranks run as Ray
tasks (num_cpus=1), rank r pinned with ``NodeAffinitySchedulingStrategy(ds.rank_nodes(W)[r], soft=False)``
in both modes, each iterating one full shuffled epoch of ``ds.to_torch(..., columns all)`` (batch 1024 for
records, 8 for 1 MiB rows) and returning its real rows (``_valid``), padding rows, seconds (loader built and
iterated; imports done before) and ``ds.network_reads()`` (counted in the rank's own process). Modes
alternate order every round, after an untimed default-mode epoch (``--warmup``); the median epoch time (max
over the ranks) of ``--rounds`` rounds is reported.
Ceiling: one task on node 0 (which holds a replica of every partition when 3 servers sit on 2 nodes) reading
the whole dataset in order with ``ds.to_arrow()``, no shuffle, no torch: what the grid serves over loopback
to one process on these 2 shared cores.

Predictions (written before measuring): with 3 servers on 2 nodes, node 0 runs servers 0 and 2, node 1
server 1; a partition whose two replicas are servers 0 and 2 (about 1/3 of them) has no replica on node 1.
Default mode: the rank on node 0 reads everything locally, the rank on node 1 reads ~1/3 of its rows across
nodes: ~1/6 of the epoch crosses nodes. locality=True: 0 rows cross; padding is the gap between the ranks'
shares (12 partitions in rows of equal size: a 6/6 split gives none, 7/5 gives ~17% of an epoch). Time: on
one machine "across nodes" is loopback too, so locality saves no transfer time here; both modes read the
same rows, so epoch times should be within ~10-20%, locality a bit slower when it pads.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import machine, table  # noqa: E402

warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
MIB = 1 << 20
FEATURES = 23  # float32: + an int64 id = 100 bytes a record
SIDE = 1024  # uint8 SIDE x SIDE = 1 MiB a row
MODES = ("default", "locality")


def log(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# ====================================================================== data
def write_records(url: str, rows: int) -> float:
    """100-byte records: id int64 + features float32[23]. Returns bytes per row (Arrow, in memory)."""
    import pyarrow as pa

    import tensorgrid as tg

    rng = np.random.default_rng(0)
    step = 500_000  # written in pieces (appends): memory stays ~50 MB whatever --records says
    for a in range(0, rows, step):
        n = min(step, rows - a)
        x = rng.random((n, FEATURES), dtype=np.float32)
        t = pa.table({"id": np.arange(a, a + n, dtype=np.int64),
                      "x": pa.FixedShapeTensorArray.from_numpy_ndarray(x)})
        tg.write(url, t, mode="append", shard_rows=250_000)
    return 8 + 4 * FEATURES


def write_mib(url: str, rows: int) -> float:
    """Rows of 1 MiB: id int64 + image uint8[1024, 1024] (random bytes). Returns bytes per row."""
    import pyarrow as pa

    import tensorgrid as tg

    rng = np.random.default_rng(1)
    step = 64  # one shard per append: 64 MiB in memory at a time
    for a in range(0, rows, step):
        n = min(step, rows - a)
        img = np.frombuffer(rng.bytes(n * SIDE * SIDE), dtype=np.uint8).reshape(n, SIDE, SIDE)
        t = pa.table({"id": np.arange(a, a + n, dtype=np.int64),
                      "image": pa.FixedShapeTensorArray.from_numpy_ndarray(img)})
        tg.write(url, t, mode="append", shard_rows=step)
    return 8 + SIDE * SIDE


# ====================================================================== Ray tasks
def rank_epoch(ds, rank: int, world: int, batch: int, locality: bool, seed: int) -> dict:
    """One rank's full shuffled epoch (runs in a Ray worker on its node)."""
    import ray
    import torch  # noqa: F401 - imported before the clock starts (a fresh worker pays it once)

    import tensorgrid.loader  # noqa: F401

    t0 = time.perf_counter()
    loader = ds.to_torch(batch_size=batch, shuffle=True, seed=seed, rank=rank, world_size=world,
                         locality=locality)
    real = pad = batches = 0
    first = None
    for b in loader:
        n = len(b["id"])
        if first is None:
            first = time.perf_counter() - t0
        valid = b.get("_valid")
        ok = n if valid is None else int(valid.sum())
        real += ok
        pad += n - ok
        batches += 1
    secs = time.perf_counter() - t0
    reads = ds.network_reads()
    return {"rank": rank, "node": ray.get_runtime_context().get_node_id(), "real": real, "pad": pad,
            "batches": batches, "secs": secs, "first_s": first, "local": reads["local"], "remote": reads["remote"],
            "partitions": sorted(reads["partitions"])}


def read_all(ds) -> dict:
    """The ceiling: the whole dataset in one process, in order (ds.to_arrow)."""
    import ray

    t0 = time.perf_counter()
    t = ds.to_arrow()
    secs = time.perf_counter() - t0
    reads = ds.network_reads()
    return {"rows": t.num_rows, "bytes": t.nbytes, "secs": secs, "local": reads["local"], "remote": reads["remote"],
            "node": ray.get_runtime_context().get_node_id()}


def run_mode(ray, ds, mode: str, world: int, batch: int, seed: int) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=1, max_retries=0)(rank_epoch)
    nodes = ds.rank_nodes(world)
    t0 = time.perf_counter()
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(nodes[r], soft=False)).remote(
        ds, r, world, batch, mode == "locality", seed) for r in range(world)]
    ranks = ray.get(refs, timeout=1800)
    wall = time.perf_counter() - t0
    for r, res in enumerate(ranks):
        assert res["node"] == nodes[r], f"rank {r} ran on {res['node']}, not {nodes[r]}"
    return {"ranks": ranks, "secs": max(r["secs"] for r in ranks), "wall": wall,
            "local": sum(r["local"] for r in ranks), "remote": sum(r["remote"] for r in ranks),
            "real": sum(r["real"] for r in ranks), "pad": sum(r["pad"] for r in ranks)}


def run_ceiling(ray, ds, node: str) -> dict:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=1, max_retries=0)(read_all)
    return ray.get(task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(ds),
                   timeout=1800)


# ====================================================================== one kind of data
def bench_kind(ray, grid, label: str, name: str, url: str, row_bytes: float, a, node_label: dict) -> str:
    t0 = time.perf_counter()
    info = grid.load(name, url, partitions=a.partitions)
    log(f"{label}: loaded in {time.perf_counter() - t0:.1f} s")
    g = grid.connect()
    out = []
    try:
        ds = g.dataset(name)
        world, batch = a.ranks, (a.batch_records if name == "records" else a.batch_mib)
        nodes_of = g.member_nodes()
        # where each partition lives, and what each rank reads with locality=True
        only = {}
        for k in range(ds.num_shards):
            held = sorted({node_label[nodes_of[m]] for m in ds.replicas(k)})
            only.setdefault("+".join(held), []).append(k)
        shares = ds.rank_partitions(world)
        rank_nodes = ds.rank_nodes(world)
        rows = ds.shard_rows
        held_by = ", ".join(f"{m}@{node_label[nodes_of[m]]}: {len(v)}" for m, v in info["held"].items())
        out.append("placement: partitions by the nodes holding a replica: "
                   + "; ".join(f"{key}: {len(ks)} {ks}" for key, ks in sorted(only.items()))
                   + f" (partitions per server: {held_by})")
        out.append("locality=True shares: " + "; ".join(
            f"rank {r}@{node_label[rank_nodes[r]]}: partitions {p} = {sum(rows[k] for k in p):,} rows"
            for r, p in enumerate(shares)))

        results = {m: [] for m in MODES}
        ceiling = []
        for _ in range(a.warmup):  # untimed: each node's worker process imports and allocates once
            res = run_mode(ray, ds, "default", world, batch, seed=99)
            log(f"{label} warm-up (default mode, not counted): {res['secs']:.2f} s, wall {res['wall']:.2f} s")
        for rnd in range(a.rounds):
            order = MODES if rnd % 2 == 0 else MODES[::-1]
            for mode in order:
                res = run_mode(ray, ds, mode, world, batch, seed=rnd)
                assert res["real"] == ds.num_rows, (mode, res["real"], ds.num_rows)
                results[mode].append(res)
                log(f"{label} round {rnd} {mode}: {res['secs']:.2f} s (wall {res['wall']:.2f}); " + "; ".join(
                    f"rank {r['rank']}: {r['secs']:.2f} s, first batch {r['first_s']:.2f} s, {r['batches']} batches, "
                    f"real {r['real']:,} pad {r['pad']:,}, read local {r['local']:,} remote {r['remote']:,}"
                    for r in res["ranks"]))
            c = run_ceiling(ray, ds, rank_nodes[0])
            assert c["rows"] == ds.num_rows
            ceiling.append(c)
            log(f"{label} round {rnd} ceiling: {c['secs']:.2f} s, remote {c['remote']:,}")

        n = ds.num_rows
        rows_out = []
        for mode in MODES:
            rs = results[mode]
            med = statistics.median(r["secs"] for r in rs)
            last = rs[-1]
            local = statistics.median(r["local"] for r in rs)
            remote = statistics.median(r["remote"] for r in rs)
            pad = statistics.median(r["pad"] for r in rs)
            rows_out.append((
                mode, f"{local:,.0f}", f"{remote:,.0f}", f"{100 * remote / max(1, local + remote):.1f}%",
                f"{(local + remote) / n:.2f}", f"{pad:,.0f} ({100 * pad / n:.1f}%)", f"{med:.2f}",
                f"{min(r['secs'] for r in rs):.2f}..{max(r['secs'] for r in rs):.2f}",
                f"{n / med:,.0f}", _bytes(remote * row_bytes),
                " / ".join(f"{r['secs']:.2f}" for r in last["ranks"])))
        cmed = statistics.median(c["secs"] for c in ceiling)
        rows_out.append(("ceiling: to_arrow, 1 task", f"{ceiling[-1]['local']:,}", f"{ceiling[-1]['remote']:,}",
                         f"{100 * ceiling[-1]['remote'] / max(1, n):.1f}%",
                         f"{(ceiling[-1]['local'] + ceiling[-1]['remote']) / n:.2f}", "-", f"{cmed:.2f}",
                         f"{min(c['secs'] for c in ceiling):.2f}..{max(c['secs'] for c in ceiling):.2f}",
                         f"{n / cmed:,.0f}", _bytes(ceiling[-1]["remote"] * row_bytes), "-"))
        head = (f"## {label}: {n:,} rows x {row_bytes:,.0f} B = {_bytes(n * row_bytes)}, {ds.num_shards} partitions, "
                f"{world} ranks, batch {batch}, one shuffled epoch, median of {a.rounds} rounds")
        tab = table(rows_out, ("mode", "rows read on own node", "rows read across nodes", "% across",
                               "rows read / epoch rows", "padding rows (% of epoch)", "epoch s (max over ranks)", "spread s", "rows/s",
                               "across-node bytes/epoch", "rank s (last round)"))
        note = ("rows read: counted by ds.network_reads() in each rank's process, summed over the ranks (medians "
                "over the rounds); 'rows read / epoch rows' > 1: rows fetched more than once (padding rows are "
                "fetched again from the servers). rows/s: the epoch's real rows / the median epoch seconds.")
        return "\n".join([head, "", *out, "", tab, "", note])
    finally:
        try:
            g.drop(name)  # frees the servers' memory before the next kind
        except Exception as exc:  # noqa: BLE001
            log(f"could not drop {name}: {exc}")
        g.close()


def _bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


# ====================================================================== main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=("both", "records", "mib"), default="both")
    ap.add_argument("--records", type=int, default=2_000_000, help="rows of the 100-byte records")
    ap.add_argument("--mib-rows", type=int, default=600, help="rows of the 1 MiB rows")
    ap.add_argument("--partitions", type=int, default=12)
    ap.add_argument("--nodes", type=int, default=2, help="Ray nodes on this machine, one CPU each")
    ap.add_argument("--servers", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--batch-records", type=int, default=1024)
    ap.add_argument("--batch-mib", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed default-mode epochs first, per kind")
    a = ap.parse_args()

    import pyarrow as pa

    t_start = time.perf_counter()
    print(f"machine: {machine()}, nproc {len(os.sched_getaffinity(0))}, pyarrow {pa.__version__}")
    print(f"load average at start: {loadavg()}", flush=True)
    # Ray picks the address it would use to reach the internet; this keeps every node on loopback (conftest)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray
    from ray.cluster_utils import Cluster

    import tensorgrid as tg

    print(f"ray {ray.__version__}; {a.nodes} Ray nodes of 1 CPU, {a.servers} grid servers (replicas={a.replicas}), "
          f"{a.ranks} ranks", flush=True)
    base = tempfile.mkdtemp(prefix="bench_locality-")
    data = os.path.join(base, "data")
    cluster = grid = None
    tables = []
    try:
        kinds = []
        if a.kind in ("both", "records"):
            t0 = time.perf_counter()
            rb = write_records(os.path.join(data, "records"), a.records)
            kinds.append(("100-byte records", "records", os.path.join(data, "records"), rb))
            log(f"records written in {time.perf_counter() - t0:.1f} s")
        if a.kind in ("both", "mib"):
            t0 = time.perf_counter()
            rb = write_mib(os.path.join(data, "mib"), a.mib_rows)
            kinds.append(("1 MiB rows", "mib", os.path.join(data, "mib"), rb))
            log(f"1 MiB rows written in {time.perf_counter() - t0:.1f} s")

        t0 = time.perf_counter()
        node_args = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": 150 * MIB}
        cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
        for _ in range(a.nodes - 1):
            cluster.add_node(**node_args)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", logging_level="WARNING",
                 log_to_driver=True)
        grid = tg.grid.start_on_ray(servers=a.servers, replicas=a.replicas, root=os.path.join(base, "servers"),
                                    allow=[data])
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n.get("Alive"))
        head = ray.get_runtime_context().get_node_id()
        node_label = {nid: f"node{i}{' (head)' if nid == head else ''}" for i, nid in enumerate(nodes)}
        print("grid: " + ", ".join(f"{m}@{node_label[nid]}" for m, nid in zip(grid.members, grid.nodes())))
        log(f"Ray cluster and grid started in {time.perf_counter() - t0:.1f} s")

        for label, name, url, rb in kinds:
            tables.append(bench_kind(ray, grid, label, name, url, rb, a, node_label))
            print("\n" + tables[-1], flush=True)
        print("\nnetwork per epoch (estimate): bytes across nodes per epoch = rows read across nodes x bytes per "
              "row (the rows' Arrow size; Flight framing and gRPC headers not counted). On this machine every "
              "'node' is a Ray node over loopback: the column says what a real network would carry per epoch, "
              "the times do not include it.")
    finally:
        if grid is not None:
            try:
                grid.shutdown()
            except Exception as exc:  # noqa: BLE001 - shut the rest down anyway
                log(f"grid shutdown: {exc}")
        try:
            ray.shutdown()
        except Exception as exc:  # noqa: BLE001
            log(f"ray shutdown: {exc}")
        if cluster is not None:
            try:
                cluster.shutdown()
            except Exception as exc:  # noqa: BLE001
                log(f"cluster shutdown: {exc}")
        shutil.rmtree(base, ignore_errors=True)
    print(f"\nload average at the end: {loadavg()}; total {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
