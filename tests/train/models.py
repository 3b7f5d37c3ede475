"""Module-level model factories and helpers: workers import them by name."""

import torch

from tensorgrid import transforms as T


def mlp():
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def cnn():
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8)), torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(32 * 16, 10))


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
