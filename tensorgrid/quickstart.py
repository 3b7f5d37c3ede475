"""``tensorgrid quickstart``: real data (scikit-learn's bundled handwritten digits, no download) through the
store: write, inspect, query, verify."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from . import fs as tgfs
from . import store
from .cli import human_bytes, out, print_frame, print_info


def digits_frame() -> pd.DataFrame:
    """The 1,797 8x8 digits as uint8 images (0-255) with integer labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return pd.DataFrame({"image": list(images), "label": d.target.astype(np.int64)})


def run(root: str = "grid") -> None:
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

    out.print("\n[bold]Try next[/]")
    out.print(f"  tensorgrid info {url}")
    out.print(f"  tensorgrid head {url} -n 3")
    out.print(f"  tensorgrid versions {url}")
    out.print(f"  tensorgrid sql \"SELECT label, count(*) FROM d GROUP BY label\" --ds d={url}")
    out.print(f"  duckdb -c \"SELECT label, count(*) FROM read_parquet('{url}/data/*.parquet') GROUP BY ALL\"")
