"""Pack a tree of small image files into shards: one row per file, bytes kept undecoded.

Loose small files cost one open + one read each (~1 ms cold on a virtual disk); packed, they are read
as a few large sequential shards.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from .. import fs as tgfs
from ..errors import ColumnNotFoundError, DatasetNotFoundError, EmptyDataError, TensorGridError
from .writer import write

BATCH_FILES = 2048


class SkippedFilesWarning(UserWarning):
    """Some files were not images (or were corrupt) and were skipped."""


def _probe(data: bytes) -> tuple[int, int, str] | str:
    """(width, height, format) of a decodable image, or the reason it is not one."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = im.size, im.format
            im.load()  # decode fully: truncated files fail here, not at training time
        return size[0], size[1], (fmt or "").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: " + re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))


def _schema(labelled: bool) -> pa.Schema:
    fields = [pa.field("image", pa.binary()), pa.field("path", pa.string())]
    if labelled:
        fields += [pa.field("label", pa.string()), pa.field("label_index", pa.int32())]
    return pa.schema(fields + [pa.field("width", pa.int32()), pa.field("height", pa.int32()),
                               pa.field("format", pa.string())])


def ingest_images(folder: str, url: str, label: str | None = "folder", mode: str = "create",
                  shard_bytes: int | None = None, progress: Callable[[int], None] | None = None):
    """Pack every image under ``folder`` into the dataset at ``url``.

    Columns: image (bytes), path (relative to folder), label (first sub-folder name) and label_index
    (its position among the sorted labels of folders holding images; appends keep the dataset's
    numbering and number new labels after it) when ``label="folder"``, width, height, format.
    Files that are not decodable images are skipped and reported in a SkippedFilesWarning
    (count and first paths); ``Dataset.skipped`` lists them all.
    """
    if label not in ("folder", None):
        raise TensorGridError(f"label must be 'folder' or None, got {label!r}")
    fs, root = tgfs.resolve(folder)
    if not fs.isdir(root):
        raise TensorGridError(f"{folder} is not a folder")
    root = root.rstrip("/")
    files = sorted(p for p in fs.find(root) if not any(part.startswith(".")
                                                          for part in p[len(root) + 1:].split("/")))
    if not files:
        raise EmptyDataError(f"no files under {folder}")
    rel = [p[len(root) + 1:] for p in files]
    labelled = label == "folder"
    labels = [r.split("/", 1)[0] if "/" in r else "" for r in rel]
    index = _label_index(fs, files, labels, url, mode) if labelled else {}
    schema = _schema(labelled)
    skipped: list[tuple[str, str]] = []

    def batches() -> Iterator[pa.RecordBatch]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(files), BATCH_FILES):
                chunk = range(start, min(start + BATCH_FILES, len(files)))
                blobs = fs.cat([files[i] for i in chunk]) if not tgfs.is_local(fs) else None
                datas = [blobs[files[i]] if blobs else _read_local(files[i]) for i in chunk]
                probes = list(pool.map(_probe, datas))
                cols = {k: [] for k in schema.names}
                for i, data, probe in zip(chunk, datas, probes):
                    if isinstance(probe, str):
                        skipped.append((rel[i], probe))
                        continue
                    cols["image"].append(data)
                    cols["path"].append(rel[i])
                    if labelled:
                        cols["label"].append(labels[i])
                        if labels[i] not in index:  # a header Pillow could not name, a body it could decode
                            index[labels[i]] = max(index.values(), default=-1) + 1
                        cols["label_index"].append(index[labels[i]])
                    cols["width"].append(probe[0])
                    cols["height"].append(probe[1])
                    cols["format"].append(probe[2])
                if progress:
                    progress(len(chunk))
                if cols["image"]:
                    yield pa.RecordBatch.from_pydict(cols, schema=schema)

    try:
        ds = write(url, batches(), mode=mode, shard_bytes=shard_bytes)
    except EmptyDataError:
        raise EmptyDataError(f"none of the {len(files)} files under {folder} is a readable image "
                             f"(first: {skipped[0][0]}: {skipped[0][1]})" if skipped else
                             f"no images under {folder}") from None
    ds.skipped = skipped
    if skipped:
        first = ", ".join(p for p, _ in skipped[:5])
        warnings.warn(SkippedFilesWarning(f"skipped {len(skipped)} of {len(files)} files that are not readable "
                                          f"images: {first}{', ...' if len(skipped) > 5 else ''}"), stacklevel=2)
    return ds


def _label_index(fs, files: list[str], labels: list[str], url: str, mode: str) -> dict[str, int]:
    """label -> label_index: positions among the sorted labels of the files that are images (by their
    extension, else by a header probe without decoding: folders of notes or stray files get no index).
    Appending to a dataset keeps its mapping and numbers new labels after it."""
    known = Image.registered_extensions()  # an image extension counts as is; other files get a header probe
    with ThreadPoolExecutor(max_workers=4) as pool:
        is_image = list(pool.map(lambda p: p[p.rfind("."):].lower() in known or _is_image_header(fs, p), files))
    found = sorted({lab for lab, ok in zip(labels, is_image) if ok})
    index: dict[str, int] = {}
    if mode == "append":
        from . import open as open_dataset

        try:
            pairs = open_dataset(url).to_arrow(columns=["label", "label_index"]).group_by(
                ["label", "label_index"]).aggregate([])
            index = dict(zip(pairs.column("label").to_pylist(), pairs.column("label_index").to_pylist()))
        except (DatasetNotFoundError, ColumnNotFoundError):
            index = {}
    for lab in found:
        if lab not in index:
            index[lab] = max(index.values(), default=-1) + 1
    return index


def _is_image_header(fs, path: str) -> bool:
    try:
        with fs.open(path, "rb") as f, Image.open(f):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _read_local(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
