"""A/B of the loader's hot paths between two source trees (e.g. before and after a refactor), alternating
processes so that the shared machine's drift hits both alike.

    python benchmarks/bench_ab.py OLD_TREE NEW_TREE [--rounds 5]

Each round runs every workload once per tree in a fresh process (page cache warm: the data is written
first and read once); a workload's figure is the median over 5 epochs after one warm-up, and the table
shows the median over rounds of each tree and their ratio. Datasets are written by NEW_TREE's code; OLD
must be able to read them (written with the old tree when the manifest format changed, see --writer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, machine, table  # noqa: E402

WORKLOADS = {  # name: (dataset, to_torch options)
    "records100 shuffled, default": ("records", dict(batch_size=256, shuffle=True)),
    "records100 sequential, default": ("records", dict(batch_size=256)),
    "records100 shuffled, cache": ("records", dict(batch_size=256, shuffle=True, cache_dir="CACHE")),
    "mnist shuffled, default": ("mnist", dict(batch_size=256, shuffle=True)),
    "mnist shuffled, cache": ("mnist", dict(batch_size=256, shuffle=True, cache_dir="CACHE")),
    "rows1mb sequential, default": ("rows1mb", dict(batch_size=16)),
    "rows1mb sequential, cache": ("rows1mb", dict(batch_size=16, cache_dir="CACHE")),
    "in-memory records shuffled": ("memory", dict(batch_size=256, shuffle=True)),
}

WRITE = """
import sys, numpy as np, pyarrow as pa, tensorgrid as tg
root = sys.argv[1]
rng = np.random.default_rng(0)
n = 1_000_000
tg.write(root + "/records", pa.table({"id": np.arange(n), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(
    rng.random((n, 25), dtype=np.float32)), "label": rng.integers(0, 10, n)}), mode="overwrite")
m = 200_000
tg.write(root + "/mnist", pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(
    rng.integers(0, 255, (m, 28, 28), dtype=np.uint8)), "label": rng.integers(0, 10, m)}), mode="overwrite")
k = 1000
tg.write(root + "/rows1mb", pa.table({"id": np.arange(k), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(
    rng.integers(0, 255, (k, 1024, 1024), dtype=np.uint8))}), mode="overwrite")
"""

RUN = """
import json, os, statistics, sys, time, numpy as np, pyarrow as pa, tensorgrid as tg
root, cache, name, kind, opts = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
opts = {k: (cache if v == "CACHE" else v) for k, v in opts.items()}
if kind == "memory":
    rng = np.random.default_rng(0)
    ds = tg.from_arrow(pa.table({"id": np.arange(1_000_000), "x": rng.random(1_000_000)}))
else:
    ds = tg.open(root + "/" + kind)
loader = ds.to_torch(**opts)
times = []
for e in range(6):
    t0 = time.perf_counter()
    rows = sum(len(next(iter(b.values()))) for b in loader)
    times.append(time.perf_counter() - t0)
print(json.dumps({"rows_per_s": rows / statistics.median(times[1:])}))
"""


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--writer", choices=("old", "new"), default="old", help="whose code writes the datasets")
    a = p.parse_args()
    trees = {"old": os.path.abspath(a.old), "new": os.path.abspath(a.new)}
    root = os.path.join(DATA, "ab")
    os.makedirs(root, exist_ok=True)
    env = lambda t: {**os.environ, "PYTHONPATH": trees[t]}  # noqa: E731
    subprocess.run([sys.executable, "-c", WRITE, root], env=env(a.writer), check=True)
    figures: dict = {name: {"old": [], "new": []} for name in WORKLOADS}
    for r in range(a.rounds):
        for name, (kind, opts) in WORKLOADS.items():
            for t in (("old", "new") if r % 2 == 0 else ("new", "old")):
                cache = os.path.join(root, f"cache-{t}")
                out = subprocess.run([sys.executable, "-c", RUN, root, cache, name, kind, json.dumps(opts)],
                                     env=env(t), check=True, capture_output=True, text=True)
                figures[name][t].append(json.loads(out.stdout.strip().splitlines()[-1])["rows_per_s"])
    print(f"machine: {machine()}\nold: {trees['old']}\nnew: {trees['new']}\n{a.rounds} rounds, alternating\n")
    rows = []
    for name, f in figures.items():
        old, new = statistics.median(f["old"]), statistics.median(f["new"])
        rows.append((name, f"{old:,.0f}", f"{new:,.0f}", f"{new / old:.2f}"))
    print(table(rows, ("workload (rows/s, median of rounds)", "old", "new", "new / old")))


if __name__ == "__main__":
    main()
