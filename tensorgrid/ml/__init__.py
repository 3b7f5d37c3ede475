"""Machine-learning stages over TensorGrid datasets (the layer above the trainer): Spark-ML-style estimators
and transformers for PyTorch (``NNEstimator``, ``NNClassifier``, ``NNModel``, ``Pipeline``), evaluators, model
files (TorchScript, ONNX) and pretrained weights from any URL."""

from . import evaluate
from .images import read_images
from .stages import (
           FormatVersionError,
           NNClassifier,
           NNEstimator,
           NNModel,
           Pipeline,
           PipelineModel,
           load_model,
)
from .weights import load_weights

__all__ = ["evaluate", "read_images", "NNEstimator", "NNClassifier", "NNModel", "Pipeline", "PipelineModel",
           "FormatVersionError", "load_model", "load_weights"]
