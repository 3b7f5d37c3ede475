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
