"""Deterministic source data for the peer figures, as plain .npy files every peer writes from.

    python benchmarks/peers/datagen.py --data DIR [--figures rows1mb,mnist] [--rows rows1mb=200,records100=200000]

Layout: DIR/source/<figure>/{x.npy, label.npy, meta.json}; jpeg64 adds jpeg.npy (all JPEG bytes, uint8)
and offsets.npy (N+1 int64) and loose files under files/<label>/<i>.jpg. No pickles, so numpy 1.26
and numpy 2 both load everything.
"""

from __future__ import annotations

import argparse
import io
import json
import os

import numpy as np

FIGURES = {  # name: (default rows, row shape, dtype)
    "rows1mb": (2000, (1024, 1024), np.uint8),
    "records100": (2_000_000, (25,), np.float32),
    "mnist": (600_000, (28, 28), np.uint8),
    "jpeg64": (20_000, (64, 64, 3), np.uint8),
}
CHUNK_BYTES = 64 << 20


def source_dir(data: str, figure: str) -> str:
    return os.path.join(data, "source", figure)


def load(data: str, figure: str) -> dict:
    """Memory-mapped source arrays plus meta (rows, shape, dtype)."""
    d = source_dir(data, figure)
    with open(os.path.join(d, "meta.json")) as f:
        meta = json.load(f)
    out = {"meta": meta, "label": np.load(os.path.join(d, "label.npy"))}
    names = ["jpeg", "offsets"] if figure == "jpeg64" else ["x"]
    for name in names:
        out[name] = np.load(os.path.join(d, f"{name}.npy"), mmap_mode="r")
    return out


def _jpeg(rng: np.random.Generator, label: int) -> bytes:
    from PIL import Image

    # Smooth blocks plus mild noise: compresses like a photo thumbnail, not like white noise.
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.int16)
    img = np.repeat(np.repeat(coarse, 8, 0), 8, 1) + rng.integers(-12, 13, (64, 64, 3), dtype=np.int16)
    img[:, :, label % 3] //= 2
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def generate(data: str, figure: str, rows: int | None = None, seed: int = 0) -> str:
    default, shape, dtype = FIGURES[figure]
    rows = rows or default
    d = source_dir(data, figure)
    meta_path = os.path.join(d, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            if json.load(f).get("rows") == rows:
                return d
    os.makedirs(d, exist_ok=True)
    if os.path.exists(meta_path):
        os.remove(meta_path)
    rng = np.random.default_rng([seed, list(FIGURES).index(figure)])
    labels = rng.integers(0, 10, rows, dtype=np.int64) if figure != "rows1mb" else np.arange(rows, dtype=np.int64)
    np.save(os.path.join(d, "label.npy"), labels)
    if figure == "jpeg64":
        blobs = [_jpeg(rng, int(y)) for y in labels]
        offsets = np.zeros(rows + 1, dtype=np.int64)
        np.cumsum([len(b) for b in blobs], out=offsets[1:])
        np.save(os.path.join(d, "offsets.npy"), offsets)
        np.save(os.path.join(d, "jpeg.npy"), np.frombuffer(b"".join(blobs), dtype=np.uint8))
        for i, (b, y) in enumerate(zip(blobs, labels)):
            sub = os.path.join(d, "files", str(y))
            os.makedirs(sub, exist_ok=True)
            with open(os.path.join(sub, f"{i:07d}.jpg"), "wb") as f:
                f.write(b)
    else:
        x = np.lib.format.open_memmap(os.path.join(d, "x.npy"), mode="w+", dtype=dtype, shape=(rows, *shape))
        step = max(1, CHUNK_BYTES // (x.itemsize * int(np.prod(shape))))
        for i in range(0, rows, step):
            n = min(step, rows - i)
            if dtype == np.float32:
                x[i:i + n] = rng.standard_normal((n, *shape), dtype=np.float32)
            else:
                x[i:i + n] = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        x.flush()
        del x
    meta = {"figure": figure, "rows": rows, "shape": list(shape), "dtype": np.dtype(dtype).name, "seed": seed}
    with open(meta_path, "w") as f:  # written last: its presence means the figure is complete
        json.dump(meta, f)
    return d


def parse_rows(text: str | None) -> dict:
    """'rows1mb=200,records100=200000' -> dict; a bare number applies to every figure."""
    if not text:
        return {}
    if text.isdigit():
        return {f: int(text) for f in FIGURES}
    return {k: int(v) for k, v in (item.split("=") for item in text.split(","))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--figures", default=",".join(FIGURES))
    ap.add_argument("--rows", help="overrides: 'rows1mb=200,records100=200000' or one number for all")
    args = ap.parse_args()
    rows = parse_rows(args.rows)
    for fig in args.figures.split(","):
        print(generate(args.data, fig, rows.get(fig)))


if __name__ == "__main__":
    main()
