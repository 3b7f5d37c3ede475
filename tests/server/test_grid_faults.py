"""The grid server under load and under faults, as real processes: `tensorgrid serve` in a process of its own,
clients in processes of their own (procs_grid.py), SIGKILL for the faults. No mocks.

Load: 16 reader processes (8 through SQL: aggregates and full reads; 8 through the loader over g.dataset) while
one process INSERTs into a table (and UPDATEs it), one writes new versions of a store dataset and one moves the
server's loaded copy to the latest version (g.load(refresh=True)). Every read must be one consistent snapshot
(the data is built so that each read checks itself, and a read mixing two states shows: see procs_grid.py), no
process may meet an error, no row may be lost.

Faults: the server SIGKILLed while a client streams a large SQL result or iterates a loader epoch: the client
raises GridConnectionError (named, one line, no gRPC dump) without hanging; a server restarted on the same
root and port has the tables and the loaded datasets (at their pinned versions) back, and a loader state saved
before the kill resumes there and finishes the epoch exactly as an uninterrupted one.
"""

import json
import multiprocessing as mp
import os
import threading
import time

import numpy as np
import pandas as pd
import pytest

import tensorgrid as tg
from tensorgrid.server import GridConnectionError

from . import procs_grid as pg
from .procs_grid import TOTAL, K

pytestmark = pytest.mark.timeout(120)

SQL_READERS = LOADER_READERS = 8
LOAD_SECONDS = 10.0  # how long the readers and writers run at once
FIRST_BATCHES = 40  # ledger batches before the load starts (320 rows of 16 KiB: two read blocks)


@pytest.fixture
def servers():
    """Servers a test starts (pg.start_server), stopped at its end whatever happened."""
    started = []
    yield started
    for proc in started:
        pg.stop_server(proc)


def _start(servers, root, port=0):
    proc, url = pg.start_server(str(root), port)
    servers.append(proc)
    return proc, url


def _forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["tests.server.procs_grid"])  # torch and tensorgrid imported once, not 19 times
    return ctx


def _run_roles(ctx, url: str, out: str, roles: list[tuple[str, int, dict]], seconds: float) -> list[dict]:
    """Every role in a process of its own, started together (a barrier); their reports."""
    barrier = ctx.Barrier(len(roles))
    procs = [ctx.Process(target=pg.run_role, args=(role, i, url, out, barrier, seconds, args), name=f"{role}-{i}")
             for role, i, args in roles]
    for p in procs:
        p.start()
    deadline = time.monotonic() + seconds + 90
    hung = []
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(p.name)
            p.kill()
            p.join(10)
    assert not hung, f"client processes did not finish (a hang): {hung}"
    reports = []
    for p, (role, i, _) in zip(procs, roles):
        path = os.path.join(out, f"{role}-{i}.json")
        assert p.exitcode == 0 and os.path.exists(path), f"{p.name} died (exit code {p.exitcode}) without a report"
        with open(path) as f:
            reports.append(json.load(f))
    return reports


def test_16_readers_while_one_inserts_and_one_loads_new_versions_all_consistent_no_errors_no_lost_rows(
        tmp_path, servers):
    root, store, out = tmp_path / "grid", tmp_path / "grid" / "store" / "events", tmp_path / "reports"
    out.mkdir()
    _, url = _start(servers, root)
    with tg.connect(url, timeout=60) as g:
        g.sql(pg.LEDGER_DDL)
        for b in range(FIRST_BATCHES):
            pg.insert_batch(g, b, gen=0)
        v0 = 1
        assert pg.write_events(str(store), v0, v0).version == v0
        assert g.load("events", "store/events")["version"] == v0

    roles = ([("sql", i, {"v0": v0}) for i in range(SQL_READERS)]
             + [("loader", i, {"v0": v0}) for i in range(LOADER_READERS)]
             + [("writer", 0, {"first": FIRST_BATCHES}), ("appender", 0, {"store": str(store), "v0": v0}),
                ("refresher", 0, {})])
    t0 = time.monotonic()
    reports = _run_roles(_forkserver(), url, str(out), roles, LOAD_SECONDS)
    elapsed = time.monotonic() - t0

    errors = [f"{r['role']}-{r['i']}:\n{e}" for r in reports for e in r["errors"]]
    assert not errors, f"{len(errors)} errors under load, the first:\n" + "\n".join(errors[:3])
    by_role = {}
    for r in reports:
        by_role.setdefault(r["role"], []).append(r)
    readers = by_role["sql"] + by_role["loader"]
    assert len(readers) == 16 and all(r["iterations"] >= 2 for r in readers)
    writer, appender, refresher = by_role["writer"][0], by_role["appender"][0], by_role["refresher"][0]
    # the writes really ran while the reads did: readers saw several table states and dataset versions
    assert writer["batches"] >= FIRST_BATCHES + 5 and len(appender["versions"]) >= 3
    assert len(set(refresher["versions"])) >= 2
    seen_ledger = {n for r in readers for n in r["ledger"]}
    seen_events = {v for r in readers for v in r["events"]}
    seen_by_loaders = {v for r in by_role["loader"] for v in r["events"]}
    assert len(seen_ledger) >= 3 and len(seen_events) >= 2 and len(seen_by_loaders) >= 2, (seen_ledger, seen_events)
    reads = sum(r["iterations"] for r in readers)
    moved = sum(r["moved"] for r in by_role["loader"])
    written = sum(r["written"] for r in by_role["loader"])
    # loader epochs really overlapped the writes: versions moved and rows were inserted while epochs ran, over a
    # table the loaders fetch block by block
    assert moved >= 1 and written >= 1 and max(r["blocks"] for r in by_role["loader"]) >= 2, (moved, written)
    print(f"\n{reads} consistent reads by 16 processes in {elapsed:.1f} s while {writer['batches'] - FIRST_BATCHES} "
          f"inserts and {len(appender['versions'])} new versions ran; table states seen {len(seen_ledger)}, versions "
          f"{sorted(seen_events)}; loader epochs that outlived their version {moved}, that saw inserts {written}")

    # no lost rows: every acknowledged insert and append is there, once
    with tg.connect(url, timeout=60) as g:
        batches = writer["batches"]
        t = g.sql("SELECT id, batch, x, gen FROM ledger").to_arrow()
        assert pg.check_ledger(*(t[c] for c in pg.LEDGER_COLUMNS), "ledger after the load") == (batches, writer["gen"])
        cols = pg.epoch_columns(g.dataset("ledger"), seed=1, columns=pg.LEDGER_COLUMNS, memory_budget=pg.LEDGER_BUDGET)
        assert pg.check_ledger(*(cols[c] for c in pg.LEDGER_COLUMNS), "final loader epoch") == (batches, writer["gen"])
        last = appender["versions"][-1]
        assert g.load("events", refresh=True)["version"] == last == tg.open(str(store)).version
        events = g.dataset("events")
        assert events.version == last and events.num_rows == pg.events_rows(last, v0)
        cols = pg.epoch_columns(events, seed=2, columns=["id", "ver"])
        pg.check_events(cols["id"], cols["ver"], last, v0, "final events epoch")

        # a reader of a version the server has moved past still reads that version, whole; the same for a table
        ledger = g.dataset("ledger")
        pg.write_events(str(store), last + 1, v0)
        assert g.load("events", refresh=True)["version"] == last + 1
        pg.bump_gen(g, batches * K)
        t = events.to_arrow()
        pg.check_events(t["id"], t["ver"], last, v0, "the superseded version read after the refresh")
        cols = pg.epoch_columns(events, seed=3, columns=["id", "ver"])
        pg.check_events(cols["id"], cols["ver"], last, v0, "an epoch over the superseded version")
        t = ledger.to_arrow()
        assert pg.check_ledger(*(t[c] for c in pg.LEDGER_COLUMNS), "the table's old snapshot") == (batches,
                                                                                                  writer["gen"])
        t = g.dataset("events").to_arrow()
        pg.check_events(t["id"], t["ver"], last + 1, v0, "the new version")


# -- faults ------------------------------------------------------------------------------------------------------

def _is_clean(exc: BaseException, url: str) -> bool:
    """A named TensorGrid error with one line that names the server, no gRPC dump."""
    text = str(exc)
    return (isinstance(exc, GridConnectionError) and url in text and "\n" not in text and len(text) < 300
            and "gRPC" not in text and "debug context" not in text and "Flight returned" not in text)


def _in_thread(fn):
    """Run fn in a thread; returns (thread, box) where box gets 'result' or 'error' and 'at' (when it ended)."""
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001
            box["error"] = exc
        box["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _heavy_endless_query() -> str:
    expr = "i::VARCHAR"
    for _ in range(12):  # each row costs the server ~12 md5s: rows stream out steadily, a few MB/s
        expr = f"md5({expr})"
    return f"SELECT i, hash({expr}) AS h FROM range(1000000000) t(i)"


def test_sigkill_mid_sql_stream_is_a_named_error_without_hang_and_the_table_survives_a_restart(tmp_path, servers):
    root = tmp_path / "grid"
    proc, url = _start(servers, root)
    g = tg.connect(url)  # no call timeout: a hang would show as one
    g.sql(pg.LEDGER_DDL)
    for b in range(4):
        pg.insert_batch(g, b, gen=0)

    cpu = pg.cpu_seconds(proc.pid)
    thread, box = _in_thread(lambda: g.sql(_heavy_endless_query()))
    give_up = time.monotonic() + 30
    while pg.cpu_seconds(proc.pid) - cpu < 1.0 and time.monotonic() < give_up:
        time.sleep(0.1)  # the server produces rows only while the client reads them (DoGet): it is streaming
    assert pg.cpu_seconds(proc.pid) - cpu >= 1.0, "the server did not start streaming the result"
    assert thread.is_alive() and not box, f"the large result was not still streaming: {box}"
    killed = time.monotonic()
    pg.kill_server(proc)
    thread.join(30)
    assert not thread.is_alive(), "the client hung after the server was killed mid-stream"
    assert "error" in box, f"the read ended without an error: {box}"
    assert _is_clean(box["error"], url), f"{type(box['error']).__mro__}: {box['error']!r}"
    assert box["at"] - killed < 10
    with pytest.raises(GridConnectionError, match="cannot reach the grid server"):
        g.sql("SELECT 1")  # the next call on the same client: named too, at once
    g.close()

    port = int(url.rsplit(":", 1)[1])
    _, url2 = _start(servers, root, port)  # the same root and port
    assert url2 == url
    with tg.connect(url2, timeout=30) as g2:
        t = g2.sql("SELECT id, batch, x, gen FROM ledger").to_arrow()
        assert pg.check_ledger(*(t[c] for c in pg.LEDGER_COLUMNS), "ledger after SIGKILL and restart") == (4, 0)
        assert g2.sql(_heavy_endless_query() + " LIMIT 5").to_arrow().num_rows == 5


def test_sigkill_mid_loader_epoch_is_a_named_error_and_the_state_resumes_exactly_on_the_restarted_server(
        tmp_path, servers):
    root = tmp_path / "grid"
    store = root / "store" / "big"
    proc, url = _start(servers, root)
    n = 16_000  # rows of 1 KiB: four 4 MiB blocks, read as the epoch goes (the loader's budget holds ~2)
    frame = pd.DataFrame({"id": np.arange(n, dtype=np.int64),
                          "p": list(np.random.default_rng(0).random((n, 256), dtype=np.float32))})
    assert tg.write(str(store), frame, shard_rows=4000).version == 1
    kw = dict(batch_size=64, shuffle=True, seed=5, cache_dir=False, memory_budget=8 << 20, columns=["id"])
    g = tg.connect(url)
    g.sql(pg.LEDGER_DDL)
    for b in range(4):
        pg.insert_batch(g, b, gen=0)
    assert g.load("big", "store/big")["version"] == 1
    tg.write(str(store), frame.iloc[:100], mode="append")  # version 2 in the store; the server keeps 1 pinned
    ds = g.dataset("big")
    whole = [i for b in ds.to_torch(**kw) for i in b["id"].tolist()]
    assert sorted(whole) == list(range(n)) and whole != list(range(n))

    loader = ds.to_torch(**kw)
    it = iter(loader)
    before = [i for _ in range(10) for i in next(it)["id"].tolist()]
    state = json.loads(json.dumps(loader.state_dict()))  # saved as a checkpoint would
    for _ in range(5):
        next(it)  # progress after the checkpoint, lost with the server
    pg.insert_batch(g, 4, gen=0)  # acknowledged just before the kill: must survive it
    killed = time.monotonic()
    pg.kill_server(proc)
    thread, box = _in_thread(lambda: sum(1 for _ in it))
    thread.join(30)
    assert not thread.is_alive(), "the loader hung after the server was killed mid-epoch"
    assert "error" in box, f"the epoch finished without the server: {box}"
    assert _is_clean(box["error"], url), f"{type(box['error']).__mro__}: {box['error']!r}"
    assert box["at"] - killed < 10
    g.close()

    port = int(url.rsplit(":", 1)[1])
    _, url2 = _start(servers, root, port)
    with tg.connect(url2, timeout=30) as g2:
        tables = g2.tables().set_index("name")
        assert tables.loc["big", "kind"] == "dataset" and tables.loc["big", "version"] == 1
        assert tables.loc["big", "rows"] == n and pd.isna(tables.loc["big", "error"])
        assert tables.loc["ledger", "rows"] == 5 * K
        total = g2.sql("SELECT count(*) AS n, sum(x) AS s FROM ledger").to_arrow().to_pylist()[0]
        assert (total["n"], total["s"]) == (5 * K, 5 * TOTAL)

        again = g2.dataset("big")
        assert again.version == 1 and again.fingerprint == ds.fingerprint
        resumed = again.to_torch(**kw)
        resumed.load_state_dict(state)
        after = [i for b in resumed for i in b["id"].tolist()]
        assert before + after == whole  # the epoch continues exactly: nothing lost, nothing twice
        assert g2.load("big", refresh=True)["version"] == 2  # the pin held until asked to move
