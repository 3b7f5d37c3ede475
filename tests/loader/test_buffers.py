"""Gathers reuse their output blocks (loader/buffers.py) once nothing refers to them: a batch a user keeps
is never written over by a later window or epoch, and blocks are reused when batches are dropped."""

import numpy as np
import pyarrow as pa
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tensorgrid as tg
from tensorgrid.loader import buffers
from tensorgrid.loader.buffers import BufferPool


def test_a_block_is_handed_out_again_only_when_nothing_refers_to_it():
    pool = BufferPool(1 << 30)
    a = pool.empty((600, 1000), np.float32)
    t = torch.from_numpy(a[:, 3])  # a tensor view of one column keeps the block
    del a
    b = pool.empty((600, 1000), np.float32)
    assert (pool.made, pool.reused) == (2, 0)
    b[:] = 7
    del t
    c = pool.empty((500, 1000), np.float32)  # fits the first block (not more than twice its size)
    assert (pool.made, pool.reused) == (2, 1)
    assert (b == 7).all(), "the held block was not written"
    view = c.reshape(-1)[5:]  # a numpy view of a view keeps it too
    del c, b
    d = pool.empty((600, 1000), np.float32)
    assert pool.reused == 2 and not np.shares_memory(d, view)


def test_the_pool_holds_at_most_its_bytes_of_free_blocks():
    pool = BufferPool(8 << 20)
    for n in (1, 2, 3, 4, 5):
        pool.empty((n << 20,), np.uint8)  # each dropped at once: free, but too small for the next
    assert sum(b.nbytes for b in pool._blocks) <= 8 << 20
    small = pool.empty((10,), np.int64)  # below MIN_BYTES: plain numpy
    assert small.shape == (10,) and pool.made == 5


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(3, 40), window=st.integers(20, 300), keep=st.integers(1, 4), cached=st.booleans())
def test_batches_kept_by_the_user_keep_their_values_while_later_windows_reuse_blocks(
        tmp_path_factory, batch, window, keep, cached):
    d = tmp_path_factory.mktemp("b")
    n = 900
    rng = np.random.default_rng(1)
    table = pa.table({"id": np.arange(n), "x": rng.standard_normal(n).astype(np.float32),
                      "y": rng.standard_normal(n).astype(np.float32),
                      "image": pa.FixedShapeTensorArray.from_numpy_ndarray(
                          rng.integers(0, 255, (n, 16, 16), dtype=np.uint8))})
    ds = tg.write(f"{d}/t", table, shard_rows=250)
    saved = buffers.MIN_BYTES
    buffers.MIN_BYTES = 0  # every gather through the pool, however small
    try:
        loader = ds.to_torch(batch_size=batch, shuffle=True, seed=5, shuffle_buffer=window,
                             cache_dir=f"{d}/c" if cached else False)
        kept, copies = [], []
        for epoch in range(3):
            for i, b in enumerate(loader):
                b["x"].fill_(-1.0)  # a user writing into each batch: it stays in that batch
                if epoch == 0 and i % keep == 0:  # some batches of the first epoch are held as they are
                    kept.append(b)
                    copies.append({k: v.clone() for k, v in b.items()})
        assert loader.source.buffers.reused > 0, "dropped batches' blocks are reused"
        seen = []
        for b, c in zip(kept, copies):
            assert b.keys() == c.keys()
            for k in b:
                assert torch.equal(b[k], c[k]), f"a kept batch's {k} changed"
            assert torch.equal(b["image"], torch.from_numpy(np.array(
                table.column("image").combine_chunks().to_numpy_ndarray()))[b["id"]])
            seen += b["id"].tolist()
        assert len(set(seen)) == len(seen)
    finally:
        buffers.MIN_BYTES = saved
