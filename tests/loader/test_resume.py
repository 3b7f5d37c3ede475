"""A loader state resumes only over the rows it was saved over (Dataset.fingerprint) and in the same order."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tensorgrid as tg
from tensorgrid.errors import ResumeError
from tests.loader.helpers import ids, make

KW = dict(batch_size=16, shuffle=True, seed=3, shuffle_buffer=64)


def stopped_after(loader, k: int) -> dict:
    """The state after k batches, through JSON (as a checkpoint would keep it)."""
    it = iter(loader)
    for _ in range(k):
        next(it)
    return json.loads(json.dumps(loader.state_dict()))


def test_a_state_from_another_dataset_with_as_many_rows_is_refused(tmp_path):
    """Before: accepted (only the row count was compared), and the run went on over other rows."""
    a = make(str(tmp_path / "a"), n=300, shard_rows=100)
    b = tg.write(str(tmp_path / "b"), pd.DataFrame({"id": np.arange(300) + 1000, "x": list(np.zeros((300, 4), np.float32)),
                                                    "name": ["b"] * 300}), shard_rows=100)
    state = stopped_after(a.to_torch(**KW), 3)
    with pytest.raises(ResumeError, match=r"saved over other data \(another dataset, or this one before an "
                                          r"append/overwrite\): it read .*/a' version 1, this loader reads .*/b' version 1"):
        b.to_torch(**KW).load_state_dict(state)


def test_a_state_saved_before_an_overwrite_with_as_many_rows_is_refused(tmp_path):
    url = str(tmp_path / "d")
    state = stopped_after(make(url, n=300, shard_rows=100).to_torch(**KW), 3)
    tg.write(url, pd.DataFrame({"id": -np.arange(300), "x": list(np.ones((300, 4), np.float32)), "name": ["n"] * 300}),
             mode="overwrite", shard_rows=100)
    with pytest.raises(ResumeError, match="saved over other data.* version 1, this loader reads .* version 2"):
        tg.open(url).to_torch(**KW).load_state_dict(state)


def test_a_state_saved_before_an_append_says_the_data_changed_not_the_layout(tmp_path):
    """Before: under shuffle the message blamed 'another block layout (cache_dir on or off...)'."""
    url = str(tmp_path / "d")
    state = stopped_after(make(url, n=300, shard_rows=100).to_torch(**KW), 3)
    tg.write(url, pd.DataFrame({"id": [300], "x": [np.zeros(4, np.float32)], "name": ["new"]}), mode="append")
    for shuffle in (True, False):
        with pytest.raises(ResumeError, match="saved over other data") as e:
            tg.open(url).to_torch(**{**KW, "shuffle": shuffle}).load_state_dict({**state, "shuffle": shuffle})
        assert "layout" not in str(e.value)
    assert stopped_after(tg.open(url, version=1).to_torch(**KW), 0)["fingerprint"] == state["fingerprint"]


def test_the_same_rows_under_another_spelling_of_the_url_resume_exactly(tmp_path):
    """A path and file://path (and a folder and its glob) are the same data: the same fingerprint."""
    make(str(tmp_path / "d"), n=300, shard_rows=100)
    folder = tmp_path / "parquet"
    folder.mkdir()
    t = pa.table({"id": np.arange(300)})
    for i in range(3):
        pq.write_table(t.slice(100 * i, 100), folder / f"part-{i}.parquet", row_group_size=30)
    for saved, resumed in ((str(tmp_path / "d"), f"file://{tmp_path}/d"), (str(folder), f"file://{folder}"),
                           (f"{folder}/*.parquet", str(folder))):
        full = ids(tg.open(saved).to_torch(**KW))
        state = stopped_after(tg.open(saved).to_torch(**KW), 5)
        loader = tg.open(resumed).to_torch(**KW)
        loader.load_state_dict(state)
        assert ids(loader) == full[5:]


def test_in_memory_tables_resume_over_equal_content_only():
    t = pa.table({"id": np.arange(200)})
    state = stopped_after(tg.from_arrow(t).to_torch(**KW), 2)
    again = tg.from_arrow(pa.table({"id": np.arange(200)})).to_torch(**KW)  # another table, equal content
    again.load_state_dict(state)
    assert ids(again) == ids(tg.from_arrow(t).to_torch(**KW))[2:]
    with pytest.raises(ResumeError, match="saved over other data"):
        tg.from_arrow(pa.table({"id": np.arange(200) * 2})).to_torch(**KW).load_state_dict(state)


def test_states_saved_before_fingerprints_still_load(tmp_path):
    ds = make(str(tmp_path / "d"), n=300, shard_rows=100)
    full = ids(ds.to_torch(**KW))
    state = stopped_after(ds.to_torch(**KW), 4)
    old = {k: v for k, v in state.items() if k not in ("fingerprint", "window")}  # the format before
    loader = ds.to_torch(**KW)
    loader.load_state_dict(old)
    assert ids(loader) == full[4:]


def test_the_order_and_a_state_do_not_depend_on_the_cache(tmp_path):
    """Before: the cache had its own block layout, so the same seed ordered the rows differently with the cache
    on and off, and a state could not move between the two. Now the blocks are the data's: one order, and a
    state taken with the cache off (or before it filled) resumes with it on, and back."""
    df = pd.DataFrame({"id": np.arange(300), "a": [np.zeros(400, np.float32)] * 300})
    ds = tg.write(str(tmp_path / "d"), df, shard_rows=200)  # shards larger than one row group
    off = dict(batch_size=4, shuffle=True, seed=5, cache_dir=False)
    on = {**off, "cache_dir": str(tmp_path / "c")}
    full = ids(ds.to_torch(**off))
    assert ids(ds.to_torch(**on)) == full
    for a, b in ((off, on), (on, off)):
        resumed = ds.to_torch(**b)
        resumed.load_state_dict(stopped_after(ds.to_torch(**a), 7))
        assert ids(resumed) == full[7:]


def test_a_state_with_another_shuffle_window_is_refused(tmp_path):
    """The window (shuffle_buffer, or memory_budget / row size) decides the order. Before: a state moved to
    a loader with another window resumed silently, repeating some rows and skipping others."""
    ds = make(str(tmp_path / "d"), n=300, shard_rows=100)
    state = stopped_after(ds.to_torch(**KW), 4)
    for other in (dict(shuffle_buffer=128), dict(shuffle_buffer=None, memory_budget=4096)):
        with pytest.raises(ResumeError, match=r"shuffle window holds 64 rows, this loader's \d+ \(keep memory_budget "
                                              r"and shuffle_buffer as they were\)"):
            ds.to_torch(**{**KW, **other}).load_state_dict(state)
    unshuffled = ds.to_torch(**{**KW, "shuffle": False, "shuffle_buffer": 128})
    unshuffled.load_state_dict({**stopped_after(ds.to_torch(**{**KW, "shuffle": False}), 4)})  # no window then
    assert ids(unshuffled)[0] == list(range(64, 80))


def test_a_state_saved_after_resuming_a_pre_pieces_state_resumes_again(tmp_path):
    """A state from before pieces (no "span") resumes in whole-block order; the state saved from there
    ("span": 0) must resume in that order again (a second crash, or max_restarts)."""
    ds = make(str(tmp_path / "d"), n=300, shard_rows=100)
    whole_blocks = ds.to_torch(**KW)
    whole_blocks.span_rows = None  # the order before pieces
    full = ids(whole_blocks)
    old = ds.to_torch(**KW)
    old.span_rows = None
    state = stopped_after(old, 3)
    state.pop("span")
    first = ds.to_torch(**KW)
    first.load_state_dict(state)
    it = iter(first)
    for _ in range(2):
        next(it)
    again = ds.to_torch(**KW)
    again.load_state_dict(first.state_dict())
    assert ids(again) == full[5:]
