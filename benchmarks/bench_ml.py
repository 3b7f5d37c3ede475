"""Issue 12: ``NNModel.transform`` (batch inference through tg.predict) against a hand-written PyTorch loop
over the same rows, same model, same batch size, same consumer (the outputs kept as an Arrow column); and
in parts written to a dataset (resumable) with one worker and with two forked worker processes (one torch
thread each: the same two cores).

Data: scikit-learn's 1,797 digits (8x8 uint8), repeated to ``--rows`` rows, written as a TensorGrid dataset
(the hand-written loop reads the same rows as one numpy array loaded before the clock starts: its best
case). Model: quickstart's digits CNN.

Each way of running lives in **its own process** (as a user's script would: one job per process), started
once and warmed up; the processes then take turns, one at a time, for ``--passes`` rounds, the order rotated
each round. Reported: best pass and spread, and the median over rounds of each pass's time against the hand
loop's in the same round (a shared host's load drifts: neighbours in time see the same load). With every
variant in one process instead (``--one-process``, the old layout), what one leaves behind (its allocations,
torch's thread pool state) weighs on the next: the parts path read 11-32% slower beside the hand loop, and
equal to the in-memory path without it.

    .venv/bin/python benchmarks/bench_ml.py [--rows 200000] [--batch 512] [--passes 9] [--one-process]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, memcpy_gbs, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid.allocator import tune_malloc  # noqa: E402
from tensorgrid.ml import NNModel  # noqa: E402
from tensorgrid.quickstart import digits_cnn, digits_frame  # noqa: E402

HAND = "hand-written torch loop (numpy in memory)"
VARIANTS = (HAND, "hand-written loop, glibc's malloc defaults", "NNModel.transform (tg dataset)", "hand-written loop, outputs written to Parquet",
            "NNModel.transform(out=, workers=1): parts, written",
            "NNModel.transform(out=, workers=2): 2 forked processes")


def to_float(batch):
    batch["image"] = batch["image"].float().div_(255)
    return batch


def runner(variant: str, root: str, rows: int, batch: int):
    """A function running ``variant`` once over the rows under ``root``, returning the rows it produced."""
    torch.set_num_threads(os.cpu_count() or 1)
    if variant != VARIANTS[1]:  # the hand loops get the malloc setting TensorGrid's inference makes: their best case
        tune_malloc()
    images = np.load(f"{root}/images.npy")
    ds = tg.open(f"{root}/digits")
    model = digits_cnn()
    model.load_state_dict(torch.load(f"{root}/model.pt"))
    model.eval()
    stage = NNModel(model, transform=to_float, features_col="image", batch_size=batch)
    n = iter(range(10**6))

    def hand_loop(save: bool) -> int:
        outs = []
        with torch.no_grad():
            for s in range(0, rows, batch):
                x = torch.from_numpy(images[s:s + batch]).float().div_(255)
                outs.append(model(x).numpy())
        out = pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate(outs))  # the same consumer: Arrow
        if save:  # its outputs written to a Parquet file, as out= also does
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"prediction": out}), f"{root}/hand-{os.getpid()}-{next(n)}.parquet")
        return len(out)

    def parts(workers: int) -> int:  # in parts, written as a dataset (resumable); a fresh output each pass
        return stage.transform(ds, out=f"{root}/pred-{os.getpid()}-{next(n)}", workers=workers).num_rows

    return {VARIANTS[0]: lambda: hand_loop(False), VARIANTS[1]: lambda: hand_loop(False),
            VARIANTS[2]: lambda: stage.transform(ds).num_rows, VARIANTS[3]: lambda: hand_loop(True),
            VARIANTS[4]: lambda: parts(1), VARIANTS[5]: lambda: parts(2)}[variant]


def timed(fn, rows: int) -> tuple[float, int]:
    """A pass's seconds and the page faults it took in this process (its workers' not counted)."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    assert fn() == rows
    return time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def serve(conn, variant: str, root: str, rows: int, batch: int) -> None:
    """One variant's process: warm up, then one timed pass per request until told to stop."""
    fn = runner(variant, root, rows, batch)
    fn()  # warm-up: page cache, the Arrow cache, torch's kernels
    conn.send("ready")
    while conn.recv() == "run":
        conn.send(timed(fn, rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--passes", type=int, default=9)
    ap.add_argument("--one-process", action="store_true", help="every variant in this process (the old layout)")
    a = ap.parse_args()
    frame = digits_frame()
    reps = -(-a.rows // len(frame))
    images = np.concatenate([np.stack(frame.image)] * reps)[:a.rows]
    root = tempfile.mkdtemp(prefix="tg-bench-ml-")
    np.save(f"{root}/images.npy", images)
    torch.manual_seed(0)
    torch.save(digits_cnn().state_dict(), f"{root}/model.pt")
    tg.write(f"{root}/digits", pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(images),
                                         "id": np.arange(a.rows)}))
    memcpy = memcpy_gbs()
    print(f"machine: {machine()}, torch {torch.__version__} ({os.cpu_count()} threads), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, memcpy {memcpy:.1f} GB/s", flush=True)
    times, faults = {k: [] for k in VARIANTS}, {k: [] for k in VARIANTS}
    if a.one_process:
        fns = {k: runner(k, root, a.rows, a.batch) for k in VARIANTS}
        for fn in fns.values():
            fn()
        for r in range(a.passes):
            for k in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                t, f = timed(fns[k], a.rows)
                times[k].append(t)
                faults[k].append(f)
    else:
        ctx = mp.get_context("spawn")
        pipes = {}
        for k in VARIANTS:
            mine, theirs = ctx.Pipe()
            ctx.Process(target=serve, args=(theirs, k, root, a.rows, a.batch), daemon=True).start()
            pipes[k] = mine
        for p in pipes.values():
            assert p.recv() == "ready"
        for r in range(a.passes):  # one process at a time; the order rotates each round
            for k in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                pipes[k].send("run")
                t, f = pipes[k].recv()
                times[k].append(t)
                faults[k].append(f)
        for p in pipes.values():
            p.send("stop")
    hand = times[HAND]
    base = min(hand)
    rows = []
    for name, ts in times.items():
        paired = float(np.median([t / h for t, h in zip(ts, hand)]))  # each pass against its own hand loop
        rows.append((name, f"{a.rows / min(ts):,.0f}", f"{a.rows / max(ts):,.0f}..{a.rows / min(ts):,.0f}",
                     f"{(min(ts) / base - 1) * 100:+.1f}%", f"{(paired - 1) * 100:+.1f}%",
                     f"{np.median(faults[name]):,.0f}"))
    layout = "all in one process" if a.one_process else "each in its own process, one at a time"
    print(f"\n## NNModel.transform vs a hand-written loop: {a.rows:,} digits, digits CNN, batch {a.batch}, "
          f"{a.passes} rounds, {layout}\n")
    print(table(rows, ("inference", "rows/s best", "spread", "best vs best hand-written",
                       "median of per-round ratios", "page faults a pass")))


if __name__ == "__main__":
    main()
