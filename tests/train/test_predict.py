"""Batch inference without a trainer: any nn.Module over every row of a dataset, once, in order."""

import numpy as np
import pyarrow as pa
import pytest
import torch

import tensorgrid as tg
from tensorgrid.errors import ArgumentError
from tensorgrid.train import predict


@pytest.fixture
def rows():
    """1,001 rows (no batch size divides them): an id, 4 features as a tensor column, a text column."""
    x = np.random.default_rng(0).normal(size=(1001, 4)).astype(np.float32)
    return tg.from_arrow(pa.table({"id": np.arange(1001), "x": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                                   "name": [f"row {i}" for i in range(1001)]})), x


def test_a_plain_module_predicts_every_row_once_in_order_whatever_rank_says(rows, monkeypatch):
    ds, x = rows
    monkeypatch.setenv("RANK", "1")  # a launcher's variables: predict runs over all rows anyway
    monkeypatch.setenv("WORLD_SIZE", "2")
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    out = predict(model, ds, "x", batch_size=100).to_pandas()
    assert list(out.columns) == ["id", "name", "prediction"]
    assert out["id"].tolist() == list(range(1001)) and out["name"][1000] == "row 1000"
    expected = model(torch.from_numpy(x)).detach().numpy().reshape(-1)
    np.testing.assert_allclose(out["prediction"].to_numpy(), expected, rtol=1e-6)


def test_several_outputs_per_row_come_back_as_a_tensor_column(rows):
    ds, x = rows
    model = torch.nn.Linear(4, 3)
    out = predict(model, ds, "x", keep=["id"], batch_size=256)
    assert out.schema.names == ["id", "prediction"]
    pred = np.stack(out.to_pandas()["prediction"])
    np.testing.assert_allclose(pred, model(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_a_classifier_gets_argmax_and_probabilities_written_to_out(rows, tmp_path):
    ds, x = rows
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Dropout(0.5))
    model.train()
    model[1].eval()  # flags that differ between submodules are put back as they were
    url = str(tmp_path / "pred")
    out = predict(model, ds, "x", transform=lambda b: {**b, "x": b["x"] * 2}, classifier=True, out=url, keep="id")
    assert isinstance(out, tg.Dataset) and tg.open(url).num_rows == 1001
    df = tg.open(url).to_pandas()
    assert list(df.columns) == ["id", "prediction", "probability"]
    logits = model.eval()(torch.from_numpy(x) * 2).detach()  # the transform ran; dropout was off
    np.testing.assert_array_equal(df["prediction"].to_numpy(), logits.argmax(dim=1).numpy())
    probs = np.stack(df["probability"])
    assert probs.dtype == np.float32 and probs.shape == (1001, 5)
    np.testing.assert_allclose(probs, torch.softmax(logits, dim=1).numpy(), rtol=1e-5, atol=1e-7)
    model.train()
    model[1].eval()
    predict(model, ds, "x", classifier=True)
    assert model.training and model[0].training and not model[1].training
    renamed = predict(model, ds, "x", classifier=True, keep="id", prediction_col="cls", probability_col="p")
    assert renamed.schema.names == ["id", "cls", "p"]
    with pytest.raises(ArgumentError, match="prediction_col must be a column name"):
        predict(model, ds, "x", prediction_col="")
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_named(rows):
    ds, _ = rows
    model = torch.nn.Linear(4, 1)
    with pytest.raises(tg.ColumnNotFoundError, match=r"missing: \['features'\]; columns: \['id', 'x', 'name'\]"):
        predict(model, ds)
    with pytest.raises(tg.ColumnNotFoundError, match="keep names 'label'"):
        predict(model, ds, "x", keep=["id", "label"])
    with pytest.raises(tg.ArgumentError, match="data must be a Dataset"):
        predict(model, ds.to_arrow(), "x")
    with pytest.raises(tg.ArgumentError, match="model must be an nn.Module"):
        predict(lambda t: t, ds, "x")
    with pytest.raises(tg.ArgumentError, match="batch_size"):
        predict(model, ds, "x", batch_size=0)


class _WidthClassifier(torch.nn.Module):
    """Scores class ``width - 4`` highest: images 4, 5, 6 pixels wide are classes 0, 1, 2."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.classes = classes

    def forward(self, width):
        return torch.nn.functional.one_hot(width.long() - 4, self.classes).float()


def _class_folders(root, widths: dict[str, int], n: int = 2):
    """A folder per class of PNGs ``widths[class]`` pixels wide."""
    from PIL import Image

    for label, w in widths.items():
        (root / label).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((3, w, 3), i, np.uint8)).save(root / label / f"{i}.png")
    return root


def test_predictions_of_an_ingested_image_folder_map_back_to_its_class_names(tmp_path):
    url = str(tmp_path / "imgs")
    tg.ingest_images(str(_class_folders(tmp_path / "a", {"dog": 5, "cat": 4})), url)
    tg.ingest_images(str(_class_folders(tmp_path / "b", {"ant": 6}, n=1)), url, mode="append")
    ds = tg.open(url)
    assert ds.label_names == ["cat", "dog", "ant"]
    out = predict(_WidthClassifier(), ds, "width", keep=["label"], classifier=True).to_pandas()
    assert list(out.columns) == ["label", "prediction", "probability", "prediction_label"]
    assert out["prediction_label"].tolist() == out["label"].tolist()  # the names, in the data's own order
    named = predict(_WidthClassifier(), ds, "width", keep=[], classifier=True, label_names=["x", "y", "z"])
    assert sorted(named.to_pandas()["prediction_label"]) == ["x", "x", "y", "y", "z"]
    assert "prediction_label" not in predict(_WidthClassifier(), ds, "width", keep=[]).schema.names


def test_label_names_that_do_not_fit_the_model_are_named(tmp_path, rows):
    ds, _ = rows
    with pytest.raises(tg.TensorGridError, match="scores 3 classes but there are 2 label names"):
        predict(torch.nn.Linear(4, 3), ds, "x", classifier=True, label_names=["a", "b"])
    with pytest.raises(tg.ArgumentError, match="pass classifier=True"):
        predict(torch.nn.Linear(4, 3), ds, "x", label_names=["a", "b", "c"])
    with pytest.raises(tg.ArgumentError, match="non-empty list of class names"):
        predict(torch.nn.Linear(4, 3), ds, "x", classifier=True, label_names="abc")
    assert "prediction_label" not in predict(torch.nn.Linear(4, 3), ds, "x", classifier=True).schema.names


def test_a_kept_list_column_comes_back_as_lists_whatever_each_batch_padded():
    """The loader hands a list column over padded per batch (with its lengths); predict gives back the lists."""
    t = pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(np.ones((300, 4), np.float32)),
                  "tokens": pa.array([list(range(i % 7)) for i in range(300)], pa.list_(pa.int64())),
                  "id": np.arange(300)})
    out = tg.predict(torch.nn.Linear(4, 2), tg.from_arrow(t), features="x", batch_size=64, keep=["id", "tokens"])
    got = out.to_arrow()
    assert got.schema.field("tokens").type == pa.list_(pa.int64())
    assert got.column("tokens").to_pylist() == t.column("tokens").to_pylist()


def test_kept_columns_with_nulls_in_some_batches_keep_the_datas_type(tmp_path):
    """Outputs are gathered per ~32k rows: a batch where a float column has nulls (a list from the loader)
    and one where it has none (a tensor), or a string column null in a whole batch, join as one type."""
    n = 3000
    x = np.random.default_rng(0).random((n, 4)).astype(np.float32)
    table = pa.table({"x": pa.FixedShapeTensorArray.from_numpy_ndarray(x),
                      "w": pa.array([None if i < 10 else float(i) for i in range(n)], pa.float32()),
                      "s": pa.array([None] * 300 + ["a"] * (n - 300), pa.string())})
    ds = tg.write(str(tmp_path / "d"), table)
    for out in (None, str(tmp_path / "o")):
        got = tg.predict(torch.nn.Linear(4, 2), ds, "x", batch_size=256, out=out).to_arrow()
        assert got.schema.field("w").type == pa.float32() and got.schema.field("s").type == pa.string()
        assert got.column("w").to_pylist() == table.column("w").to_pylist()
        assert got.column("s").to_pylist() == table.column("s").to_pylist()
