"""``read_images``: an image folder as a Dataset, NNImageReader's role (class folders -> labels)."""

from __future__ import annotations

import uuid

from .. import fs as tgfs
from ..store import from_arrow, ingest_images
from ..store.dataset import Dataset


def read_images(folder: str, url: str | None = None, on_error: str = "skip", mode: str = "create") -> Dataset:
    """The images under ``folder`` (any URL): columns image (the file's bytes), path, label (the first
    sub-folder's name), label_index (int64; the class names in ``ds.label_names``), width, height, format.
    Written to ``url`` when given (``ingest_images``), else held in memory. Files that are not readable
    images are skipped with a warning (``on_error="skip"``, listed in ``ds.skipped``) or raise
    ImageDecodeError naming the path (``on_error="raise"``, nothing written)."""
    if url is not None:
        return ingest_images(folder, url, label="folder", mode=mode, on_error=on_error)
    scratch = f"memory://tensorgrid-read-images/{uuid.uuid4().hex}"
    try:
        packed = ingest_images(folder, scratch, label="folder", on_error=on_error)
        ds = from_arrow(packed.to_arrow())
        ds.skipped = packed.skipped
        return ds
    finally:
        fs, where = tgfs.resolve(scratch)
        if fs.exists(where):
            fs.rm(where, recursive=True)
