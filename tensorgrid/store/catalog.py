"""The datasets under a root URL: what ``tensorgrid ls`` prints and what the grid server serves."""

from __future__ import annotations

from dataclasses import dataclass

from .. import fs as tgfs
from ..args import check_int
from ..errors import DatasetNotFoundError, TensorGridError
from . import manifest
from .versioned import StoreDataset


@dataclass(frozen=True)
class DatasetEntry:
    url: str
    version: int | None  # None when the dataset could not be opened (see ``error``)
    rows: int
    shards: int
    bytes: int
    error: str | None = None


def list_datasets(root_url: str, max_depth: int = 4, storage_options: dict | None = None) -> list[DatasetEntry]:
    """Every TensorGrid dataset at or under ``root_url`` (up to ``max_depth`` folders down), sorted by URL.
    A dataset that cannot be opened (a corrupt manifest, an interrupted first write) is listed with its
    error instead of stopping the listing."""
    max_depth = check_int("max_depth", max_depth, 0)
    fs, root = tgfs.resolve(root_url, storage_options)
    if not fs.exists(root):
        raise DatasetNotFoundError(f"nothing at {root_url}")
    found: list[str] = []
    below = fs.find(root, withdirs=True, maxdepth=max_depth) if max_depth else []
    for path in sorted({p.rstrip("/") for p in [root, *below]}):
        # a dataset's own metadata and shard folders are not searched, nor anything inside them
        if any((path + "/").startswith(f"{d}/{sub}/") for d in found for sub in (manifest.META_DIR, manifest.DATA_DIR)):
            continue
        if fs.isdir(path) and manifest.is_dataset(fs, path):
            found.append(path)
    out = []
    for path in found:
        url = tgfs.to_url(fs, path)
        try:
            ds = StoreDataset(fs, path, manifest.load(fs, path))
        except TensorGridError as e:
            out.append(DatasetEntry(url, None, 0, 0, 0, str(e)))
            continue
        out.append(DatasetEntry(url, ds.version, ds.num_rows, ds.num_shards, ds.size_bytes))
    return out
