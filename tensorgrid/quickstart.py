"""``tensorgrid quickstart``: real data (scikit-learn's bundled handwritten digits, no download) through the
store: write, inspect, query, verify, load, train, plot.

Everything the demo writes lives in its own folder, ``<root>/quickstart`` (marked by a file it leaves there),
which each run replaces. A folder of that name it did not make is never touched: the demo refuses, naming
it and ``--overwrite``."""

from __future__ import annotations

import functools
import os
import shutil
import sys
import time

import numpy as np
import pandas as pd
import torch

from . import fs as tgfs
from . import store
from .errors import TensorGridError
from .show import human_bytes, out, print_frame, print_info

MARKER = ".made-by-tensorgrid-quickstart"  # in the demo's folder: what a later run may replace


class DemoFolderError(TensorGridError):
    """The demo's folder exists and was not made by the demo (nothing was changed)."""


def digits_frame() -> pd.DataFrame:
    """The 1,797 8x8 digits as uint8 images (0-255) with integer labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return pd.DataFrame({"image": list(images), "label": d.target.astype(np.int64)})


def digits_cnn() -> torch.nn.Module:
    """A small CNN for 8x8 digits (module level, so worker processes can import it)."""
    nn = torch.nn
    return nn.Sequential(
        nn.Unflatten(1, (1, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.25), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def adam(params):
    return torch.optim.Adam(params, lr=2e-3)


def cosine(optimizer, epochs: int = 8):
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)


def train_digits(ds, home: str, workers: int = 2, epochs: int = 8) -> None:
    """Train the CNN on ~1,500 digits with ``workers`` local processes; report held-out accuracy."""
    from .train import Trainer
    from .transforms import to_float

    train, held_out = ds.split([0.83, 0.17], seed=0, stratify="label")  # views of the dataset: no copy
    run_dir = f"{home}/runs/digits"  # fresh each run: the demo's folder was emptied
    out.print(f"\n[bold]training[/] a CNN on {train.num_rows:,} digits with {workers} local workers (PyTorch DDP, "
              f"gloo), {held_out.num_rows} held out: ds.split([0.83, 0.17], seed=0, stratify=\"label\")")
    trainer = Trainer(model=digits_cnn, loss=torch.nn.CrossEntropyLoss(), optimizer=adam,
                      scheduler=functools.partial(cosine, epochs=epochs), features="image", label="label",
                      transform=to_float, batch_size=32, epochs=epochs, workers=workers,
                      checkpoint_dir=f"{run_dir}/checkpoints", log_dir=f"{run_dir}/tensorboard", quiet=False)
    t0 = time.perf_counter()
    result = trainer.fit(train, val=held_out)
    acc = result.metrics["val_accuracy"]
    out.print(f"held-out accuracy [bold]{acc:.3f}[/] after {epochs} epochs in {time.perf_counter() - t0:.1f} s; "
              f"last checkpoint {result.checkpoint}")
    out.print(f"TensorBoard: {commands()[2]} --logdir {run_dir}/tensorboard")
    try:
        png = result.plot(f"{run_dir}/curves.png", title="quickstart: a CNN on scikit-learn's digits")
        out.print(f"learning curves (loss and accuracy, training and held-out): [bold]{png}[/]")
    except TensorGridError as e:  # matplotlib is an extra: `python3 dev.py demo` installs it
        out.print(f"(no picture of the learning curves: {e})")


def prepare(root: str, overwrite: bool = False) -> str:
    """The demo's folder ``<root>/quickstart``, emptied: made afresh, or replaced when an earlier run made it
    (its marker file), or ``overwrite``; any other folder there is refused and left as it is."""
    home = f"{root.rstrip('/')}/quickstart"
    fs, path = tgfs.resolve(home)
    if fs.exists(path):
        ours = fs.exists(f"{path}/{MARKER}")
        if not (ours or overwrite):
            raise DemoFolderError(f"{home} exists and was not made by the quickstart: nothing was changed; pass "
                                  f"--root DIR for another folder, or --overwrite to replace {home}")
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    with fs.open(f"{path}/{MARKER}", "wb") as f:
        f.write(b"made by `tensorgrid quickstart`; the next run replaces this folder\n")
    return home


def run(root: str = "grid", train: bool = True, overwrite: bool = False) -> None:
    home = prepare(root, overwrite)
    url = f"{home}/digits"
    out.rule("[bold]TensorGrid quickstart")
    t0 = time.perf_counter()
    ds = store.write(url, digits_frame())
    out.print(f"wrote scikit-learn's digits to [bold]{ds.url}[/] as version {ds.version} "
              f"in {time.perf_counter() - t0:.2f} s")
    print_info(ds)

    q = "SELECT label, count(*) AS n FROM ds GROUP BY label ORDER BY label"
    out.print(f"\nSQL through DuckDB: [cyan]{q}[/]")
    print_frame(ds.sql(q).to_pandas())

    r = ds.verify()
    out.print(f"verified {r['shards']} shard(s), {human_bytes(r['bytes'])}: sizes and xxh3 checksums match")

    first = ds.head(1)["image"][0]
    out.print(f"\nrow 0 comes back as a {first.dtype} array of shape {first.shape}:")
    for row in first:
        out.print("  " + "".join(" .:-=+*#%@"[int(v) * 10 // 256] for v in row))

    loader = ds.to_torch(batch_size=256, shuffle=True, seed=0)
    out.print(f"\nthe loader: ds.to_torch(batch_size=256, shuffle=True) -> {len(loader)} batches per epoch")
    for i, batch in enumerate(loader):
        if i == 3:
            break
        x, y = batch["image"], batch["label"]
        out.print(f"  batch {i}: image {tuple(x.shape)} {x.dtype}, label {tuple(y.shape)} {y.dtype}, "
                  f"first labels {y[:8].tolist()}")
    t0, rows = time.perf_counter(), 0
    for _ in range(5):
        for batch in loader:
            rows += len(batch["label"])
    out.print(f"  5 shuffled epochs: {rows / (time.perf_counter() - t0):,.0f} samples/s")

    if train:
        train_digits(ds, home)

    tg, py, _ = commands()
    out.print("\n[bold]Try next[/]" + ("" if tg == "tensorgrid" else
                                        f" (after [cyan]source {os.path.dirname(tg)}/activate[/], plain "
                                        "[cyan]tensorgrid[/] does)"))
    out.print(f"  {tg} info {url}")
    out.print(f"  {tg} head {url} -n 3")
    out.print(f"  {tg} versions {url}")
    out.print(f"  {tg} sql \"SELECT label, count(*) FROM d GROUP BY label\" --ds d={url}")
    out.print(f"  {py} -c \"import duckdb; duckdb.sql(\\\"SELECT label, count(*) FROM "
              f"read_parquet('{url}/data/*.parquet') GROUP BY ALL\\\").show()\"")


def commands() -> tuple[str, str, str]:
    """How to call ``tensorgrid``, ``python`` and ``tensorboard`` from the user's shell: plain names when they are on its PATH
    (an activated environment), else the paths of this environment's, relative to here when inside it."""
    bin_dir = os.path.dirname(sys.executable)

    def name(cmd: str) -> str:
        mine = os.path.join(bin_dir, cmd)
        found = shutil.which(cmd)
        if found and os.path.realpath(found) == os.path.realpath(mine):
            return cmd
        rel = os.path.relpath(mine)
        return rel if not rel.startswith("..") else mine

    return name("tensorgrid"), name("python"), name("tensorboard")
