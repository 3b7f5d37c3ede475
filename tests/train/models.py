"""Module-level model factories and helpers: workers import them by name."""

import torch

from tensorgrid import transforms as T
from tensorgrid.train import Callback


def mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def cnn():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8)), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))


def log_softmax_mlp():
    return torch.nn.Sequential(mlp(), torch.nn.LogSoftmax(dim=1))


def wrong_output():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))


def adam(params):
    return torch.optim.Adam(params, lr=3e-3)


def sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


to_float = T.to_float


def paced_to_float(batch):
    """``to_float`` that takes 20 ms a batch: a run lasts long enough for a test to kill a worker mid-run
    however fast the machine is."""
    import time

    time.sleep(0.02)
    return T.to_float(batch)


def ce(out, y):
    """Cross-entropy as a plain function: no per-row values for the trainer to mask."""
    return torch.nn.functional.cross_entropy(out, y)


def ce_step(model, batch):
    return torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])


def noisy_high_labels(batch):
    """A random augmentation whose number of draws depends on the data: noise on rows labelled 5 or more."""
    batch = T.to_float(batch)
    high = batch["label"] >= 5
    batch["image"][high] += 0.1 * torch.rand(int(high.sum()), *batch["image"].shape[1:])
    return batch


class RankOneFails(torch.nn.Module):
    """Fails in forward on rank 1 of a multi-worker run only."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("rank one refuses")
        return self.net(x)


def rank_one_fails():
    return RankOneFails()


def nan_images(batch):
    batch = T.to_float(batch)
    batch["image"][:] = float("nan")
    return batch


_steps = [0]


def hang_on_rank_one(model, batch):
    """A step that sleeps for an hour on rank 1's third step (a hung worker, alive but silent)."""
    import time

    _steps[0] += 1
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1 and _steps[0] == 3:
        time.sleep(3600)
    return ce_step(model, batch)


def exit_on_rank_one(model, batch):
    """A step that ends rank 1's process with exit code 0 on its third step (no error, no result)."""
    import os

    _steps[0] += 1
    if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1 and _steps[0] == 3:
        os._exit(0)
    return ce_step(model, batch)


# --- training callbacks (tests/train/test_callbacks.py) ------------------------------------------------

class StopAfterEpoch(Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, state):
        if state.epoch == self.epoch:
            state.should_stop = True


class StopAtStep:
    """A duck-typed callback (no base class) that stops the run after a given step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state):
        if state.step == self.step:
            state.should_stop = True


class Recorder(Callback):
    """Records what every hook saw (on rank 0; the driver's object gets these attributes back)."""

    def __init__(self):
        self.rows, self.events, self.batch_losses = [], [], []

    def on_train_start(self, state):
        self.events.append(("start", state.epoch, state.step, state.samples, state.world_size))

    def on_step_end(self, state):
        self.batch_losses.append(state.batch_loss)

    def on_epoch_end(self, state):
        self.rows.append(state.metrics)
        self.events.append(("epoch", state.epoch, state.step, state.samples, len(state.history), state.checkpoint))

    def on_train_end(self, state):
        self.events.append(("end", state.epoch, state.step, state.samples, state.metrics == state.history[-1]))


class FailsAtEpochEnd(Callback):
    def on_epoch_end(self, state):
        raise ValueError("no metrics today")
