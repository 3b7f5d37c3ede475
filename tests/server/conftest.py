"""One real grid server for the whole session, on a loopback port picked by the OS (its own Flight threads)."""

import pytest

from tensorgrid.server import GridServer


@pytest.fixture(scope="session")
def grid(tmp_path_factory):
    """A GridServer on grpc://127.0.0.1:<free port> over a fresh root; tests use their own table names."""
    server = GridServer(tmp_path_factory.mktemp("grid"), memory_limit="1GB", threads=1)
    yield server
    server.close()
