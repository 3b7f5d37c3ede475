"""Pack a tree of small image files into shards: one row per file, bytes kept undecoded.

Loose small files cost one open + one read each (~1 ms cold on a virtual disk); packed, they are read
as a few large sequential shards.
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from .. import fs as tgfs
from ..errors import (
    ArgumentError,
    DatasetNotFoundError,
    EmptyDataError,
    ImageDecodeError,
    SchemaMismatchError,
    TensorGridError,
)
from .labels import with_names
from .writer import write

BATCH_FILES = 2048


class SkippedFilesWarning(UserWarning):
    """Some files were not images (or were corrupt) and were skipped."""


def _probe(data: bytes) -> tuple[int, int, str] | str:
    """(width, height, format) of a decodable image, or the reason it is not one."""
    from PIL import Image, UnidentifiedImageError  # on use: a process that only reads data never loads PIL

    try:
        with Image.open(io.BytesIO(data)) as im:
            size, fmt = im.size, im.format
            im.load()  # decode fully: truncated files fail here, not at training time
        return size[0], size[1], (fmt or "").lower()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return f"{type(e).__name__}: " + re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(e))


def _schema(labelled: bool, names: list[str | None] | None = None, index_type: pa.DataType | None = None) -> pa.Schema:
    fields = [pa.field("image", pa.binary()), pa.field("path", pa.string())]
    if labelled:  # int64 (what torch's CrossEntropyLoss takes); the class names ride in its field metadata
        index = pa.field("label_index", index_type or pa.int64())
        fields += [pa.field("label", pa.string()), with_names(index, names or [])]
    return pa.schema(fields + [pa.field("width", pa.int32()), pa.field("height", pa.int32()),
                               pa.field("format", pa.string())])


def ingest_images(folder: str, url: str, label: str | None = "folder", mode: str = "create",
                  shard_bytes: int | None = None, progress: Callable[[int], None] | None = None,
                  on_error: str = "skip", storage_options: dict | None = None):
    """Pack every image under ``folder`` into the dataset at ``url`` (``storage_options``: for both, as
    ``tg.open`` takes them).

    Columns: image (bytes), path (relative to folder), label (first sub-folder name) and label_index
    (int64: its position among the sorted labels of folders holding images; appends keep the dataset's
    numbering, and its type, and number new labels after it) when ``label="folder"``, width, height,
    format. The class names in index order are kept with the schema: ``ds.label_names``.
    Files that are not decodable images are skipped and reported in a SkippedFilesWarning
    (count and first paths); ``Dataset.skipped`` lists them all, with the reason. On a local disk,
    symbolic links (to files and folders) are followed, each real folder walked once: links that loop
    or lead to a folder already walked, dangling links, FIFOs, sockets and devices are skipped and
    reported the same way (never opened, so nothing blocks). ``on_error="raise"``: the first such file is
    an ImageDecodeError naming its path instead, and nothing is written.
    """
    if on_error not in ("skip", "raise"):
        raise ArgumentError(f"on_error must be 'skip' or 'raise', got {on_error!r}")
    if label not in ("folder", None):
        raise ArgumentError(f"label must be 'folder' or None, got {label!r}")
    tgfs.remember(url, tgfs.check_storage_options(storage_options))
    fs, root = tgfs.resolve(folder, storage_options)
    if not fs.isdir(root):
        raise TensorGridError(f"{folder} is not a folder")
    root = root.rstrip("/") or "/"
    local = tgfs.is_local(fs)
    files, skipped = _walk_local(root) if local else _find(fs, root)
    if skipped and on_error == "raise":
        raise ImageDecodeError(f"{skipped[0][0]} under {folder}: {skipped[0][1]}")
    seen_files = len(files) + len(skipped)
    if not files and not skipped:
        raise EmptyDataError(f"no files under {folder}")
    prefix = len(root.rstrip("/")) + 1
    rel = [p[prefix:] for p in files]
    labelled = label == "folder"
    labels = [r.split("/", 1)[0] if "/" in r else "" for r in rel]
    index, names, index_type = _label_index(fs, files, labels, url, mode) if labelled else ({}, None, None)
    schema = _schema(labelled, names, index_type)

    def batches() -> Iterator[pa.RecordBatch]:
        with ThreadPoolExecutor(max_workers=4) as pool:
            for start in range(0, len(files), BATCH_FILES):
                chunk = range(start, min(start + BATCH_FILES, len(files)))
                if local:  # regular files only, opened without blocking: a FIFO swapped in is skipped
                    datas = list(pool.map(_read_local, (files[i] for i in chunk)))
                else:
                    blobs = fs.cat([files[i] for i in chunk])
                    datas = [blobs[files[i]] for i in chunk]
                probes = list(pool.map(lambda d: d if isinstance(d, str) else _probe(d), datas))
                cols = {k: [] for k in schema.names}
                for i, data, probe in zip(chunk, datas, probes):
                    if isinstance(probe, str):
                        if on_error == "raise":  # before the write commits: nothing is written
                            raise ImageDecodeError(f"{rel[i]} under {folder} is not a readable image: {probe}")
                        skipped.append((rel[i], probe))
                        continue
                    cols["image"].append(data)
                    cols["path"].append(rel[i])
                    if labelled and labels[i] not in index:  # the kept names were fixed before the write
                        skipped.append((rel[i], f"an image in {labels[i] or 'the top folder'}, which held no "
                                                "image when the ingest started (it changed meanwhile)"))
                        continue
                    if labelled:
                        cols["label"].append(labels[i])
                        cols["label_index"].append(index[labels[i]])
                    cols["width"].append(probe[0])
                    cols["height"].append(probe[1])
                    cols["format"].append(probe[2])
                if progress:
                    progress(len(chunk))
                if cols["image"]:
                    yield pa.RecordBatch.from_pydict(cols, schema=schema)

    try:
        if not files:
            raise EmptyDataError("only unreadable entries")
        ds = write(url, batches(), mode=mode, shard_bytes=shard_bytes)
    except EmptyDataError:
        raise EmptyDataError(f"none of the {seen_files} files under {folder} is a readable image "
                             f"(first: {skipped[0][0]}: {skipped[0][1]})" if skipped else
                             f"no images under {folder}") from None
    ds.skipped = skipped
    if skipped:
        first = ", ".join(p for p, _ in skipped[:5])
        warnings.warn(SkippedFilesWarning(f"skipped {len(skipped)} of {seen_files} files that are not readable "
                                          f"images: {first}{', ...' if len(skipped) > 5 else ''}"), stacklevel=2)
    return ds


def _label_index(fs, files: list[str], labels: list[str], url: str,
                 mode: str) -> tuple[dict[str, int], list[str | None], pa.DataType]:
    """label -> label_index, the names in index order and the index's type: positions among the sorted
    labels of the files that are images (by their extension, else by a header probe without decoding:
    folders of notes or stray files get no index). Appending to a dataset keeps its mapping and the type
    of its label_index (int32 in datasets ingested before int64), and numbers new labels after it."""
    from PIL import Image

    known = Image.registered_extensions()  # an image extension counts as is; other files get a header probe
    with ThreadPoolExecutor(max_workers=4) as pool:
        is_image = list(pool.map(lambda p: p[p.rfind("."):].lower() in known or _is_image_header(fs, p), files))
    found = sorted({lab for lab, ok in zip(labels, is_image) if ok})
    names: list[str | None] = []
    index_type = pa.int64()
    if mode == "append":
        from . import open as open_dataset

        try:
            old = open_dataset(url)
        except DatasetNotFoundError:
            old = None
        if old is not None and "label_index" in old.schema.names and "label" in old.schema.names:
            names = old.label_names  # kept with the schema, or from the rows of older datasets
            if names is None:  # numbering new classes from 0 would give them indices its rows already use
                raise SchemaMismatchError(f"cannot append images to {url}: its label/label_index rows map no "
                                          "index to one class name (not written by ingest_images?): write "
                                          "the images to a new dataset")
            index_type = old.schema.field("label_index").type
    index = {lab: i for i, lab in enumerate(names) if lab is not None}
    for lab in found:
        if lab not in index:
            index[lab] = len(names)
            names.append(lab)
    return index, names, index_type


def _is_image_header(fs, path: str) -> bool:
    from PIL import Image, UnidentifiedImageError

    try:
        with (_open_regular(path) if tgfs.is_local(fs) else fs.open(path, "rb")) as f, Image.open(f):
            return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def walk(folder: str) -> tuple[list[str], list[tuple[str, str]]]:
    """The files ``ingest_images`` reads under ``folder`` (sorted) and the entries it skips with the reason
    (links that loop or dangle, FIFOs, sockets, devices), found without opening any of them."""
    fs, root = tgfs.resolve(folder)
    root = root.rstrip("/") or "/"
    return _walk_local(root) if tgfs.is_local(fs) else _find(fs, root)


def _find(fs, root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Files under ``root`` on a filesystem without links or special files (object stores, memory://)."""
    files = sorted(p for p in fs.find(root) if not any(part.startswith(".")
                                                          for part in p[len(root.rstrip("/")) + 1:].split("/")))
    return files, []


def _walk_local(root: str) -> tuple[list[str], list[tuple[str, str]]]:
    """Regular files under the local folder ``root`` (sorted) and the entries skipped, with the reason.

    Symbolic links are followed, to files and to folders, but every real folder is walked once: a link to a
    folder above it (a loop) or to a folder already walked is reported, not entered, so a tree of links
    can neither loop nor multiply the work. Dangling links, FIFOs, sockets and devices are reported and
    never opened. The real tree is walked first, linked folders after it, so which path a file is
    ingested under does not depend on the order of the listing. Hidden entries (".name") are left out.
    """
    prefix = len(root.rstrip("/")) + 1
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    try:
        st = os.stat(root)
    except OSError as e:
        raise TensorGridError(f"cannot read the folder {root}: {e.strerror or e}") from None
    walked = {(st.st_dev, st.st_ino): root}  # real folder -> the path it was walked under
    folders, links = [root], []  # folders to walk; linked folders, walked after the real tree

    def rel(path: str) -> str:
        return path[prefix:]

    while folders or links:
        if not folders:
            path, st = links.pop(0)
            key = (st.st_dev, st.st_ino)
            if key in walked:
                first = walked[key]
                above = path.startswith(first.rstrip("/") + "/")
                skipped.append((rel(path), f"symlink loop: links to {rel(first) or 'the root'}, a folder above it"
                                if above else f"links to a folder already ingested as {rel(first)}"))
                continue
            walked[key] = path
            folders.append(path)
            continue
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel(folder), f"cannot list this folder: {e.strerror or e}"))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            try:
                st = os.stat(e.path)  # follows links
            except OSError as err:
                if e.is_symlink():
                    reason = ("symlink loop" if err.errno == errno.ELOOP else
                              f"dangling symlink (to {os.readlink(e.path)})" if err.errno == errno.ENOENT else
                              f"unreadable symlink: {err.strerror or err}")
                else:
                    reason = f"cannot read it: {err.strerror or err}"
                skipped.append((rel(e.path), reason))
                continue
            if stat.S_ISDIR(st.st_mode):
                if e.is_symlink():
                    links.append((e.path, st))
                elif (st.st_dev, st.st_ino) not in walked:  # a bind mount can make a real loop too
                    walked[(st.st_dev, st.st_ino)] = e.path
                    folders.append(e.path)
                else:
                    skipped.append((rel(e.path), f"a folder already ingested as {rel(walked[(st.st_dev, st.st_ino)])}"))
            elif stat.S_ISREG(st.st_mode):
                files.append(e.path)
            else:
                skipped.append((rel(e.path), f"not a regular file ({_kind(st.st_mode)})"))
        if not folders:
            links.sort(key=lambda x: x[0])
    return sorted(files), skipped


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return what
    return "a special file"


class _NotRegularFile(OSError):
    pass


def _open_regular(path: str):
    """Open a local file for reading only if it is a regular file: opened without blocking (a FIFO put in
    its place since the walk cannot hang the open), then checked on the open descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    f = open(fd, "rb")  # noqa: SIM115 - owns fd; closed by the caller's with
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise _NotRegularFile(f"not a regular file ({_kind(mode)})")
    return f


def _read_local(path: str) -> bytes | str:
    """The bytes of a local regular file, or why it cannot be read (it changed since the walk)."""
    try:
        with _open_regular(path) as f:
            return f.read()
    except _NotRegularFile as e:
        return str(e)
    except OSError as e:
        return f"cannot read it: {e.strerror or e}"
