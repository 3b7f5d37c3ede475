"""Every malformed loader argument or resume state is a one-line named error, never a traceback."""

import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.errors import ArgumentError, ResumeError, TensorGridError
from tests.loader.helpers import make


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make(str(tmp_path_factory.mktemp("a") / "d"), n=300, shard_rows=100)


def one_line(error) -> str:
    text = str(error)
    assert "\n" not in text and len(text) < 400, text
    return text


@pytest.mark.parametrize("kw, needle", [
    (dict(rank=0.5, world_size=2), "rank must be an int"),
    (dict(rank="0", world_size=2), "rank must be an int"),
    (dict(rank=2, world_size=2), r"rank must be an int in \[0, 1\], got 2"),
    (dict(world_size=0), "world_size must be an int >= 1"),
    (dict(world_size=True), "world_size must be an int"),
    (dict(shuffle_buffer="10"), "shuffle_buffer must be an int >= 1"),
    (dict(shuffle_buffer=0), "shuffle_buffer must be an int >= 1"),
    (dict(timeout=-1), "timeout must be a finite number >= 0"),
    (dict(timeout=math.nan), "timeout must be a finite number"),
    (dict(timeout=math.inf), "timeout must be a finite number"),
    (dict(timeout="5"), "timeout must be a finite number"),
    (dict(batch_size=2.0), "batch_size must be an int"),
    (dict(num_workers=-1), "num_workers must be an int >= 0"),
    (dict(prefetch=0), "prefetch must be an int >= 1"),
    (dict(memory_budget=1.5), "memory_budget must be an int"),
    (dict(cache_limit=-1), "cache_limit must be an int >= 0"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(shuffle="yes"), "shuffle must be one of"),
    (dict(drop_last=None), "drop_last must be one of"),
    (dict(multiprocessing_context="threads"), "multiprocessing_context must be one of"),
    (dict(multiprocessing_context=3), "multiprocessing_context must be one of"),
    (dict(transform=3), "transform must be callable"),
    (dict(cache_dir=3), "cache_dir must be a folder path"),
])
def test_bad_loader_arguments_are_argument_errors(ds, kw, needle):
    with pytest.raises(ArgumentError, match=needle) as e:
        ds.to_torch(batch_size=kw.pop("batch_size", 4), **kw)
    assert isinstance(e.value, (TensorGridError, ValueError))
    one_line(e.value)


def test_cache_dir_that_is_an_existing_file(ds, tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    with pytest.raises(ArgumentError, match="is an existing file, not a folder"):
        ds.to_torch(batch_size=4, cache_dir=str(f))
    with pytest.raises(ArgumentError, match="cannot be created"):
        ds.to_torch(batch_size=4, cache_dir=str(f / "below"))


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "abc", "WORLD_SIZE": "2"}, r"\$RANK must be an int, got 'abc'"),
    ({"RANK": "0", "WORLD_SIZE": "abc"}, r"\$WORLD_SIZE must be an int, got 'abc'"),
    ({"RANK": "3", "WORLD_SIZE": "2"}, r"rank \(from the environment\) must be an int in \[0, 1\], got 3"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"world_size \(from the environment\) must be an int >= 1"),
])
def test_rank_and_world_size_from_a_bad_environment(ds, monkeypatch, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ArgumentError, match=needle) as e:
        ds.to_torch(batch_size=4)
    one_line(e.value)
    assert ds.to_torch(batch_size=4, rank=0, world_size=1).rank == 0  # given explicitly: no environment read


def test_good_values_of_every_type_still_work(ds):
    loader = ds.to_torch(batch_size=np.int64(4), rank=np.int32(1), world_size=2, shuffle=np.bool_(True),
                         drop_last=0, timeout=np.float32(3), shuffle_buffer=np.int64(50), seed=-7,
                         multiprocessing_context="spawn")
    assert (loader.rank, loader.world_size, loader.shuffle, loader.drop_last, loader.timeout) == (1, 2, True, False, 3.0)
    assert len(list(loader)) == len(loader) > 0


@pytest.mark.parametrize("change, needle", [
    (dict(batch=-5), r"the state's batch must be an int in \[0, 75\], got -5"),
    (dict(batch=76), r"the state's batch must be an int in \[0, 75\], got 76"),
    (dict(batch="3"), "the state's batch must be an int"),
    (dict(batch=2.0), "the state's batch must be an int"),
    (dict(epoch="x"), "the state's epoch must be an int"),
    (dict(epoch=-1), r"the state's epoch must be an int >= 0, got -1"),
    (dict(epoch=None), "the state's epoch must be an int"),
    (dict(seed="0"), "the state has seed='0'"),
    (dict(shuffle="False"), "the state has shuffle='False'"),
    (dict(global_batch=[4]), "the state has global_batch=\\[4\\]"),
    (dict(num_rows=np.arange(3)), "the state has num_rows=array"),
    (dict(drop_last={}), "the state has drop_last={}"),
    (dict(fingerprint=17), "saved over other data"),
])
def test_malformed_states_are_resume_errors(ds, change, needle):
    loader = ds.to_torch(batch_size=4)
    state = {**loader.state_dict(), **change}
    with pytest.raises(ResumeError, match=needle) as e:
        loader.load_state_dict(state)
    one_line(e.value)
    assert (loader.epoch, len(list(loader))) == (0, 75)  # refused states change nothing


def test_set_epoch_refuses_what_is_not_an_epoch(ds):
    loader = ds.to_torch(batch_size=4)
    for bad in (-1, "1", 1.0, None):
        with pytest.raises(ArgumentError, match="epoch must be an int >= 0"):
            loader.set_epoch(bad)
    loader.set_epoch(np.int64(2))
    assert loader.epoch == 2


# --- fuzz ---------------------------------------------------------------------------------------
junk = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**6), st.floats(allow_nan=True),
                 st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                           st.integers(), max_size=1))
small_int = st.integers(-2, 6)


def arguments():
    values = {"batch_size": st.one_of(st.integers(-1, 40), junk), "rank": st.one_of(small_int, junk),
              "world_size": st.one_of(small_int, junk), "shuffle": st.one_of(st.booleans(), junk),
              "seed": st.one_of(st.integers(), junk), "num_workers": st.one_of(st.just(0), junk.filter(lambda v: not isinstance(v, int) or v < 1)),
              "drop_last": st.one_of(st.booleans(), junk), "prefetch": st.one_of(small_int, junk),
              "shuffle_buffer": st.one_of(st.none(), st.integers(-1, 500), junk),
              "memory_budget": st.one_of(st.none(), st.integers(-1, 1 << 20), junk),
              "timeout": st.one_of(st.floats(-1, 10), junk), "cache_limit": st.one_of(st.none(), small_int, junk),
              "multiprocessing_context": st.one_of(st.sampled_from([None, "fork", "spawn", "nope"]), junk),
              "columns": st.one_of(st.none(), st.sampled_from([["id"], "x", ["nope"], []]), junk)}
    return st.fixed_dictionaries({}, optional=values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kw=arguments())
def test_fuzzed_arguments_give_a_working_loader_or_a_named_error(ds, kw):
    kw.setdefault("batch_size", 8)
    try:
        loader = ds.to_torch(**kw)
    except TensorGridError:
        return
    assert len(loader) >= 0
    next(iter(loader), None)


def states():
    fields = {"epoch": st.one_of(st.integers(-2, 5), junk), "batch": st.one_of(st.integers(-2, 80), junk),
              "seed": st.one_of(st.just(0), junk), "shuffle": st.one_of(st.booleans(), junk),
              "global_batch": st.one_of(st.just(4), junk), "num_rows": st.one_of(st.just(300), junk),
              "drop_last": st.one_of(st.just(False), junk), "layout": st.one_of(st.text(max_size=16), junk),
              "window": st.one_of(st.integers(0, 10**6), junk), "fingerprint": st.one_of(st.text(max_size=8), junk),
              "url": junk, "version": junk}
    return st.one_of(junk, st.fixed_dictionaries({}, optional=fields))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=states(), shuffle=st.booleans())
def test_fuzzed_states_load_or_raise_resume_error(ds, state, shuffle):
    loader = ds.to_torch(batch_size=4, shuffle=shuffle)
    good = loader.state_dict()
    if isinstance(state, dict):
        state = {**{k: good[k] for k in ("epoch", "batch") if k not in state and len(state) % 2}, **state}
    try:
        loader.load_state_dict(state)
    except TensorGridError:
        assert (loader.epoch, loader.state_dict()["batch"]) == (0, 0)
        return
    assert sum(1 for _ in loader) == len(loader) - state["batch"]


def test_in_memory_data_checks_the_same(ds):
    loader = tg.from_arrow(pa.table({"id": np.arange(10)})).to_torch(batch_size=2)
    with pytest.raises(ResumeError, match="the state's batch"):
        loader.load_state_dict({**loader.state_dict(), "batch": -5})


def test_the_plan_checks_its_counts_the_same_way():
    from tensorgrid.loader import Layout, Plan

    layout = Layout((10,), ((0, 0, 10),))
    for kw, needle in ((dict(batch_size=0), "batch_size must be an int >= 1"),
                       (dict(batch_size=2, rank=2, world_size=2), r"rank must be an int in \[0, 1\]"),
                       (dict(batch_size=2.5), "batch_size must be an int")):
        with pytest.raises(ArgumentError, match=needle):
            Plan(layout, **kw)
