"""Spark-ML-style stages for PyTorch: ``NNEstimator`` / ``NNClassifier`` (fit -> ``NNModel``), ``NNModel``
(a transformer: batch inference that adds a column), ``Pipeline`` / ``PipelineModel`` (fit and transform in
order, save and load). Training runs on the Trainer (any engine), inference through ``tg.predict``.

Names follow Spark ML and BigDL: ``criterion``, ``max_epoch``, ``features_col``, ``label_col``,
``prediction_col``, ``probability_col``; ``batch_size`` is the global batch, as in the Trainer. The engine
and the number of workers are ``fit`` arguments (``fit(data, engine="local", workers=2)``), for stages and
pipelines alike. ``get_params()``, ``copy(**changes)`` and ``set_<param>(value)`` work like scikit-learn's
and Spark ML's, so a pipeline can be refit with other settings.
"""

from __future__ import annotations

import copy as _copy
import inspect
import io
import json
import os
import uuid

import cloudpickle
import torch

from .. import fs as tgfs
from ..args import check_choice, check_int
from ..errors import ArgumentError, ModelLoadError, TensorGridError
from ..store.dataset import Dataset
from ..train.engines import ENGINES
from ..train.predict import Inference, predict
from ..train.trainer import Trainer
from . import inference

FORMAT = 1  # the saved pipeline's layout; another one is refused with FormatVersionError


class FormatVersionError(TensorGridError):
    """A saved pipeline written in a layout this version cannot read."""


class _Stage:
    """Parameters are the constructor's arguments: ``get_params``, ``copy`` and ``set_<name>`` follow them."""

    _attrs: dict = {}  # a parameter kept under another attribute name (NNModel's transform: the verb's name)

    def get_params(self) -> dict:
        return {name: getattr(self, self._attrs.get(name, name))
                for name in inspect.signature(type(self).__init__).parameters if name != "self"}

    def copy(self, **changes):
        """A new stage with the same parameters (deep-copied: a module is not shared) except ``changes``."""
        unknown = set(changes) - set(self.get_params())
        if unknown:
            raise ArgumentError(f"{type(self).__name__} has no parameter {sorted(unknown)[0]!r}; parameters: "
                                f"{sorted(self.get_params())}")
        return type(self)(**{**_copy.deepcopy(self.get_params()), **changes})

    def __getattr__(self, name: str):
        if name.startswith("set_") and name[4:] in inspect.signature(type(self).__init__).parameters:
            def setter(value):
                setattr(self, self._attrs.get(name[4:], name[4:]), value)
                return self
            return setter
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.get_params().items() if not isinstance(v, torch.nn.Module)}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


class NNModel(_Stage):
    """A transformer: ``model`` (an ``nn.Module``, or a TorchScript file's path) over every row of the
    ``features_col`` column(s) (after ``transform``), adding ``prediction_col`` (and ``probability_col``
    with ``classifier=True``: softmax of the outputs, ``prediction`` their argmax). As a frozen backbone
    (``prediction_col="embedding"``) its outputs are the features of the next stage."""

    _attrs = {"transform": "transform_fn"}  # ``transform`` is also the verb (Spark ML's)

    def __init__(self, model, transform=None, features_col="features", prediction_col: str = "prediction",
                 batch_size: int = 256, classifier: bool = False, probability_col: str = "probability"):
        self.model, self.transform_fn, self.features_col = model, transform, features_col
        self.prediction_col, self.batch_size, self.classifier = prediction_col, batch_size, classifier
        self.probability_col = probability_col

    def module(self) -> torch.nn.Module:
        if isinstance(self.model, torch.nn.Module):
            return self.model
        if isinstance(self.model, (str, os.PathLike)):
            return load_model(os.fspath(self.model))
        raise ArgumentError(f"model must be an nn.Module, a TorchScript file or an ONNX file, got "
                            f"{type(self.model).__name__}")

    def transform(self, data, out: str | None = None, mode: str = "create", engine: str = "local",
                  workers: int = 1, part_rows: int | None = None) -> Dataset:
        """The data's columns (but the features) plus the predictions; written to ``out`` when given.

        With ``out`` or ``workers > 1`` the rows go in parts (``part_rows`` each; by default at least 16,384
        and at most 1,000 parts), spread over ``workers`` on ``engine`` ("local" processes, "ray", "spark"),
        each part written whole as it is done: a rerun after a crash computes only the parts still missing
        (``self.last_run`` says how many were computed and reused), then one version is committed."""
        check_choice("engine", engine, ENGINES)
        workers = check_int("workers", workers, 1)
        model = self.module()  # a file that does not load fails here, before any worker starts
        settings = dict(transform=self.transform_fn, batch_size=self.batch_size, classifier=self.classifier,
                        prediction_col=self.prediction_col, probability_col=self.probability_col)
        if out is None and workers == 1 and engine == "local":  # in this process, in one pass, in memory
            self.last_run = {"parts": 1, "computed": 1, "reused": 0}
            return predict(model, data, self.features_col, **settings)
        job = Inference(data, self.features_col, **settings)
        source = model if isinstance(self.model, torch.nn.Module) else (load_model, os.fspath(self.model))
        ds, self.last_run = inference.run(source, job, out, mode, engine, workers, part_rows)
        return ds


def load_model(url: str) -> torch.nn.Module:
    """A model file as a module: ONNX (``.onnx``, through onnxruntime) or TorchScript."""
    if url.lower().endswith(".onnx"):
        from . import onnx

        return onnx.load(url)
    fs, path = tgfs.resolve(url)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{url}: no such model file") from None
    except OSError as e:
        raise ModelLoadError(f"{url}: cannot be read ({e})") from None
    try:
        return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except (RuntimeError, ValueError) as e:
        raise ModelLoadError(f"{url}: not a TorchScript file torch.jit.load reads ({e})"[:300]) from None


class NNEstimator(_Stage):
    """An estimator: ``fit`` trains ``model`` with ``criterion`` on the Trainer and returns an ``NNModel``.
    ``optimizer``: a function of the model's parameters (default Adam, lr 1e-3)."""

    classifier = False

    def __init__(self, model, criterion, optimizer=None, batch_size: int = 32, max_epoch: int = 10,
                 features_col="features", label_col: str = "label", transform=None,
                 prediction_col: str = "prediction", seed: int = 0):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.batch_size, self.max_epoch = batch_size, max_epoch
        self.features_col, self.label_col, self.transform = features_col, label_col, transform
        self.prediction_col, self.seed = prediction_col, seed

    def fit(self, data, engine: str = "local", workers: int = 1, val=None) -> NNModel:
        # the Trainer trains a copy of a module (or calls a factory): this estimator's model stays untrained
        trainer = Trainer(self.model, loss=self.criterion, optimizer=self.optimizer, features=self.features_col,
                          label=self.label_col, transform=self.transform, batch_size=self.batch_size,
                          epochs=self.max_epoch, workers=workers, engine=engine, seed=self.seed, quiet=True,
                          metrics=("accuracy",) if self.classifier else ())
        result = trainer.fit(data, val=val)
        fitted = NNModel(result.model, transform=self.transform, features_col=self.features_col,
                         prediction_col=self.prediction_col, batch_size=max(self.batch_size, 256),
                         classifier=self.classifier)
        fitted.history = result.history
        return fitted


class NNClassifier(NNEstimator):
    """``NNEstimator`` for integer class labels (``label_col``): the fitted model's ``prediction`` is the
    argmax of its outputs and ``probability`` their softmax."""

    classifier = True


class PipelineModel(_Stage):
    """Fitted stages, applied in order by ``transform``; ``save(url)`` / ``PipelineModel.load(url)``."""

    def __init__(self, stages: list):
        self.stages = list(stages)

    def transform(self, data, out: str | None = None, mode: str = "create", engine: str = "local",
                  workers: int = 1) -> Dataset:
        """Each stage's transform in order (``engine``/``workers`` apply to each NNModel); only the result
        is written to ``out``."""
        for stage in self.stages[:-1]:
            data = _apply(stage, data, engine=engine, workers=workers)
        return _apply(self.stages[-1], data, out=out, mode=mode, engine=engine, workers=workers)

    def save(self, url: str) -> str:
        """Each stage (its parameters and module, pickled by value) and a manifest naming the format, under
        ``url`` (any URL the store takes). Stage files get fresh names and the manifest is replaced last, whole:
        a reader sees the earlier save or this one, never a mix; the earlier save's stage files go after."""
        fs, root = tgfs.resolve(os.fspath(url))
        fs.makedirs(root, exist_ok=True)
        before = _stage_files(fs, root)
        tag = uuid.uuid4().hex[:12]
        names = []
        for i, stage in enumerate(self.stages):
            name = f"stage-{i}-{tag}.pkl"
            tgfs.put_atomic(fs, f"{root}/{name}", cloudpickle.dumps(stage))
            names.append({"file": name, "class": type(stage).__name__})
        manifest = {"format": FORMAT, "kind": "tensorgrid.ml.PipelineModel", "stages": names}
        tgfs.put_atomic(fs, f"{root}/pipeline.json", json.dumps(manifest, indent=1).encode())
        for name in before:
            try:
                fs.rm(f"{root}/{name}")
            except FileNotFoundError:
                pass
        return url

    @classmethod
    def load(cls, url: str) -> PipelineModel:
        fs, root = tgfs.resolve(os.fspath(url))
        try:
            manifest = json.loads(fs.cat_file(f"{root}/pipeline.json"))
        except FileNotFoundError:
            raise ArgumentError(f"{url} holds no saved pipeline (no pipeline.json)") from None
        except ValueError as e:
            raise FormatVersionError(f"{url}/pipeline.json is not a pipeline manifest: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else None
            raise FormatVersionError(f"{url} was saved in pipeline format {found!r}; this TensorGrid reads "
                                     f"format {FORMAT}: save it again with a matching version")
        stages = []
        for entry in manifest.get("stages") or []:
            where = f"{root}/{entry.get('file') if isinstance(entry, dict) else entry}"
            try:
                stages.append(cloudpickle.loads(fs.cat_file(where)))
            except Exception as e:  # noqa: BLE001 - missing, truncated, or made by code this process lacks
                raise ArgumentError(f"{where}: the saved stage cannot be loaded ({type(e).__name__}: {e})"[:400]) \
                    from None
        if not stages:
            raise FormatVersionError(f"{url}/pipeline.json names no stages")
        return cls(stages)


def _stage_files(fs, root: str) -> list[str]:
    """The stage files the current manifest names (none when there is no readable one)."""
    try:
        return [s["file"] for s in json.loads(fs.cat_file(f"{root}/pipeline.json")).get("stages", [])]
    except (FileNotFoundError, ValueError, TypeError, KeyError, AttributeError):
        return []


class Pipeline(_Stage):
    """Stages fitted in order: an estimator is fitted on what the stages before it produce (``fit``'s
    ``engine``/``workers`` apply to each), a transformer is applied; the result is a ``PipelineModel``."""

    def __init__(self, stages: list):
        if not isinstance(stages, (list, tuple)) or not stages:
            raise ArgumentError("a Pipeline takes a non-empty list of stages")
        for s in stages:
            if not hasattr(s, "fit") and not hasattr(s, "transform"):
                raise ArgumentError(f"{type(s).__name__} is not a stage (it has neither fit nor transform)")
        self.stages = list(stages)

    def fit(self, data, engine: str = "local", workers: int = 1) -> PipelineModel:
        fitted = []
        for i, stage in enumerate(self.stages):
            model = stage.fit(data, engine=engine, workers=workers) if hasattr(stage, "fit") else stage
            fitted.append(model)
            if i < len(self.stages) - 1:
                data = _apply(model, data, engine=engine, workers=workers)
        return PipelineModel(fitted)


def _apply(stage, data, engine: str, workers: int, **options):
    """``stage.transform`` with ``engine``/``workers`` when it takes them (a user's own transformer may not)."""
    accepted = inspect.signature(stage.transform).parameters
    for name, value in (("engine", engine), ("workers", workers)):
        if name in accepted or any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            options[name] = value
    return stage.transform(data, **options)
