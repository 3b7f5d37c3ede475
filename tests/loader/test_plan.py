"""Property tests of the epoch plan: exactly once, equal batches per rank, determinism, resume."""

from collections import Counter

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from tensorgrid.loader.plan import Layout, Plan


def layout_of(shard_rows, block):
    blocks = [(s, a, min(a + block, n)) for s, n in enumerate(shard_rows) for a in range(0, n, block)]
    return Layout(tuple(shard_rows), tuple(blocks))


plans = st.fixed_dictionaries({
    "shard_rows": st.lists(st.integers(0, 40), min_size=1, max_size=8).filter(lambda r: sum(r) > 0),
    "block": st.integers(1, 12),
    "batch_size": st.integers(1, 9),
    "world_size": st.integers(1, 4),
    "shuffle": st.booleans(),
    "seed": st.integers(0, 2**31),
    "epoch": st.integers(0, 5),
    "drop_last": st.booleans(),
    "window_rows": st.integers(1, 64),
    "max_chunk_batches": st.one_of(st.none(), st.integers(1, 5)),
    "span_rows": st.one_of(st.none(), st.integers(1, 100)),  # None: whole blocks (states saved before pieces)
    "ramp": st.booleans(),  # the first window's chunks grow from one batch (off when all rows are cached)
})


def all_ranks(p):
    lay = layout_of(p["shard_rows"], p["block"])
    kw = {k: v for k, v in p.items() if k not in ("shard_rows", "block")}
    return [Plan(lay, rank=r, **kw) for r in range(p["world_size"])]


def epoch_rows(plan):
    """(rows, valid) per batch of one rank."""
    out = []
    for k in range(plan.num_batches):
        pos = plan.batch_positions(k)
        out.append((plan.rows_at(pos), pos < plan.num_rows))
    return out


@settings(max_examples=300, deadline=None)
@given(plans)
def test_every_row_exactly_once_and_equal_batch_counts(p):
    ranks = all_ranks(p)
    n = sum(p["shard_rows"])
    counts = {r.num_batches for r in ranks}
    assert len(counts) == 1  # equal number of batches on every rank: DDP never hangs
    seen, pads = Counter(), 0
    for plan in ranks:
        batches = epoch_rows(plan)
        sizes = [len(rows) for rows, _ in batches]
        assert all(s == p["batch_size"] for s in sizes[:-1])
        for rows, valid in batches:
            seen.update(rows[valid].tolist())
            pads += int((~valid).sum())
            assert ((rows >= 0) & (rows < n)).all()
    if p["drop_last"]:
        assert pads == 0
        assert all(c == 1 for c in seen.values())
        assert n - len(seen) < p["world_size"] * p["batch_size"]
        assert all(len(rows) == p["batch_size"] for plan in ranks for rows, _ in epoch_rows(plan))
    else:
        assert sorted(seen) == list(range(n)) and all(c == 1 for c in seen.values())
        assert pads < p["world_size"]
        # every rank's last batch has the same size too
        assert len({len(epoch_rows(plan)[-1][0]) for plan in ranks}) == 1


@settings(max_examples=150, deadline=None)
@given(plans, st.data())
def test_resume_from_any_batch_gives_the_remaining_batches(p, data):
    plan = all_ranks(p)[0]
    if plan.num_batches == 0:
        return
    k = data.draw(st.integers(0, plan.num_batches - 1))
    full = [r.tolist() for r, _ in epoch_rows(plan)]
    fresh = all_ranks(p)[0]  # a new process recomputes the plan from scratch
    resumed = [fresh.rows_at(fresh.batch_positions(j)).tolist() for j in range(k, fresh.num_batches)]
    assert resumed == full[k:]
    # chunks cover batches [k, end) exactly once, in order, each inside one shuffle window
    chunks = [list(fresh.chunk_batches(c, k)) for c in range(fresh.chunk_of(k), fresh.num_chunks)]
    assert [b for c in chunks for b in c] == list(range(k, fresh.num_batches))
    for c in chunks:
        assert c and len(c) <= fresh.batches_per_chunk
        assert len({b // fresh.batches_per_window for b in c}) == 1
    if k == 0 and p["ramp"] and len(chunks) > 1:
        assert len(chunks[0]) == 1  # the epoch's first batch waits for one batch's gather only
    # chunks only group batches: the rows do not depend on them
    other = Plan(fresh.layout, **{**{k2: v for k2, v in p.items() if k2 not in ("shard_rows", "block")},
                                  "ramp": not p["ramp"], "rank": 0})
    assert [other.rows_at(other.batch_positions(j)).tolist() for j in range(k, other.num_batches)] == full[k:]


@settings(max_examples=150, deadline=None)
@given(plans, st.sampled_from([1, 2, 4]), st.data())
def test_global_batches_do_not_depend_on_world_size(p, factor, data):
    """Same global batch, other world size: each global batch holds the same rows, so resume across
    world sizes continues with exactly the remaining rows."""
    g = p["batch_size"] * p["world_size"]
    if g % factor:
        return
    q = dict(p, world_size=factor, batch_size=g // factor)
    a, b = all_ranks(p), all_ranks(q)

    def global_batches(ranks):
        nb = ranks[0].num_batches
        return [sorted(x for r in ranks for x, v in zip(*((lambda pos: (r.rows_at(pos), pos < r.num_rows))
                                                           (r.batch_positions(k)))) if v) for k in range(nb)]

    ga, gb = global_batches(a), global_batches(b)
    if p["drop_last"]:
        assert ga == gb
    else:  # padding depends on the world size; the real rows of every global batch do not
        assert ga == gb


@settings(max_examples=100, deadline=None)
@given(plans)
def test_same_seed_same_order_and_epochs_differ(p):
    a, b = all_ranks(p)[0], all_ranks(p)[0]
    ra = [r.tolist() for r, _ in epoch_rows(a)]
    assert ra == [r.tolist() for r, _ in epoch_rows(b)]
    if p["shuffle"] and sum(p["shard_rows"]) >= 30 and p["world_size"] == 1 and not p["drop_last"]:
        other = all_ranks(dict(p, epoch=p["epoch"] + 1))[0]
        assert [r.tolist() for r, _ in epoch_rows(other)] != ra


def test_shuffle_quality_is_near_zero_rank_correlation():
    lay = layout_of([10_000] * 10, 512)
    plan = Plan(lay, batch_size=256, shuffle=True, seed=3, window_rows=16_384)
    order = np.concatenate([plan.rows_at(plan.batch_positions(k)) for k in range(plan.num_batches)])
    assert sorted(order.tolist()) == list(range(100_000))
    # Spearman correlation between storage position and epoch position (order is a permutation of 0..n-1).
    # Blocks are the unit of the global permutation, so its noise is ~1/sqrt(blocks).
    nblocks = len(lay.blocks)
    rhos = []
    for seed in range(8):
        p = Plan(lay, batch_size=256, shuffle=True, seed=seed, window_rows=16_384)
        o = np.concatenate([p.rows_at(p.batch_positions(k)) for k in range(p.num_batches)])
        rhos.append(np.corrcoef(np.arange(len(o)), o)[0, 1])
    assert max(abs(r) for r in rhos) < 3 / np.sqrt(nblocks - 1)
    assert abs(np.mean(rhos)) < 1.5 / np.sqrt(nblocks - 1)
    # within a window, neighbours in the epoch come from far apart in storage
    assert np.median(np.abs(np.diff(order))) > 1000
    unshuffled = Plan(lay, batch_size=256)
    seq = np.concatenate([unshuffled.rows_at(unshuffled.batch_positions(k)) for k in range(unshuffled.num_batches)])
    assert (seq == np.arange(100_000)).all()


@settings(max_examples=100, deadline=None)
@given(plans)
def test_segments_of_each_window_are_the_rows_the_window_holds(p):
    """The reads a worker makes for a window (segments) cover exactly the rows the plan puts in it."""
    plan = all_ranks(p)[0]
    for j in range(-(-plan.num_rows // plan.window)):
        a, b = plan.window_range(j)
        segs = plan.segments(a, b)
        read = [plan.layout.shard_starts[s] + r for s, lo, hi in segs for r in range(lo, hi)]
        assert len(read) == b - a and sorted(read) == sorted(plan.rows_at(np.arange(a, b)).tolist())


def test_the_first_rows_of_an_epoch_come_from_nearly_every_block():
    """Shuffle quality with the writer's own block size: 1 M records in 100 row groups, the window a 512 MB
    budget gives (108-byte rows), the span half of it: the first 4,096 rows of an epoch touch >= 95% of
    the blocks (whole blocks per window touched ~71%; an exact shuffle ~100%)."""
    rows, blocks = 1_000_000, 100
    per = rows // blocks
    lay = Layout((rows,), tuple((0, a, a + per) for a in range(0, rows, per)))
    budget, row_bytes = 512 << 20, 108
    window = int(budget / 4 / 2 / row_bytes)
    for seed in range(3):
        plan = Plan(lay, 256, shuffle=True, seed=seed, window_rows=window, span_rows=int(budget / 2 / row_bytes))
        first = plan.rows_at(np.arange(4096))
        assert len(np.unique(first // per)) >= 95
        assert sorted(plan.rows_at(np.arange(rows)).tolist()) == list(range(rows))  # still a permutation
    small = Plan(lay, 256, shuffle=True, seed=0, window_rows=40_000, span_rows=80_000)  # a smaller budget
    assert len(np.unique(small.rows_at(np.arange(4096)) // per)) >= 8  # spans of 8 blocks: all of its span
