"""Machine-learning stages over TensorGrid datasets (the layer above the trainer): Spark-ML-style estimators
and transformers for PyTorch (``NNEstimator``, ``NNClassifier``, ``NNModel``, ``Pipeline``), evaluators."""

from . import evaluate
from .images import read_images
from .stages import FormatVersionError, NNClassifier, NNEstimator, NNModel, Pipeline, PipelineModel

__all__ = ["evaluate", "read_images", "NNEstimator", "NNClassifier", "NNModel", "Pipeline", "PipelineModel", "FormatVersionError"]
