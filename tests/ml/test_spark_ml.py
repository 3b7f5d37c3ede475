"""tensorgrid.ml.spark: the stages as real pyspark.ml stages on scikit-learn's digits, in Spark local[2]:
a pyspark Pipeline beside MLlib's stages (fit on the Spark engine, judged by MLlib's evaluator), save and
load with PipelineModel, streaming scoring that loads the model once per executor Python process, and
named errors for bad input."""

import functools
import os
import uuid
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("pyspark", reason="pyspark is in the dev extras")

from pyspark.errors import PythonException  # noqa: E402
from pyspark.ml import Pipeline, PipelineModel  # noqa: E402
from pyspark.ml.evaluation import MulticlassClassificationEvaluator  # noqa: E402
from pyspark.ml.feature import StringIndexer, VectorAssembler  # noqa: E402
from pyspark.ml.linalg import VectorUDT  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402

from tensorgrid import transforms  # noqa: E402
from tensorgrid.errors import ArgumentError, ColumnNotFoundError, TrainingConfigError  # noqa: E402
from tensorgrid.ml.spark import NNClassifier, NNEstimator, NNModel  # noqa: E402

PX = [f"px{i}" for i in range(64)]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


def _classifier(**params):
    return NNClassifier(model=_mlp(), criterion=torch.nn.CrossEntropyLoss(),
                        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
                        transform=transforms.to_float(column="features", scale=1 / 16),
                        **{"batchSize": 64, "maxEpoch": 8, "workers": 2, **params})


class LoadLogged(torch.nn.Module):
    """A model that appends "load <pid>" to a file each time it is unpickled and "call <pid>" each time it
    runs: what the executors really did, read back by the test."""

    def __init__(self, inner: torch.nn.Module, log: str):
        super().__init__()
        self.inner, self.log = inner, log

    def __setstate__(self, state):
        super().__setstate__(state)
        self._note("load")

    def forward(self, x):
        self._note("call")
        return self.inner(x)

    def _note(self, what: str) -> None:
        with open(self.log, "a") as f:
            f.write(f"{what} {os.getpid()}\n")


@pytest.fixture(scope="module")
def digits(spark):
    """The 1,797 digits as a wide table (px0..px63, 0-16), a string label ("zero".."nine") and an id; every
    fifth row held out."""
    from sklearn.datasets import load_digits

    d = load_digits()
    frame = pd.DataFrame(d.data.reshape(-1, 64), columns=PX)
    frame["digit"] = [NAMES[t] for t in d.target]
    frame["id"] = np.arange(len(frame))
    sdf = spark.createDataFrame(frame)
    return frame, sdf.where(F.col("id") % 5 != 0), sdf.where(F.col("id") % 5 == 0)


@pytest.fixture(scope="module")
def fitted(digits):
    """A pyspark Pipeline: MLlib's StringIndexer and VectorAssembler, then NNClassifier (2 Spark workers)."""
    pipeline = Pipeline(stages=[StringIndexer(inputCol="digit", outputCol="label"),
                                VectorAssembler(inputCols=PX, outputCol="features"), _classifier()])
    return pipeline, pipeline.fit(digits[1])


def test_pipeline_with_mllib_stages_fits_on_spark_and_mllib_evaluator_scores_it(digits, fitted):
    model = fitted[1].stages[-1]
    assert isinstance(model, NNModel) and model.getClassifier() and model.getFeaturesShape() == [64]
    assert len(model.history) == 8 and model.history[-1]["accuracy"] > 0.9
    out = fitted[1].transform(digits[2])
    types = {f.name: f.dataType for f in out.schema}
    assert types["prediction"].simpleString() == "double"
    assert isinstance(types["probability"], VectorUDT) and isinstance(types["rawPrediction"], VectorUDT)
    accuracy = MulticlassClassificationEvaluator(metricName="accuracy").evaluate(out)
    assert accuracy >= 0.85, accuracy
    first = out.select("probability").first()["probability"]
    assert len(first) == 10 and abs(sum(first) - 1) < 1e-5


def test_fitted_pipeline_saves_and_loads_with_the_same_predictions(spark, digits, fitted, tmp_path):
    pipeline, model = fitted
    model.write().overwrite().save(str(tmp_path / "model"))
    again = PipelineModel.load(str(tmp_path / "model"))
    stage = again.stages[-1]
    assert isinstance(stage, NNModel) and stage.uid == model.stages[-1].uid
    assert (stage.getFeaturesShape(), stage.getBatchSize()) == ([64], model.stages[-1].getBatchSize())
    before = model.transform(digits[2]).select("id", "prediction", "probability").toPandas()
    after = again.transform(digits[2]).select("id", "prediction", "probability").toPandas()
    np.testing.assert_array_equal(after["prediction"], before["prediction"])
    np.testing.assert_allclose(np.stack(after["probability"].map(np.asarray)),
                               np.stack(before["probability"].map(np.asarray)), rtol=1e-6)
    # the estimator too: its Params and torch objects
    pipeline.getStages()[-1].save(str(tmp_path / "estimator"))
    estimator = NNClassifier.load(str(tmp_path / "estimator"))
    assert (estimator.getMaxEpoch(), estimator.getWorkers(), estimator.getBatchSize()) == (8, 2, 64)
    assert isinstance(estimator.model, torch.nn.Sequential) and isinstance(estimator.criterion, torch.nn.CrossEntropyLoss)
    saved = next((tmp_path / "model" / "stages").glob("2_*")) / "torch.pkl"
    saved.write_bytes(saved.read_bytes()[:100])  # truncated
    with pytest.raises(ArgumentError, match="torch.pkl: the saved torch objects cannot be loaded"):
        PipelineModel.load(str(tmp_path / "model"))


def test_streaming_scores_like_batch_and_loads_the_model_once_per_executor_process(spark, digits, fitted, tmp_path):
    frame, model = digits[0], fitted[1]
    held = frame[frame.id % 5 == 0].reset_index(drop=True)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        held.iloc[i * 90:(i + 1) * 90].to_parquet(src / f"part-{i}.parquet")
    log = tmp_path / "loads.log"
    counted = model.stages[-1].copy()
    counted.model = LoadLogged(counted.model, str(log))
    scoring = PipelineModel(stages=[*model.stages[:-1], counted])
    schema = spark.read.parquet(str(src)).schema
    stream = spark.readStream.schema(schema).option("maxFilesPerTrigger", 2).parquet(str(src))
    assert stream.isStreaming
    name = f"scores_{uuid.uuid4().hex[:8]}"
    query = (scoring.transform(stream).select("id", "prediction", "probability").writeStream
             .format("memory").queryName(name).start())
    try:
        query.processAllAvailable()  # two micro-batches: files 0-1, then 2
        held.iloc[270:].to_parquet(src / "part-3.parquet")  # a file that arrives later: one more micro-batch
        query.processAllAvailable()
        batches = sum(1 for p in query.recentProgress if p["numInputRows"] > 0)
    finally:
        query.stop()
    assert batches == 3
    got = spark.table(name).toPandas().sort_values("id").reset_index(drop=True)
    want = model.transform(spark.read.parquet(str(src))).select("id", "prediction", "probability").toPandas() \
        .sort_values("id").reset_index(drop=True)
    assert len(got) == len(held) == len(want)
    np.testing.assert_array_equal(got["id"], want["id"])
    np.testing.assert_array_equal(got["prediction"], want["prediction"])
    np.testing.assert_allclose(np.stack(got["probability"].map(np.asarray)),
                               np.stack(want["probability"].map(np.asarray)), rtol=1e-5, atol=1e-7)
    events = [line.split() for line in log.read_text().splitlines()]
    loads = Counter(int(pid) for what, pid in events if what == "load")
    calls = [int(pid) for what, pid in events if what == "call" and int(pid) != os.getpid()]  # not the driver's probe
    assert loads and max(loads.values()) == 1, f"a process unpickled the model more than once: {loads}"
    assert set(calls) <= set(loads) and os.getpid() not in loads
    assert len(calls) > len(loads), f"no process scored twice ({len(calls)} calls, loads {loads}): no reuse to show"


def test_a_hand_built_nnmodel_scores_tensor_bytes_through_its_transform(spark, digits):
    frame = digits[0].iloc[:200]
    images = (frame[PX].to_numpy() * (255 / 16)).round().astype(np.uint8).reshape(-1, 8, 8)
    sdf = spark.createDataFrame(pd.DataFrame({"id": np.arange(200), "image": [im.tobytes() for im in images]})) \
        .withMetadata("image", {"tensorgrid.tensor": {"dtype": "uint8", "shape": [8, 8]}})
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    out = NNModel(model=net, transform=transforms.to_float(column="image"), featuresCol="image",
                  predictionCol="z").transform(sdf)
    assert out.schema["z"].dataType.simpleString() == "array<float>"
    assert out.schema["z"].metadata == {"tensorgrid.tensor": {"dtype": "float32", "shape": [3]}}
    got = np.stack(out.orderBy("id").toPandas()["z"])
    want = net(torch.from_numpy(images).float() / 255).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_nnestimator_regresses_and_its_model_adds_a_double_prediction(spark, digits):
    data = VectorAssembler(inputCols=PX, outputCol="features").transform(digits[1]) \
        .withColumn("label", F.col("px36"))  # a pixel from the features: learnable
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 1), torch.nn.Flatten(0))
    model = NNEstimator(model=net, criterion=torch.nn.MSELoss(), maxEpoch=2, batchSize=64,
                        optimizer=functools.partial(torch.optim.Adam, lr=3e-2)).fit(data)
    assert not model.getClassifier() and model.history[-1]["loss"] < model.history[0]["loss"]
    out = model.transform(data)
    assert out.schema["prediction"].dataType.simpleString() == "double"
    assert "probability" not in out.columns and out.count() == data.count()


def test_bad_input_gives_named_errors(spark, digits, fitted):
    frame, train, held = digits
    model = fitted[1].stages[-1]
    with pytest.raises(ColumnNotFoundError, match=r"featuresCol 'features' is not a column.*'px0'"):
        model.transform(held)
    with pytest.raises(ColumnNotFoundError, match=r"featuresCol 'features' is not a column"):
        _classifier().fit(train)
    narrow = VectorAssembler(inputCols=PX[:63], outputCol="features").transform(held)
    with pytest.raises(ArgumentError, match=r"shape \[63\] \(63 values\) but the model takes shape \[64\]"):
        model.transform(narrow)
    arrays = held.select(F.array(*PX[:63]).alias("features"))  # no metadata: checked as the rows arrive
    with pytest.raises(PythonException, match=r"a row holds 63 values but the model takes features of shape \[64\]"):
        model.transform(arrays).collect()
    with pytest.raises(ArgumentError, match=r"column 'digit' is string: features are an MLlib vector"):
        model.copy({model.featuresCol: "digit"}).transform(held)
    with_features = VectorAssembler(inputCols=PX, outputCol="features").transform(train)
    with pytest.raises(TrainingConfigError, match="index string labels with pyspark.ml.feature.StringIndexer"):
        _classifier(labelCol="digit").fit(with_features)
    indexed = with_features.withColumn("label", (F.col("id") % 10).cast("double"))
    with pytest.raises(TrainingConfigError, match=r"label column 'label' holds \d\.5: NNClassifier takes class indices"):
        _classifier().fit(indexed.withColumn("label", F.col("label") + 0.5))
    # a label beyond the model's 10 classes: the core trainer's own check on its first batch
    with pytest.raises(TrainingConfigError, match="out of bounds"):
        _classifier().fit(indexed.withColumn("label", F.col("label") + 10))


def test_params_are_spark_params_with_setters_and_keyword_only_constructors():
    clf = _classifier()
    assert clf.setMaxEpoch(3).setBatchSize(128).setWorkers(1).setSeed(7) is clf
    assert (clf.getMaxEpoch(), clf.getBatchSize(), clf.getWorkers(), clf.getSeed()) == (3, 128, 1, 7)
    assert clf.getFeaturesCol() == "features" and clf.getProbabilityCol() == "probability"
    assert "maxEpoch: passes over the training data" in clf.explainParams()
    other = clf.copy({clf.maxEpoch: 5})
    assert other.getMaxEpoch() == 5 and clf.getMaxEpoch() == 3 and other.model is clf.model
    clf.setParams(labelCol="y", maxEpoch=2)
    assert (clf.getLabelCol(), clf.getMaxEpoch()) == ("y", 2)
    with pytest.raises(TypeError, match="forces keyword arguments"):
        NNEstimator(_mlp(), torch.nn.MSELoss())
    reg = NNEstimator(model=_mlp(), criterion=torch.nn.MSELoss())
    assert not reg.hasParam("probabilityCol") and reg.getBatchSize() == 32
    m = NNModel(model=_mlp(), classifier=True, featuresShape=[64])
    assert (m.getClassifier(), m.getFeaturesShape(), m.getBatchSize(), m.transform_fn) == (True, [64], 1024, None)
