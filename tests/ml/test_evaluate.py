"""Evaluators against scikit-learn's metrics on random predictions (hypothesis), over every input kind;
the confusion-matrix PNG; bad input as named errors."""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from sklearn import metrics

import tensorgrid as tg
from tensorgrid.errors import ArgumentError, ColumnNotFoundError, EmptyDataError
from tensorgrid.ml import evaluate


@st.composite
def predictions(draw):
    n, k = draw(st.integers(1, 60)), draw(st.integers(2, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    y = rng.integers(0, k, n)
    p = np.where(rng.random(n) < 0.6, y, rng.integers(0, k, n))
    probs = rng.random((n, k))
    return y, p, probs / probs.sum(axis=1, keepdims=True)


@settings(max_examples=60, deadline=None)
@given(predictions(), st.sampled_from(["pandas", "arrow"]))
def test_metrics_equal_scikit_learns(pred, kind):
    y, p, probs = pred
    frame = pd.DataFrame({"label": y, "prediction": p, "probability": list(probs)})
    data = frame if kind == "pandas" else pa.Table.from_pandas(frame, preserve_index=False)
    assert evaluate.accuracy(data) == pytest.approx(metrics.accuracy_score(y, p))
    labels = sorted(set(y) | set(p))
    report = evaluate.precision_recall_f1(data)
    assert report.labels == labels
    for name, fn in (("precision", metrics.precision_score), ("recall", metrics.recall_score),
                     ("f1", metrics.f1_score)):
        np.testing.assert_allclose(getattr(report, name), fn(y, p, labels=labels, average=None, zero_division=0))
        assert report.macro[name] == pytest.approx(fn(y, p, labels=labels, average="macro", zero_division=0))
    np.testing.assert_array_equal(evaluate.confusion_matrix(data).matrix, metrics.confusion_matrix(y, p, labels=labels))
    assert evaluate.log_loss(data) == pytest.approx(metrics.log_loss(y, probs, labels=list(range(probs.shape[1]))))


def test_a_dataset_with_label_names_draws_a_readable_confusion_matrix(tmp_path):
    y = np.array([0, 0, 1, 1, 2, 2, 2, 1])
    p = np.array([0, 1, 1, 1, 2, 0, 2, 1])
    table = pa.table({"label_index": y, "prediction": p})
    ds = tg.write(str(tmp_path / "pred"), table)
    cm = evaluate.confusion_matrix(ds, label_col="label_index", label_names=["ant", "bee", "wasp"])
    assert cm.to_pandas().loc["bee", "bee"] == 3 and cm.to_pandas().loc["wasp", "ant"] == 1
    out = cm.plot(str(tmp_path / "plots" / "cm.png"))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    assert evaluate.accuracy(ds, label_col="label_index") == pytest.approx(6 / 8)


def test_bad_input_is_a_named_error(tmp_path):
    frame = pd.DataFrame({"label": [0, 1], "prediction": [0, 3], "probability": [[0.5, 0.5], [0.2, 0.8]]})
    with pytest.raises(ColumnNotFoundError, match="no column 'label_index'"):
        evaluate.accuracy(frame, label_col="label_index")
    with pytest.raises(EmptyDataError):
        evaluate.accuracy(frame.iloc[:0])
    with pytest.raises(ArgumentError, match="not among the labels"):
        evaluate.confusion_matrix(frame, labels=[0, 1])
    with pytest.raises(ArgumentError, match="outside the 2 classes"):
        evaluate.log_loss(pd.DataFrame({"label": [0, 2], "probability": [[0.5, 0.5], [0.2, 0.8]]}))
    with pytest.raises(ArgumentError, match="nulls"):
        evaluate.accuracy(pd.DataFrame({"label": [0, None], "prediction": [0, 1]}))
    with pytest.raises(ArgumentError, match="a Dataset, a pandas DataFrame or an Arrow table"):
        evaluate.accuracy([(0, 0)])
    with pytest.raises(ArgumentError, match="not of the kind 'label' holds"):
        evaluate.confusion_matrix(pd.DataFrame({"label": ["a", "b"], "prediction": ["a", "a"]}), labels=[0, 1])
    with pytest.raises(ArgumentError, match="different lengths"):
        evaluate.log_loss(pd.DataFrame({"label": [0, 1], "probability": [[0.5, 0.5], [1.0]]}))
    with pytest.raises(ArgumentError, match="different kinds"):
        evaluate.accuracy(pd.DataFrame({"label": ["a", "b"], "prediction": [0, 1]}))


def test_evaluate_reads_what_tg_predict_writes(tmp_path):
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 4)).astype(np.float32)
    ds = tg.write(str(tmp_path / "d"), pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                                                  "label_index": (x[:, 0] > 0).astype(np.int64)}))
    model = torch.nn.Linear(4, 2)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1, 0], model.weight[0, 0] = 5.0, -5.0  # class 1 when x0 > 0: nearly always right
        model.bias.zero_()
    pred = tg.predict(model, ds, features="x", classifier=True)
    assert evaluate.accuracy(pred, label_col="label_index") == 1.0
    assert evaluate.log_loss(pred, label_col="label_index", probability_col="probability") < 0.5
    assert evaluate.confusion_matrix(pred, label_col="label_index").matrix.trace() == 200
