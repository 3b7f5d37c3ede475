"""Machine-learning stages over TensorGrid datasets (the layer above the trainer): evaluators so far."""

from . import evaluate

__all__ = ["evaluate"]
