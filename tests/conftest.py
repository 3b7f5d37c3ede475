import uuid

import fsspec
import pytest
import torch

# tiny test models on 2 shared cores: one intra-op thread is fastest and steadiest
torch.set_num_threads(1)


def pytest_collection_modifyitems(session, config, items):
    """The grid server's tests run last, after the tests that start Ray. They leave gRPC threads in this process (the session's server, its
    clients), and a fork() taken while such threads hold a lock can deadlock the child: later tests that
    fork (writer processes, loader workers) or start a subprocess with a preexec_fn (Spark's JVM, Ray,
    setrlimit) hung until their timeouts. Users meet the same rule: fork before connecting, or spawn."""
    server = [it for it in items if "/tests/server/" in str(it.fspath)]
    rest = [it for it in items if "/tests/server/" not in str(it.fspath)]
    # Ray's driver runs gRPC threads too: once a test started it, pools of forked workers are off for the
    # session (jobs.can_fork); the tests that use Ray run after the others so that both paths are tested
    ray = [it for it in rest if "ray_cluster" in getattr(it, "fixturenames", ())
           or getattr(getattr(it, "callspec", None), "params", {}).get("engine") == "ray"]  # asked for by name
    items[:] = [it for it in rest if it not in ray] + ray + server


@pytest.fixture
def mem_url():
    """A fresh memory:// dataset URL, cleaned up afterwards."""
    root = f"memory://tg-test-{uuid.uuid4().hex[:8]}"
    yield f"{root}/ds"
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API on loopback for the whole run: moto's server (a separate thread serving HTTP), reached
    through s3fs like any S3 endpoint. Credentials and endpoint come from the environment, as a user's
    would (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...): child processes (loader workers, trainer
    ranks, the CLI) inherit them. Yields the endpoint URL."""
    import os
    import socket

    pytest.importorskip("s3fs", reason="s3fs is in the dev extras")
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extras")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def new_bucket(endpoint: str) -> str:
    """A fresh bucket on the test S3 server; its name."""
    import boto3

    name = f"tg-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_url(s3_server):
    """A fresh s3:// dataset URL (its own bucket) on the test S3 server."""
    return f"s3://{new_bucket(s3_server)}/ds"


@pytest.fixture(params=["local", "memory", "s3"])
def any_url(request, tmp_path, mem_url):
    """A dataset URL on the local disk, on memory:// and on the S3 server."""
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    return str(tmp_path / "ds") if request.param == "local" else mem_url


@pytest.fixture(scope="session")
def spark():
    """One real Spark local[2] session for the whole run (~6 s to start)."""
    import shutil

    pyspark = pytest.importorskip("pyspark", reason="pyspark is in the dev extras")
    if shutil.which("java") is None and not __import__("os").environ.get("JAVA_HOME"):
        pytest.skip("Spark needs Java 17")
    from pyspark.sql import SparkSession

    __import__("os").environ["SPARK_LOCAL_IP"] = "127.0.0.1"  # loopback only
    __import__("os").environ["PYSPARK_PYTHON"] = __import__("sys").executable  # this venv on the executors

    session = (SparkSession.builder.master("local[2]").appName("tensorgrid-tests")
               .config("spark.ui.enabled", "false")
               .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1").config("spark.sql.shuffle.partitions", "2")
               .config("spark.driver.memory", "1g").getOrCreate())
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()
    del pyspark


@pytest.fixture(scope="session")
def ray_cluster():
    """A real three-node Ray cluster on this machine (one CPU each), shared by the whole run."""
    import os

    # Ray picks the address it would use to reach the internet; this keeps every node on loopback
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray = pytest.importorskip("ray", reason="ray is in the dev extras")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session", autouse=True)
def _loader_cache_in_a_temp_folder(tmp_path_factory):
    """The loader's Arrow cache is on by default: the tests (and the processes they start) fill a folder of
    their own, never the real ~/.cache."""
    import os

    saved = {k: os.environ.get(k) for k in ("TENSORGRID_CACHE_DIR", "TENSORGRID_CACHE", "TENSORGRID_CACHE_LIMIT")}
    os.environ["TENSORGRID_CACHE_DIR"] = str(tmp_path_factory.mktemp("tensorgrid-cache"))
    os.environ.pop("TENSORGRID_CACHE", None)
    os.environ.pop("TENSORGRID_CACHE_LIMIT", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v

