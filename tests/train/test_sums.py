"""Epoch sums kept on the device: exact, and carried over from a checkpoint."""

import torch

from tensorgrid.train.losses import Sums


def test_sums_accumulate_like_python_and_read_once():
    rng = torch.Generator().manual_seed(0)
    losses = [torch.rand((), generator=rng) * 3 for _ in range(500)]
    hits = [torch.randint(0, 33, (), generator=rng) for _ in range(500)]
    s = Sums(base=(1.5, 2.0, 10))  # what a checkpoint carried over
    for i, (ls, c) in enumerate(zip(losses, hits)):
        s.add(ls, c, 32)
        if i == 250:
            mid = s.values()  # a mid-epoch checkpoint reads, and accumulation goes on
            assert mid[2] == 10 + 251 * 32
    ls, c, n = s.values()
    assert abs(ls - (1.5 + sum(float(x) for x in losses))) < 1e-9
    assert c == 2.0 + sum(int(x) for x in hits) and n == 10 + 500 * 32
    assert s.values() == [ls, c, n]  # reading twice changes nothing

