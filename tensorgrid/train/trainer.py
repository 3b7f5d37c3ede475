"""``tg.Trainer``: one ``fit`` call that trains in-process, on N local processes, on Ray or on Spark."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import cloudpickle
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .. import fs as tgfs
from ..args import check_choice, check_int, check_number
from ..errors import ArgumentError, CheckpointError, ResumeError, TensorGridError, TrainingConfigError
from ..loader import Loader
from ..loader.locality import Share, placed
from ..loader.locality import check_resume as check_locality
from ..store import Dataset
from . import checkpoint as ckpt
from .callbacks import check_callbacks
from .engines import ENGINES
from .features import ACCEPTED, check_features, feature_columns, label_for_loss, show_columns, stack_features
from .loop import Spec, build_model, train
from .losses import is_classifier
from .monitors import BestCheckpoint
from .placement import RankPlacement
from .precision import FP16_NEEDS_CUDA, PRECISIONS
from .predict import predict
from .schedule import SCHEDULES

METRICS = ("accuracy",)  # computed for classifiers (CrossEntropyLoss / NLLLoss)
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_SEED = (1 << 63) - 1


def _metrics(metrics) -> tuple[str, ...]:
    """``metrics`` as a tuple of known names: None (or ()) means none, a string one metric."""
    if metrics is None:
        return ()
    if isinstance(metrics, str):
        metrics = (metrics,)
    if not isinstance(metrics, Iterable):
        raise TrainingConfigError(f"metrics must be None or a list of names from {METRICS}, got {metrics!r}")
    return tuple(check_choice("each of metrics", m, METRICS, error=TrainingConfigError) for m in metrics)


def _engine_options(engine: str, options) -> dict:
    """``options`` if the engine's ``run`` takes every key (an engine that forwards the rest, as Ray's to
    ``ray.init``, checks them itself before it starts anything)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TrainingConfigError(f"engine_options must be a dict, got {type(options).__name__}")
    from .engines import get

    params = list(inspect.signature(get(engine)).parameters.values())[5:]  # after the common five
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if not any(p.kind == p.VAR_KEYWORD for p in params):
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise TrainingConfigError(f"engine_options: engine={engine!r} has no option {unknown[0]!r}; it accepts "
                                      + (", ".join(accepted) if accepted else "none"))
    return dict(options)


@dataclass
class FitResult:
    model: torch.nn.Module
    metrics: dict  # the last epoch's train (and val_*) metrics
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None
    placement: list[RankPlacement] | None = None  # per rank: its node, its partitions (locality), what it read there
    best_checkpoint: str | None = None  # the kept best epoch's checkpoint, with a BestCheckpoint callback

    def plot(self, path: str = "curves.png", title: str | None = None) -> str:
        """The loss (and accuracy) curves, training and validation, by epoch, as a PNG at ``path`` (needs
        matplotlib: ``pip install 'tensorgrid[plot]'``); returns its absolute path."""
        from .plot import plot_history

        return plot_history(self.history, path, title)


class Trainer:
    """Data-parallel training (PyTorch DDP) of ``model`` on a Dataset; configure here, then ``fit``.

    The same seed, data and global batch give the same updates on any number of workers and engines, and a
    run resumed from a checkpoint continues exactly as if never stopped. Every argument is checked here or
    in ``fit`` before any worker starts (``TrainingConfigError`` naming the fix).

    What to train:
      model: an ``nn.Module`` (copied to every worker) or a zero-argument factory returning one.
      loss: ``loss(model(features), label)``, e.g. ``nn.CrossEntropyLoss()``; a loss with ``reduction`` is
        taken per row (so padding rows weigh nothing). CrossEntropyLoss/NLLLoss make the model a classifier:
        accuracy is computed and integer labels of any width are widened to int64.
      optimizer: ``fn(params) -> torch.optim.Optimizer`` (default Adam, lr 1e-3).
      scheduler: ``fn(optimizer) -> LR scheduler``, stepped once after every epoch.
      features: the input column, or a list of numeric columns stacked per batch into one float32
        (rows, columns) tensor (a wide table: ``[f"px{i}" for i in range(64)]``).
      label: the target column.
      step: ``fn(model, batch) -> scalar loss`` instead of ``loss``/``features``/``label``, for anything else
        (``batch`` a dict of every column on the model's device; the loss a mean over its rows).
      transform: ``fn(batch) -> batch`` run on each batch in the loader (augmentation, decoding, to_float).
      metrics: names from ``METRICS`` computed for classifiers ("accuracy"); None for none.

    How much and how:
      batch_size: the GLOBAL batch of one forward/backward pass, split evenly across ``workers``.
      accumulate: micro-batches per optimizer step (gradient accumulation): each step sees batch_size *
        accumulate rows (the loader reads them together) and makes the same update as one step over them,
        with the gradients all-reduced once per step. Steps, ``checkpoint_every`` and schedules count steps.
      epochs: passes over the training data (numbered from 1 in the history, logs and callbacks).
      grad_clip: clip the gradients' total L2 norm (over all parameters together, after accumulation and
        the all-reduce; ``clip_grad_norm_`` with norm_type 2) to this value before each step; None: never.
        The norm before clipping is logged as train/grad_norm.
      precision: "fp32" (default); "bf16": forward and loss under ``torch.autocast`` with bfloat16 (CPU and
        CUDA; weights and optimizer state stay float32); "fp16": float16 autocast with a ``GradScaler``
        (CUDA only; its state is checkpointed).
      warmup_steps: raise the learning rate linearly over the first N optimizer steps (step i uses
        (i+1)/N of it).
      lr_schedule: after the warm-up, per optimizer step: "constant", "linear" or "cosine" decay towards 0 at
        the run's last step (epochs * steps per epoch). Both multiply the optimizer's own learning rate (and
        combine with ``scheduler``); a resumed run continues the same curve.
      seed: fixes the model's initialisation, the shuffle and every rank's random streams.

    Where it runs:
      workers: data-parallel processes (DDP, one rank each).
      engine: "local" (processes on this machine; workers=1 runs in the calling process), "ray" or "spark".
      engine_options: options for the engine's ``run`` (e.g. Ray's address), checked against it.
      loader_workers: background processes per rank that read and transform batches (0: in the rank itself).
      max_restarts: restart the whole group from its newest checkpoint this many times after a worker fails.
      timeout_s: how long a collective waits for a slow or hung rank before the run fails.
      locality: over a grid of several servers, each rank reads only the partitions held on its own node (on
        Ray each rank is placed beside them), shuffled within its share, padded with its own repeated rows to
        the same batch count as the others; a run resumes only with the same workers and placement. Default
        False: global batches over all partitions (exact global shuffle, resume under any world size), each
        rank fetching its rows from wherever they are. ``FitResult.placement`` says where each rank ran and
        what it read on its node.

    What it keeps and shows:
      checkpoint_dir: a URL (local path, s3://, ...) for checkpoints; ``fit(resume=True)`` continues from the
        newest. Names count finished epochs: ckpt-e00002-s000000048.pt is after 2 epochs (plus any steps
        of the 3rd), step 48.
      checkpoint_every: "epoch", or a number of optimizer steps (and at every epoch's end).
      keep_checkpoints: how many of the newest ``ckpt-*`` files to keep (a BestCheckpoint copy is apart).
      log_dir: a URL for TensorBoard events (per step: loss, lr, samples/s, data wait; per epoch: the row).
      storage_options: fsspec's options (credentials, endpoint) for the stores of checkpoint_dir, log_dir and
        data given as a URL, as ``tg.open`` takes them; never in a checkpoint or log. Ranks get them with their
        job (local engine: a job file readable by this user only, removed when the run ends; Ray and Spark:
        their task arguments). Default: the store's usual sources, and what was given for that bucket before.
      quiet: no progress on stderr. Otherwise rank 0 shows a live bar on a terminal, and plain lines (about
        every 10% of an epoch, and one per epoch) when stderr is not one (CI, nohup, notebooks).
      callbacks: objects with hooks run on rank 0 that may stop training (``tensorgrid.train.Callback``;
        built in: ``EarlyStopping``, ``BestCheckpoint``).
    """

    def __init__(self, model, loss=None, optimizer=None, scheduler=None, features: str | None = "features",
                 label: str | None = "label", step=None, transform=None, batch_size: int = 256, epochs: int = 5,
                 workers: int = 1, engine: str = "local", checkpoint_dir: str | None = None,
                 checkpoint_every="epoch", keep_checkpoints: int = 3, log_dir: str | None = None,
                 metrics=("accuracy",), seed: int = 0, max_restarts: int = 0, timeout_s: float = 300,
                 loader_workers: int = 0, quiet: bool = False, engine_options: dict | None = None,
                 callbacks=None, accumulate: int = 1, grad_clip: float | None = None, precision: str = "fp32",
                 warmup_steps: int = 0, lr_schedule: str = "constant", locality: bool = False,
                 storage_options: dict | None = None):
        if not (isinstance(model, torch.nn.Module) or callable(model)):
            raise TrainingConfigError("model must be an nn.Module or a zero-argument factory returning one")
        if step is None and loss is None:
            raise TrainingConfigError("give a loss (with features= and label=) or step=fn(model, batch) -> loss")
        check_choice("engine", engine, ENGINES, error=TrainingConfigError)
        batch_size, epochs, workers, keep_checkpoints, max_restarts, loader_workers = (
            check_int(name, v, lo, error=TrainingConfigError) for name, v, lo in (
                ("batch_size", batch_size, 1), ("epochs", epochs, 1), ("workers", workers, 1),
                ("keep_checkpoints", keep_checkpoints, 1), ("max_restarts", max_restarts, 0),
                ("loader_workers", loader_workers, 0)))
        seed = check_int("seed", seed, 0, MAX_SEED, error=TrainingConfigError)
        # checked here, not by the first collective that times out after the workers started
        timeout_s = check_number("timeout_s", timeout_s, 1, MAX_TIMEOUT_S, error=TrainingConfigError)
        if batch_size % workers:
            raise TrainingConfigError(f"batch_size ({batch_size}) is the global batch: it must divide evenly "
                                      f"across {workers} workers")
        if not (isinstance(checkpoint_every, str) and checkpoint_every == "epoch"):
            checkpoint_every = check_int("checkpoint_every ('epoch' or a number of steps)", checkpoint_every, 1,
                                         error=TrainingConfigError)
        metrics = _metrics(metrics)
        features = check_features(features)
        step_options = _step_options(accumulate, grad_clip, precision, warmup_steps, lr_schedule, engine)
        engine_options = _engine_options(engine, engine_options)
        callbacks = check_callbacks(callbacks)
        self.locality = check_choice("locality", locality, (False, True), error=TrainingConfigError)
        try:
            self.storage_options = tgfs.check_storage_options(storage_options)
        except ArgumentError as e:
            raise TrainingConfigError(str(e)) from None
        for url in (checkpoint_dir, log_dir):
            if url:
                tgfs.remember(str(url), self.storage_options)
        self.model, self.loss = model, loss
        self.optimizer = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        self.scheduler, self.features, self.label, self.step = scheduler, features, label, step
        self.transform, self.batch_size, self.epochs, self.workers = transform, batch_size, epochs, workers
        self.engine, self.checkpoint_dir, self.checkpoint_every = engine, checkpoint_dir, checkpoint_every
        self.keep_checkpoints, self.log_dir, self.metrics, self.seed = keep_checkpoints, log_dir, metrics, seed
        self.max_restarts, self.timeout_s, self.loader_workers = max_restarts, timeout_s, loader_workers
        self.quiet, self.engine_options, self.callbacks = quiet, engine_options, callbacks
        self.accumulate, self.grad_clip, self.precision, self.warmup_steps, self.lr_schedule = step_options
        self.result: FitResult | None = None

    # --- checks that run before any worker starts -------------------------------------------------
    def _dataset(self, data, what: str, need_label: bool = True) -> Dataset:
        if isinstance(data, Dataset):
            ds = data
        elif type(data).__module__.startswith("pyspark"):
            from .engines.spark import dataset_of

            ds = dataset_of(data)
        elif isinstance(data, str):
            from ..store import open as open_dataset

            ds = open_dataset(data, storage_options=self.storage_options or None)
        else:
            raise TrainingConfigError(f"{what} must be a Dataset (tg.open/tg.write/tg.from_arrow/SQL), a URL "
                                      f"or a Spark DataFrame, got {type(data).__name__}")
        if ds.num_rows == 0:
            raise TrainingConfigError(f"{what} dataset {ds.url} is empty")
        if self.step is None:
            names = ds.schema.names
            missing = [c for c in feature_columns(self.features) if c not in names]
            if missing:
                raise TrainingConfigError(f"{what} dataset has no column {missing[0]!r} ({ACCEPTED} of the dataset; "
                                          f"missing: {missing}); columns: {show_columns(names)}")
            if need_label and self.label not in names:
                raise TrainingConfigError(f"{what} dataset has no column {self.label!r} (label=); columns: "
                                          f"{show_columns(names)}")
        return ds

    def _check_model_on_one_batch(self, ds: Dataset) -> None:
        model = self._build_model(ds)
        if not isinstance(model, torch.nn.Module):
            raise TrainingConfigError(f"the model factory returned a {type(model).__name__}, not an nn.Module")
        cols = None if self.step else list(dict.fromkeys([*feature_columns(self.features), self.label]))
        # one real batch (a shuffled one, so its labels are a sample of all of them), in this process only
        # (the workers fill the Arrow cache as they train: this look at one batch builds none)
        batch = next(iter(Loader(ds, min(self.batch_size, 256, ds.num_rows), columns=cols, shuffle=True,
                                 seed=self.seed, transform=self.transform, rank=0, world_size=1,
                                 cache_fill=False)))
        model.eval()
        try:
            with torch.no_grad(), warnings.catch_warnings():
                # torch only warns when a loss broadcasts an output against labels of another shape
                warnings.filterwarnings("error", message=".*target size.*different to the input size")
                if self.step is not None:
                    loss = self.step(model, batch)
                else:
                    out = model(stack_features(batch, self.features))
                    loss = self.loss(out, label_for_loss(batch[self.label], is_classifier(self.loss)))
            self._check_optimizer(model)
        except TrainingConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - reported with what was tried
            if self.step is not None:
                raise TrainingConfigError(f"step(model, batch) fails on the first batch: {type(e).__name__}: {e}") from None
            x = stack_features(batch, self.features)
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            what = repr(self.features) if isinstance(self.features, str) else \
                f"{len(self.features)} feature columns stacked"
            raise TrainingConfigError(
                f"the model does not fit the data: on a batch with {what} {shape} "
                f"{getattr(x, 'dtype', '')} and {self.label!r} {tuple(getattr(batch[self.label], 'shape', ()))}, "
                f"{type(e).__name__}: {e}") from None
        if not (isinstance(loss, torch.Tensor) and loss.numel() == 1):
            raise TrainingConfigError(f"the loss must be a scalar tensor, got {type(loss).__name__} "
                                      f"{tuple(getattr(loss, 'shape', ()))}")
        if self.step is None and self.transform is None and is_classifier(self.loss) and out.ndim == 2:
            self._check_label_range(ds, out.shape[1])

    def _check_label_range(self, ds: Dataset, classes: int) -> None:
        """Every label of the data is one of the model's classes (a batch's look sees only some of them: a
        label out of range deep in an epoch would fail there). One scan of the label column."""
        if not pa.types.is_integer(ds.schema.field(self.label).type):
            return
        ignore = getattr(self.loss, "ignore_index", None)
        lo = hi = None
        for i in range(ds.num_shards):
            col = ds.read_shard(i, [self.label]).column(0)
            if ignore is not None:
                col = pc.filter(col, pc.not_equal(col, ignore))
            mm = pc.min_max(col).as_py()
            if mm["min"] is not None:
                lo = mm["min"] if lo is None else min(lo, mm["min"])
                hi = mm["max"] if hi is None else max(hi, mm["max"])
        if lo is not None and (lo < 0 or hi >= classes):
            raise TrainingConfigError(f"label {self.label!r} holds classes {lo}..{hi} but the model scores {classes} "
                                      f"classes (0..{classes - 1}): give the model {hi + 1} outputs or map the labels")

    def _build_model(self, ds: Dataset) -> torch.nn.Module:
        """The model as a worker builds it: a copy of the given module, or what the factory returns."""
        try:
            return build_model(self._spec(ds, None, None))
        except Exception as e:  # noqa: BLE001
            if isinstance(self.model, torch.nn.Module):  # copied to every worker, so it must copy here
                raise TrainingConfigError(f"the model, loss, optimizer, transform or callbacks cannot be sent to "
                                          f"workers: {type(e).__name__}: {e}") from None
            raise TrainingConfigError(f"the model factory fails: {type(e).__name__}: {e}") from None

    def _check_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimizer the factory builds for ``model`` (and the scheduler factory runs on it)."""
        try:
            opt = self.optimizer(model.parameters())
        except Exception as e:  # noqa: BLE001
            raise TrainingConfigError(f"optimizer(params) fails: {type(e).__name__}: {e}") from None
        if not isinstance(opt, torch.optim.Optimizer):
            raise TrainingConfigError(f"optimizer(params) must return a torch.optim.Optimizer, got {type(opt).__name__}")
        if self.scheduler is not None:
            try:
                self.scheduler(opt)
            except Exception as e:  # noqa: BLE001
                raise TrainingConfigError(f"scheduler(optimizer) fails: {type(e).__name__}: {e}") from None
        return opt

    def _share(self, ds: Dataset) -> Share | None:
        """What each rank reads with ``locality=True`` (checked before any worker starts)."""
        if not self.locality:
            return None
        try:
            return Share.of(ds, self.workers, self.batch_size * self.accumulate // self.workers, False)
        except ArgumentError as e:
            raise TrainingConfigError(str(e)) from None

    def _spec(self, train_ds, val_ds, resume_from) -> Spec:
        return Spec(model=self.model, loss=self.loss, optimizer=self.optimizer, scheduler=self.scheduler,
                    features=self.features, label=self.label, step=self.step, transform=self.transform,
                    batch_size=self.batch_size, epochs=self.epochs, seed=self.seed,
                    checkpoint_dir=self.checkpoint_dir, checkpoint_every=self.checkpoint_every,
                    keep_checkpoints=self.keep_checkpoints, log_dir=self.log_dir, metrics=self.metrics,
                    timeout_s=self.timeout_s, loader_workers=self.loader_workers, quiet=self.quiet,
                    train=train_ds, val=val_ds, resume_from=resume_from, callbacks=self.callbacks,
                    accumulate=self.accumulate, grad_clip=self.grad_clip, precision=self.precision,
                    warmup_steps=self.warmup_steps, lr_schedule=self.lr_schedule, locality=self.locality,
                    storage=tgfs.remembered(self.checkpoint_dir, self.log_dir))

    def _epoch_metrics(self, with_val: bool) -> set[str]:
        """The keys of the history's rows (but "epoch")."""
        names = {"loss"} | ({"accuracy"} if is_classifier(self.loss) and "accuracy" in self.metrics else set())
        return names | {"samples_per_s", "data_wait_fraction"} | ({f"val_{n}" for n in names} if with_val else set())

    def _check_urls(self) -> None:
        if self.workers > 1 or self.engine != "local":
            for name in ("checkpoint_dir", "log_dir"):
                url = getattr(self, name)
                if url and str(url).startswith("memory://"):
                    raise TrainingConfigError(f"{name}={url!r}: memory:// lives inside one process, and training "
                                              "runs in several; use a local path or an object store")

    # --- fit / predict ----------------------------------------------------------------------------
    def fit(self, train_ds, val=None, resume: bool = False) -> FitResult:
        """Train; with ``resume=True`` continue exactly from the newest checkpoint in ``checkpoint_dir``."""
        spark_input = type(train_ds).__module__.startswith("pyspark")
        train_ds = self._dataset(train_ds, "train")
        val_ds = self._dataset(val, "val") if val is not None else None
        fingerprint = _fingerprint(train_ds)
        self._check_urls()
        if train_ds.num_rows < self.workers:
            raise TrainingConfigError(f"{train_ds.num_rows} rows cannot feed {self.workers} workers")
        share = self._share(train_ds)
        resume_from = None
        if not resume and ckpt.latest(self.checkpoint_dir):
            raise TrainingConfigError(f"checkpoint_dir {self.checkpoint_dir} already holds checkpoints of an earlier "
                                      "run: pass resume=True to continue it, or use a new directory (nothing was "
                                      "overwritten)")
        if resume:
            if not self.checkpoint_dir:
                raise TrainingConfigError("resume=True needs checkpoint_dir")
            resume_from = ckpt.latest(self.checkpoint_dir)
            if resume_from is None:
                raise CheckpointError(f"resume=True but {self.checkpoint_dir} holds no checkpoint")
            state = ckpt.load(resume_from)
            saved = state.get("data_fingerprint")  # checkpoints written before it was recorded still resume
            if saved is not None and fingerprint is not None and saved != fingerprint:
                raise CheckpointError(
                    f"checkpoint {resume_from} was trained on other data: the data changed since, or this is "
                    f"another dataset (fingerprint {fingerprint}, the checkpoint's {saved}); resume on the same "
                    "data, or start a new run in a new checkpoint_dir"
                    + (". A Spark DataFrame is written anew by every fit: write it once with tg.write and train "
                       "on that dataset to resume" if spark_input else ""))
            model = self._build_model(train_ds)
            ckpt.check_fits(state, model, resume_from)
            ckpt.check_optimizer_fits(state, self._check_optimizer(model), resume_from)
            done = state["loader"]["epoch"] + (1 if state["loader"].get("batch") else 0)
            if done > self.epochs:
                raise CheckpointError(f"checkpoint {resume_from} is past this run's end: it trained {done} epochs "
                                      f"(or part of the last), this trainer has epochs={self.epochs}")
            try:
                check_locality(state["loader"], {"locality": share.state() if share is not None else None})
            except ResumeError as e:
                raise CheckpointError(f"checkpoint {resume_from}: {e}") from None
            step_batch = self.batch_size * self.accumulate
            if state["loader"].get("global_batch") not in (None, step_batch):
                raise CheckpointError(f"checkpoint {resume_from} was trained with {state['loader']['global_batch']} "
                                      f"rows per optimizer step, this trainer uses {step_batch} (batch_size * "
                                      "accumulate)")
        self._check_model_on_one_batch(train_ds)
        for cb in self.callbacks:
            if hasattr(cb, "_check_fit"):  # built-in callbacks check what they monitor
                cb._check_fit(self._epoch_metrics(val_ds is not None), self.checkpoint_dir)
        spec = self._spec(train_ds, val_ds, resume_from)
        spec.data_fingerprint = fingerprint
        try:
            payload = cloudpickle.dumps(spec)
        except Exception as e:  # noqa: BLE001
            raise TrainingConfigError(f"the model, loss, optimizer, transform or callbacks cannot be sent to "
                                      f"workers: {type(e).__name__}: {e}") from None
        if self.workers == 1 and self.engine == "local":
            out = train(cloudpickle.loads(payload))  # in this process: easy to debug
        else:
            from .engines import get

            options = dict(self.engine_options)
            if share is not None and self.engine == "ray" and "nodes" not in options:
                nodes = placed(train_ds).rank_nodes(self.workers)  # each rank on the node holding its partitions
                if nodes is not None:
                    options["nodes"] = nodes
            out = get(self.engine)(payload, self.workers, self.max_restarts, self.timeout_s, self.checkpoint_dir,
                                   **options)
        model = build_model(spec)
        model.load_state_dict(out["model"])
        _callbacks_back(self.callbacks, out.get("callbacks"))
        history = out["history"]
        best = next((cb.best_checkpoint for cb in self.callbacks if isinstance(cb, BestCheckpoint)), None)
        self.result = FitResult(model, dict(history[-1]) if history else {}, history, out["checkpoint"],
                                out.get("placement"), best)
        if not self.quiet:
            from rich.console import Console

            from .progress import summary_table

            Console(stderr=True).print(summary_table(history))
        return self.result

    def predict(self, ds, out: str | None = None, batch_size: int | None = None, model=None, mode: str = "create"):
        """Run the trained model over ``ds``; returns a Dataset with its columns (but the features) plus
        ``prediction`` (and ``probability`` for classifiers). Written to ``out`` when given. The same as
        ``tensorgrid.train.predict`` with this trainer's features, transform and batch size."""
        batch_size = check_int("batch_size", batch_size, 1, none=True, error=TrainingConfigError)
        model = model if model is not None else (self.result.model if self.result else None)
        if model is None:
            raise TensorGridError("predict needs a trained model: call fit first or pass model=")
        ds = self._dataset(ds, "predict", need_label=False)  # inference data need not have labels
        return predict(model, ds, self.features, transform=self.transform, batch_size=batch_size or self.batch_size,
                       out=out, classifier=is_classifier(self.loss), mode=mode)


def _step_options(accumulate, grad_clip, precision, warmup_steps, lr_schedule, engine) -> tuple:
    """The optimizer-step arguments, checked: (accumulate, grad_clip, precision, warmup_steps, lr_schedule)."""
    accumulate = check_int("accumulate", accumulate, 1, error=TrainingConfigError)
    grad_clip = check_number("grad_clip", grad_clip, 0, none=True, error=TrainingConfigError)
    if grad_clip == 0:
        raise TrainingConfigError("grad_clip must be > 0 (the largest total gradient norm), or None not to clip")
    check_choice("precision", precision, PRECISIONS, error=TrainingConfigError)
    if precision == "fp16" and engine == "local" and not torch.cuda.is_available():
        raise TrainingConfigError(FP16_NEEDS_CUDA)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0, error=TrainingConfigError)
    check_choice("lr_schedule", lr_schedule, SCHEDULES, error=TrainingConfigError)
    return accumulate, grad_clip, precision, warmup_steps, lr_schedule


def _fingerprint(ds: Dataset) -> str | None:
    """The dataset's fingerprint, recorded in checkpoints; None if its kind cannot say (no check then)."""
    try:
        return str(ds.fingerprint)
    except Exception:  # noqa: BLE001 - a user's own Dataset kind
        return None


def _callbacks_back(callbacks: tuple, returned: list | None) -> None:
    """Give each callback object the attributes it had on rank 0 at the end of training (it ran there, on a
    copy), so that what a callback records is the same on every engine."""
    for cb, data in zip(callbacks, returned or ()):
        if isinstance(data, str):  # rank 0 could not pickle it
            warnings.warn(f"callback {type(cb).__qualname__} could not be sent back from the workers ({data}): "
                          "it keeps its attributes from before fit", RuntimeWarning, stacklevel=3)
            continue
        try:
            back = cloudpickle.loads(data)
        except Exception as e:  # noqa: BLE001 - e.g. its class changed meanwhile
            warnings.warn(f"callback {type(cb).__qualname__} could not be read back from the workers "
                          f"({type(e).__name__}: {e}): it keeps its attributes from before fit", RuntimeWarning,
                          stacklevel=3)
            continue
        if hasattr(cb, "__dict__") and hasattr(back, "__dict__"):
            cb.__dict__.update(back.__dict__)
