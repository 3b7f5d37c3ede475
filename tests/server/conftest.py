"""One real grid server for the whole session, on a loopback port picked by the OS (its own Flight threads)."""

import pytest

from tensorgrid.server import GridServer


@pytest.fixture(scope="session")
def grid(tmp_path_factory):
    """A GridServer on grpc://127.0.0.1:<free port> over a fresh root; tests use their own table names."""
    server = GridServer(tmp_path_factory.mktemp("grid"), memory_limit="1GB", threads=1)
    yield server
    server.close()


@pytest.fixture
def g(grid):
    """tg.connect to the session's server (a client of its own per test)."""
    import tensorgrid as tg

    with tg.connect(grid.url) as client:
        yield client


@pytest.fixture(scope="session")
def grid_digits(grid):
    """scikit-learn's 1,797 digits written under the server's root in 4 shards (500 rows each, the last 297),
    loaded once as 'digits'; returns the store dataset."""
    import os

    import tensorgrid as tg
    from tensorgrid.quickstart import digits_frame

    ds = tg.write(os.path.join(grid.root, "store", "digits"), digits_frame(), shard_rows=500)
    with tg.connect(grid.url) as g:
        g.load("digits", "store/digits")
    return ds
