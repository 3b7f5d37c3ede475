"""The trainer: data-parallel PyTorch training where the data lives; batch inference of any model."""

from .callbacks import Callback, CallbackError, TrainState
from .checkpoint import load_weights
from .features import stack_features
from .monitors import BestCheckpoint, EarlyStopping
from .predict import predict
from .trainer import FitResult, Trainer

__all__ = ["Trainer", "FitResult", "Callback", "CallbackError", "TrainState", "predict", "stack_features",
           "EarlyStopping", "BestCheckpoint", "load_weights"]
