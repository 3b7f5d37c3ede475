"""``tensorgrid quickstart``: real data (scikit-learn's bundled handwritten digits, no download) through the
store: write, inspect, query, verify."""

from __future__ import annotations

import functools
import time

import numpy as np
import pandas as pd
import torch

from . import fs as tgfs
from . import store
from .show import human_bytes, out, print_frame, print_info


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


def train_digits(ds, root: str, workers: int = 2, epochs: int = 8) -> None:
    """Train the CNN on 1,500 digits with ``workers`` local processes; report held-out accuracy."""
    from .store import from_arrow
    from .train import Trainer
    from .transforms import to_float

    table = ds.to_arrow()
    perm = np.random.default_rng(0).permutation(table.num_rows)
    train, held_out = from_arrow(table.take(perm[:1500])), from_arrow(table.take(perm[1500:]))
    run_dir = f"{root.rstrip('/')}/runs/digits"
    fs, path = tgfs.resolve(run_dir)
    if fs.exists(path):  # a fresh run each time: old checkpoints and event files would mix in
        fs.rm(path, recursive=True)
    out.print(f"\n[bold]training[/] a CNN on 1,500 digits with {workers} local workers (PyTorch DDP, gloo), "
              f"{held_out.num_rows} held out")
    trainer = Trainer(model=digits_cnn, loss=torch.nn.CrossEntropyLoss(), optimizer=adam,
                      scheduler=functools.partial(cosine, epochs=epochs), features="image", label="label",
                      transform=to_float, batch_size=32, epochs=epochs, workers=workers,
                      checkpoint_dir=f"{run_dir}/checkpoints", log_dir=f"{run_dir}/tensorboard", quiet=False)
    t0 = time.perf_counter()
    result = trainer.fit(train, val=held_out)
    acc = result.metrics["val_accuracy"]
    out.print(f"held-out accuracy [bold]{acc:.3f}[/] after {epochs} epochs in {time.perf_counter() - t0:.1f} s; "
              f"last checkpoint {result.checkpoint}")
    out.print(f"TensorBoard: tensorboard --logdir {run_dir}/tensorboard")


def run(root: str = "grid", train: bool = True) -> None:
    url = f"{root.rstrip('/')}/digits"
    out.rule("[bold]TensorGrid quickstart")
    fs, path = tgfs.resolve(url)
    if store.manifest.is_dataset(fs, path):  # a fresh demo dataset each run, so plain globs see one version
        fs.rm(path, recursive=True)
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
        train_digits(ds, root)

    out.print("\n[bold]Try next[/]")
    out.print(f"  tensorgrid info {url}")
    out.print(f"  tensorgrid head {url} -n 3")
    out.print(f"  tensorgrid versions {url}")
    out.print(f"  tensorgrid sql \"SELECT label, count(*) FROM d GROUP BY label\" --ds d={url}")
    out.print(f"  duckdb -c \"SELECT label, count(*) FROM read_parquet('{url}/data/*.parquet') GROUP BY ALL\"")
