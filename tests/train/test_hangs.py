"""A rank that hangs or exits early is named, not the peer that then fails waiting for it (real worker
processes, short collective timeouts)."""

import time

import pytest

import tensorgrid as tg
from tests.train import models
from tests.train.helpers import trainer


def test_a_hung_rank_is_named_not_the_peer_that_timed_out(halves):
    a, _ = halves
    t0 = time.time()
    with pytest.raises(tg.WorkerFailedError) as e:
        trainer(loss=None, step=models.hang_on_rank_one, workers=2, timeout_s=4).fit(a)
    msg = str(e.value)
    assert msg.startswith("worker rank 1 (pid "), msg
    assert "stopped making progress" in msg and "it hung" in msg and "timeout_s=4" in msg
    assert time.time() - t0 < 240  # the hung rank sleeps for an hour: the run ended without it


def test_a_rank_that_exits_0_early_is_named(halves):
    a, _ = halves
    t0 = time.time()
    with pytest.raises(tg.WorkerFailedError) as e:
        trainer(loss=None, step=models.exit_on_rank_one, workers=2, timeout_s=600).fit(a)
    msg = str(e.value)
    assert msg.startswith("worker rank 1 (pid "), msg
    assert "exited before the end of training without reporting an error" in msg
    assert time.time() - t0 < 240  # its peer notices the closed connection: no wait for timeout_s=600
