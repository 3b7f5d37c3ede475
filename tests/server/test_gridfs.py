"""grid://host:port/path against a real GridServer on loopback: fsspec round trips, ranged and streamed reads,
atomic writes (no reader sees a partial file; a killed or failed upload leaves nothing), paths that would
leave the root refused, read-only users refused writes, and the trainer's checkpoints and TensorBoard logs
on grid:// (read back by TensorBoard's own reader; a resume continues exactly)."""

import hashlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
import uuid

import fsspec
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tensorgrid import fs as tgfs
from tensorgrid.server import GridServer, auth
from tensorgrid.server.files import CHUNK, SCHEMA, TMP_DIR
from tensorgrid.server.gridfs import GridFileSystem


@pytest.fixture(scope="module")
def gfs(grid):
    return fsspec.filesystem("grid", host="127.0.0.1", port=grid.port)


@pytest.fixture
def base(grid):
    """A fresh directory of this test on the session's server, as a URL."""
    return f"grid://127.0.0.1:{grid.port}/{uuid.uuid4().hex[:8]}"


def _temporaries(grid):
    return os.listdir(os.path.join(grid.root, TMP_DIR))


def test_write_read_ls_info_mv_rm_round_trip_with_fsspec_errors(gfs, base):
    with fsspec.open(f"{base}/a/x.bin", "wb") as f:  # parents are made, as on object stores
        f.write(b"hello ")
        f.write(b"grid")
    assert fsspec.open(f"{base}/a/x.bin", "rb").open().read() == b"hello grid"
    gfs.pipe_file(f"{base}/a/y.txt", b"")
    for part in (b"y", b""):
        with gfs.open(f"{base}/a/y.txt", "ab") as f:  # append: the old bytes, then these, committed on close
            f.write(part)
    gfs.makedirs(f"{base}/a/empty", exist_ok=True)
    netloc = base.split("/")[2]
    top = f"{netloc}/{base.rsplit('/', 1)[1]}"
    assert gfs.ls(base, detail=False) == [f"{top}/a"]
    listed = gfs.ls(f"{base}/a")
    assert [(e["name"].rsplit("/", 1)[1], e["type"], e["size"]) for e in listed] == [
        ("empty", "directory", 0), ("x.bin", "file", 10), ("y.txt", "file", 1)]
    assert gfs.info(f"{base}/a/x.bin")["size"] == 10 and gfs.isdir(f"{base}/a") and gfs.isfile(f"{base}/a/y.txt")
    assert gfs.unstrip_protocol(listed[1]["name"]) == f"{base}/a/x.bin"  # paths keep their server
    gfs.mv(f"{base}/a/x.bin", f"{base}/b/z.bin")
    assert not gfs.exists(f"{base}/a/x.bin") and gfs.cat_file(f"{base}/b/z.bin") == b"hello grid"
    with pytest.raises(FileNotFoundError, match="a/x.bin"):
        gfs.cat_file(f"{base}/a/x.bin")
    with pytest.raises(IsADirectoryError):
        gfs.open(f"{base}/a", "rb")
    with pytest.raises(FileExistsError):
        gfs.mkdir(f"{base}/a/empty")
    with pytest.raises(OSError, match="not empty"):
        gfs.rm(f"{base}/a")
    gfs.rm(f"{base}/a", recursive=True)
    assert gfs.ls(base, detail=False) == [f"{top}/b"]
    with pytest.raises(FileNotFoundError):
        gfs.rm(f"{base}/a")
    with pytest.raises(ValueError, match="on grid server 10.0.0.1:1"):
        gfs.info("grid://10.0.0.1:1/x")  # another server's path is not silently read from this one


def test_ranged_reads(gfs, base):
    data = bytes(range(256)) * 40_000  # 10 MB: ranges cross the 1 MiB chunks
    gfs.pipe_file(f"{base}/r", data)
    for start, end in [(0, 1), (5, 300), (CHUNK - 3, CHUNK + 3), (3 * CHUNK + 7, 7 * CHUNK), (len(data) - 9, None),
                       (-100, None), (10, -10), (len(data) + 5, None), (100, 50)]:
        assert gfs.cat_file(f"{base}/r", start, end) == data[start:end], (start, end)
    with gfs.open(f"{base}/r", "rb", block_size=1 << 16) as f:
        f.seek(123_457)
        assert f.read(70_000) == data[123_457:193_457]
        f.seek(-10, 2)
        assert f.read() == data[-10:]


def test_a_50_mb_file_streams_both_ways_in_chunks(gfs, grid, base):
    block = os.urandom(1 << 20)
    digest, size = hashlib.sha256(), 50 << 20
    t0 = time.perf_counter()
    with gfs.open(f"{base}/big", "wb") as f:  # sent as written: 8 MiB buffers, 1 MiB batches
        for i in range(50):
            piece = bytes([i]) + block[1:]
            f.write(piece)
            digest.update(piece)
    t1 = time.perf_counter()
    data = gfs.cat_file(f"{base}/big")
    t2 = time.perf_counter()
    assert len(data) == size and hashlib.sha256(data).digest() == digest.digest()
    print(f"\ngrid:// loopback: write {size / 2**20 / (t1 - t0):.0f} MiB/s, read {size / 2**20 / (t2 - t1):.0f} MiB/s")
    assert size / (t1 - t0) > 5 << 20 and size / (t2 - t1) > 5 << 20  # several MiB/s at the least
    # the server streams the file in record batches of at most CHUNK bytes (it never loads it whole)
    client = flight.FlightClient(grid.url)
    info = client.get_flight_info(flight.FlightDescriptor.for_path("files", *gfs._rel(f"{base}/big").split("/")))
    assert info.total_bytes == size
    batches = list(client.do_get(info.endpoints[0].ticket).to_reader())
    assert len(batches) == 50 and all(b.column(0)[0].as_buffer().size == CHUNK for b in batches)


def test_a_reader_never_sees_a_partial_file(gfs, base):
    """Mid-upload (bytes already on the server) the old file is what readers get, whole; a new file is
    absent; and under a writer replacing the file over and over, every read is one whole generation."""
    path, new = f"{base}/f", f"{base}/new"
    gfs.pipe_file(path, b"old" * 1000)
    w, w2 = gfs.open(path, "wb", block_size=1 << 16), gfs.open(new, "wb", block_size=1 << 16)
    for f in (w, w2):
        f.write(b"n" * (3 << 20))  # uploaded in 64 KiB flushes: on the server, not yet committed
    assert gfs.cat_file(path) == b"old" * 1000 and not gfs.exists(new)
    w.close(), w2.close()
    assert gfs.cat_file(path) == gfs.cat_file(new) == b"n" * (3 << 20)

    stop, seen, bad = threading.Event(), set(), []

    def writer():
        for g in range(1, 25):
            with gfs.open(path, "wb", block_size=1 << 18) as f:
                f.write(bytes([g]) * ((1 << 20) + g * 4097))
        stop.set()

    def reader():
        while not stop.is_set():
            data = gfs.cat_file(path)
            g = data[0]
            if data != bytes([g]) * ((1 << 20) + g * 4097) and data != b"n" * (3 << 20):
                bad.append((g, len(data)))
            seen.add(g)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not bad and len(seen) > 3


_KILLED_CLIENT = """
import pickle, sys, time
fs = pickle.loads(bytes.fromhex(sys.argv[1]))
f = fs.open(sys.argv[2], "wb", block_size=1 << 20)
for _ in range(8):
    f.write(b"k" * (1 << 20))
print("sent", flush=True)
time.sleep(60)
"""


def test_a_client_killed_mid_upload_leaves_nothing_visible_and_no_temporary(gfs, grid, base):
    """The filesystem pickles to a fresh process, which uploads 8 MiB without closing and is SIGKILLed: the
    old file stays whole, a new one never appears, the server's temporary is removed."""
    for target, old in [(f"{base}/ckpt.pt", b"old checkpoint"), (f"{base}/fresh.pt", None)]:
        if old is not None:
            gfs.pipe_file(target, old)
        child = subprocess.Popen([sys.executable, "-c", _KILLED_CLIENT, pickle.dumps(gfs).hex(), target],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline() == "sent\n", child.stderr.read()
            deadline = time.monotonic() + 10
            while not any(os.path.getsize(os.path.join(grid.root, TMP_DIR, n)) >= 4 << 20
                          for n in _temporaries(grid)) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert _temporaries(grid), "the upload never reached the server"
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        deadline = time.monotonic() + 10
        while _temporaries(grid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _temporaries(grid) == []
        assert (gfs.cat_file(target) == old) if old is not None else not gfs.exists(target)


def test_an_upload_left_by_an_exception_is_discarded_and_one_short_of_its_bytes_refused(gfs, grid, base):
    gfs.pipe_file(f"{base}/keep", b"v1")
    with pytest.raises(RuntimeError, match="boom"):
        with gfs.open(f"{base}/keep", "wb", block_size=1 << 20) as f:
            f.write(b"x" * (3 << 20))  # already streaming
            raise RuntimeError("boom")
    assert gfs.cat_file(f"{base}/keep") == b"v1" and _temporaries(grid) == []
    # a stream that ends without the end marker, or one short of the bytes it announced, commits nothing
    client = flight.FlightClient(grid.url)
    rel = gfs._rel(f"{base}/short").split("/")
    for marker, error in [(None, "ended without its commit"), (b'{"size": 4}', "announced 4 bytes but sent 3")]:
        writer, acks = client.do_put(flight.FlightDescriptor.for_path("files", *rel), SCHEMA.with_metadata({"mode": "w"}))
        writer.write_batch(pa.record_batch([pa.array([b"abc"], pa.binary())], schema=SCHEMA))
        if marker is not None:
            writer.write_metadata(pa.py_buffer(marker))
        writer.done_writing()
        with pytest.raises(flight.FlightServerError, match=error):
            acks.read()
            writer.close()
        assert not gfs.exists(f"{base}/short") and _temporaries(grid) == []


def test_temporaries_of_uploads_that_died_with_a_server_are_swept(gfs, grid, base):
    """A temporary no running upload owns and idle for over a minute (its server was killed) is removed by the
    next upload (and when a server starts on the root); a recent one may be another upload's: kept."""
    tmp = os.path.join(grid.root, TMP_DIR)
    dead, recent = os.path.join(tmp, "dead.part"), os.path.join(tmp, "recent.part")
    for path in (dead, recent):
        with open(path, "wb") as f:
            f.write(b"partial")
    os.utime(dead, (time.time() - 120, time.time() - 120))
    try:
        gfs.pipe_file(f"{base}/x", b"x")
        assert _temporaries(grid) == ["recent.part"]
    finally:
        for path in (dead, recent):
            if os.path.exists(path):
                os.unlink(path)


def test_exclusive_create_has_one_winner_among_racing_writers(gfs, base):
    fs, path = tgfs.resolve(f"{base}/race/manifest")
    wins, barrier = [], threading.Barrier(6)

    def racer(i):
        barrier.wait()
        wins.append((i, tgfs.create_exclusive(fs, path, f"writer {i}".encode())))

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, won in wins if won]
    assert len(winners) == 1 and fs.cat_file(path) == f"writer {winners[0]}".encode()
    with pytest.raises(FileExistsError):
        fs.pipe_file(path, b"again", mode="create")
    tgfs.put_atomic(fs, path, b"replaced")
    assert fs.cat_file(path) == b"replaced"


def test_paths_that_leave_the_root_are_refused(gfs, grid, base, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    gfs.pipe_file(f"{base}/inside", b"ok")
    here = os.path.join(grid.root, "files", base.rsplit("/", 1)[1])
    os.symlink(outside, os.path.join(here, "dirlink"))  # planted on the server's disk
    os.symlink(outside / "secret", os.path.join(here, "filelink"))
    netloc = base.split("/")[2]
    for url in [f"{base}/../../escape", f"grid://{netloc}/..", f"grid://{netloc}//etc/passwd",
                f"{base}/dirlink/secret", f"{base}/filelink", f"{base}/a\x00b"]:
        for op in (gfs.cat_file, gfs.info, gfs.ls):
            with pytest.raises(PermissionError, match="refused"):
                op(url)
    for url in [f"{base}/../x", f"grid://{netloc}//tmp/x", f"{base}/dirlink/new"]:
        with pytest.raises(PermissionError, match="refused"):
            gfs.pipe_file(url, b"x")
        with pytest.raises(PermissionError, match="refused"):
            gfs.mv(f"{base}/inside", url)
    with pytest.raises(PermissionError, match="refused"):
        gfs.makedirs(f"{base}/dirlink/sub", exist_ok=True)
    assert sorted(os.listdir(outside)) == ["secret"] and (outside / "secret").read_bytes() == b"secret"
    assert [n.rsplit("/", 1)[1] for n in gfs.ls(base, detail=False)] == ["inside"]  # escaping links not listed
    gfs.rm(f"{base}/dirlink")  # removing a link removes the link, never what it points to
    assert (outside / "secret").exists() and gfs.cat_file(f"{base}/inside") == b"ok"


def test_a_read_only_user_reads_but_cannot_write(tmp_path):
    users = {"ro": auth.User("ro", auth.hash_password("pw-ro"), "reader"),
             "rw": auth.User("rw", auth.hash_password("pw-rw"), "admin")}
    with GridServer(tmp_path / "g", threads=1, **auth.server_options(users)) as server:
        opts = dict(host="127.0.0.1", port=server.port, skip_instance_cache=True)
        rw = GridFileSystem(username="rw", password="pw-rw", **opts)
        ro = GridFileSystem(username="ro", password="pw-ro", **opts)
        rw.pipe_file("d/f", b"data")
        assert ro.cat_file("d/f") == b"data" and ro.ls("d", detail=False) == [f"127.0.0.1:{server.port}/d/f"]
        for write in (lambda: ro.pipe_file("d/g", b"x"), lambda: ro.rm("d/f"), lambda: ro.mv("d/f", "d/h"),
                      lambda: ro.makedirs("e", exist_ok=True)):
            with pytest.raises(PermissionError, match="may not write"):
                write()
        with pytest.raises(PermissionError):
            GridFileSystem(**opts).ls("d")  # no credentials
        assert rw.ls("d", detail=False) == [f"127.0.0.1:{server.port}/d/f"]
        os.environ["TENSORGRID_USERNAME"], os.environ["TENSORGRID_PASSWORD"] = "rw", "pw-rw"
        try:
            fs, path = tgfs.resolve(f"grid://127.0.0.1:{server.port}/d/f")  # credentials from the env
            assert fs.cat_file(path) == b"data"
        finally:
            del os.environ["TENSORGRID_USERNAME"], os.environ["TENSORGRID_PASSWORD"]


def test_a_filesystem_idle_past_its_tokens_ttl_signs_in_again_for_reads_and_listings(tmp_path):
    import time

    users = {"rw": auth.User("rw", auth.hash_password("pw-rw"), "admin")}
    with GridServer(tmp_path / "g", threads=1, **auth.server_options(users, token_ttl=0.3)) as server:
        gfs = GridFileSystem(host="127.0.0.1", port=server.port, username="rw", password="pw-rw",
                             skip_instance_cache=True)
        gfs.pipe_file("d/f", b"data")
        first = gfs._session.connection()[0]
        time.sleep(0.6)  # the token expired: the next calls sign in again with the password
        assert gfs.cat_file("d/f") == b"data"
        assert gfs._session.connection()[0] is not first
        with pytest.raises(pa.ArrowInvalid, match="closed"):  # the refused channel was closed, not leaked
            first.list_actions()
        time.sleep(0.6)
        assert gfs.ls("d", detail=False) == [f"127.0.0.1:{server.port}/d/f"]


@pytest.fixture(scope="module")
def digits640(tmp_path_factory):
    import tensorgrid as tg
    from tensorgrid.quickstart import digits_frame

    return tg.write(str(tmp_path_factory.mktemp("gridfs-digits") / "a"), digits_frame().iloc[:640])


def test_trainer_checkpoints_and_logs_on_grid_resume_exactly_and_tensorboard_reads_them(gfs, base, digits640):
    """Two workers train with checkpoint_dir and log_dir on grid://, stop at step 15, resume from the grid
    checkpoint and end with the weights and history of an uninterrupted run; TensorBoard's EventAccumulator
    reads the events through the grid:// URL itself (its gfile layer takes any fsspec protocol)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from tests.train import models
    from tests.train.helpers import same, trainer, weights

    ck, logs = f"{base}/run1/ckpt", f"{base}/run1/logs"
    full = trainer(workers=2, epochs=2).fit(digits640)
    r = trainer(workers=2, epochs=2, checkpoint_dir=ck, log_dir=logs, callbacks=[models.StopAtStep(15)]).fit(digits640)
    assert r.checkpoint == f"{ck}/ckpt-e00001-s000000015.pt"
    assert [n.rsplit("/", 1)[1] for n in gfs.ls(ck, detail=False)] == [
        "ckpt-e00001-s000000010.pt", "ckpt-e00001-s000000015.pt"]
    resumed = trainer(workers=2, epochs=2, checkpoint_dir=ck, log_dir=logs, keep_checkpoints=2).fit(
        digits640, resume=True)
    assert same(weights(resumed.model), weights(full.model), atol=1e-5)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-5)
    assert resumed.checkpoint == f"{ck}/ckpt-e00002-s000000020.pt"
    assert [n.rsplit("/", 1)[1] for n in gfs.ls(ck, detail=False)] == [  # rotation removed the oldest
        "ckpt-e00001-s000000015.pt", "ckpt-e00002-s000000020.pt"]

    acc = EventAccumulator(logs)
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))  # each step once across the resume
    assert acc.Scalars("epoch/loss")[-1].value == pytest.approx(full.history[-1]["loss"], rel=1e-5)
