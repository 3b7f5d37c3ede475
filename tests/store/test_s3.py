"""The store on a real S3 API (moto's server on loopback, s3fs as the client): storage options through every
entry point, racing writers, stores that cannot commit safely refused, a killed writer, training that
checkpoints and logs to s3://. (The store's behaviour tests run on S3 too, through the ``any_url`` fixture.)"""

import http.client
import http.server
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from fsspec.implementations.arrow import ArrowFSWrapper

import tensorgrid as tg
from tensorgrid import fs as tgfs
from tensorgrid.cli import main as cli
from tests.conftest import new_bucket


def _env_without_aws() -> dict:
    """A process environment with no AWS settings: only the options a test passes can reach the store."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def _run(script: str, *args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=env or _env_without_aws(), timeout=timeout)


def _bucket_fs(endpoint: str):
    return fsspec.filesystem("s3", endpoint_url=endpoint, key="testing", secret="testing", skip_instance_cache=True)


FLAT_SCRIPT = """
import json, sys
import numpy as np, pandas as pd, tensorgrid as tg
url, endpoint = sys.argv[1], sys.argv[2]
opts = {"endpoint_url": endpoint, "key": "testing", "secret": "hush-hush-secret"}
df = pd.DataFrame({"x": np.arange(1000, dtype="float32"), "label": np.arange(1000) % 3})
tg.write(url, df, storage_options=opts, shard_rows=250)
tg.write(url, df.iloc[:10], mode="append", storage_options=opts)
ds = tg.open(url, storage_options=opts)
old = tg.open(url, version=1, storage_options=opts)
rows = sum(len(b["x"]) for b in ds.to_torch(batch_size=128, shuffle=True, seed=1))
out = {"version": ds.version, "rows": ds.num_rows, "old_rows": old.num_rows, "verify": ds.verify()["rows"],
       "versions": [v.version for v in ds.versions()], "loaded": rows,
       "vacuum": tg.vacuum(url, min_age_s=0, storage_options=opts)["removed"],
       "listed": [e.url for e in tg.list_datasets(url.rsplit("/", 1)[0], storage_options=opts)],
       "repr": repr(ds) + str(ds.info())}
print(json.dumps(out))
"""


def test_storage_options_reach_write_open_loader_vacuum_and_listing_without_any_environment(s3_server):
    """A flat script with no AWS settings in its environment: everything goes through storage_options, and
    no secret is written to the store or shown."""
    url = f"s3://{new_bucket(s3_server)}/ds"
    r = _run(FLAT_SCRIPT, url, s3_server)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["version"] == 2 and out["rows"] == 1010 and out["old_rows"] == 1000 and out["verify"] == 1010
    assert out["versions"] == [1, 2] and out["loaded"] == 1010 and out["vacuum"] == 0
    assert out["listed"] == [url]
    assert "hush-hush" not in out["repr"]
    fs = _bucket_fs(s3_server)
    root = url[len("s3://"):]
    files = fs.find(root)
    assert any(f.endswith("v0000000002.json") for f in files)
    assert not any(b"hush-hush" in fs.cat_file(f) for f in files)  # credentials are never stored
    # without the options (and no environment), the store is unreachable: a clear error, no traceback
    r = _run("import sys, tensorgrid as tg; tg.open(sys.argv[1])", url)
    assert r.returncode != 0


def test_cli_takes_storage_options(s3_server, tmp_path):
    url = f"s3://{new_bucket(s3_server)}/ds"
    tg.write(url, pd.DataFrame({"a": np.arange(7)}))
    cmd = [sys.executable, "-m", "tensorgrid.cli"]
    opts = ["--storage-option", f"endpoint_url={s3_server}", "--storage-option", "key=testing",
            "--storage-option", "secret=testing"]
    r = subprocess.run(cmd + ["info", url] + opts, capture_output=True, text=True, env=_env_without_aws(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "7" in r.stdout and "testing" not in r.stdout
    r = subprocess.run(cmd + ["vacuum", url, "--min-age", "0"] + opts, capture_output=True, text=True,
                       env=_env_without_aws(), timeout=120)
    assert r.returncode == 0 and "removed 0" in r.stdout, r.stderr
    r = subprocess.run(cmd + ["info", url, "--storage-option", "no-equals-sign"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "KEY=VALUE" in r.stderr
    assert cli(["info", url, "--storage-option", "anon=false"]) == 0  # a JSON value (a bool) is taken as such
    assert tgfs.remembered(url) == {}  # the CLI's options lasted for its command only


def test_storage_options_are_checked():
    with pytest.raises(tg.ArgumentError, match="storage_options"):
        tg.open("s3://some-bucket/ds", storage_options="endpoint=x")
    with pytest.raises(tg.ArgumentError, match="storage_options"):
        tg.write("s3://some-bucket/ds", pd.DataFrame({"a": [1]}), storage_options={1: "x"})
    with pytest.raises(tg.TrainingConfigError, match="storage_options"):
        tg.Trainer(lambda: None, loss=lambda a, b: a, storage_options=["key"])


RACER = """
import sys, tensorgrid as tg, pandas as pd
url, me, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
done = []
for i in range(n):
    df = pd.DataFrame({"writer": [me] * 3, "i": [i] * 3})
    while True:
        try:
            done.append(tg.write(url, df, mode="append").version)
            break
        except tg.ConflictError as e:
            try:
                done.append(e.retry().version)
                break
            except tg.ConflictError:
                continue
print(" ".join(map(str, done)))
"""


def test_racing_writers_on_s3_each_commit_once(s3_server):
    """Three processes appending at once through S3's conditional writes: every append lands exactly once,
    versions are consecutive, none is claimed twice (a cached listing never makes a writer lose forever)."""
    url = f"s3://{new_bucket(s3_server)}/race"
    tg.write(url, pd.DataFrame({"writer": [-1], "i": [-1]}))
    procs = [subprocess.Popen([sys.executable, "-c", RACER, url, str(w), "5"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for w in range(3)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    claimed = [int(v) for out, _ in outs for v in out.split()]
    assert sorted(claimed) == list(range(2, 17))  # 15 commits, each version won by exactly one writer
    ds = tg.open(url)
    assert ds.version == 16
    rows = ds.to_pandas()
    assert len(rows) == 1 + 15 * 3
    assert sorted(map(tuple, rows.drop_duplicates().to_numpy().tolist())) == \
        [(-1, -1)] + sorted((w, i) for w in range(3) for i in range(5))


def test_a_long_lived_reader_sees_versions_other_processes_commit(s3_server):
    url = f"s3://{new_bucket(s3_server)}/live"
    tg.write(url, pd.DataFrame({"a": [0]}))
    assert tg.open(url).version == 1  # this process has listed the dataset (and fsspec cached it)
    for v in range(2, 4):
        r = subprocess.run([sys.executable, "-c", "import sys, tensorgrid as tg, pandas as pd; "
                            "tg.write(sys.argv[1], pd.DataFrame({'a': [1]}), mode='append')", url],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        ds = tg.open(url)
        assert ds.version == v and [x.version for x in ds.versions()] == list(range(1, v + 1))
    assert tg.write(url, pd.DataFrame({"a": [2]}), mode="append").version == 4  # and commits after them


KILLED_WRITER = """
import sys, time, numpy as np, pyarrow as pa, tensorgrid as tg
def batches():
    for i in range(10_000):
        yield pa.record_batch({"a": np.arange(i * 100, (i + 1) * 100), "pad": [b"x" * 1000] * 100})
        time.sleep(0.005)
tg.write(sys.argv[1], batches(), mode="append", shard_rows=200)
"""


def test_writer_killed_on_s3_leaves_the_previous_version_and_vacuum_cleans_up(s3_server):
    bucket = new_bucket(s3_server)
    url = f"s3://{bucket}/k"
    tg.write(url, pa.table({"a": np.arange(5), "pad": [b"y"] * 5}))
    fs = _bucket_fs(s3_server)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, url])
    try:
        deadline = time.time() + 90
        while time.time() < deadline and len(fs.find(f"{bucket}/k/data")) < 4:
            fs.invalidate_cache()
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    fs.invalidate_cache()
    orphans = len(fs.find(f"{bucket}/k/data")) - 1
    assert orphans >= 3, "the writer never got going"
    ds = tg.open(url)
    assert ds.version == 1 and ds.to_arrow().column("a").to_pylist() == list(range(5))
    ds.verify()
    assert ds.vacuum()["removed"] == 0  # young files may be a writer's at work
    assert ds.vacuum(min_age_s=0)["removed"] == orphans
    assert tg.write(url, pa.table({"a": [5], "pad": [b"z"]}), mode="append").num_rows == 6


# --- stores that cannot commit safely are refused -------------------------------------------------------
class _DropConditions(http.server.BaseHTTPRequestHandler):
    """An S3-compatible endpoint without conditional writes: forwards every request to the S3 server
    minus its If-None-Match header (as older S3-compatible stores ignore it)."""

    upstream = ""
    protocol_version = "HTTP/1.1"  # answers "Expect: 100-continue" (S3 clients send it with a PUT's body)

    def _forward(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("if-none-match", "host", "expect")}
        host, port = self.upstream.split("//", 1)[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


def test_a_store_that_ignores_conditional_writes_is_refused_and_nothing_is_committed(s3_server):
    bucket = new_bucket(s3_server)
    handler = type("H", (_DropConditions,), {"upstream": s3_server})
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        opts = {"endpoint_url": f"http://127.0.0.1:{proxy.server_address[1]}"}
        url = f"s3://{bucket}/unsafe"
        with pytest.raises(tg.UnsafeStoreError, match="conditional writes"):
            tg.write(url, pd.DataFrame({"a": [1]}), storage_options=opts)
        fs = _bucket_fs(s3_server)
        assert not any(f.endswith(".json") for f in fs.find(bucket))  # no version was committed
        assert not fs.exists(f"{bucket}/unsafe/_tensorgrid/v0000000001.json")
    finally:
        proxy.shutdown()
        proxy.server_close()
        tgfs._options.pop(tgfs.location(f"s3://{bucket}"), None)


class ArrowLocal(ArrowFSWrapper):
    """pyarrow's filesystems through fsspec (how fsspec serves hdfs://): "xb" opens are not exclusive here."""

    protocol = "arrowlocal"

    def __init__(self, **kwargs):
        super().__init__(pa.fs.LocalFileSystem(), **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        return path.split("://", 1)[-1] if isinstance(path, str) else path


def test_a_filesystem_without_exclusive_create_is_refused_unless_one_writer_is_vouched_for(tmp_path, monkeypatch):
    fsspec.register_implementation("arrowlocal", ArrowLocal, clobber=True)
    url = f"arrowlocal://{tmp_path}/ds"
    with pytest.raises(tg.UnsafeStoreError, match="TENSORGRID_SINGLE_WRITER"):
        tg.write(url, pd.DataFrame({"a": [1]}))
    assert not (tmp_path / "ds" / "_tensorgrid" / "v0000000001.json").exists()
    monkeypatch.setenv("TENSORGRID_SINGLE_WRITER", "1")
    assert tg.write(url, pd.DataFrame({"a": [1]})).version == 1
    assert tg.write(url, pd.DataFrame({"a": [2]}), mode="append").version == 2
    assert tg.open(url).to_pandas()["a"].tolist() == [1, 2]


# --- training against S3 ------------------------------------------------------------------------------------
TRAIN_SCRIPT = """
import json, sys
import numpy as np, pandas as pd, torch, tensorgrid as tg
bucket, endpoint = sys.argv[1], sys.argv[2]
opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
rng = np.random.default_rng(0)
x = rng.normal(size=(600, 4)).astype("float32")
df = pd.DataFrame({"features": list(x), "label": (x[:, 0] > 0).astype("int64")})
tg.write(f"s3://{bucket}/data", df, storage_options=opts, shard_rows=150)
def trainer(epochs):
    return tg.Trainer(lambda: torch.nn.Linear(4, 2), loss=torch.nn.CrossEntropyLoss(), batch_size=60,
                      epochs=epochs, workers=2, checkpoint_dir=f"s3://{bucket}/run/ckpt",
                      log_dir=f"s3://{bucket}/run/logs", storage_options=opts, quiet=True)
first = trainer(1).fit(f"s3://{bucket}/data")
second = trainer(2).fit(f"s3://{bucket}/data", resume=True)
print(json.dumps({"first": first.checkpoint, "second": second.checkpoint, "epochs": len(second.history),
                  "accuracy": second.metrics.get("accuracy")}))
"""


def test_trainer_checkpoints_and_logs_to_s3_and_resumes_and_tensorboard_reads_the_logs(s3_server):
    """Two ranks in their own processes, no AWS settings in their environment: the trainer hands them its
    storage options; a second run resumes from the checkpoint on S3; TensorBoard reads the events there."""
    bucket = new_bucket(s3_server)
    r = _run(TRAIN_SCRIPT, bucket, s3_server, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["first"].startswith(f"s3://{bucket}/run/ckpt/ckpt-e00001")
    assert out["second"].startswith(f"s3://{bucket}/run/ckpt/ckpt-e00002") and out["epochs"] == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(f"s3://{bucket}/run/logs")  # TensorBoard's own S3 reader (AWS_* from the fixture)
    events.Reload()
    epochs = [e.step for e in events.Scalars("epoch/loss")]
    assert len(epochs) == 2 and len(set(epochs)) == 2  # one per epoch, the resumed run's after the first's


def test_a_create_whose_response_was_lost_is_still_known_as_ours(s3_server):
    """A conditional PUT can land while its response is lost: the client's retry is refused by the object it
    made itself. The commit must count as made (else a retry would commit the same shards twice, or a
    compaction would delete the shards of the version it just published)."""
    bucket = new_bucket(s3_server)
    fs, path = tgfs.resolve(f"s3://{bucket}/x/v0000000001.json")
    assert tgfs.create_exclusive(fs, path, b"ours, with a timestamp")  # made
    assert tgfs.create_exclusive(fs, path, b"ours, with a timestamp")  # the retry of that same create: ours
    assert not tgfs.create_exclusive(fs, path, b"another writer's")    # another create: refused
    assert fs.cat_file(path) == b"ours, with a timestamp"


def test_remembered_options_merge_and_defaults_never_reach_grid_or_memory_urls(s3_server):
    bucket = new_bucket(s3_server)
    try:
        with tgfs.default_options({"endpoint_url": s3_server, "token": "a-store-secret"}):
            tgfs.remember(f"s3://{bucket}", {"key": "testing", "token": None})
            assert tgfs._options_for(f"s3://{bucket}/d") == {"endpoint_url": s3_server, "key": "testing",
                                                             "token": None}  # the bucket's over the defaults
            assert tgfs._options_for("grid://127.0.0.1:8815/files/x") == {}
            assert tgfs._options_for("memory://x/y") == {}
            fs, _ = tgfs.resolve(f"s3://{bucket}/d", {"secret": "only-this-call"}, keep=False)
            assert "secret" not in tgfs._options_for(f"s3://{bucket}/d")
    finally:
        tgfs._options.pop(tgfs.location(f"s3://{bucket}"), None)
    r = subprocess.run([sys.executable, "-m", "tensorgrid.cli", "info", "s3://b/x", "--storage-option",
                        "secret:s3cr3t-typo"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "s3cr3t" not in r.stderr  # a mistyped option is not echoed: it may be a secret
