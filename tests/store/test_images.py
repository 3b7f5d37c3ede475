"""Small image files packed into shards; corrupt and non-image files reported, never silently dropped."""

import io
import os
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import tensorgrid as tg
from tensorgrid.store import SkippedFilesWarning, labels


def _img(fmt, w, h, seed):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def image_tree(tmp_path):
    root = tmp_path / "imgs"
    expected = {}
    for label in ("dog", "cat", "bird"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            fmt, ext = (("PNG", "png"), ("JPEG", "jpg"))[i % 2]
            data = _img(fmt, 8 + i, 6 + i, hash((label, i)) % 1000)
            (root / label / f"{i}.{ext}").write_bytes(data)
            expected[f"{label}/{i}.{ext}"] = (data, label, 8 + i, 6 + i, fmt.lower())
    return root, expected


def test_ingest_images_packs_every_file(image_tree, tmp_path):
    root, expected = image_tree
    ds = tg.ingest_images(str(root), str(tmp_path / "packed"))
    assert ds.num_rows == 12 and ds.skipped == []
    df = tg.open(str(tmp_path / "packed")).to_pandas()
    assert set(df.columns) == {"image", "path", "label", "label_index", "width", "height", "format"}
    classes = sorted({"dog", "cat", "bird"})
    for row in df.itertuples():
        data, label, w, h, fmt = expected[row.path]
        assert row.image == data  # bytes kept undecoded
        assert (row.label, row.width, row.height, row.format) == (label, w, h, fmt)
        assert row.label_index == classes.index(label)


def test_corrupt_and_non_image_files_are_reported_and_skipped(image_tree, tmp_path):
    root, expected = image_tree
    (root / "dog" / "notes.txt").write_text("not an image")
    good = _img("JPEG", 32, 32, 1)
    (root / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "cat" / ".hidden.png").write_bytes(b"junk")  # hidden files are not data
    with pytest.warns(SkippedFilesWarning, match="skipped 2 of 14") as w:
        ds = tg.ingest_images(str(root), str(tmp_path / "p2"))
    assert "cat/truncated.jpg" in str(w[0].message) and "dog/notes.txt" in str(w[0].message)
    assert sorted(p for p, _ in ds.skipped) == ["cat/truncated.jpg", "dog/notes.txt"]
    assert ds.num_rows == 12


def test_unlabelled_and_no_images(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(_img("PNG", 4, 4, 0))
    ds = tg.ingest_images(str(tmp_path / "flat"), str(tmp_path / "o"), label=None)
    assert ds.schema.names == ["image", "path", "width", "height", "format"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(tg.EmptyDataError, match="none of the 1 files"):
            tg.ingest_images(str(tmp_path / "junk"), str(tmp_path / "o2"))
    assert not (tmp_path / "o2" / "_tensorgrid").exists() or not list((tmp_path / "o2" / "_tensorgrid").glob("v*"))


def test_label_index_counts_image_folders_only_and_appends_keep_it(image_tree, tmp_path):
    image_tree, _ = image_tree
    (image_tree / "notes").mkdir()
    (image_tree / "notes" / "readme.md").write_text("not an image")
    (image_tree / "top.txt").write_text("a stray file at the root")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkippedFilesWarning)
        ds = tg.ingest_images(str(image_tree), str(tmp_path / "ds"))
    pairs = lambda d: dict(zip(*(d.to_pandas()[c].tolist() for c in ("label", "label_index"))))  # noqa: E731
    assert pairs(ds) == {"bird": 0, "cat": 1, "dog": 2}
    more = tmp_path / "more"
    for label in ("ant", "dog"):
        (more / label).mkdir(parents=True)
        (more / label / "0.png").write_bytes(_img("PNG", 5, 5, 7))
    ds = tg.ingest_images(str(more), str(tmp_path / "ds"), mode="append")
    assert pairs(ds) == {"bird": 0, "cat": 1, "dog": 2, "ant": 3}


def _unblocked(fn, fifos):
    """Run fn() in a thread; if it blocks (on a FIFO), unblock it by opening the FIFOs for writing and
    closing them (a reader then sees end of file) and fail: a test never hangs, the library must not."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    blocked = t.is_alive()
    deadline = time.time() + 10
    while t.is_alive() and time.time() < deadline:
        for f in fifos:
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join(0.1)
    assert not blocked, "blocked on a FIFO"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _ingest_in_thread(fifos, *args, **kw):
    """ingest_images(*args, **kw) that cannot hang the test; returns the dataset and the skip warnings."""
    def ingest():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = tg.ingest_images(*args, **kw)
        return ds, [str(w.message) for w in caught if issubclass(w.category, SkippedFilesWarning)]

    return _unblocked(ingest, fifos)


def test_fifo_is_reported_and_never_opened(image_tree, tmp_path):
    root, _ = image_tree
    fifos = [str(root / "cat" / "pipe.png"), str(root / "dog" / "pipe")]  # an image name; no extension (probed)
    for f in fifos:
        os.mkfifo(f)
    ds, caught = _ingest_in_thread(fifos, str(root), str(tmp_path / "out"))
    assert ds.num_rows == 12
    assert dict(ds.skipped) == {"cat/pipe.png": "not a regular file (a FIFO)", "dog/pipe": "not a regular file (a FIFO)"}
    assert caught and "skipped 2 of 14" in caught[0] and "cat/pipe.png" in caught[0]


def test_a_fifo_swapped_in_after_the_walk_is_not_read(tmp_path):
    from tensorgrid.store import images

    fifo = str(tmp_path / "late.png")
    os.mkfifo(fifo)
    assert _unblocked(lambda: images._read_local(fifo), [fifo]) == "not a regular file (a FIFO)"


def test_symlink_loops_and_dangling_links_are_reported(image_tree, tmp_path):
    root, _ = image_tree
    os.symlink("..", root / "cat" / "up")  # a loop: the root again, from inside it
    os.symlink("b", root / "cat" / "a")  # a -> b -> a: the OS says ELOOP
    os.symlink("a", root / "cat" / "b")
    os.symlink("missing.png", root / "dog" / "gone.png")
    ds, caught = _ingest_in_thread([], str(root), str(tmp_path / "out"))
    assert ds.num_rows == 12
    reasons = dict(ds.skipped)
    assert reasons["cat/up"].startswith("symlink loop") and "the root" in reasons["cat/up"]
    assert reasons["cat/a"] == reasons["cat/b"] == "symlink loop"
    assert reasons["dog/gone.png"] == "dangling symlink (to missing.png)"
    assert "skipped 4 of 16" in caught[0]


def test_symlinked_folders_and_files_are_followed_once(image_tree, tmp_path):
    root, expected = image_tree
    elsewhere = tmp_path / "elsewhere" / "fish"
    elsewhere.mkdir(parents=True)
    fish = _img("PNG", 3, 5, 9)
    (elsewhere / "0.png").write_bytes(fish)
    os.symlink(elsewhere, root / "fish")  # a folder outside the tree: followed, labelled by the link's name
    os.symlink(root / "dog", root / "hound")  # a folder already in the tree: walked once, under its real name
    os.symlink(root / "dog" / "0.png", root / "cat" / "also_dog.png")  # a linked file: read through the link
    linked_root = tmp_path / "root_link"
    os.symlink(root, linked_root)  # the folder given may itself be a link
    ds, caught = _ingest_in_thread([], str(linked_root), str(tmp_path / "out"))
    df = ds.to_pandas().set_index("path")
    assert len(df) == 14
    assert df.loc["fish/0.png", "image"] == fish and df.loc["fish/0.png", "label"] == "fish"
    assert df.loc["cat/also_dog.png", "image"] == expected["dog/0.png"][0]
    assert not any(p.startswith("hound/") for p in df.index)
    assert dict(ds.skipped) == {"hound": "links to a folder already ingested as dog"}
    assert sorted(set(df["label"])) == ["bird", "cat", "dog", "fish"]


def _class_folders(root, widths: dict[str, int], n: int = 2):
    """A folder per class whose PNGs are ``widths[class]`` pixels wide (a model can read the class off)."""
    for label, w in widths.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / label / f"{i}.png").write_bytes(_img("PNG", w, 3, i))
    return root


def test_labels_are_int64_and_named_and_an_append_extends_the_names(tmp_path):
    import torch

    url = str(tmp_path / "ds")
    ds = tg.ingest_images(str(_class_folders(tmp_path / "a", {"dog": 5, "cat": 4})), url)
    assert ds.schema.field("label_index").type == pa.int64()
    assert ds.label_names == tg.open(url).label_names == ["cat", "dog"]
    batch = next(iter(tg.open(url).to_torch(4, columns=["label_index"])))
    assert batch["label_index"].dtype == torch.int64  # what CrossEntropyLoss takes, as is
    torch.nn.functional.cross_entropy(torch.zeros(4, 2), batch["label_index"])
    tg.ingest_images(str(_class_folders(tmp_path / "b", {"ant": 6, "dog": 5}, n=1)), url, mode="append")
    ds = tg.open(url)
    assert ds.label_names == ["cat", "dog", "ant"] and tg.open(url, version=1).label_names == ["cat", "dog"]
    rows = ds.to_arrow()
    names = ds.label_names
    assert all(names[i] == lab for lab, i in zip(rows.column("label").to_pylist(),
                                                 rows.column("label_index").to_pylist()))
    # every read carries the version's names, also rows of shards written before the append
    assert labels.names_in(rows.schema) == names == labels.names_in(ds.read_shard(0).schema)
    assert tg.write(str(tmp_path / "copy"), rows).label_names == names  # a copy keeps them
    assert tg.ingest_images(str(tmp_path / "b"), str(tmp_path / "u"), label=None).label_names is None


def test_an_append_to_a_dataset_ingested_with_int32_labels_keeps_int32_and_gets_names(tmp_path):
    url = str(tmp_path / "old")
    old = pa.table({"image": [_img("PNG", 4, 3, 0)], "path": ["cat/0.png"], "label": ["cat"],
                    "label_index": pa.array([0], pa.int32()), "width": pa.array([4], pa.int32()),
                    "height": pa.array([3], pa.int32()), "format": ["png"]})
    tg.write(url, old)  # how ingest_images wrote labels before: int32, no names kept
    assert labels.names_in(tg.open(url).schema) is None
    assert tg.open(url).label_names == ["cat"]  # derived from the rows
    ds = tg.ingest_images(str(_class_folders(tmp_path / "b", {"dog": 5, "cat": 4}, n=1)), url, mode="append")
    assert ds.schema.field("label_index").type == pa.int32()  # the dataset's type: its old shards hold int32
    assert ds.label_names == ["cat", "dog"] and labels.names_in(ds.schema) == ["cat", "dog"]
    pairs = ds.to_arrow(columns=["label", "label_index"]).to_pylist()
    assert sorted((p["label"], p["label_index"]) for p in pairs) == [("cat", 0), ("cat", 0), ("dog", 1)]


def test_label_names_of_rows_without_kept_names_leave_gaps_as_none(tmp_path):
    ds = tg.from_arrow(pa.table({"label": ["b", "d", "b"], "label_index": [1, 3, 1]}))
    assert ds.label_names == [None, "b", None, "d"]
    assert tg.from_arrow(pa.table({"label_index": [0, 1]})).label_names is None  # no names to derive
