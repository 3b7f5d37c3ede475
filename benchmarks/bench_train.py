"""Trainer figures: overhead vs a hand-written PyTorch loop, data-wait fraction, samples/s and scaling on
each engine, checkpoint write/read GB/s.

    python benchmarks/bench_train.py [--rows 60000] [--engines local,ray,spark]

Predictions: at workers=1 the trainer adds a masked loss, one dict per batch and a few timers: <= 3%
over the hand loop. Data wait: the loader hands out slices of an already-gathered window, ~1% of a
small CNN step. Two workers on two cores: the CNN is compute-bound, so ~1.6-1.8x minus all-reduce.
Checkpoints: torch.save to memory then one write; ~1 GB/s local (page cache), faster to memory://.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DATA, machine, table  # noqa: E402

import tensorgrid as tg  # noqa: E402
from tensorgrid import transforms as T  # noqa: E402
from tensorgrid.allocator import tune_malloc  # noqa: E402
from tensorgrid.quickstart import digits_frame  # noqa: E402
from tensorgrid.train import checkpoint as ckpt  # noqa: E402


def mnist_cnn():
    nn = torch.nn
    return nn.Sequential(nn.Unflatten(1, (1, 28)), nn.Conv2d(1, 16, 5, stride=2), nn.ReLU(),
                         nn.Conv2d(16, 32, 5, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 16, 10))


def digits_cnn():
    from tensorgrid.quickstart import digits_cnn as f

    return f()


def sgd(params):
    return torch.optim.SGD(params, lr=0.01, momentum=0.9)


def hand_loop(x: torch.Tensor, y: torch.Tensor, make, batch: int, epochs: int) -> float:
    """The baseline: tensors already in memory, randperm batches, forward/backward/step. Samples/s of the
    median epoch after the first (the trainer's figure is taken the same way)."""
    torch.manual_seed(0)
    model, lossf = make(), torch.nn.CrossEntropyLoss()
    opt = sgd(model.parameters())
    xf = x.float() / 255  # the best case: features converted once, up front
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            xb = xf[idx]
            opt.zero_grad()
            lossf(model(xb), y[idx]).backward()
            opt.step()
        rates.append(len(x) / (time.perf_counter() - t0))
    return float(np.median(rates[1:] or rates))


def _hand_child(url: str, make, batch: int, epochs: int, tune: bool, out) -> None:
    torch.set_num_threads(1)
    if tune:
        tune_malloc()
    out.put(hand_loop(*_tensors(tg.open(url)), make, batch, epochs))


def hand_in_child(url: str, make, batch: int, epochs: int, tune: bool) -> float:
    """The hand loop in a fresh process: glibc's malloc state there is untouched by earlier runs."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_hand_child, args=(url, make, batch, epochs, tune, q))
    p.start()
    r = q.get()
    p.join()
    return r


def _raw_worker(rank: int, world: int, make, batch: int, steps: int, port: int, out) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    tune_malloc()  # the ceiling: with the allocator tuning the trainer applies (tensorgrid/allocator.py)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    model = make()
    model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt, lossf = sgd(model.parameters()), torch.nn.CrossEntropyLoss()
    x, y = torch.rand(batch // world, *SHAPES[make.__name__]), torch.randint(0, 10, (batch // world,))
    for i in range(steps + 10):
        if i == 10:
            t0 = time.perf_counter()
        opt.zero_grad()
        lossf(model(x), y).backward()
        opt.step()
    if rank == 0:
        out.put(steps * batch / (time.perf_counter() - t0))
    if world > 1:
        dist.barrier()  # leave together: a rank tearing down while its peer still talks aborts in gloo
        dist.destroy_process_group()


SHAPES = {"mnist_cnn": (28, 28), "digits_cnn": (8, 8)}


def raw_ddp(make, batch: int, world: int, steps: int = 300) -> float:
    """The machine's ceiling: plain torch DDP (gloo) on fixed tensors, no data loading at all."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    mp.start_processes(_raw_worker, args=(world, make, batch, steps, port, q), nprocs=world, start_method="spawn")
    return q.get()


def run_trainer(ds, make, batch, epochs, workers=1, engine="local"):
    t0 = time.perf_counter()
    r = tg.Trainer(model=make, loss=torch.nn.CrossEntropyLoss(), optimizer=sgd, features="image", label="label",
                   transform=T.to_float, batch_size=batch, epochs=epochs, workers=workers, engine=engine,
                   quiet=True).fit(ds)
    wall = time.perf_counter() - t0
    steady = r.history[1:] or r.history  # epoch 0 includes warm-up
    sps = np.median([h["samples_per_s"] for h in steady])
    wait = float(np.mean([h["data_wait_fraction"] for h in steady]))
    return sps, wait, wall


def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    df = ds.to_pandas()
    return torch.from_numpy(np.stack(df["image"])), torch.from_numpy(df["label"].to_numpy())


def checkpoints(mb: int) -> list[tuple]:
    state = {"model": {f"w{i}": torch.randn(mb * (1 << 20) // 4 // 16) for i in range(16)}}
    nbytes = sum(v.numel() * 4 for v in state["model"].values())
    rows = []
    import shutil

    shutil.rmtree(os.path.join(DATA, "ckpt-bench"), ignore_errors=True)
    for url in (os.path.join(DATA, "ckpt-bench"), "memory://ckpt-bench"):
        times_w, times_r = [], []
        for i in range(3):
            t0 = time.perf_counter()
            path = ckpt.save(url, 0, i, state, keep=1)
            times_w.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ckpt.load(path)
            times_r.append(time.perf_counter() - t0)
        rows.append((url.split(":")[0] if "://" in url else "local disk", f"{nbytes / 1e9 / np.median(times_w):.2f}",
                     f"{nbytes / 1e9 / np.median(times_r):.2f}"))
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=60_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--engines", default="local,ray,spark")
    p.add_argument("--ckpt-mb", type=int, default=256)
    a = p.parse_args()
    torch.set_num_threads(1)  # one intra-op thread per worker on 2 cores; the hand loop gets the same
    tune_malloc()  # as the trainer does in its workers (workers=1 runs in this process)
    print(f"machine: {machine()}; torch threads per process: 1\n")
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 255, (a.rows, 28, 28), dtype=np.uint8)
    ys = rng.integers(0, 10, a.rows)
    mnist = tg.write(os.path.join(DATA, "train-mnist"), pa.table({
        "image": pa.FixedShapeTensorArray.from_numpy_ndarray(xs), "label": ys}), mode="overwrite")
    digits = tg.write(os.path.join(DATA, "train-digits"), digits_frame(), mode="overwrite")
    rows = []
    for name, ds, make, batch in (("mnist-shaped CNN", mnist, mnist_cnn, 128), ("digits CNN", digits, digits_cnn, 32)):
        hand_default = hand_in_child(ds.url, make, batch, a.epochs, tune=False)
        hand = hand_in_child(ds.url, make, batch, a.epochs, tune=True)
        sps, wait, _ = run_trainer(ds, make, batch, a.epochs)
        raw1, raw2 = raw_ddp(make, batch, 1), raw_ddp(make, batch, 2)
        rows.append((name, "raw torch DDP, fixed tensors (ceiling)", 1, f"{raw1:,.0f}", "-", "-"))
        rows.append((name, "raw torch DDP, fixed tensors (ceiling)", 2, f"{raw2:,.0f}", "-",
                     f"scaling {raw2 / raw1:.2f}x"))
        rows.append((name, "hand-written loop, glibc malloc defaults", 1, f"{hand_default:,.0f}", "-", "-"))
        rows.append((name, "hand-written loop, malloc tuned as tg", 1, f"{hand:,.0f}", "-", "-"))
        rows.append((name, "tg.Trainer local", 1, f"{sps:,.0f}", f"{wait:.1%}",
                     f"overhead {1 - sps / hand:+.1%} (vs defaults {sps / hand_default:.2f}x)"))
        for engine in a.engines.split(","):
            try:
                if engine == "spark":
                    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
                    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
                    from pyspark.sql import SparkSession

                    s = SparkSession.builder.master("local[2]").config("spark.ui.enabled", "false").config(
                        "spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1").getOrCreate()
                    s.sparkContext.setLogLevel("ERROR")
                if engine == "ray":
                    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
                sps2, wait2, wall = run_trainer(ds, make, batch, a.epochs, workers=2, engine=engine)
                rows.append((name, f"tg.Trainer {engine}", 2, f"{sps2:,.0f}", f"{wait2:.1%}",
                             f"scaling {sps2 / sps:.2f}x (wall {wall:.0f} s incl. start-up)"))
            except Exception as e:  # noqa: BLE001 - an engine that fails is reported, not fatal
                rows.append((name, f"tg.Trainer {engine}", 2, "-", "-", f"error: {e}"[:80]))
    print(table(rows, ("model", "runner", "workers", "samples/s", "data wait", "overhead / scaling")))
    print(f"\n## checkpoint of {a.ckpt_mb} MB\n")
    print(table(checkpoints(a.ckpt_mb), ("target", "write GB/s", "read GB/s")))


if __name__ == "__main__":
    main()
