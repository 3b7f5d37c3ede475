"""read_images on a real folder of PNG files: labels from class folders, unreadable files skipped (with a
warning and a list) or raised as ImageDecodeError with nothing written."""

import os
import warnings

import numpy as np
import pytest
from PIL import Image

import tensorgrid as tg
from tensorgrid.ml import read_images
from tensorgrid.quickstart import digits_frame
from tensorgrid.store.images import SkippedFilesWarning


@pytest.fixture
def folder(tmp_path):
    frame = digits_frame().iloc[:60]
    for i, (img, lab) in enumerate(zip(frame.image, frame.label)):
        os.makedirs(tmp_path / "photos" / f"digit{lab}", exist_ok=True)
        Image.fromarray(img).save(tmp_path / "photos" / f"digit{lab}" / f"{i}.png")
    (tmp_path / "photos" / "digit3" / "broken.png").write_bytes(b"not a png")
    return tmp_path / "photos", frame


def test_read_images_labels_by_folder_and_skips_what_does_not_decode(folder):
    path, frame = folder
    with pytest.warns(SkippedFilesWarning, match="digit3/broken"):
        ds = read_images(str(path))
    assert ds.num_rows == 60 and [p for p, _ in ds.skipped] == ["digit3/broken.png"]
    assert ds.label_names == [f"digit{k}" for k in range(10)]
    df = ds.to_pandas().sort_values("path", key=lambda s: s.str.split("/").str[1].str.split(".").str[0].astype(int))
    np.testing.assert_array_equal(df["label_index"].to_numpy(), frame.label.to_numpy())
    decoded = np.asarray(Image.open(__import__("io").BytesIO(df["image"].iloc[0])))
    np.testing.assert_array_equal(decoded, frame.image.iloc[0])


def test_on_error_raise_names_the_file_and_writes_nothing(folder, tmp_path):
    path, _ = folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no skip warning on this path
        with pytest.raises(tg.ImageDecodeError, match="digit3/broken.png"):
            read_images(str(path), url=str(tmp_path / "ds"), on_error="raise")
    with pytest.raises(tg.DatasetNotFoundError):
        tg.open(str(tmp_path / "ds"))
    with pytest.raises(tg.ArgumentError, match="on_error"):
        read_images(str(path), on_error="ignore")
