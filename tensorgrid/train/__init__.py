"""The trainer: data-parallel PyTorch training where the data lives; batch inference of any model."""

from .callbacks import Callback, CallbackError, TrainState
from .features import stack_features
from .predict import predict
from .trainer import FitResult, Trainer

__all__ = ["Trainer", "FitResult", "Callback", "CallbackError", "TrainState", "predict", "stack_features"]
