"""Shared fixtures of the trainer tests: scikit-learn's digits as store datasets, written once a session."""

import pytest

import tensorgrid as tg
from tensorgrid.quickstart import digits_frame


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    df = digits_frame()
    train = tg.write(str(root / "train"), df.iloc[:1500])
    val = tg.write(str(root / "val"), df.iloc[1500:])
    return train, val


@pytest.fixture(scope="session")
def halves(tmp_path_factory, digits):
    """Two store datasets of 640 rows each, different rows: the same size, other data."""
    root = tmp_path_factory.mktemp("halves")
    t = digits[0].to_arrow()
    return tg.write(str(root / "a"), t.slice(0, 640)), tg.write(str(root / "b"), t.slice(640, 640))


@pytest.fixture(scope="session")
def wide(tmp_path_factory, digits):
    """The digits' first 640 training rows as a wide pandas Parquet file: px0..px63 (float64, scaled to [0, 1]
    as transforms.to_float scales the image) and an int32 label (as datasets ingested earlier store
    label_index), opened in place; and the same rows as digits."""
    import numpy as np
    import pandas as pd

    t = digits[0].to_arrow().slice(0, 640)
    images = np.stack(t.column("image").to_pandas().to_numpy()).reshape(640, 64)
    df = pd.DataFrame({f"px{i}": images[:, i] / 255.0 for i in range(64)})
    df["label"] = t.column("label").to_numpy().astype("int32")
    path = tmp_path_factory.mktemp("wide") / "digits.parquet"
    df.to_parquet(path)
    return tg.open(str(path)), tg.from_arrow(t)
