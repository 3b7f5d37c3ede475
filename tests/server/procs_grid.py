"""Processes for the grid server's load and fault tests (test_grid_faults.py): `tensorgrid serve` as a real
process, and the client roles that run against it in processes of their own (started by multiprocessing's
forkserver with this module, torch and tensorgrid preloaded: 18 processes on 2 cores would otherwise spend
most of the test importing torch).

The data is built so that every read can be checked on its own, and so that a read mixing two states shows
(appends alone would not: the old rows of a newer state are the same rows):
- table ``ledger``: an INSERT adds one batch b of K rows, ids b*K..b*K+K-1, whose x values sum to TOTAL; batches
  are inserted in order, so a consistent snapshot holds batches 0..B-1 whole: count = K*B, sum(x) = TOTAL*B.
  After each insert an UPDATE moves every row's ``gen`` on by one (new rows get the current gen): a snapshot's
  rows all have one gen, a read that mixes snapshots has two.
- loaded dataset ``events``: version v of the store dataset holds ids 0..A*(v-v0+1)-1, every row with ver = v
  (each version overwrites the last with A rows more), so an epoch at version v reads exactly those ids, each
  once, all of version v.

Every role writes ``<out>/<role>-<i>.json`` with the errors it met (tracebacks) and what it saw.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import pandas as pd
import torch  # noqa: F401 - preloaded in the forkserver: the loader roles need it

import tensorgrid as tg

K = 8  # rows per ledger insert
TOTAL = 1000  # sum of x over one insert
A = 40  # rows more in each version of the events store dataset
PAD = 16 << 10  # bytes of padding per ledger row: the table spans several 4 MiB read blocks, so a loader
# epoch fetches them as it goes (while inserts go on) rather than all at once
LEDGER_DDL = "CREATE TABLE ledger (id BIGINT PRIMARY KEY, batch INTEGER, x BIGINT, gen BIGINT, pad VARCHAR)"
LEDGER_COLUMNS = ["id", "batch", "x", "gen"]
LEDGER_BUDGET = 4 << 20  # the ledger loaders' memory budget: one block in memory at a time
URL_LINE = re.compile(r"serving (grpc://\S+)")


# -- the server ------------------------------------------------------------------------------------------------

def start_server(root: str, port: int = 0, timeout: float = 30.0, *extra: str) -> tuple[subprocess.Popen, str]:
    """`tensorgrid serve --root root --port port [extra...]` and the URL it prints (waits for the line)."""
    proc = subprocess.Popen([sys.executable, "-m", "tensorgrid.cli", "serve", "--root", root, "--port", str(port),
                             "--memory-limit", "512MB", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    match = URL_LINE.search(line)
    if not match:
        proc.kill()
        _, err = proc.communicate(timeout=30)
        raise AssertionError(f"tensorgrid serve printed no URL in {timeout:g} s: {line!r}; stderr: {err[-2000:]!r}")
    return proc, match.group(1)


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill_server(proc: subprocess.Popen) -> None:
    """SIGKILL (no clean-up of any kind) and reap."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=20)


# -- the data --------------------------------------------------------------------------------------------------

def ledger_values(b: int) -> list[int]:
    """The x values of ledger batch b: K pseudo-random ints (some negative) summing to TOTAL."""
    rng = random.Random(b)
    xs = [rng.randint(-500, 500) for _ in range(K - 1)]
    return xs + [TOTAL - sum(xs)]


def insert_batch(g, b: int, gen: int) -> None:
    rows = ", ".join(f"({b * K + j}, {b}, {x}, {gen}, repeat('p', {PAD}))" for j, x in enumerate(ledger_values(b)))
    changed = g.sql(f"INSERT INTO ledger VALUES {rows}")
    assert changed == K, f"INSERT of batch {b} changed {changed} rows, not {K}"


def bump_gen(g, rows: int) -> None:
    changed = g.sql("UPDATE ledger SET gen = gen + 1")
    assert changed == rows, f"UPDATE of every gen changed {changed} rows of {rows}"


def events_frame(rows: int, version: int) -> pd.DataFrame:
    ids = np.arange(rows, dtype=np.int64)
    return pd.DataFrame({"id": ids, "x": ids * 3 % 7, "ver": np.full(rows, version, dtype=np.int64)})


def write_events(store: str, version: int, v0: int):
    """Version ``version`` of the events store dataset (overwriting the last), one shard per A rows."""
    return tg.write(store, events_frame(events_rows(version, v0), version), mode="overwrite" if version > v0 else
                    "create", shard_rows=A)


def check_ledger(ids, batches, xs, gens, where: str) -> tuple[int, int]:
    """Rows of one ledger read are batches 0..B-1, each whole, each id once, one gen: returns (B, gen)."""
    ids, batches, xs, gens = (np.asarray(a, dtype=np.int64) for a in (ids, batches, xs, gens))
    n = len(ids)
    assert n and np.all(gens == gens[0]), f"{where}: rows of several states in one read: gens {np.unique(gens)}"
    assert n % K == 0, f"{where}: {n} rows is not a whole number of batches of {K}"
    order = np.argsort(ids, kind="stable")
    ids, batches, xs = ids[order], batches[order], xs[order]
    assert np.array_equal(ids, np.arange(n)), f"{where}: ids are not 0..{n - 1} each once (a torn or mixed read)"
    assert np.array_equal(batches, ids // K), f"{where}: rows carry the wrong batch numbers"
    sums = np.bincount(batches, weights=xs, minlength=n // K) if n else np.zeros(0)
    assert np.all(sums == TOTAL), f"{where}: a batch's x do not sum to {TOTAL}: {sums[sums != TOTAL][:5]}"
    return n // K, int(gens[0])


def events_rows(version: int, v0: int) -> int:
    return A * (version - v0 + 1)


def check_events(ids, vers, version: int, v0: int, where: str) -> None:
    vers = np.asarray(vers, dtype=np.int64)
    assert np.all(vers == version), f"{where}: rows of versions {np.unique(vers)} in a read of version {version}"
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    want = events_rows(version, v0)
    assert np.array_equal(ids, np.arange(want)), (
        f"{where}: version {version} holds ids 0..{want - 1} each once, the read had {len(ids)} rows "
        f"(ids {ids[:3].tolist()}..{ids[-3:].tolist()})")


def epoch_columns(ds, seed: int, columns: list[str], memory_budget: int | None = None) -> dict[str, np.ndarray]:
    """One shuffled loader epoch over ``ds`` (in this process, no cache), columns concatenated."""
    loader = ds.to_torch(batch_size=32, shuffle=True, seed=seed, cache_dir=False, columns=columns,
                         memory_budget=memory_budget)
    out = {c: [] for c in columns}
    for b in loader:
        for c in columns:
            out[c].append(b[c].numpy())
    return {c: np.concatenate(v) if v else np.zeros(0, np.int64) for c, v in out.items()}


# -- roles (each in a process of its own) ------------------------------------------------------------------------

def run_role(role: str, i: int, url: str, out: str, barrier, seconds: float, args: dict) -> None:
    """Run ``role`` for ``seconds`` after every process reached ``barrier``; its report goes to a JSON file."""
    torch.set_num_threads(1)
    report = {"role": role, "i": i, "errors": [], "iterations": 0}
    try:
        g = tg.connect(url, timeout=60)
        barrier.wait(timeout=120)
        end = time.monotonic() + seconds
        ROLES[role](g, i, end, report, **args)
    except BaseException:  # noqa: BLE001 - every failure is reported, the parent asserts there are none
        report["errors"].append(traceback.format_exc())
    finally:
        path = os.path.join(out, f"{role}-{i}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(report, f)
        os.replace(path + ".tmp", path)


def _loop(end: float, report: dict, most: int):
    """Iterations until the deadline (at least two, at most ``most``); errors are collected, not fatal."""
    while report["iterations"] < 2 or (time.monotonic() < end and report["iterations"] < most):
        report["iterations"] += 1
        yield report["iterations"] - 1
        if len(report["errors"]) >= 3:
            return


def sql_reader(g, i: int, end: float, report: dict, v0: int, most: int = 10_000) -> None:
    """Aggregates and full reads of the table and the loaded dataset through Flight SQL."""
    report.update(ledger=[], events=[])
    last_ledger = last_events = 0
    for k in _loop(end, report, most):
        try:
            kind = (i + k) % 4
            if kind == 0:
                n, s, b, top, gens = g.sql("SELECT count(*), sum(x), count(DISTINCT batch), max(batch), "
                                           "count(DISTINCT gen) FROM ledger").to_arrow().to_pylist()[0].values()
                assert (n, s, top, gens) == (K * b, TOTAL * b, b - 1, 1), (
                    f"ledger aggregate torn: n={n} sum={s} batches={b} gens={gens}")
                batches = b
            elif kind == 1:
                t = g.sql("SELECT id, batch, x, gen FROM ledger").to_arrow()  # (not the padding)
                batches, _ = check_ledger(t["id"], t["batch"], t["x"], t["gen"], "SQL full read of ledger")
            elif kind == 2:
                n, s, top, xs, lo, hi = g.sql("SELECT count(*), sum(id), max(id), sum(x), min(ver), max(ver) "
                                              "FROM events").to_arrow().to_pylist()[0].values()
                version = lo
                assert n == events_rows(version, v0) and hi == lo, f"events aggregate torn: n={n} versions {lo}..{hi}"
                assert s == n * (n - 1) // 2 and top == n - 1, f"events aggregate torn: n={n} sum(id)={s}"
                assert xs == int((np.arange(n) * 3 % 7).sum()), f"events x sum {xs} wrong for {n} rows"
            else:
                t = g.sql("SELECT id, x, ver FROM events").to_arrow()
                version = t["ver"][0].as_py()
                check_events(t["id"], t["ver"], version, v0, "SQL full read of events")
                assert np.array_equal(np.asarray(t["x"]), np.asarray(t["id"]) * 3 % 7), "events rows torn"
            if kind in (0, 1):
                assert batches >= last_ledger, f"ledger went back in time: {batches} batches after {last_ledger}"
                last_ledger = batches
                report["ledger"].append(batches)
            else:
                assert version >= last_events, f"events went back: version {version} after {last_events}"
                last_events = version
                report["events"].append(version)
        except Exception:  # noqa: BLE001
            report["errors"].append(traceback.format_exc())


def loader_reader(g, i: int, end: float, report: dict, v0: int, most: int = 10_000) -> None:
    """Shuffled loader epochs over g.dataset(name): each epoch exactly one snapshot's rows, each once."""
    report.update(ledger=[], events=[], moved=0, written=0, blocks=0)
    for k in _loop(end, report, most):
        try:
            if (i + k) % 2 == 0:
                ds = g.dataset("ledger")
                cols = epoch_columns(ds, seed=100 * i + k, columns=LEDGER_COLUMNS, memory_budget=LEDGER_BUDGET)
                batches, gen = check_ledger(*(cols[c] for c in LEDGER_COLUMNS), f"loader epoch over ledger ({i}, {k})")
                assert batches * K == ds.num_rows, f"the epoch read {batches * K} rows of a {ds.num_rows}-row snapshot"
                report["ledger"].append(batches)
                report["blocks"] = max(report["blocks"], len(ds.blocks()))
                now = g.sql("SELECT max(gen) AS gen FROM ledger").to_arrow()["gen"][0].as_py()
                report["written"] += now != gen  # the table was written during the epoch
            else:
                ds = g.dataset("events")
                cols = epoch_columns(ds, seed=100 * i + k, columns=["id", "ver"])
                check_events(cols["id"], cols["ver"], ds.version, v0, f"loader epoch over events ({i}, {k})")
                report["events"].append(ds.version)
                report["moved"] += g.dataset("events").version != ds.version  # refreshed during the epoch
        except Exception:  # noqa: BLE001
            report["errors"].append(traceback.format_exc())


def table_writer(g, i: int, end: float, report: dict, first: int, pause: float = 0.03) -> None:
    """Inserts ledger batches first, first+1, ..., each followed by an UPDATE of every row's gen, until the
    deadline; reports how many batches exist and the last gen."""
    report["batches"], report["gen"] = first, 0
    for _ in _loop(end, report, 10_000):
        insert_batch(g, report["batches"], report["gen"])
        report["batches"] += 1
        bump_gen(g, report["batches"] * K)
        report["gen"] += 1
        time.sleep(pause)


def store_appender(g, i: int, end: float, report: dict, store: str, v0: int, pause: float = 0.4) -> None:
    """Writes version after version of the events store dataset (A rows more each) until the deadline."""
    report["versions"] = []
    for _ in _loop(end, report, 1000):
        version = tg.open(store).version + 1
        assert write_events(store, version, v0).version == version
        report["versions"].append(version)
        time.sleep(pause)


def refresher(g, i: int, end: float, report: dict, pause: float = 0.2) -> None:
    """g.load('events', refresh=True) until the deadline: the server moves to the store's latest version."""
    report["versions"] = []
    for _ in _loop(end, report, 1000):
        report["versions"].append(g.load("events", refresh=True)["version"])
        time.sleep(pause)


ROLES = {"sql": sql_reader, "loader": loader_reader, "writer": table_writer, "appender": store_appender,
         "refresher": refresher}


# -- training over a grid ---------------------------------------------------------------------------------------

class KillAfterFirstEpoch(tg.Callback):
    """On rank 0, at the end of epoch 1: SIGKILL a grid server's process (the next epochs read from its
    partitions' other replicas)."""

    def __init__(self, pid):
        self.pid = pid

    def on_epoch_end(self, state):
        if state.epoch == 1:
            os.kill(self.pid, signal.SIGKILL)


def linear():
    import torch

    return torch.nn.Linear(1, 2)


def sgd(params):
    import torch

    return torch.optim.SGD(params, lr=0.5)
