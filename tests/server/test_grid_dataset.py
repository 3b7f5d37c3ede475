"""g.dataset(name) is a Dataset kind like any other: the real loader (ranks, shuffle, resume, worker
processes) and the real trainer read it from a real grid server, by partition and row range."""

import json
import pickle
import uuid

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.errors import ArgumentError
from tensorgrid.server import GridDataset, SnapshotError


def _ids(loader) -> list[int]:
    """Row ids a loader yields, padding rows (``_valid`` false: equal batches on every rank) left out."""
    out = []
    for b in loader:
        keep = b["_valid"] if "_valid" in b else torch.ones(len(b["id"]), dtype=torch.bool)
        out += b["id"][keep].tolist()
    return out


@pytest.fixture(scope="module")
def numbers(grid):
    """A table of 1,000 rows (id, a float vector) on the server, one partition per 256 rows of the snapshot
    is not what a table gets (2^18): loaded instead as a store dataset of 7 shards."""
    url = f"{grid.root}/store/numbers-{uuid.uuid4().hex[:6]}"
    df = pd.DataFrame({"id": np.arange(1000, dtype=np.int64),
                       "x": list(np.arange(4000, dtype=np.float32).reshape(1000, 4))})
    tg.write(url, df, shard_rows=150)
    with tg.connect(grid.url) as g:
        g.load("numbers", url)
        yield g.dataset("numbers")


def test_shards_are_the_servers_partitions_and_reads_fetch_only_the_asked_rows(numbers, grid):
    assert numbers.shard_rows == [150] * 6 + [100] and numbers.is_remote
    service = grid.services["datasets"]
    before = service.rows_served
    part = numbers.read_rows(2, 10, 13, ["id"])
    assert part.column_names == ["id"] and part.column("id").to_pylist() == [310, 311, 312]
    assert service.rows_served - before == 3


def test_one_partition_by_argument_or_by_tensorgrid_part(g, numbers, monkeypatch):
    one = g.dataset("numbers", partition=6)
    assert one.shard_rows == [100] and one.to_arrow().column("id").to_pylist() == list(range(900, 1000))
    monkeypatch.setenv("TENSORGRID_PART", "1")
    assert g.dataset("numbers").to_arrow().column("id").to_pylist() == list(range(150, 300))
    with pytest.raises(ArgumentError, match="has partitions 0..6, not 7"):
        g.dataset("numbers", partition=7)


def test_every_row_exactly_once_across_two_ranks_shuffled(numbers):
    seen = []
    for rank in range(2):
        seen += _ids(numbers.to_torch(batch_size=64, shuffle=True, seed=1, rank=rank, world_size=2))
    assert sorted(seen) == list(range(1000))
    in_order = _ids(numbers.to_torch(batch_size=64, shuffle=True, seed=1))
    assert sorted(in_order) == list(range(1000)) and in_order != list(range(1000))


def test_resume_mid_epoch_equals_the_uninterrupted_epoch(numbers, g):
    kw = dict(batch_size=32, shuffle=True, seed=7)
    whole = _ids(numbers.to_torch(**kw))
    loader = numbers.to_torch(**kw)
    it, first = iter(loader), []
    for _ in range(10):
        first += next(it)["id"].tolist()
    state = json.loads(json.dumps(loader.state_dict()))
    # another process would unpickle the dataset and connect on its own
    fresh = pickle.loads(pickle.dumps(g.dataset("numbers")))
    assert fresh.session._client is None and fresh.fingerprint == numbers.fingerprint
    rest = fresh.to_torch(**kw)
    rest.load_state_dict(state)
    assert first + _ids(rest) == whole


def test_a_rank_fetches_only_its_own_rows(numbers, grid):
    """Shuffled over two ranks, each rank downloads its share of every window, not the window."""
    service = grid.services["datasets"]
    served = []
    for rank in range(2):
        before = service.rows_served
        ids = _ids(numbers.to_torch(batch_size=64, shuffle=True, seed=2, rank=rank, world_size=2,
                                    memory_budget=64 << 10))  # small windows: many fetches per epoch
        served.append((service.rows_served - before, len(ids)))
    for rows, mine in served:
        assert mine <= rows <= mine + 64  # its rows, and at most a batch of padding rows
    assert sum(m for _, m in served) == 1000


def test_spawned_loader_workers_open_their_own_connection(numbers):
    ids = _ids(numbers.to_torch(batch_size=100, shuffle=True, seed=3, num_workers=2, multiprocessing_context="spawn"))
    assert sorted(ids) == list(range(1000))


def test_loader_workers_are_spawned_by_default_over_a_grid_dataset(numbers):
    """A process forked after gRPC ran hangs on its first call: the loader spawns its workers instead."""
    loader = numbers.to_torch(batch_size=100, shuffle=True, seed=3, num_workers=2, timeout=120)
    assert loader._start_method() == "spawn"
    assert sorted(_ids(loader)) == list(range(1000))


def test_malformed_row_lists_in_a_ticket_are_refused(grid):
    import pyarrow.flight as flight

    from tensorgrid.server.griddataset import decode_rows, encode_rows

    rows = np.array([0, 3, 4, 900], dtype=np.int64)
    assert decode_rows(encode_rows(rows), 1000).tolist() == rows.tolist()
    for bad in ([3, 1], [2, 2], [-1, 4]):
        with pytest.raises(ArgumentError):
            encode_rows(np.array(bad))
    client = flight.connect(grid.url)
    for text in ("!!!", encode_rows(np.arange(5000)), "eJzLSM3JyQcABiwCFQ=="):  # not base64; too many; not gaps
        ticket = f"datasets/numbers/0?rows={text}".encode()
        with pytest.raises(flight.FlightError, match="invalid request|outside partition"):
            client.do_get(flight.Ticket(ticket)).read_all()
    client.close()


def test_a_table_is_read_from_one_snapshot_while_others_write(g, grid):
    name = f"snap_{uuid.uuid4().hex[:6]}"
    g.sql(f"CREATE TABLE {name} (id BIGINT PRIMARY KEY, v DOUBLE)")
    g.put(name, pd.DataFrame({"id": np.arange(100), "v": np.zeros(100)}))
    ds = g.dataset(name)
    assert g.dataset(name).fingerprint == ds.fingerprint  # nothing written: the same snapshot
    g.put(name, pd.DataFrame({"id": [0, 100], "v": [1.0, 1.0]}))
    assert ds.to_arrow().column("v").to_pylist() == [0.0] * 100  # the reader's snapshot, not the new rows
    newer = g.dataset(name)
    assert newer.num_rows == 101 and newer.fingerprint != ds.fingerprint
    grid.services["datasets"]._snapshots.clear()  # the server let the old rows go (evicted, restarted)
    assert newer.num_rows == newer.to_arrow().num_rows == 101  # the current rows are taken again: same digest
    with pytest.raises(SnapshotError, match=f"table '{name}' changed since this reader opened it"):
        ds.read_rows(0, 0, 5)


def test_trainer_fits_on_a_grid_dataset(g, grid_digits):
    from tests.train.models import mlp, sgd, to_float

    train = g.dataset("digits")
    assert isinstance(train, GridDataset)
    result = tg.Trainer(model=mlp, loss=torch.nn.CrossEntropyLoss(), optimizer=sgd, features="image",
                        label="label", transform=to_float, batch_size=64, epochs=1, workers=1, engine="local",
                        quiet=True).fit(train)
    assert len(result.history) == 1 and np.isfinite(result.history[0]["loss"])


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 30), min_size=1, max_size=6), data=st.data())
def test_rows_taken_batch_by_batch_equal_arrows_take(sizes, data):
    from tensorgrid.server.datasets import _take_sorted

    start, batches = 0, []
    for n in sizes:
        ids = np.arange(start, start + n)
        batches.append(pa.record_batch({"id": ids, "t": pa.FixedShapeTensorArray.from_numpy_ndarray(
            np.stack([ids, -ids], axis=1).reshape(n, 2, 1).astype(np.float32))}))
        start += n
    table = pa.Table.from_batches(batches)
    rows = np.array(sorted(data.draw(st.sets(st.integers(0, max(0, start - 1)), max_size=start))), dtype=np.int64)
    rows = rows[rows < start]
    assert _take_sorted(table, rows).equals(table.take(pa.array(rows, pa.int64())))
