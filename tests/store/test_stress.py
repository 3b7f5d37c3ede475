"""Adversarial stress on the store's integrity guarantees, with real processes and real signals.

The claim under attack (README, "Commits, concurrency and integrity"): vacuum never deletes a file a committed
version references, whatever the timing; a damaged store is the same data or a named TensorGridError, never
other data, a raw exception or a hang. Delays are injected only as *delays* (a slow disk, a slow listing, a
descheduled process): every patch below waits, then calls the real function.

Tests marked "HOLE" in their docstring failed on the code they were written against (5a18b3d): bugs found
by the stress pass, fixed since; they stay as regression tests.
"""

import base64
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

import tensorgrid as tg
from tensorgrid import fs as tgfs
from tensorgrid.store import claims, manifest

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(tg.__file__)))}


def _start(code: str, *args) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", code, *map(str, args)], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _every_version_whole(url: str) -> list:
    """(version, error) for each committed version that does not verify and read all its rows."""
    bad = []
    for v in range(1, tg.open(url).version + 1):
        try:
            ds = tg.open(url, version=v)
            ds.verify()
            assert ds.to_arrow().num_rows == ds.num_rows
        except Exception as e:  # noqa: BLE001 - any failure of a committed version is the finding
            bad.append((v, f"{type(e).__name__}: {str(e)[:200]}"))
    return bad


def _leftovers(url: str) -> dict:
    """Files no version references, claims, temporaries."""
    fs, root = tgfs.resolve(url)
    referenced = set()
    for v in manifest.list_versions(fs, root):
        referenced |= {s.path for s in manifest.load(fs, root, v).shards}
    on_disk = {"data/" + f for f in os.listdir(os.path.join(url, "data"))}
    meta = [os.path.join(d, f) for d, _, files in os.walk(os.path.join(url, "_tensorgrid")) for f in files]
    return {"orphans": sorted(on_disk - referenced), "missing": sorted(referenced - on_disk),
            "claims": sorted(p for p in meta if "/claims/" in p), "temps": sorted(p for p in meta if ".tmp-" in p)}


# ------------------------------------------------------------------------------------------------------------
# 1. Many writers, vacuums and readers, SIGKILLed at random moments

ROLE = textwrap.dedent("""
    import json, os, random, sys, time, traceback
    import numpy as np, pyarrow as pa, tensorgrid as tg
    from tensorgrid.store import manifest, writer
    role, url, logdir, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    rng = random.Random(seed)
    log = open(os.path.join(logdir, f"{role}-{os.getpid()}.log"), "a", buffering=1)
    def emit(ev, **kw):
        log.write(json.dumps({"ev": ev, **kw}) + "\\n")
    def raw(e):
        emit("RAW", err=type(e).__name__, msg=str(e)[:300], tb=traceback.format_exc()[-2000:])
    def slow(fn, s):  # a slow disk: kills land while a claim is held, and right after a manifest appears
        def wrapped(*a, **kw):
            time.sleep(rng.uniform(0, s)); r = fn(*a, **kw); time.sleep(rng.uniform(0, s)); return r
        return wrapped
    def rows(wid, k, n):  # h ties each row's values together: a row read as other data breaks it
        i = np.arange(n, dtype=np.int64)
        return pa.table({"w": np.full(n, wid, np.int64), "k": np.full(n, k, np.int64), "i": i,
                         "h": (wid * 1_000_003 + k * 7919 + i * 31) % 1_000_000_007, "pad": [b"p" * 64] * n})
    if role == "writer":
        manifest.commit = slow(manifest.commit, 0.03)
        writer._ShardWriter.missing = slow(writer._ShardWriter.missing, 0.03)
        k = 0
        while True:
            k += 1
            emit("start")
            try:
                tg.write(url, rows(os.getpid(), k, rng.randint(1, 40)), shard_rows=rng.choice([5, 20]),
                         mode="overwrite" if rng.random() < 0.15 else "append")
                emit("commit")
            except tg.ConflictError as e:
                while True:
                    if not e.retryable:
                        emit("vacuumed"); break
                    time.sleep(rng.uniform(0, 0.3))  # vacuums run meanwhile (min_age_s=0 may take these shards)
                    try:
                        e.retry(); emit("commit"); emit("retried"); break
                    except tg.ConflictError as e2:
                        e = e2
                    except Exception as e3:
                        raw(e3); break
            except Exception as e:
                raw(e)
    elif role == "vacuum":
        real_load = manifest.load
        def slow_load(*a, **kw):  # a remote store: every manifest read takes a while
            time.sleep(rng.uniform(0, 0.005)); return real_load(*a, **kw)
        manifest.load = slow_load
        while True:
            try:
                r = tg.vacuum(url, min_age_s=rng.choice([0, 0, 0.01, 0.2]))
                emit("vacuum", removed=r["removed"])
            except Exception as e:
                raw(e)
    else:
        while True:
            v = rng.randint(1, tg.open(url).version)
            try:
                ds = tg.open(url, version=v)
                ds.verify()
                t = ds.to_arrow()
                assert t.num_rows == ds.num_rows, (t.num_rows, ds.num_rows)
                w, k, i, h = (t.column(c).to_numpy() for c in "wkih")
                assert ((w * 1_000_003 + k * 7919 + i * 31) % 1_000_000_007 == h).all(), "other data"
                emit("read")
            except BaseException as e:
                emit("FAIL", v=v, err=type(e).__name__, msg=str(e)[:300])
            time.sleep(0.02)
""")

def test_writers_vacuums_and_readers_sigkilled_at_random_never_lose_a_committed_file(tmp_path, monkeypatch):
    url, logdir = str(tmp_path / "ds"), tmp_path / "logs"
    logdir.mkdir()
    tg.write(url, pa.table({"w": [0], "k": [0], "i": [0], "h": [0], "pad": [b"p" * 64]}))
    rng = random.Random(1234)
    procs, seq = {}, [0]

    def spawn(role):
        seq[0] += 1
        p = subprocess.Popen([PY, "-c", ROLE, role, url, str(logdir), str(seq[0])], env=ENV)
        procs[p.pid] = (role, p)

    for role in ["writer"] * 3 + ["vacuum"] * 2 + ["reader"]:
        spawn(role)
    kills = collections.Counter()
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            time.sleep(rng.uniform(0.05, 0.4))
            role = "vacuum" if rng.random() < 0.2 else "writer"
            working = [pid for pid, (r, _) in procs.items() if r == role and (logdir / f"{r}-{pid}.log").exists()]
            if working:
                pid = rng.choice(working)
                os.kill(pid, signal.SIGKILL)
                procs.pop(pid)[1].wait()
                kills[role] += 1
                spawn(role)
    finally:
        for _, p in procs.values():
            p.kill()
            p.wait()

    events, raws, fails = collections.Counter(), [], []
    for f in logdir.iterdir():
        for line in f.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue  # a line cut by SIGKILL
            events[d["ev"]] += 1
            events["removed"] += d.get("removed", 0)
            if d["ev"] == "RAW":
                raws.append(d)
            if d["ev"] == "FAIL":
                fails.append(d)
    print(f"stress: kills={dict(kills)} events={dict(events)} versions={tg.open(url).version}")
    assert not fails, f"a reader saw a committed version broken: {fails[:3]}"
    assert not raws, f"raw exceptions: {raws[:3]}"
    assert events["commit"] >= 5 and events["read"] >= 5 and events["vacuum"] >= 3 and kills["writer"] >= 5
    assert _every_version_whole(url) == []
    t = tg.open(url).to_arrow()
    w, k, i, h = (t.column(c).to_numpy() for c in "wkih")
    assert ((w * 1_000_003 + k * 7919 + i * 31) % 1_000_000_007 == h).all()
    # afterwards (every process dead, its claims stale) one vacuum leaves exactly the referenced files
    monkeypatch.setattr(claims, "STALE_S", 0.5)
    time.sleep(0.6)
    tg.vacuum(url, min_age_s=0)
    assert _leftovers(url) == {"orphans": [], "missing": [], "claims": [], "temps": []}
    assert _every_version_whole(url) == []


def test_memory_url_writer_vacuum_and_reader_threads(mem_url):
    url = mem_url
    tg.write(url, pa.table({"w": [0], "k": [0]}))
    stop = time.time() + 2
    ev, raws, lock = collections.Counter(), [], threading.Lock()

    def note(k, e=None):
        with lock:
            ev[k] += 1
            if e is not None:
                raws.append(f"{k}: {type(e).__name__}: {e}")

    def writer(wid):
        rng, k = random.Random(wid), 0
        while time.time() < stop:
            k += 1
            try:
                tg.write(url, pa.table({"w": [wid] * 4, "k": [k] * 4}), shard_rows=2,
                         mode="overwrite" if rng.random() < 0.15 else "append")
                note("commit")
            except tg.ConflictError as e:
                while e.retryable:
                    time.sleep(rng.uniform(0, 0.01))
                    try:
                        e.retry()
                        note("commit")
                        break
                    except tg.ConflictError as e2:
                        e = e2
                else:
                    note("vacuumed")
            except Exception as e:  # noqa: BLE001
                note("raw-writer", e)

    def vacuum():
        rng = random.Random(9)
        while time.time() < stop:
            try:
                ev["removed"] += tg.vacuum(url, min_age_s=rng.choice([0, 0.005, 0.02]))["removed"]
            except Exception as e:  # noqa: BLE001
                note("raw-vacuum", e)
            time.sleep(0.005)

    def reader():
        rng = random.Random(0)
        while time.time() < stop:
            try:
                ds = tg.open(url, version=rng.randint(1, tg.open(url).version))
                ds.verify()
                assert ds.to_arrow().num_rows == ds.num_rows
                note("read")
            except Exception as e:  # noqa: BLE001
                note("reader", e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(1, 4)]
    threads += [threading.Thread(target=vacuum) for _ in range(2)] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert raws == [] and ev["commit"] >= 3 and ev["read"] >= 1, (dict(ev), raws[:3])
    assert _every_version_whole(url) == []


# ------------------------------------------------------------------------------------------------------------
# 2. Claims broken that were never stale: two vacuums and one writer, only delays injected

_SYNC = textwrap.dedent("""
    import os, sys, time, pyarrow as pa, tensorgrid as tg
    from tensorgrid.store import claims, manifest, vacuum, writer
    url, flags = sys.argv[1], sys.argv[2]
    def flag(name):
        open(os.path.join(flags, name), "w").close()
    def wait(name, timeout=30):
        t = time.time()
        while not os.path.exists(os.path.join(flags, name)):
            if time.time() - t > timeout:
                raise SystemExit(f"timed out waiting for {name}")
            time.sleep(0.01)
    def once(name):
        if os.path.exists(os.path.join(flags, "once-" + name)):
            return False
        flag("once-" + name)
        return True
    def slow_remove():  # a slow delete: the files of a write go only once the test says the writer is done
        real = vacuum._remove
        def remove(fs, files):
            if any("/part-" in "/" + rel for _, rel, _ in files):
                wait("w_done")
            return real(fs, files)
        vacuum._remove = remove
    def flag_on_claim(name):
        real = claims.take
        def take(fs, root, txn, holder):
            ok = real(fs, root, txn, holder)
            if ok:
                flag(name)
            return ok
        claims.take = take
""")


def _wait_flag(flags, name, procs=(), timeout=60):
    deadline = time.time() + timeout
    while not (flags / name).exists():
        for p in procs:
            if p.poll() is not None and p.returncode:
                pytest.fail(f"a helper died: {p.communicate()}")
        assert time.time() < deadline, f"no {name}"
        time.sleep(0.01)


def _finish(flags, writer, va, vb):
    """W goes on once VA has released a claim (or finished without releasing one); VB deletes once W is done.
    Returns W's output: the version it committed, or the named error it got instead."""
    deadline = time.time() + 60
    while not (flags / "va_released").exists() and va.poll() is None:
        assert time.time() < deadline, "VA is stuck"
        time.sleep(0.01)
    (flags / "va_released").touch()
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    (flags / "w_done").touch()
    for v in (va, vb):
        _, verr = v.communicate(timeout=60)
        assert v.returncode == 0, verr
    return out.strip()


def test_a_claim_released_while_a_vacuum_read_it_is_not_taken_for_stale(tmp_path):
    """HOLE. No process dies and one vacuum runs with the defaults. VA lists the claims while writer W holds
    its claim (W is losing a commit race); W releases it; VA reads the claim: gone, which
    ``_break_stale_claims`` takes for stale (``taken_at(...) or 0``), and deletes it -- but by then vacuum VB
    (min_age_s=0) has claimed W's kept shards. With VB's claim gone, W's ``retry()`` claims, finds its shards,
    publishes version 3; VB, which listed the manifests before that, deletes the shard version 3 names."""
    url, flags = str(tmp_path / "ds"), tmp_path / "flags"
    flags.mkdir()
    tg.write(url, pa.table({"a": [0]}))
    w = _start(_SYNC + textwrap.dedent("""
        sneaking = []
        def sneak_in(fs, root, version):  # another writer takes version 2 first: W's commit will conflict
            writer._before_commit = None
            sneaking.append(1)
            tg.write(url, pa.table({"a": [1]}), mode="append")
            sneaking.clear()
        real_commit = manifest.commit
        def commit(fs, root, m):  # W holds its claim; the disk is slow
            if not sneaking and once("w_commit"):
                flag("w_holds"); wait("va_listed")
            return real_commit(fs, root, m)
        manifest.commit, writer._before_commit = commit, sneak_in
        try:
            tg.write(url, pa.table({"a": [2]}), mode="append")
        except tg.ConflictError as e:
            flag("w_conflicted"); wait("va_released")
            try:
                print(e.retry().version)
            except tg.ConflictError as e2:  # a vacuum holds the claim: nothing committed
                print("named ConflictError", e2)
    """), url, flags)
    _wait_flag(flags, "w_holds", [w])
    va = _start(_SYNC + textwrap.dedent("""
        real_held, real_release = claims.held, claims.release
        def held(fs, root):  # a slow listing
            out = real_held(fs, root)
            if out:
                flag("va_listed"); wait("w_conflicted")
            return out
        def release(fs, root, txn):  # a slow delete
            if once("va_release"):
                wait("vb_holds")
            real_release(fs, root, txn)
            flag("va_released")
        claims.held, claims.release = held, release
        tg.vacuum(url)  # the defaults: min_age_s=600, claims.STALE_S=600
    """), url, flags)
    _wait_flag(flags, "w_conflicted", [w, va])
    vb = _start(_SYNC + "flag_on_claim('vb_holds'); slow_remove(); tg.vacuum(url, min_age_s=0)", url, flags)
    out = _finish(flags, w, va, vb)
    assert out == "3" or out.startswith("named ConflictError"), out
    assert _every_version_whole(url) == []  # today: version 3 (W's retry) has lost its shard


def test_two_vacuums_breaking_the_same_stale_claim_never_share_it_with_a_writer(tmp_path):
    """Found by the stress pass (was a hole). A vacuum died 20 minutes ago holding the claim on W's write (W
    is a long write, still running). VA and VB both read that claim as stale; VB breaks it and takes its
    own; VA, whose read was slow, must not remove VB's fresh claim (breakers re-read the claim under an
    exclusive breaker claim), so W cannot claim and publish while VB deletes its shards."""
    url, flags = str(tmp_path / "ds"), tmp_path / "flags"
    flags.mkdir()
    tg.write(url, pa.table({"a": list(range(10))}))
    w = _start(_SYNC + textwrap.dedent("""
        def before(fs, root, version):
            flag("w_written"); wait("va_released")
        writer._before_commit = before
        try:
            print(tg.write(url, pa.table({"a": list(range(10, 20))}), mode="append").version)
        except tg.ConflictError as e:  # a vacuum holds the claim: nothing committed
            print("named ConflictError", e)
    """), url, flags)
    _wait_flag(flags, "w_written", [w])
    committed = {manifest.txn_of(u) for u in tg.open(url).shard_urls()}
    txn = next(t for t in map(manifest.txn_of, os.listdir(os.path.join(url, "data"))) if t not in committed)
    assert claims.take(*tgfs.resolve(url), txn, "vacuum")  # the dead vacuum's claim, 20 minutes old
    path = os.path.join(url, "_tensorgrid", "claims", txn)
    body = json.loads(open(path).read())
    body["time"] -= 1200
    open(path, "w").write(json.dumps(body))
    va = _start(_SYNC + textwrap.dedent("""
        real_read, real_break = claims._read, claims.break_if_stale
        def _read(fs, root, txn):  # a slow read: its answer arrives after VB broke the claim
            body = real_read(fs, root, txn)
            if once("va_read_claim"):
                flag("va_read"); wait("vb_holds")
            return body
        def break_if_stale(*args, **kwargs):
            broke = real_break(*args, **kwargs)
            if once("va_break"):  # VA's next step comes late
                flag("va_released"); wait("w_done")
            return broke
        claims._read, claims.break_if_stale = _read, break_if_stale
        tg.vacuum(url, min_age_s=0)
    """), url, flags)
    _wait_flag(flags, "va_read", [w, va])
    vb = _start(_SYNC + "flag_on_claim('vb_holds'); slow_remove(); tg.vacuum(url, min_age_s=0)", url, flags)
    out = _finish(flags, w, va, vb)
    assert out == "2" or out.startswith("named ConflictError"), out
    assert _every_version_whole(url) == []  # today: version 2 (W's) has lost its shard


def test_a_writer_paused_past_its_claims_age_is_refused_or_says_its_version_is_broken(tmp_path, monkeypatch):
    """A writer frozen (SIGSTOP) right before publishing, while a vacuum takes its claim for a dead one's
    (STALE_S=1): it re-checks its claim before publishing and its shards after, so write() never returns
    a broken version silently."""
    url, flag = str(tmp_path / "ds"), tmp_path / "flag"
    tg.write(url, pa.table({"a": [0]}))
    w = _start(textwrap.dedent("""
        import sys, time, pyarrow as pa, tensorgrid as tg
        from tensorgrid.store import manifest
        url, flag = sys.argv[1:3]
        real = manifest.commit
        def commit(fs, root, m):  # its shards and its claim's age are checked: it is about to publish
            open(flag, "w").close(); time.sleep(0.3)
            return real(fs, root, m)
        manifest.commit = commit
        try:
            print("committed", tg.write(url, pa.table({"a": [1]}), mode="append").version)
        except tg.TensorGridError as e:
            print("refused", type(e).__name__)
    """), url, flag)
    _wait_flag(flag.parent, flag.name, [w])
    os.kill(w.pid, signal.SIGSTOP)  # a VM freeze, swap storm or debugger
    monkeypatch.setattr(claims, "STALE_S", 1.0)
    time.sleep(1.3)
    tg.vacuum(url, min_age_s=0)
    os.kill(w.pid, signal.SIGCONT)
    out = w.communicate(timeout=60)[0]
    assert out.startswith("refused") or _every_version_whole(url) == []


# ------------------------------------------------------------------------------------------------------------
# 3. A vacuum (min_age_s=0) running while a commit's temporary file waits to be linked, or right after

_TEMP_WRITER = textwrap.dedent("""
    import os, sys, time, pyarrow as pa, tensorgrid as tg
    url, flag, phase, target = sys.argv[1:5]
    want = "/_tensorgrid/claims/" if target == "claim" else "/_tensorgrid/v"
    real_link = os.link
    def link(src, dst, *a, **kw):
        if want in dst and phase == "before":
            open(flag, "w").close(); time.sleep(1.0)  # a slow disk: the complete temporary waits to be linked
        r = real_link(src, dst, *a, **kw)
        if want in dst and phase == "after":
            open(flag, "w").close(); time.sleep(1.0)  # descheduled right after the link
        return r
    os.link = link
    try:
        print("committed", tg.write(url, pa.table({"a": [1]}), mode="append").version)
    except tg.TensorGridError as e:
        print("named", type(e).__name__, e)
    except BaseException as e:
        print("RAW", type(e).__name__, e)
""")


@pytest.mark.parametrize("phase, target", [("after", "manifest"), ("before", "claim")])
def test_a_vacuum_removing_a_commits_temporary_file_gives_a_named_outcome(tmp_path, phase, target):
    """HOLE. ``_candidates`` treats every ``.tmp-*`` under _tensorgrid/ (claims/ included) older than
    ``min_age_s`` as a loose file, but ``create_exclusive`` still needs it: the write raises a raw
    FileNotFoundError (from ``os.link`` or the final ``os.unlink``). After the manifest's link the version
    IS committed, yet ``write`` raises: a caller that writes again duplicates the rows."""
    url, flag = str(tmp_path / "ds"), tmp_path / "flag"
    tg.write(url, pa.table({"a": [0]}))
    w = _start(_TEMP_WRITER, url, flag, phase, target)
    _wait_flag(tmp_path, "flag", [w])
    tg.vacuum(url, min_age_s=0)
    out = w.communicate(timeout=60)[0].strip()
    ds = tg.open(url)
    rows = ds.to_arrow().column("a").to_pylist()
    assert _every_version_whole(url) == []
    assert not out.startswith("RAW"), out
    assert out == "committed 2" if rows == [0, 1] else (ds.version == 1 and out.startswith("named ConflictError"))


# ------------------------------------------------------------------------------------------------------------
# 4. Writers SIGKILLed at each step of a commit

_STEP_WRITER = textwrap.dedent("""
    import os, sys, time, pyarrow as pa, tensorgrid as tg
    from tensorgrid.store import claims, manifest
    url, flag, step = sys.argv[1:4]
    def stop_here():  # tell the test, then wait for its SIGKILL
        open(flag, "w").close(); time.sleep(60)
    real_link, real_take, real_commit = os.link, claims.take, manifest.commit
    def link(src, dst, *a, **kw):
        if (step == "claim_temp" and "/claims/" in dst) or (step == "manifest_temp" and "/_tensorgrid/v" in dst):
            stop_here()
        return real_link(src, dst, *a, **kw)
    def take(fs, root, txn, holder):
        ok = real_take(fs, root, txn, holder)
        if step == "claimed":
            stop_here()  # between the claim and the manifest
        return ok
    def commit(fs, root, m):
        ok = real_commit(fs, root, m)
        if step == "published":
            stop_here()  # after the manifest, before the claim's release
        return ok
    os.link, claims.take, manifest.commit = link, take, commit
    tg.write(url, pa.table({"a": [int(sys.argv[4])] * 3}), mode="append")
""")


def test_writers_killed_at_each_commit_step_leave_a_readable_dataset_that_vacuum_cleans(tmp_path, monkeypatch):
    url = str(tmp_path / "ds")
    tg.write(url, pa.table({"a": [0]}))
    steps = ["claim_temp", "claimed", "manifest_temp", "published"]
    for i, step in enumerate(steps):  # one at a time: each dies before the next starts
        flag = tmp_path / f"flag-{step}"
        w = _start(_STEP_WRITER, url, flag, step, i + 1)
        _wait_flag(tmp_path, flag.name, [w])
        os.kill(w.pid, signal.SIGKILL)
        w.wait()
        assert w.returncode == -signal.SIGKILL
        assert _every_version_whole(url) == []
    ds = tg.open(url)
    assert ds.version == 2 and sorted(ds.to_arrow().column("a").to_pylist()) == [0, 4, 4, 4]  # "published" only
    before = _leftovers(url)
    assert len(before["claims"]) >= 2 and before["temps"] and len(before["orphans"]) == 3
    r = tg.vacuum(url, min_age_s=0)  # the claims are fresh: their writers might be alive
    assert r["kept_young"] >= 1 and _leftovers(url)["claims"]
    monkeypatch.setattr(claims, "STALE_S", 0.5)
    time.sleep(0.6)
    tg.vacuum(url, min_age_s=0)
    assert _leftovers(url) == {"orphans": [], "missing": [], "claims": [], "temps": []}
    assert _every_version_whole(url) == []
    assert tg.write(url, pa.table({"a": [9]}), mode="append").version == 3


# ------------------------------------------------------------------------------------------------------------
# 5. A damaged store: same data or a named error, never other data, a raw exception or a hang

def _outcome(fn):
    try:
        fn()
        return "ok"
    except tg.TensorGridError as e:
        return f"named {type(e).__name__}"
    except Exception as e:  # noqa: BLE001
        return f"RAW {type(e).__name__}: {e}"


def _claims_dir_is_a_file(url):
    os.rmdir(os.path.join(url, "_tensorgrid", "claims"))
    open(os.path.join(url, "_tensorgrid", "claims"), "w").write("not a folder")


def _claim_is_a_folder(url):
    os.makedirs(os.path.join(url, "_tensorgrid", "claims", "0123456789ab", "x"))
    open(os.path.join(url, "data", "part-0123456789ab-00000.parquet"), "wb").write(b"orphan")


def _claim_is_garbage(url):
    open(os.path.join(url, "_tensorgrid", "claims", "0123456789ab"), "wb").write(b"\xff\x00 not json")
    open(os.path.join(url, "data", "part-0123456789ab-00000.parquet"), "wb").write(b"orphan")


def _manifest_is_a_folder(url):
    os.makedirs(os.path.join(url, "_tensorgrid", "v0000000003.json"))


def _data_is_a_file(url):
    shutil.rmtree(os.path.join(url, "data"))
    open(os.path.join(url, "data"), "w").write("not a folder")


@pytest.mark.parametrize("damage", [_claims_dir_is_a_file, _claim_is_a_folder, _claim_is_garbage,
                                    _manifest_is_a_folder, _data_is_a_file])
def test_a_damaged_store_layout_gives_the_same_data_or_named_errors(tmp_path, damage):
    """HOLE for every layout but a garbage claim: raw IsADirectoryError / NotADirectoryError / FileExistsError
    from ``manifest.load`` (cat_file of a folder), ``claims.taken_at``/``release`` (a claim that is a folder),
    ``create_exclusive`` (claims/ is a file), ``_shard_buffer`` (os.stat through a file); ``list_datasets``,
    which promises to list a dataset it cannot open with its error, stops with the raw one."""
    url = str(tmp_path / "ds")
    tg.write(url, pa.table({"a": [1, 2]}))
    tg.write(url, pa.table({"a": [3]}), mode="append")
    expected = {1: [1, 2], 2: [1, 2, 3]}
    damage(url)
    outcomes = {}
    for v, rows in expected.items():
        def read(v=v, rows=rows):
            assert tg.open(url, version=v).to_arrow().column("a").to_pylist() == rows, "other data"
        outcomes[f"read v{v}"] = _outcome(read)
    outcomes["open latest"] = _outcome(lambda: tg.open(url).to_arrow())
    outcomes["versions"] = _outcome(lambda: tg.open(url, version=1).versions())
    outcomes["verify"] = _outcome(lambda: tg.open(url, version=2).verify())
    outcomes["list_datasets"] = _outcome(lambda: tg.list_datasets(str(tmp_path)))
    outcomes["vacuum"] = _outcome(lambda: tg.vacuum(url, min_age_s=0))
    outcomes["append"] = _outcome(lambda: tg.write(url, pa.table({"a": [4]}), mode="append"))
    raws = [f"{k}: {o}" for k, o in outcomes.items() if o.startswith("RAW")]
    assert not raws, "\n".join(raws)


def test_truncated_swapped_and_foreign_manifests_are_named_errors(tmp_path):
    url, other = str(tmp_path / "a"), str(tmp_path / "b")
    for u, off in ((url, 0), (other, 100)):
        tg.write(u, pa.table({"a": np.arange(off, off + 40)}), shard_rows=20)
        tg.write(u, pa.table({"a": np.arange(off + 40, off + 50)}), mode="append")
        tg.write(u, pa.table({"a": np.arange(off + 50, off + 60)}), mode="overwrite")
    expected = {v: tg.open(url, version=v).to_arrow() for v in (1, 2, 3)}
    path = {v: os.path.join(url, "_tensorgrid", f"v{v:010d}.json") for v in (1, 2, 3)}
    original = {v: open(path[v], "rb").read() for v in (1, 2, 3)}

    def outcome(v):
        try:
            same = tg.open(url, version=v).to_arrow().equals(expected[v])
            return "same" if same else "OTHER DATA"
        except tg.TensorGridError:
            return "named"
        except Exception as e:  # noqa: BLE001
            return f"RAW {type(e).__name__}"

    seen = collections.Counter()
    for v in (1, 2, 3):
        for n in range(0, len(original[v]), 23):
            open(path[v], "wb").write(original[v][:n])
            seen[outcome(v)] += 1
        open(path[v], "wb").write(original[v])
    for a, b in ((1, 2), (2, 3), (1, 3)):
        open(path[a], "wb").write(original[b])
        open(path[b], "wb").write(original[a])
        seen[outcome(a)] += 1
        seen[outcome(b)] += 1
        open(path[a], "wb").write(original[a])
        open(path[b], "wb").write(original[b])
    for v in (1, 2, 3):  # another dataset's manifest of the same version: valid, checksummed, other shards
        shutil.copy(os.path.join(other, "_tensorgrid", f"v{v:010d}.json"), path[v])
        seen[outcome(v)] += 1
        open(path[v], "wb").write(original[v])
    assert set(seen) == {"named"}, seen
    assert all(outcome(v) == "same" for v in (1, 2, 3))


def test_a_rechecksummed_manifest_cannot_change_a_tensor_columns_dtype_or_shape(tmp_path):
    """HOLE. ``_check_footer`` compares names and Arrow types only; a tensor is fixed_size_binary with its
    dtype and shape in field metadata, so a manifest edited (checksum recomputed) from float32 [2,2] to
    int32 [4] validates: ``to_arrow(filter=...)`` and SQL decode with the manifest's schema and return the
    float bits as integers, ``ds.schema`` says int32, ``verify()`` passes (plain ``to_arrow`` decodes with the
    footer's schema and is right). The architecture promises a consistent edit "cannot make a shard read as
    other data"."""
    url = str(tmp_path / "ds")
    x = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    tg.write(url, pd.DataFrame({"id": [0, 1], "x": list(x)}))
    path = os.path.join(url, "_tensorgrid", "v0000000001.json")
    body = json.loads(open(path).read())
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(body["schema"])))
    field = schema.field("x")
    meta = dict(field.metadata)
    tensor = json.loads(meta[b"tensorgrid.tensor"])
    tensor.update(dtype="int32", shape=[4])
    meta[b"tensorgrid.tensor"] = json.dumps(tensor).encode()
    schema = schema.set(schema.get_field_index("x"), field.with_metadata(meta))
    body["schema"] = base64.b64encode(schema.serialize().to_pybytes()).decode()
    body["checksum"] = manifest._content_checksum(body)
    open(path, "w").write(json.dumps(body, indent=1))

    def same_tensors(t):
        assert t.schema.field("x").type == pa.fixed_shape_tensor(pa.float32(), [2, 2]), t.schema.field("x").type
        assert np.array_equal(t.column("x").combine_chunks().to_numpy_ndarray(), x)

    outcomes = {}
    for name, read in [("to_arrow", lambda ds: ds.to_arrow()),
                       ("to_arrow(filter)", lambda ds: ds.to_arrow(filter=pc.field("id") >= 0)),
                       ("sql", lambda ds: ds.sql("SELECT * FROM ds ORDER BY id").to_arrow())]:
        outcomes[name] = _outcome(lambda read=read: same_tensors(read(tg.open(url))))
    assert all(o == "ok" or o.startswith("named") for o in outcomes.values()), outcomes
