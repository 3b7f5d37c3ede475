"""A grid server loading datasets from S3 (moto's server on loopback), with no AWS settings in its
environment: the client sends the storage options with the load, or the server has its own
(``--storage-option``)."""

import os
import select
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import tensorgrid as tg
from tests.conftest import new_bucket
from tests.server.procs_grid import URL_LINE, stop_server


def _serve(root, *extra) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc = subprocess.Popen([sys.executable, "-m", "tensorgrid.cli", "serve", "--root", str(root), "--port", "0",
                             "--memory-limit", "256MB", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    match = URL_LINE.search(proc.stdout.readline() if ready else "")
    if not match:
        proc.kill()
        raise AssertionError(f"no URL from tensorgrid serve: {proc.communicate(timeout=30)[1][-2000:]}")
    return proc, match.group(1)


def test_a_server_loads_an_s3_dataset_with_the_clients_or_its_own_storage_options(s3_server, tmp_path):
    bucket = new_bucket(s3_server)
    url = f"s3://{bucket}/ds"
    tg.write(url, pd.DataFrame({"a": np.arange(500), "b": np.arange(500) % 7}), shard_rows=100)
    opts = {"endpoint_url": s3_server, "key": "testing", "secret": "not-in-the-catalog"}
    proc, grid_url = _serve(tmp_path / "one", "--allow", f"s3://{bucket}")
    try:
        with tg.connect(grid_url) as grid:
            with pytest.raises(tg.TensorGridError):  # the server alone cannot reach this store
                grid.load("t", url)
            info = grid.load("t", url, storage_options=opts)
            assert info["rows"] == 500
            assert grid.sql("SELECT count(*) AS n, sum(a) AS s FROM t").to_pandas().iloc[0].tolist() == \
                [500, sum(range(500))]
            with pytest.raises(tg.TensorGridError):  # one client's options served that load only
                grid.load("t2", url)
        catalog = "".join(p.read_text(errors="replace") for p in (tmp_path / "one").rglob("*") if p.is_file()
                          and p.stat().st_size < 1 << 20)
        assert "not-in-the-catalog" not in catalog  # credentials stay in the server's memory
    finally:
        stop_server(proc)
    proc, grid_url = _serve(tmp_path / "two", "--allow", f"s3://{bucket}", "--storage-option",
                            f"endpoint_url={s3_server}", "--storage-option", "key=testing",
                            "--storage-option", "secret=testing")
    try:
        with tg.connect(grid_url) as grid:
            assert grid.load("t", url)["rows"] == 500
    finally:
        stop_server(proc)
