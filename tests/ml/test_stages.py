"""Spark-ML-style stages on real data (scikit-learn's digits): transfer learning through a Pipeline of a
frozen NNModel backbone and an NNClassifier head; save/load; parameters; bad input."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

import tensorgrid as tg
from tensorgrid.errors import ArgumentError
from tensorgrid.ml import NNClassifier, NNModel, Pipeline, PipelineModel, evaluate
from tensorgrid.ml.stages import FormatVersionError
from tensorgrid.quickstart import digits_frame


def _to_float(batch):
    batch["image"] = batch["image"].float().div_(255).flatten(1)
    return batch


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 5))


def _cnn(classes=5):
    """quickstart's digits CNN (5 classes): its convolutions up to the flattened 512 features are the backbone."""
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, classes))


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    frame = digits_frame()
    low, high = frame[frame.label < 5], frame[frame.label >= 5].assign(label=lambda f: f.label - 5)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(high))
    few, held = high.iloc[order[:300]], high.iloc[order[300:]]
    return {name: tg.write(str(root / name), part.reset_index(drop=True))
            for name, part in (("low", low), ("few", few), ("held", held))}


def test_a_frozen_backbone_pipeline_learns_new_classes_from_a_few_hundred_rows(digits, tmp_path):
    opt = lambda p: torch.optim.Adam(p, lr=3e-3)  # noqa: E731
    pretrained = NNClassifier(_cnn(), torch.nn.CrossEntropyLoss(), optimizer=opt, batch_size=64, max_epoch=10,
                              features_col="image", transform=_to_float).fit(digits["low"])
    assert pretrained.history[-1]["accuracy"] > 0.9
    backbone = torch.nn.Sequential(*list(pretrained.model)[:7])  # the conv features (512 wide): frozen
    for p in backbone.parameters():
        p.requires_grad_(False)
    torch.manual_seed(1)
    head = torch.nn.Linear(512, 5)
    pipeline = Pipeline([
        NNModel(backbone, transform=_to_float, features_col="image", prediction_col="embedding"),
        NNClassifier(head, torch.nn.CrossEntropyLoss(), optimizer=opt, batch_size=32, max_epoch=30,
                     features_col="embedding")])
    model = pipeline.fit(digits["few"])
    pred = model.transform(digits["held"])
    assert {"label", "prediction", "probability"} <= set(pred.schema.names) and "image" not in pred.schema.names
    accuracy = evaluate.accuracy(pred)
    assert accuracy >= 0.9, accuracy
    # saved and loaded: the same predictions; another format version is refused
    model.save(str(tmp_path / "m"))
    again = PipelineModel.load(str(tmp_path / "m")).transform(digits["held"]).to_pandas()
    np.testing.assert_array_equal(again["prediction"], pred.to_pandas()["prediction"])
    model.save(str(tmp_path / "m"))  # saved again over itself: the first save's stage files are gone
    manifest = json.loads((tmp_path / "m" / "pipeline.json").read_text())
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == sorted(
        ["pipeline.json", *(s["file"] for s in manifest["stages"])])
    stage0 = tmp_path / "m" / manifest["stages"][0]["file"]
    saved = stage0.read_bytes()
    stage0.write_bytes(saved[:100])  # truncated
    with pytest.raises(ArgumentError, match="the saved stage cannot be loaded"):
        PipelineModel.load(str(tmp_path / "m"))
    stage0.write_bytes(saved)
    (tmp_path / "m" / "pipeline.json").write_text(json.dumps({**manifest, "format": 99}))
    with pytest.raises(FormatVersionError, match="format 99"):
        PipelineModel.load(str(tmp_path / "m"))
    with pytest.raises(ArgumentError, match="no saved pipeline"):
        PipelineModel.load(str(tmp_path / "nothing"))


def test_params_setters_and_copy_like_spark_ml_and_scikit_learn():
    clf = NNClassifier(_mlp(), torch.nn.CrossEntropyLoss(), batch_size=32, features_col="image")
    assert clf.set_max_epoch(3).set_batch_size(64) is clf
    params = clf.get_params()
    assert (params["max_epoch"], params["batch_size"], params["features_col"]) == (3, 64, "image")
    other = clf.copy(max_epoch=7)
    assert other.max_epoch == 7 and clf.max_epoch == 3 and other.model is not clf.model
    with pytest.raises(ArgumentError, match="no parameter 'epochs'"):
        clf.copy(epochs=2)
    model = NNModel(torch.nn.Identity(), transform=_to_float, features_col="image")
    assert model.get_params()["transform"] is _to_float and callable(model.transform)
    assert model.set_transform(None).get_params()["transform"] is None
    with pytest.raises(ArgumentError, match="non-empty list of stages"):
        Pipeline([])


def test_nnmodel_runs_a_torchscript_file_and_refuses_one_that_is_not(digits, tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(64, 3))
    path = str(tmp_path / "net.pt")
    torch.jit.script(net).save(path)
    out = NNModel(path, transform=_to_float, features_col="image", prediction_col="z").transform(digits["held"])
    x = torch.from_numpy(np.stack(digits["held"].to_pandas()["image"])).float().div(255).flatten(1)
    np.testing.assert_allclose(np.stack(out.to_pandas()["z"]), net(x).detach().numpy(), rtol=1e-5, atol=1e-6)
    (tmp_path / "bad.pt").write_bytes(b"not a model")
    with pytest.raises(tg.errors.ModelLoadError, match="not a TorchScript file"):
        NNModel(str(tmp_path / "bad.pt"), features_col="image").transform(digits["held"])


def test_a_label_outside_the_models_classes_is_refused_before_training_wherever_it_is(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 3000)
    labels[2990] = 7  # in the last shard: no first batch sees it
    ds = tg.write(str(tmp_path / "d"), pd.DataFrame({"x": list(rng.random((3000, 4), dtype=np.float32)),
                                                    "label": labels}), shard_rows=1000)
    clf = NNClassifier(torch.nn.Linear(4, 5), torch.nn.CrossEntropyLoss(), features_col="x", max_epoch=1)
    with pytest.raises(tg.TrainingConfigError, match=r"'label' holds classes 0..7 but the model scores 5"):
        clf.fit(ds)
    labels[2990] = -100  # CrossEntropyLoss's ignore_index: allowed
    ds = tg.write(str(tmp_path / "e"), pd.DataFrame({"x": list(rng.random((3000, 4), dtype=np.float32)),
                                                    "label": labels}), shard_rows=1000)
    assert clf.fit(ds).history
