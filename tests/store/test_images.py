"""Small image files packed into shards; corrupt and non-image files reported, never silently dropped."""

import io
import warnings

import numpy as np
import pytest
from PIL import Image

import tensorgrid as tg
from tensorgrid.store import SkippedFilesWarning


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
