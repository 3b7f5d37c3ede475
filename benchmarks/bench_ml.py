"""Issue 12: ``NNModel.transform`` (batch inference through tg.predict) against a hand-written PyTorch loop
over the same rows, same model, same batch size, same consumer (the outputs kept as an Arrow column); and
in parts written to a dataset (resumable) with one worker in this process and with two worker processes
(one torch thread each: the same two cores).

Data: scikit-learn's 1,797 digits (8x8 uint8), repeated to ``--rows`` rows, written as a TensorGrid dataset
(the hand-written loop reads the same rows as one numpy array loaded before the clock starts: its best
case). Model: quickstart's digits CNN. Passes alternate; best pass and spread are reported, and the median
over passes of each pass's time against the hand loop's in the same pass (a shared host's load drifts:
neighbours in time see the same load), with memcpy measured in the same run.

    .venv/bin/python benchmarks/bench_ml.py [--rows 200000] [--batch 512] [--passes 5]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import machine, memcpy_gbs, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid.ml import NNModel  # noqa: E402
from tensorgrid.quickstart import digits_cnn, digits_frame  # noqa: E402


def to_float(batch):
    batch["image"] = batch["image"].float().div_(255)
    return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--passes", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    frame = digits_frame()
    reps = -(-a.rows // len(frame))
    images = np.concatenate([np.stack(frame.image)] * reps)[:a.rows]
    root = tempfile.mkdtemp(prefix="tg-bench-ml-")
    ds = tg.write(f"{root}/digits", pa.table({"image": pa.FixedShapeTensorArray.from_numpy_ndarray(images),
                                               "id": np.arange(a.rows)}))
    model = digits_cnn().eval()
    stage = NNModel(model, transform=to_float, features_col="image", batch_size=a.batch)

    def hand_loop(save: bool) -> int:
        outs = []
        with torch.no_grad():
            for s in range(0, a.rows, a.batch):
                x = torch.from_numpy(images[s:s + a.batch]).float().div_(255)
                outs.append(model(x).numpy())
        out = pa.FixedShapeTensorArray.from_numpy_ndarray(np.concatenate(outs))  # the same consumer: Arrow
        if save:  # its outputs written to a Parquet file, as out= also does
            import pyarrow.parquet as pq

            pq.write_table(pa.table({"prediction": out}), f"{root}/hand-{next(outs_n)}.parquet")
        return len(out)

    outs_n = iter(range(10**6))

    def hand_written() -> int:
        return hand_loop(False)

    def hand_written_saved() -> int:
        return hand_loop(True)

    def nnmodel() -> int:
        return stage.transform(ds).num_rows

    outs = iter(range(10**6))

    def nnmodel_out(workers: int):
        def run() -> int:  # in parts, written as a dataset (resumable); a fresh output each pass
            return stage.transform(ds, out=f"{root}/pred-{next(outs)}", workers=workers).num_rows
        return run

    memcpy = memcpy_gbs()
    print(f"machine: {machine()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, memcpy {memcpy:.1f} GB/s", flush=True)
    runs = {"hand-written torch loop (numpy in memory)": hand_written, "NNModel.transform (tg dataset)": nnmodel,
            "hand-written loop, outputs written to Parquet": hand_written_saved,
            "NNModel.transform(out=, workers=1): parts, written": nnmodel_out(1),
            "NNModel.transform(out=, workers=2): 2 forked processes": nnmodel_out(2)}
    for fn in runs.values():
        fn()  # warm-up: page cache, the Arrow cache, torch's kernels
    times = {k: [] for k in runs}
    for _ in range(a.passes):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            assert fn() == a.rows
            times[name].append(time.perf_counter() - t0)
    hand = times["hand-written torch loop (numpy in memory)"]
    base = min(hand)
    rows = []
    for name, ts in times.items():
        paired = float(np.median([t / h for t, h in zip(ts, hand)]))  # each pass against its own hand loop
        rows.append((name, f"{a.rows / min(ts):,.0f}", f"{a.rows / max(ts):,.0f}..{a.rows / min(ts):,.0f}",
                     f"{(min(ts) / base - 1) * 100:+.1f}%", f"{(paired - 1) * 100:+.1f}%"))
    print(f"\n## NNModel.transform vs a hand-written loop: {a.rows:,} digits, digits CNN, batch {a.batch}, "
          f"best of {a.passes} alternating passes\n")
    print(table(rows, ("inference", "rows/s best", "spread", "best vs best hand-written",
                       "median of per-pass ratios")))


main()
