"""Shared helpers of the trainer tests: a Trainer on digits with small defaults, weight comparisons."""

import torch

import tensorgrid as tg
from tests.train import models


def trainer(**kw):
    base = dict(model=models.mlp, loss=torch.nn.CrossEntropyLoss(), optimizer=models.sgd, features="image",
                label="label", transform=models.to_float, batch_size=64, epochs=2, quiet=True)
    base.update(kw)
    return tg.Trainer(**base)


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same(a, b, atol=1e-5):
    return all(torch.allclose(a[k], b[k], atol=atol) for k in a)
