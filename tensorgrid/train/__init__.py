"""The trainer: data-parallel PyTorch training where the data lives."""

from .trainer import FitResult, Trainer

__all__ = ["Trainer", "FitResult"]
