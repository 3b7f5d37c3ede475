import uuid

import fsspec
import pytest


@pytest.fixture
def mem_url():
    """A fresh memory:// dataset URL, cleaned up afterwards."""
    root = f"memory://tg-test-{uuid.uuid4().hex[:8]}"
    yield f"{root}/ds"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def any_url(request, tmp_path, mem_url):
    """A dataset URL on the local disk and on memory://."""
    return str(tmp_path / "ds") if request.param == "local" else mem_url
