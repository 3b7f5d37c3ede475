"""Issue 13: a learning curve's runs keep the cores busy. A 6-size x 3-repeat curve on scikit-learn's
digits (quickstart's CNN, or an MLP; 1,200 training rows, 597 validation rows) with ``parallel=2`` against the same 18 runs, each
timed alone, one after another (``parallel=1``: the sum). Target: the parallel curve within 1.3x of sum / 2
on 2 cores. Fresh work folders each time (no run is read back); the two alternate for ``--passes`` passes and
the best of each is compared. memcpy measured in the same run.

    .venv/bin/python benchmarks/bench_curve.py [--model cnn|mlp] [--epochs 10] [--repeats 3] [--passes 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, memcpy_gbs, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid.quickstart import digits_cnn, digits_frame  # noqa: E402

SIZES = [75, 120, 190, 300, 480, 760]
MODEL = "cnn"


def scaled(batch):
    batch["image"] = batch["image"].float().div_(16)
    if MODEL == "mlp":
        batch["image"] = batch["image"].flatten(1)
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--model", choices=["cnn", "mlp"], default="cnn")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--passes", type=int, default=3)
    a = ap.parse_args()
    global MODEL
    MODEL = a.model
    frame = digits_frame().sample(frac=1.0, random_state=0).reset_index(drop=True)
    root = tempfile.mkdtemp(prefix="tg-bench-curve-")
    train, val = tg.write(f"{root}/train", frame.iloc[:1200]), tg.write(f"{root}/val", frame.iloc[1200:])

    def make():
        torch.manual_seed(0)
        net = digits_cnn() if a.model == "cnn" else torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
        return tg.Trainer(net, loss=torch.nn.CrossEntropyLoss(), features="image", label="label", transform=scaled,
                          optimizer=lambda p: torch.optim.Adam(p, lr=1e-2), batch_size=32, epochs=a.epochs,
                          quiet=True)

    memcpy = memcpy_gbs()
    print(f"machine: {machine()}, torch {torch.__version__}, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}, memcpy {memcpy:.1f} GB/s", flush=True)
    runs = iter(range(1000))
    tg.learning_curve(make(), train, val, sizes=SIZES[:4], repeats=1, work_dir=f"{root}/warm", progress=False)
    serial, parallel = [], []
    for _ in range(a.passes):  # alternated: a shared host's load falls on both alike
        for times, workers in ((serial, 1), (parallel, 2)):
            t0 = time.perf_counter()
            tg.learning_curve(make(), train, val, sizes=SIZES, repeats=a.repeats, parallel=workers,
                              work_dir=f"{root}/w{next(runs)}", progress=False)
            times.append(time.perf_counter() - t0)
    print("passes (s): sum " + " ".join(f"{t:.1f}" for t in serial) + "; parallel=2 "
          + " ".join(f"{t:.1f}" for t in parallel))
    serial, parallel = min(serial), min(parallel)
    n = len(SIZES) * a.repeats
    print(f"\n## A {len(SIZES)} x {a.repeats} learning curve on digits ({n} runs, {a.model}, {a.epochs} epochs), 2 cores\n")
    print(table([("runs one after another (parallel=1): the sum", f"{serial:.1f}", "-"),
                 ("sum / 2 (the ideal on 2 cores)", f"{serial / 2:.1f}", "1.00x"),
                 ("parallel=2 (2 processes forked from this one)", f"{parallel:.1f}", f"{parallel / (serial / 2):.2f}x")],
                ("curve", "seconds", "vs sum / 2 (target <= 1.3x)")))


main()
